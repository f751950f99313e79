"""The image path: safe loading of every mode and failure, the resize policy, tensors and patchify.

Every test image is written here with Pillow into tmp_path; nothing is downloaded.
"""

from __future__ import annotations

import gc
import io
import math
import os
import pickle
import re
import struct
import threading
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from monovlm.config import VisionConfig
from monovlm.data.images import (
    ImageLoadError,
    ImagePathError,
    image_path_under,
    grid_size,
    group_by_size,
    image_to_tensor,
    load_image,
    num_image_tokens,
    patchify,
    random_shifts,
    resized_size,
)
from monovlm.data.layout import TokenLayout

WIDTH, HEIGHT = 37, 23  # deliberately non-square and not multiples of anything


def _save(image: Image.Image, path, **params) -> str:
    image.save(path, **params)
    return str(path)


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def _close(actual, expected, tolerance: int = 0) -> bool:
    return all(abs(a - e) <= tolerance for a, e in zip(actual, expected))


# ---------------------------------------------------------------------------------------------------------------------
# Modes


def _palette_image() -> Image.Image:
    image = Image.new("P", (WIDTH, HEIGHT), 1)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0, 0, 0] * 254)  # index 1 = red
    return image


# (name, image factory, save format, expected RGB, tolerance). The expected colour also proves the mode was
# interpreted correctly (e.g. 16-bit white must not come out as anything but white, CMYK paper must be white).
MODE_CASES = [
    ("1", lambda: Image.new("1", (WIDTH, HEIGHT), 1), "PNG", (255, 255, 255), 0),
    ("L", lambda: Image.new("L", (WIDTH, HEIGHT), 100), "PNG", (100, 100, 100), 0),
    ("P", _palette_image, "PNG", (255, 0, 0), 0),
    ("LA", lambda: Image.new("LA", (WIDTH, HEIGHT), (100, 255)), "PNG", (100, 100, 100), 0),
    ("RGBA", lambda: Image.new("RGBA", (WIDTH, HEIGHT), (10, 20, 30, 255)), "PNG", (10, 20, 30), 0),
    ("RGB", lambda: Image.new("RGB", (WIDTH, HEIGHT), (10, 200, 30)), "JPEG", (10, 200, 30), 6),
    ("CMYK", lambda: Image.new("CMYK", (WIDTH, HEIGHT), (0, 0, 0, 0)), "JPEG", (255, 255, 255), 4),
    ("I;16", lambda: Image.new("I;16", (WIDTH, HEIGHT), 65535), "PNG", (255, 255, 255), 0),
    ("I", lambda: Image.new("I", (WIDTH, HEIGHT), 100), "TIFF", (100, 100, 100), 0),
    ("F", lambda: Image.new("F", (WIDTH, HEIGHT), 50.0), "TIFF", (50, 50, 50), 0),
]


