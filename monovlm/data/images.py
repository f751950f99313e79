"""The one image path of monovlm: safe loading, the resize policy, pixels to tensors, and patchify.

Training, evaluation, chat and the server all go through these functions, so an image is seen the same way
everywhere:

    load_image(path | bytes | PIL image)  ->  RGB PIL image        (refuses bombs, applies EXIF, flattens alpha)
    resized_size / grid_size              ->  target size           (native aspect ratio, area budget, no padding)
    num_image_tokens                      ->  placeholder count     (`TokenLayout`, shared by processor and model)
    image_to_tensor                       ->  (3, H, W) float32     (bicubic resize, normalised)
    patchify                              ->  (rows, cols, p*p*C)   (Fuyu's (ph, pw, C) order)
    group_by_size                         ->  same-size batches     (images of one size batch without padding)

Loading is strict: anything that is not a complete, readable image of a supported format raises `ImageLoadError`,
whose message names the image and the reason. Datasets catch it to skip and count bad samples.
"""

from __future__ import annotations

import io
import math
import os
import random
import re
import stat
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from monovlm.config import VisionConfig
from monovlm.data.layout import TokenLayout, pooled_grid

# Formats we decode. An allowlist rather than everything Pillow knows: some plugins hand untrusted bytes to outside
# programs (EPS runs Ghostscript) or to rarely exercised decoders, and a server reads images from anyone.
# (Phone JPEGs that Pillow reports as MPO open through "JPEG".)
SUPPORTED_FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP", "DIB", "TIFF", "PPM", "AVIF", "JPEG2000")

# Magic bytes of the common formats: bytes that start like an image but fail to open are a damaged image, not a
# non-image, and saying so helps whoever has to fix the data.
_MAGIC_PREFIXES = (
    b"\x89PNG\r\n\x1a\n",
    b"\xff\xd8\xff",
    b"GIF87a",
    b"GIF89a",
    b"BM",
    b"II*\x00",
    b"MM\x00*",
)

# 16-bit grayscale modes (and their byte orders); Pillow's own convert("L") clips them at 255 instead of scaling.
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")

# `warnings.catch_warnings` swaps process-wide state (until Python 3.14); serialise our own uses of it so that two
# threads loading images at once cannot leave each other's filter behind. Only the cheap header read runs under it.
_WARNINGS_LOCK = threading.Lock()


class ImageLoadError(ValueError):
    """An image that cannot be used; the message names the image (path, "<bytes>" or a given name) and the reason."""

    def __init__(self, source: str, reason: str) -> None:
        self.source = source
        self.reason = reason
        super().__init__(f"image {source} {reason}")

    def __reduce__(self):  # keep the two-argument form through pickling (e.g. out of DataLoader workers)
        return (type(self), (self.source, self.reason))


class ImagePathError(ValueError):
    """An image name that leaves its image folder; the message names the image, the folder and the reason."""


def image_path_under(root: str | os.PathLike, name: str | os.PathLike) -> Path:
    """`name` joined to the image folder `root`, symlinks resolved; `ImagePathError` if the file it names is not
    inside `root` (`..`, an absolute name, or a link pointing out of the folder).

    The one rule for every reader of image folders (training and evaluation alike): a data file may only reach the
    images its folder holds, however its links are laid out. A link farm into a shared store is refused; pass the
    store itself as the image root instead.
    """
    base = Path(root).resolve()
    try:
        path = (base / name).resolve()  # not strict: a missing image is the loader's error to name, not this one's
    except (OSError, RuntimeError, ValueError) as error:  # a link loop, a NUL in the name, a name too long
        raise ImagePathError(f"image path {str(name)!r} under {base} cannot be resolved ({error})") from error
    if not path.is_relative_to(base):
        lexical = Path(os.path.normpath(base / name))
        how = f" through a symbolic link to {path}" if lexical.is_relative_to(base) else ""
        raise ImagePathError(f"image path {str(name)!r} escapes the image root {base}{how}")
    return path


# ---------------------------------------------------------------------------------------------------------------------
# Loading


