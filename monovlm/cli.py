"""`monovlm <verb>`: each verb is a typed function; its signature and docstring are the command-line interface.

litgpt-style: the function is the source of truth, so the CLI and the Python API cannot drift apart. The functions
live in commands.py and are listed in COMMANDS below (commands.py never imports this module). Parameters without
defaults become positional arguments (required `--flags` when keyword-only), positional-only ones with a default
optional positional arguments (`def serve(model: Path | None = None, /)` is `monovlm serve [MODEL]`), the rest
`--flags`; `bool` defaults become `--flag/--no-flag`.
"""

from __future__ import annotations

import argparse
import inspect
import sys
import typing
from collections.abc import Callable
from pathlib import Path

from monovlm.commands import (
    chat,
    compare_command,
    data_shard,
    data_synth,
    eval_command,
    generate_text,
    quickstart,
    recipes_command,
    serve,
    teacher_features,
    train_command,
    train_tokenizer,
)
from monovlm.errors import run_command

# verb -> function, in the order `monovlm --help` lists them; "group verb" makes a subcommand ("data synth")
COMMANDS: dict[str, Callable] = {
    "generate-text": generate_text,
    "train-tokenizer": train_tokenizer,
    "data synth": data_synth,
    "data shard": data_shard,
    "train": train_command,
    "recipes": recipes_command,
    "teacher features": teacher_features,
    "quickstart": quickstart,
    "eval": eval_command,
    "compare": compare_command,
    "chat": chat,
    "serve": serve,
}


def _parse_docstring(function: Callable) -> tuple[str, dict[str, str]]:
    """(summary, {param: help}) from a docstring whose `Args:` lines read `name: help`."""
    doc = inspect.getdoc(function) or ""
    summary, _, rest = doc.partition("\nArgs:\n")
    helps = {}
    for line in rest.splitlines():
        name, sep, text = line.strip().partition(": ")
        if sep:
            helps[name] = text
    return summary.strip(), helps


def _add_parameter(parser: argparse.ArgumentParser, param: inspect.Parameter, hint, help_text: str) -> None:
    origin = typing.get_origin(hint)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = args[0] if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) and args else hint
    is_list = typing.get_origin(base) in (list, tuple)
    element = typing.get_args(base)[0] if is_list else base
    converter = element if element in (int, float, str, Path) else str
    flag = "--" + param.name.replace("_", "-")
    if param.kind is inspect.Parameter.POSITIONAL_ONLY and param.default is not inspect.Parameter.empty:
        parser.add_argument(param.name, type=converter, nargs="*" if is_list else "?", default=param.default,
                            help=help_text)
        return
    if param.default is inspect.Parameter.empty and param.kind is inspect.Parameter.KEYWORD_ONLY:
        parser.add_argument(flag, dest=param.name, type=converter, nargs="+" if is_list else None, required=True,
                            help=help_text)
    elif param.default is inspect.Parameter.empty:
        parser.add_argument(param.name, type=converter, nargs="+" if is_list else None, help=help_text)
    elif base is bool:
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=param.default, help=help_text)
    elif is_list:  # repeatable flag (`--image a.png --image b.png`), so it never swallows a positional argument
        parser.add_argument(flag, dest=param.name, type=converter, action="append", default=param.default,
                            help=f"{help_text} (repeatable)")
    else:
        parser.add_argument(flag, dest=param.name, type=converter, default=param.default,
                            help=f"{help_text} (default: {param.default})")


def build_parser() -> argparse.ArgumentParser:
    from monovlm import __version__

    parser = argparse.ArgumentParser(
        prog="monovlm",
        description="Encoder-free vision-language models: build, train, speed up, evaluate and serve them.",
    )
    parser.add_argument("--version", action="version", version=f"monovlm {__version__}")
    verbs = parser.add_subparsers(dest="command", metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {}
    for name, function in COMMANDS.items():
        summary, helps = _parse_docstring(function)
        first_line = summary.splitlines()[0] if summary else ""
        group_name, _, verb = name.rpartition(" ")  # "data synth" -> a "data" group holding "synth"
        if group_name:
            if group_name not in groups:
                group = verbs.add_parser(group_name, help=f"{group_name} commands")
                groups[group_name] = group.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
            sub = groups[group_name].add_parser(verb, help=first_line, description=summary)
        else:
            sub = verbs.add_parser(name, help=first_line, description=summary)
        hints = typing.get_type_hints(function)
        for param in inspect.signature(function).parameters.values():
            _add_parameter(sub, param, hints.get(param.name, str), helps.get(param.name, ""))
        sub.set_defaults(_function=function, _name=name)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    function = args._function
    kwargs = {k: v for k, v in vars(args).items() if k not in ("command", "subcommand", "_function", "_name")}
    positional = [kwargs.pop(p.name) for p in inspect.signature(function).parameters.values()
                  if p.kind is inspect.Parameter.POSITIONAL_ONLY]
    # an error the user can fix (ours, a full disk, a damaged file) is one line naming the file, exit 2; a bug raises
    return run_command(args._name, function, *positional, **kwargs)


if __name__ == "__main__":
    sys.exit(main())