@pytest.mark.parametrize("mode, factory, file_format, expected, tolerance", MODE_CASES, ids=[c[0] for c in MODE_CASES])
def test_every_mode_loads_as_rgb(tmp_path, mode, factory, file_format, expected, tolerance):
    path = _save(factory(), tmp_path / f"image.{file_format.lower()}", format=file_format)
    with Image.open(path) as reopened:
        assert reopened.mode == mode  # the file really holds the mode under test
    image = load_image(path)
    assert image.mode == "RGB"
    assert image.size == (WIDTH, HEIGHT)
    assert _close(image.getpixel((WIDTH // 2, HEIGHT // 2)), expected, tolerance)


def test_transparent_rgba_pixels_take_the_background(tmp_path):
    image = Image.new("RGBA", (4, 2), (255, 0, 0, 0))  # fully transparent red
    image.putpixel((1, 0), (255, 0, 0, 255))  # opaque red
    image.putpixel((2, 0), (255, 0, 0, 128))  # half-transparent red
    path = _save(image, tmp_path / "alpha.png")
    loaded = load_image(path, background=(0, 128, 255))
    assert loaded.getpixel((0, 0)) == (0, 128, 255)
    assert loaded.getpixel((1, 0)) == (255, 0, 0)
    assert _close(loaded.getpixel((2, 0)), (128, 64, 127), tolerance=1)  # blended half and half
    assert load_image(path).getpixel((0, 0)) == (255, 255, 255)  # default background is white, not black


def test_transparent_la_pixel_takes_the_background(tmp_path):
    path = _save(Image.new("LA", (3, 3), (0, 0)), tmp_path / "la.png")
    assert load_image(path, background=(1, 2, 3)).getpixel((1, 1)) == (1, 2, 3)


def test_palette_transparency_takes_the_background(tmp_path):
    image = Image.new("P", (4, 2), 0)
    image.putpalette([255, 0, 0, 0, 255, 0] + [0, 0, 0] * 254)  # 0 = red (transparent), 1 = green
    image.paste(1, (2, 0, 4, 2))  # right half green
    path = _save(image, tmp_path / "palette.png", transparency=0)
    with Image.open(path) as reopened:
        assert reopened.mode == "P" and "transparency" in reopened.info
    loaded = load_image(path, background=(0, 0, 255))
    assert loaded.getpixel((0, 0)) == (0, 0, 255)  # transparent red became the background, not red
    assert loaded.getpixel((3, 1)) == (0, 255, 0)


def test_exif_orientation_6_rotates_clockwise(tmp_path):
    # Stored 40 wide × 20 tall, red block in the stored top-left; orientation 6 means "rotate 90° clockwise to view",
    # so the viewer sees 20 wide × 40 tall with the red block in the top-right.
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation
    path = _save(image, tmp_path / "phone.jpg", exif=exif.tobytes(), quality=95)
    loaded = load_image(path)
    assert loaded.size == (20, 40)
    assert _close(loaded.getpixel((15, 4)), (255, 0, 0), tolerance=40)  # top-right: red
    assert _close(loaded.getpixel((4, 4)), (0, 0, 255), tolerance=40)  # top-left: blue
    assert _close(loaded.getpixel((15, 35)), (0, 0, 255), tolerance=40)


COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]


@pytest.mark.parametrize("file_format", ["GIF", "PNG", "WEBP"])  # GIF, APNG, animated WebP
def test_animation_gives_the_first_frame(tmp_path, file_format):
    frames = [Image.new("RGB", (16, 12), colour) for colour in COLOURS]
    params = {"lossless": True} if file_format == "WEBP" else {}
    path = _save(frames[0], tmp_path / f"anim.{file_format.lower()}", format=file_format, save_all=True,
                 append_images=frames[1:], duration=100, loop=0, **params)
    with Image.open(path) as reopened:
        assert reopened.n_frames == 3  # the file really is animated
    loaded = load_image(path)
    assert loaded.size == (16, 12)
    assert _close(loaded.getpixel((8, 6)), COLOURS[0], tolerance=2)


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257 * 100, 65535, 1000]], dtype=np.uint16)  # 16-bit levels
    path = _save(Image.fromarray(values), tmp_path / "deep.png")
    with Image.open(path) as reopened:
        assert reopened.mode == "I;16"
    loaded = np.asarray(load_image(path))  # (1, 4, 3)
    assert loaded[0, :, 0].tolist() == [0, 100, 255, 4]  # 1000/257 ≈ 3.9; Pillow's own convert would give 255
    assert (loaded[..., 0] == loaded[..., 1]).all() and (loaded[..., 1] == loaded[..., 2]).all()


def test_int_and_float_images_are_stretched_to_their_range(tmp_path):
    ints = Image.fromarray(np.array([[0, 500, 1000]], dtype=np.int32))
    floats = Image.fromarray(np.array([[-1.0, 0.0, 1.0]], dtype=np.float32))
    assert (ints.mode, floats.mode) == ("I", "F")
    assert np.asarray(load_image(_save(ints, tmp_path / "i.tif")))[0, :, 0].tolist() == [0, 128, 255]
    assert np.asarray(load_image(_save(floats, tmp_path / "f.tif")))[0, :, 0].tolist() == [0, 128, 255]


# ---------------------------------------------------------------------------------------------------------------------
# Sources