def load_image(
    source: str | os.PathLike | bytes | Image.Image,
    max_source_pixels: int = 64_000_000,
    background: tuple[int, int, int] = (255, 255, 255),
    name: str | None = None,
) -> Image.Image:
    """Open a path, raw bytes or a PIL image and return a fully decoded RGB image, or raise `ImageLoadError`.

    - The header-declared width × height is checked against `max_source_pixels` before any pixel is decoded, so a
      small file that would expand to gigabytes is refused cheaply. Pillow's own decompression-bomb limit
      (`PIL.Image.MAX_IMAGE_PIXELS`) still applies on top and is turned into `ImageLoadError` too.
    - Animations (GIF, APNG, WebP) give their first frame.
    - EXIF orientation is applied, so the pixels are upright as a viewer would show them.
    - Every mode becomes RGB; transparency is composited onto `background`; 16-bit grayscale is scaled, not clipped;
      32-bit int and float images have no standard range, so their own [min, max] is stretched to [0, 255].
    - The pixels are decoded here, so a truncated file fails now rather than later inside a batch (unless the
      application set Pillow's process-wide `ImageFile.LOAD_TRUNCATED_IMAGES`, which we do not override).
    `name` replaces the path / "<bytes>" in error messages (e.g. the dataset entry or the upload's file name).
    """
    _check_background(background)
    if isinstance(source, Image.Image):
        label = name or _image_label(source)
        return _finish(source, label, max_source_pixels, background)
    if isinstance(source, (bytes, bytearray, memoryview)):
        label = name or "<bytes>"
        data = bytes(source)
        if not data:
            raise ImageLoadError(label, "is empty (0 bytes)")
        return _load_from_stream(io.BytesIO(data), data[:16], label, max_source_pixels, background)
    if isinstance(source, (str, os.PathLike)):
        return _load_from_path(Path(source), name, max_source_pixels, background)
    raise TypeError(f"load_image takes a path, bytes or a PIL image, not {type(source).__name__}")


def image_header_size(path: str | os.PathLike, name: str | None = None) -> tuple[int, int]:
    """(height, width) of the image file at `path` as its header declares them, without decoding a pixel: a cheap
    size for planning, e.g. how many visual tokens a sample will have. EXIF orientation is not applied (for some
    formats reading it means decoding the image), so a rotated photo's sides may be swapped compared with what
    `load_image` returns. Raises `ImageLoadError` where `load_image` would for the path or the header."""
    path = Path(path)
    label = name or f"'{path}'"
    _check_regular_file(path, label)
    try:
        with _open_regular(path, label) as file:
            prefix = file.read(16)
            if not prefix:
                raise ImageLoadError(label, "is empty (0 bytes)")
            with open_header(file, prefix, label) as image:
                width, height = image.size
    except OSError as error:  # permission denied, I/O error, ... (decoding errors are already ImageLoadError)
        raise ImageLoadError(label, f"cannot be read ({error.strerror or error})") from error
    return height, width


def _check_regular_file(path: Path, label: str) -> None:
    try:
        kind = path.stat().st_mode  # follows links: what matters is what the open would read
    except FileNotFoundError:
        raise ImageLoadError(label, "does not exist") from None
    except OSError as error:  # permission denied on a parent folder, a name too long, ...
        raise ImageLoadError(label, f"cannot be read ({error.strerror or error})") from error
    except ValueError as error:  # a NUL byte in the name: no file can have it
        raise ImageLoadError(label, f"is not a usable path ({error})") from error
    if stat.S_ISDIR(kind):
        raise ImageLoadError(label, "is a directory, not an image file")
    if not stat.S_ISREG(kind):
        # Opening a FIFO blocks until a writer appears (the loader would hang), and a device may never end or may
        # act on being opened; an image is always a regular file.
        raise ImageLoadError(label, f"is not a regular file (it is a {_file_kind(kind)})")


def _load_from_path(
    path: Path, name: str | None, max_source_pixels: int, background: tuple[int, int, int]
) -> Image.Image:
    label = name or f"'{path}'"
    _check_regular_file(path, label)
    try:
        with _open_regular(path, label) as file:  # our own handle, closed on every path out, success or error
            prefix = file.read(16)
            if not prefix:
                raise ImageLoadError(label, "is empty (0 bytes)")
            return _load_from_stream(file, prefix, label, max_source_pixels, background)
    except OSError as error:  # permission denied, I/O error, ... (decoding errors are already ImageLoadError)
        raise ImageLoadError(label, f"cannot be read ({error.strerror or error})") from error


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISSOCK, "socket")):
        if test(mode):
            return kind
    return "special file"


