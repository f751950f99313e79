"""Write one benchmark's section of BENCHMARKS.md, leaving every other section as it is.

A section runs from its `## ` title to the next `## ` title. Each benchmark script replaces its own section with
`--write` (or appends it when the file has none yet); hand-written notes below an optional marker line in the old
section are carried over into the new one.
"""

from __future__ import annotations

from pathlib import Path


def replace_section(path: Path, title: str, section: str, notes_marker: str | None = None) -> None:
    """Put `section` (starting with `title`, which may be a prefix of the heading) in place of the old one."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    start = text.find(title)
    if start < 0:
        path.write_text(text.rstrip("\n") + "\n\n" + section.rstrip("\n") + "\n")
        return
    following = text.find("\n## ", start + len(title))
    end = len(text) if following < 0 else following + 1
    old_section = text[start:end]
    if notes_marker is not None and notes_marker in old_section:
        head = section[: section.index(notes_marker)] if notes_marker in section else section.rstrip("\n") + "\n\n"
        section = head + old_section[old_section.index(notes_marker) :]
    rest = text[end:]
    path.write_text(text[:start] + section.rstrip("\n") + "\n" + ("\n" + rest if rest else ""))