def test_bytes_and_pil_inputs(tmp_path):
    data = _png_bytes(Image.new("RGBA", (5, 3), (9, 8, 7, 255)))
    loaded = load_image(data)
    assert (loaded.mode, loaded.size, loaded.getpixel((0, 0))) == ("RGB", (5, 3), (9, 8, 7))
    assert load_image(bytearray(data)).size == (5, 3)

    original = Image.new("LA", (5, 3), (50, 255))
    converted = load_image(original)
    assert converted is not original and original.mode == "LA"  # the caller's image is left alone
    assert converted.getpixel((0, 0)) == (50, 50, 50)
    rgb = Image.new("RGB", (2, 2))
    assert load_image(rgb) is not rgb

    with pytest.raises(TypeError):
        load_image(12345)  # type: ignore[arg-type]


def test_errors_name_the_source(tmp_path):
    with pytest.raises(ImageLoadError, match=r"image <bytes> is empty"):
        load_image(b"")
    with pytest.raises(ImageLoadError, match=r"upload\.jpg.*is not an image"):
        load_image(b"definitely not pixels", name="upload.jpg")
    error = pytest.raises(ImageLoadError, load_image, tmp_path / "gone.png").value
    assert isinstance(error, ValueError)
    clone = pickle.loads(pickle.dumps(error))  # survives the trip out of a DataLoader worker
    assert (type(clone), str(clone), clone.reason) == (ImageLoadError, str(error), "does not exist")