def _open_regular(path: Path, label: str) -> io.BufferedReader:
    """Open for reading without blocking, then check the opened file itself: the path may have been replaced by a
    FIFO since it was checked, and O_NONBLOCK keeps even that open from hanging."""
    nonblocking = getattr(os, "O_NONBLOCK", 0)  # POSIX only; elsewhere FIFOs are not files on a path anyway
    descriptor = os.open(path, os.O_RDONLY | nonblocking)
    try:
        kind = os.fstat(descriptor).st_mode
        if not stat.S_ISREG(kind):
            raise ImageLoadError(label, f"is not a regular file (it is a {_file_kind(kind)})")
        if nonblocking:
            os.set_blocking(descriptor, True)  # a regular file: ordinary blocking reads from here on
        return os.fdopen(descriptor, "rb")
    except BaseException:
        os.close(descriptor)
        raise


def _load_from_stream(
    stream: io.BufferedIOBase,
    prefix: bytes,
    label: str,
    max_source_pixels: int,
    background: tuple[int, int, int],
) -> Image.Image:
    image = open_header(stream, prefix, label)
    with image:  # releases whatever Pillow holds for the lazily opened file (TIFF/MPO may keep extra state)
        return _finish(image, label, max_source_pixels, background)


def open_header(stream: io.BufferedIOBase, prefix: bytes, label: str) -> Image.ImageFile.ImageFile:
    """Identify the format and read the header only (no pixel data); map every failure to `ImageLoadError`."""
    stream.seek(0)
    with _WARNINGS_LOCK, warnings.catch_warnings():
        # Pillow warns (rather than raises) between MAX_IMAGE_PIXELS and twice that; make it an error here only.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            return Image.open(stream, formats=SUPPORTED_FORMATS)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            raise ImageLoadError(label, _pillow_bomb_reason(error)) from error
        except UnidentifiedImageError as error:
            if prefix.startswith(_MAGIC_PREFIXES) or (prefix[:4] == b"RIFF" and prefix[8:12] == b"WEBP"):
                raise ImageLoadError(label, "is truncated or corrupt (its header cannot be read)") from error
            supported = ", ".join(SUPPORTED_FORMATS)
            raise ImageLoadError(label, f"is not an image (or not in a supported format: {supported})") from error
        except Exception as error:  # a damaged header can surface as OSError, ValueError, struct.error, ...
            raise ImageLoadError(label, f"is truncated or corrupt ({type(error).__name__}: {error})") from error


def _pillow_bomb_reason(error: Exception) -> str:
    found = re.search(r"\((\d+) pixels\) exceeds limit of (\d+)", str(error))
    if found is None:
        return f"is over Pillow's decompression-bomb limit ({error}); refusing to decode it"
    pixels, limit = found.groups()
    return f"has {pixels} pixels, over Pillow's decompression-bomb limit of {limit}; refusing to decode it"


def _finish(
    image: Image.Image, label: str, max_source_pixels: int, background: tuple[int, int, int]
) -> Image.Image:
    """Size check (header only), full decode, EXIF orientation, RGB. Returns a new image; `image` is not changed."""
    width, height = image.size
    if width * height > max_source_pixels:
        raise ImageLoadError(
            label,
            f"has {width}x{height} = {width * height} pixels, over the limit of {max_source_pixels} "
            "(max_source_pixels); refusing to decode it",
        )
    # The current frame right after opening is frame 0, so animations give their first frame without seeking;
    # deliberately no `n_frames`/`is_animated`, which would walk (and decode headers of) every frame.
    try:
        image.load()
    except Exception as error:  # truncated data: OSError; broken chunks: SyntaxError, zlib.error, ValueError, ...
        raise ImageLoadError(label, f"is truncated or corrupt ({type(error).__name__}: {error})") from error
    try:
        upright = ImageOps.exif_transpose(image)  # always a new image, detached from the file
    except Exception as error:
        raise ImageLoadError(label, f"has unreadable EXIF metadata ({type(error).__name__}: {error})") from error
    return _to_rgb(upright, background)


def _image_label(image: Image.Image) -> str:
    filename = getattr(image, "filename", "")
    return f"'{filename}'" if filename else "<PIL image>"


def _check_background(background: Sequence[int]) -> None:
    if len(background) != 3 or not all(isinstance(v, int) and 0 <= v <= 255 for v in background):
        raise ValueError(f"background={background!r} must be three integers in [0, 255] (an RGB colour)")


# ---------------------------------------------------------------------------------------------------------------------
# Modes