def _truncated(tmp_path, file_format: str) -> str:
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, file_format)
    data = buffer.getvalue()
    path = tmp_path / f"cut.{file_format.lower()}"
    path.write_bytes(data[: len(data) // 2])
    return str(path)


def _huge_png(tmp_path, width: int, height: int) -> str:
    """A valid tiny PNG whose IHDR (with a correct CRC) claims `width` × `height`."""
    data = bytearray(_png_bytes(Image.new("L", (1, 1))))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # CRC over chunk type + data
    path = tmp_path / f"bomb_{width}x{height}.png"
    path.write_bytes(bytes(data))
    return str(path)


def _noise_file(tmp_path) -> str:
    path = tmp_path / "noise.png"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return str(path)


def _empty_file(tmp_path) -> str:
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    return str(path)


def _directory(tmp_path) -> str:
    path = tmp_path / "folder.png"
    path.mkdir()
    return str(path)


FAILURES = [
    ("missing", lambda tmp: str(tmp / "missing.png"), {}, "missing.png", r"does not exist"),
    ("directory", _directory, {}, "folder.png", r"is a directory"),
    ("empty", _empty_file, {}, "empty.png", r"is empty"),
    ("truncated png", lambda tmp: _truncated(tmp, "PNG"), {}, "cut.png", r"is truncated or corrupt"),
    ("truncated jpeg", lambda tmp: _truncated(tmp, "JPEG"), {}, "cut.jpeg", r"is truncated or corrupt"),
    ("random bytes", _noise_file, {}, "noise.png", r"is not an image"),
    # Over our limit only: refused by our header check, with the declared size in the message.
    ("over our limit", lambda tmp: _huge_png(tmp, 9000, 9000), {}, "bomb_9000x9000.png",
     r"has 9000x9000 = 81000000 pixels, over the limit of 64000000"),
    # Pillow warns here (89M < 100M < 178M): that warning must become our error, not leak out.
    ("pillow warning", lambda tmp: _huge_png(tmp, 10000, 10000), {"max_source_pixels": 10**12},
     "bomb_10000x10000.png", r"pixels, over Pillow's decompression-bomb limit"),
    # Pillow raises here (1e10 > 178M) while opening.
    ("pillow error", lambda tmp: _huge_png(tmp, 100000, 100000), {}, "bomb_100000x100000.png",
     r"has 10000000000 pixels, over .*limit"),
    ("low limit", lambda tmp: _save(Image.new("RGB", (64, 48)), tmp / "small.png"), {"max_source_pixels": 1000},
     "small.png", r"has 64x48 = 3072 pixels, over the limit of 1000"),
]


@pytest.mark.parametrize("make, kwargs, file_name, reason", [c[1:] for c in FAILURES], ids=[c[0] for c in FAILURES])
def test_bad_images_raise_image_load_error(tmp_path, make, kwargs, file_name, reason):
    path = make(tmp_path)
    filters_before = list(warnings.filters)
    bomb_limit_before = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings(record=True) as escaped:
        warnings.simplefilter("always")  # record rather than raise, so our own guard is what is tested
        with pytest.raises(ImageLoadError) as caught:
            load_image(path, **kwargs)
    assert [str(w.message) for w in escaped] == []  # nothing escapes as a warning either
    message = str(caught.value)
    assert file_name in message
    assert re.search(reason, message), message
    # Our guard is local: neither the warning filters nor Pillow's global limit changed.
    assert warnings.filters == filters_before
    assert Image.MAX_IMAGE_PIXELS == bomb_limit_before


def test_huge_header_bytes_are_refused_before_decoding(tmp_path):
    data = open(_huge_png(tmp_path, 9000, 9000), "rb").read()
    with pytest.raises(ImageLoadError, match=r"image <bytes> has 9000x9000"):
        load_image(data)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts open descriptors through /proc")
def test_no_file_handles_left_open(tmp_path):
    good = _save(Image.new("RGB", (8, 8)), tmp_path / "good.png")
    bad = [_truncated(tmp_path, "PNG"), _noise_file(tmp_path), _huge_png(tmp_path, 9000, 9000)]
    before = len(os.listdir("/proc/self/fd"))
    with warnings.catch_warnings(record=True) as caught:
        # A leaked handle is closed by the garbage collector with a ResourceWarning from __del__, where an "error"
        # filter could not raise; record instead, and count descriptors too.
        warnings.simplefilter("always", ResourceWarning)
        for _ in range(3):
            load_image(good)
            for path in bad:
                with pytest.raises(ImageLoadError):
                    load_image(path)
        gc.collect()
    assert [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)] == []
    assert len(os.listdir("/proc/self/fd")) == before


# ---------------------------------------------------------------------------------------------------------------------
# Resize policy

CONFIGS = {
    "linear30": VisionConfig(embedder="linear", patch_size=30, merge=1),
    "conv16x2": VisionConfig(embedder="conv", patch_size=16, merge=2),
    "eve14x2": VisionConfig(embedder="eve", patch_size=14, merge=2),
}
# Tight budgets: one token only, and min == max just above one token (ceil can overshoot, then must be pulled back).
TIGHT_CONFIGS = {
    "one_token": VisionConfig(embedder="linear", patch_size=30, merge=1, min_pixels=900, max_pixels=900),
    "min_eq_max": VisionConfig(embedder="conv", patch_size=16, merge=2, min_pixels=1100, max_pixels=1100),
}
SIZES = [(1, 4000), (4000, 1), (7, 7), (4000, 3000), (3000, 4000), (1, 1), (33, 65), (480, 640), (1080, 1920),
         (100, 37), (224, 224), (10, 1000)]
EXTREME = {(1, 4000), (4000, 1), (10, 1000)}


@pytest.mark.parametrize("config_name", list(CONFIGS) + list(TIGHT_CONFIGS))
def test_resized_size_is_multiples_within_budget(config_name):
    config = {**CONFIGS, **TIGHT_CONFIGS}[config_name]
    unit = config.pixels_per_token
    for height, width in SIZES:
        out_h, out_w = resized_size(height, width, config)
        assert out_h > 0 and out_w > 0 and out_h % unit == 0 and out_w % unit == 0, (height, width, out_h, out_w)
        assert out_h * out_w <= config.max_pixels, (height, width, out_h, out_w)
        if config_name in CONFIGS:
            assert out_h * out_w >= config.min_pixels, (height, width, out_h, out_w)
        # The orientation is never flipped.
        assert (out_h >= out_w) == (height >= width) or out_h == out_w, (height, width, out_h, out_w)


@pytest.mark.parametrize("config_name", list(CONFIGS))
def test_resized_size_keeps_the_aspect_ratio(config_name):
    config = CONFIGS[config_name]
    unit = config.pixels_per_token
    for height, width in SIZES:
        if (height, width) in EXTREME:
            continue
        out_h, out_w = resized_size(height, width, config)
        # Each side is within one unit of the same scaled original side, so the true ratio lies in this interval.
        low = (out_h - unit) / (out_w + unit)
        high = (out_h + unit) / (out_w - unit) if out_w > unit else math.inf
        assert low <= height / width <= high, (height, width, out_h, out_w)


@pytest.mark.parametrize("config_name", list(CONFIGS))
def test_extreme_aspect_ratio_fills_the_long_side(config_name):
    config = CONFIGS[config_name]
    unit = config.pixels_per_token
    longest = config.max_pixels // unit // unit * unit  # the largest multiple with unit * longest <= max_pixels
    assert resized_size(1, 4000, config) == (unit, longest)
    assert resized_size(4000, 1, config) == (longest, unit)


def test_resized_size_known_values():
    conv, linear, eve = CONFIGS["conv16x2"], CONFIGS["linear30"], CONFIGS["eve14x2"]
    assert resized_size(4000, 3000, conv) == (288, 192)  # shrunk by sqrt(12e6 / 65536), floored to 32s
    assert resized_size(33, 65, conv) == (32, 64)  # already in budget: nearest multiples
    assert resized_size(7, 7, conv) == (32, 32)
    assert resized_size(1, 1, conv) == (32, 32)
    assert resized_size(48, 48, conv) == (64, 64)  # 1.5 units rounds half up (round() would give 64 too: even)
    assert resized_size(80, 80, conv) == (96, 96)  # 2.5 units: half up, where Python's round() would give 64
    assert resized_size(7, 7, linear) == (60, 60)  # 30×30 = 900 < min 1024: scaled up and ceiled
    assert resized_size(1, 4000, linear) == (30, 2160)
    assert resized_size(7, 7, eve) == (56, 56)
    assert resized_size(5, 5, TIGHT_CONFIGS["min_eq_max"]) == (32, 32)  # ceil overshoots 1100, pulled back


@pytest.mark.parametrize("height, width", [(0, 10), (10, 0), (-1, 5)])
def test_resized_size_rejects_non_positive_sizes(height, width):
    with pytest.raises(ValueError, match="positive"):
        resized_size(height, width, CONFIGS["conv16x2"])


def test_grid_and_token_count():
    for config in CONFIGS.values():
        unit = config.pixels_per_token
        for height, width in SIZES:
            out_h, out_w = resized_size(height, width, config)
            rows, cols = grid_size(height, width, config)
            assert (rows * unit, cols * unit) == (out_h, out_w)
            expected = (1 if config.use_cls else 0) + rows * (cols + (1 if config.use_row_separator else 0))
            assert num_image_tokens(height, width, config) == expected

    counts = {}
    for use_cls in (True, False):
        for use_row_separator in (True, False):
            config = VisionConfig(use_cls=use_cls, use_row_separator=use_row_separator)
            assert grid_size(4000, 3000, config) == (9, 6)
            counts[use_cls, use_row_separator] = num_image_tokens(4000, 3000, config)
    assert counts == {(True, True): 1 + 9 * 7, (True, False): 1 + 54, (False, True): 63, (False, False): 54}


@pytest.mark.parametrize("use_cls", [True, False])
@pytest.mark.parametrize("use_row_separator", [True, False])
def test_token_layout_is_cls_then_rows_closed_by_separators(use_cls, use_row_separator):
    vision = VisionConfig(use_cls=use_cls, use_row_separator=use_row_separator)
    layout = TokenLayout.of(2, 3, vision)
    expected = ([(-1, -1)] if use_cls else []) + [
        cell for r in range(2) for cell in [(r, c) for c in range(3)] + ([(-1, -1)] if use_row_separator else [])]
    assert list(zip(layout.grid_row.tolist(), layout.grid_col.tolist())) == expected
    assert layout.is_patch.tolist() == [row >= 0 for row, _ in expected]
    assert layout.num_tokens == len(expected) and (layout.rows, layout.cols) == (2, 3)
    grid = [(int(layout.grid_row[i]), int(layout.grid_col[i])) for i in layout.patch_index]
    assert grid == [(r, c) for r in range(2) for c in range(3)]  # row-major, structural tokens skipped
    unit = vision.pixels_per_token
    pixels = torch.zeros(3, 2 * unit, 3 * unit)
    assert torch.equal(TokenLayout.for_image(pixels, vision).is_patch, layout.is_patch)
    for height, width in SIZES:  # the processor's count is the layout's
        rows, cols = grid_size(height, width, vision)
        assert num_image_tokens(height, width, vision) == TokenLayout.of(rows, cols, vision).num_tokens


def test_group_by_size_keeps_first_seen_order():
    images = [torch.zeros(3, 8, 12), torch.zeros(3, 12, 8), torch.zeros(3, 8, 12), torch.zeros(1, 4, 4)]
    assert group_by_size(images) == {(8, 12): [0, 2], (12, 8): [1], (4, 4): [3]}


# ---------------------------------------------------------------------------------------------------------------------
# Tensors and patches


def test_image_to_tensor_shape_and_normalisation():
    image = Image.new("RGB", (100, 40), (255, 0, 0))  # 100 wide, 40 tall
    image.paste((0, 0, 255), (50, 0, 100, 40))  # right half blue
    config = CONFIGS["conv16x2"]
    pixels = image_to_tensor(image, config)
    assert pixels.shape == (3, *resized_size(40, 100, config)) == (3, 32, 96)
    assert pixels.dtype == torch.float32
    assert pixels.min() >= -1.0 - 1e-6 and pixels.max() <= 1.0 + 1e-6  # mean = std = 0.5 maps [0, 1] to [-1, 1]
    assert torch.allclose(pixels[:, 16, 5], torch.tensor([1.0, -1.0, -1.0]), atol=1e-6)  # red, left
    assert torch.allclose(pixels[:, 16, 90], torch.tensor([-1.0, -1.0, 1.0]), atol=1e-6)  # blue, right

    imagenet = VisionConfig(image_mean=(0.485, 0.456, 0.406), image_std=(0.229, 0.224, 0.225))
    white = image_to_tensor(Image.new("RGB", (64, 64), (255, 255, 255)), imagenet)
    expected = (1 - torch.tensor(imagenet.image_mean)) / torch.tensor(imagenet.image_std)
    assert torch.allclose(white[:, 10, 10], expected, atol=1e-6)

    with pytest.raises(ValueError, match="RGB"):
        image_to_tensor(Image.new("L", (64, 64)), config)


def _unpatchify(patches: torch.Tensor, patch: int, channels: int) -> torch.Tensor:
    """Reassemble by explicit loops, independent of the reshape trick under test."""
    rows, cols, _ = patches.shape
    image = torch.empty(channels, rows * patch, cols * patch)
    for row in range(rows):
        for col in range(cols):
            block = patches[row, col].view(patch, patch, channels).permute(2, 0, 1)  # (C, ph, pw)
            image[:, row * patch : (row + 1) * patch, col * patch : (col + 1) * patch] = block
    return image


def test_patchify_round_trips():
    pixels = torch.randn(3, 64, 96)
    patches = patchify(pixels, 32)
    assert patches.shape == (2, 3, 32 * 32 * 3)
    assert torch.equal(_unpatchify(patches, 32, 3), pixels)

    batch = torch.randn(2, 3, 28, 56)
    batched = patchify(batch, 14)
    assert batched.shape == (2, 2, 4, 14 * 14 * 3)
    for index in range(2):
        assert torch.equal(batched[index], patchify(batch[index], 14))
        assert torch.equal(_unpatchify(batched[index], 14, 3), batch[index])


def test_patchify_flattens_in_ph_pw_c_order():
    pixels = torch.arange(8.0).view(2, 2, 2)  # (C=2, H=2, W=2): value = c*4 + h*2 + w
    flat = patchify(pixels, 2)[0, 0]
    # (ph, pw, C): (0,0,c0) (0,0,c1) (0,1,c0) (0,1,c1) (1,0,c0) ...
    assert flat.tolist() == [0.0, 4.0, 1.0, 5.0, 2.0, 6.0, 3.0, 7.0]


@pytest.mark.parametrize("shape, patch", [((3, 65, 96), 32), ((3, 64, 90), 32), ((2, 3, 30, 28), 14), ((64, 64), 32)])
def test_patchify_rejects_bad_shapes(shape, patch):
    with pytest.raises(ValueError):
        patchify(torch.zeros(shape), patch)


def test_concurrent_loads_leave_the_warning_filters_alone(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    good = _save(Image.new("RGB", (8, 8), (1, 2, 3)), tmp_path / "good.png")
    warned = _huge_png(tmp_path, 10000, 10000)  # makes Pillow warn, which we turn into an error under our guard
    filters_before = list(warnings.filters)

    def load(index: int):
        try:
            return load_image(good if index % 2 else warned, max_source_pixels=10**12).getpixel((0, 0))
        except ImageLoadError as error:
            return error.reason

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(load, range(40)))
    assert all(result == (1, 2, 3) for result in results[1::2])
    assert all("decompression-bomb" in result for result in results[0::2])
    assert warnings.filters == filters_before


def test_a_fifo_or_a_device_is_refused_without_blocking(tmp_path):
    # opening a FIFO for reading blocks until some writer appears: the loader must refuse it without opening it
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    outcome: list[BaseException] = []
    worker = threading.Thread(target=lambda: outcome.append(pytest.raises(ImageLoadError, load_image, fifo).value),
                              daemon=True)
    worker.start()
    worker.join(timeout=10)
    if worker.is_alive():  # unblock the hung open so the test process can end, then fail
        with open(fifo, "wb"):
            pass
        pytest.fail("load_image blocked on a FIFO")
    assert outcome and outcome[0].reason == "is not a regular file (it is a FIFO)"
    (tmp_path / "link.png").symlink_to(fifo)  # a link to one is no better
    assert "FIFO" in pytest.raises(ImageLoadError, load_image, tmp_path / "link.png").value.reason
    assert pytest.raises(ImageLoadError, load_image, tmp_path / "a\0.png").value.reason == (
        "is not a usable path (embedded null byte)")
    if os.path.exists("/dev/zero"):  # an endless character device would otherwise be read forever
        error = pytest.raises(ImageLoadError, load_image, "/dev/zero").value
        assert error.reason == "is not a regular file (it is a character device)"


def test_image_path_under_resolves_links_and_refuses_what_leaves_the_folder(tmp_path):
    root, store = tmp_path / "images", tmp_path / "store"
    root.mkdir()
    store.mkdir()
    (root / "a.png").write_bytes(b"")
    (root / "alias.png").symlink_to(root / "a.png")
    (root / "out.png").symlink_to(store / "b.png")
    (root / "loop.png").symlink_to(root / "loop.png")
    assert image_path_under(root, "a.png") == root.resolve() / "a.png"
    assert image_path_under(root, "alias.png") == root.resolve() / "a.png"
    assert image_path_under(root, "not/yet/there.png") == root.resolve() / "not/yet/there.png"  # the loader's job
    assert str(pytest.raises(ImagePathError, image_path_under, root, "out.png").value) == (
        f"image path 'out.png' escapes the image root {root.resolve()} through a symbolic link to "
        f"{store.resolve() / 'b.png'}")
    for name in ("../x.png", "/etc/hostname", "sub/../../x.png"):
        assert "escapes the image root" in str(pytest.raises(ImagePathError, image_path_under, root, name).value)
    assert "cannot be resolved" in str(pytest.raises(ImagePathError, image_path_under, root, "loop.png").value)
    assert "cannot be resolved" in str(pytest.raises(ImagePathError, image_path_under, root, "a\0.png").value)


def test_random_shifts_translate_each_image_within_the_bound_and_draw_by_key():
    images = []
    for _ in range(6):
        image = torch.zeros(3, 16, 16)
        image[:, 8, 8] = 1.0  # one bright pixel on a flat background: where it lands is the shift
        images.append(image)
    shifted = random_shifts(images, 3, "seed/step")
    offsets = [tuple(int(v) - 8 for v in torch.nonzero(image[0])[0]) for image in shifted]
    assert all(max(abs(dy), abs(dx)) <= 3 for dy, dx in offsets)
    assert len(set(offsets)) > 1  # each image its own draw
    assert all(torch.equal(a, b) for a, b in zip(shifted, random_shifts(images, 3, "seed/step")))
    other = random_shifts(images, 3, "seed/next step")
    assert any(not torch.equal(a, b) for a, b in zip(shifted, other))
    assert all(a is b for a, b in zip(random_shifts(images, 0, "seed/step"), images))