def _to_rgb(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Any Pillow mode -> RGB. Transparency (alpha band or a palette/tRNS transparent colour) goes onto `background`."""
    if image.mode in _SIXTEEN_BIT_MODES:
        image = _sixteen_bit_to_l(image)
    elif image.mode in ("I", "F"):
        image = _stretch_to_l(image)
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")  # also turns a palette's transparent index into alpha
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")  # copies when already RGB, so the caller's image is never shared


def _sixteen_bit_to_l(image: Image.Image) -> Image.Image:
    """16-bit grayscale: map 0..65535 onto 0..255 (Pillow's convert would clip everything above 255 to white)."""
    values = np.asarray(image).astype(np.float32)  # (H, W), any byte order
    return Image.fromarray(np.rint(values / 257.0).astype(np.uint8))


def _stretch_to_l(image: Image.Image) -> Image.Image:
    """32-bit int / float images carry no standard range: stretch the image's own [min, max] onto [0, 255].

    A constant image has no range to stretch; its value is clipped to [0, 255]. NaNs become the minimum.
    """
    values = np.asarray(image).astype(np.float64)  # (H, W)
    finite = np.isfinite(values)
    if not finite.any():
        return Image.new("L", image.size, 0)
    low, high = values[finite].min(), values[finite].max()
    values = np.clip(np.where(finite, values, low), low, high)
    scaled = (values - low) * (255.0 / (high - low)) if high > low else np.clip(values, 0, 255)
    return Image.fromarray(np.rint(scaled).astype(np.uint8))


# ---------------------------------------------------------------------------------------------------------------------
# Resize policy


def resized_size(height: int, width: int, config: VisionConfig) -> tuple[int, int]:
    """The (H, W) an image of `height` × `width` is resized to before it becomes visual tokens.

    Native aspect ratio, no padding: each side is a positive multiple of `config.pixels_per_token`, the area is
    brought into [min_pixels, max_pixels] as Qwen2-VL's smart_resize does, and H * W <= max_pixels always holds
    (min_pixels is a target; for extreme aspect ratios only max_pixels can be guaranteed).
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got height={height}, width={width}")
    unit = config.pixels_per_token
    # Nearest multiple (halves round up), at least one multiple per side.
    new_height = max(unit, _round_half_up(height / unit) * unit)
    new_width = max(unit, _round_half_up(width / unit) * unit)
    if new_height * new_width > config.max_pixels:
        # Same factor on both sides keeps the shape; flooring keeps the area under the budget (unless a side is
        # clamped at one multiple, handled below).
        scale = math.sqrt(height * width / config.max_pixels)
        new_height = max(unit, math.floor(height / scale / unit) * unit)
        new_width = max(unit, math.floor(width / scale / unit) * unit)
    elif new_height * new_width < config.min_pixels:
        scale = math.sqrt(config.min_pixels / (height * width))
        new_height = math.ceil(height * scale / unit) * unit
        new_width = math.ceil(width * scale / unit) * unit
    return _fit_area(new_height, new_width, unit, config.max_pixels)


def _round_half_up(value: float) -> int:
    return math.floor(value + 0.5)  # Python's round() rounds halves to even, which is surprising for sizes


def _fit_area(height: int, width: int, unit: int, max_pixels: int) -> tuple[int, int]:
    """Enforce H * W <= max_pixels by shrinking the long side first (extreme ratios like 1×4000), then the other.

    Terminates within budget because config validation guarantees max_pixels >= unit².
    """
    if height * width <= max_pixels:
        return height, width
    if height >= width:
        height = max(unit, max_pixels // width // unit * unit)
        if height * width > max_pixels:  # the long side is already one multiple; the short one must give too
            width = max(unit, max_pixels // height // unit * unit)
    else:
        width = max(unit, max_pixels // height // unit * unit)
        if height * width > max_pixels:
            height = max(unit, max_pixels // width // unit * unit)
    return height, width


def grid_size(height: int, width: int, config: VisionConfig) -> tuple[int, int]:
    """(rows, cols) of visual tokens for an image of original size `height` × `width`."""
    new_height, new_width = resized_size(height, width, config)
    return new_height // config.pixels_per_token, new_width // config.pixels_per_token


def num_image_tokens(height: int, width: int, config: VisionConfig, pool: int | None = None) -> int:
    """Placeholder positions for one image of original size `height` × `width` (processor and model agree).

    The `TokenLayout` of its grid, pooled by `pool` (default: `config.token_pool`): an optional CLS token, then the
    grid row by row, each row optionally followed by a row-separator token, then any learnable queries. Image
    begin/end markers are ordinary text tokens and are not counted.
    """
    rows, cols = pooled_grid(*grid_size(height, width, config), pool or config.token_pool)
    return TokenLayout.of(rows, cols, config).num_tokens


def max_image_tokens(config: VisionConfig) -> int:
    """The most placeholder positions any image can take under `config` (an upper bound for planning lengths).

    A resized image has rows × cols <= max_pixels / pixels_per_token² tokens in its grid; with a row separator after
    each row the most positions come from a one-column grid of that many rows."""
    grid = config.max_pixels // config.pixels_per_token**2
    return int(config.use_cls) + grid * (2 if config.use_row_separator else 1) + config.num_queries


# ---------------------------------------------------------------------------------------------------------------------
# Pixels


def image_to_tensor(image: Image.Image, config: VisionConfig) -> torch.Tensor:
    """RGB image -> (3, H, W) float32 at `resized_size`, scaled to [0, 1] then normalised by config mean/std."""
    if image.mode != "RGB":
        raise ValueError(f"image_to_tensor expects an RGB image, got mode {image.mode!r}; load it with load_image")
    new_height, new_width = resized_size(image.height, image.width, config)
    if (new_height, new_width) != (image.height, image.width):
        # reducing_gap=None: one exact bicubic pass, no cheaper pre-reduction, so every caller gets identical pixels.
        image = image.resize((new_width, new_height), Image.Resampling.BICUBIC, reducing_gap=None)
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8))  # (H, W, 3), a writable copy
    pixels = pixels.permute(2, 0, 1).to(torch.float32) / 255.0  # (3, H, W) in [0, 1]
    mean = torch.tensor(config.image_mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(config.image_std, dtype=torch.float32).view(3, 1, 1)
    return ((pixels - mean) / std).contiguous()  # (3, H, W)


def patchify(pixels: torch.Tensor, patch: int) -> torch.Tensor:
    """(C, H, W) -> (H/patch, W/patch, patch*patch*C), or (B, C, H, W) -> (B, rows, cols, patch*patch*C).

    Each patch is flattened in (ph, pw, C) order, as Fuyu does, so a Fuyu-style linear projection reads it as is.
    """
    if patch <= 0:
        raise ValueError(f"patch={patch} must be positive")
    if pixels.dim() not in (3, 4):
        raise ValueError(f"patchify expects (C, H, W) or (B, C, H, W), got shape {tuple(pixels.shape)}")
    batched = pixels.dim() == 4
    images = pixels if batched else pixels.unsqueeze(0)  # (B, C, H, W)
    batch, channels, height, width = images.shape
    if height % patch or width % patch:
        raise ValueError(f"image size {height}x{width} is not a multiple of patch={patch}")
    rows, cols = height // patch, width // patch
    patches = images.reshape(batch, channels, rows, patch, cols, patch)  # (B, C, rows, ph, cols, pw)
    patches = patches.permute(0, 2, 4, 3, 5, 1)  # (B, rows, cols, ph, pw, C)
    patches = patches.reshape(batch, rows, cols, patch * patch * channels)  # (B, rows, cols, ph*pw*C)
    return patches if batched else patches[0]


def shift_image(image: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Translate (C, H, W) by (dy, dx) pixels, filling the uncovered border by repeating the edge (background)."""
    if dy == 0 and dx == 0:
        return image
    pad = max(abs(dy), abs(dx))
    height, width = image.shape[1:]
    padded = F.pad(image[None].float(), (pad, pad, pad, pad), mode="replicate")[0]
    return padded[:, pad - dy:pad - dy + height, pad - dx:pad - dx + width].to(image.dtype)


def random_shifts(images: Sequence[torch.Tensor], max_shift: int, key: str) -> list[torch.Tensor]:
    """Each (C, H, W) image translated by its own (dy, dx), each drawn uniformly from [-max_shift, max_shift] by `key`
    (e.g. seed, step and micro-batch: a resumed run draws the same). Training-time augmentation: a patch embedder is
    not shift-equivariant below its patch, so a shape must be learnt at every offset to the patch grid."""
    if max_shift <= 0:
        return list(images)
    draw = random.Random(key)
    return [shift_image(image, draw.randint(-max_shift, max_shift), draw.randint(-max_shift, max_shift))
            for image in images]


def group_by_size(images: Sequence[torch.Tensor]) -> dict[tuple[int, int], list[int]]:
    """Indices of `images` (..., H, W) grouped by (H, W), in first-seen order: each group stacks into one batch
    without padding (native aspect ratios give many sizes)."""
    groups: dict[tuple[int, int], list[int]] = {}
    for index, image in enumerate(images):
        groups.setdefault(tuple(image.shape[-2:]), []).append(index)
    return groups
