"""Tests for viq.image: bit-exact parity with the authors' preprocessing, sizes, modes, errors."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from viq.image import (
    load_image,
    normalize,
    pad_to_multiple,
    patch_grid,
    predict_grid,
    preprocess,
    reference_square_crop,
    resize_area,
    to_rgb,
    verify_image,
)

_FIXTURE_NAME = "reference-16k-d2-seed0.npz"
_REPO = Path(__file__).resolve().parents[2]
_FIXTURE_CANDIDATES = [
    _REPO / "shared" / "fixtures" / _FIXTURE_NAME,
    _REPO.parent / "shared" / "fixtures" / _FIXTURE_NAME,
]


@pytest.fixture(scope="module")
def reference():
    path = next((p for p in _FIXTURE_CANDIDATES if p.is_file()), None)
    if path is None:
        pytest.skip(f"reference fixture {_FIXTURE_NAME} not found")
    with np.load(path) as data:
        keys = [f"{k}_{i}" for i in range(4) for k in ("image", "preprocess", "pixels")]
        return {k: data[k] for k in keys + ["grid_hw"]}


# --- parity with the authors' preprocessing -------------------------------------------------------


def test_square_crop_reproduces_reference_pixels(reference):
    assert str(reference["preprocess_0"]) == "process_image:256"
    img = Image.fromarray(reference["image_0"])
    crop = reference_square_crop(img, 256)
    assert crop.size == (256, 256)
    assert np.array_equal(normalize(crop)[None].numpy(), reference["pixels_0"])
    x_3HW, grid = preprocess(patch_size=16, image=reference["image_0"], mode="square_crop", area=256 * 256)
    assert np.array_equal(x_3HW[None].numpy(), reference["pixels_0"])
    assert grid == tuple(reference["grid_hw"][0])


@pytest.mark.parametrize("i", [1, 2, 3])
def test_processor_path_reproduces_reference_pixels(reference, i):
    assert str(reference[f"preprocess_{i}"]) == "processor"
    pixels = normalize(reference[f"image_{i}"])
    assert pixels.dtype == torch.float32
    assert np.array_equal(pixels[None].numpy(), reference[f"pixels_{i}"])
    x_3HW, grid = preprocess(patch_size=16, image=Image.fromarray(reference[f"image_{i}"]), mode="none")
    assert grid == tuple(int(v) for v in reference["grid_hw"][i])
    h, w = reference[f"pixels_{i}"].shape[-2:]
    assert np.array_equal(x_3HW[:, :h, :w].numpy(), reference[f"pixels_{i}"][0])
    assert torch.all(x_3HW[:, h:, :] == 0) and torch.all(x_3HW[:, :, w:] == 0)


def test_normalize_in_float32_would_not_be_bit_exact(reference):
    # Guards the float64 choice documented in normalize(): the float32 formula differs.
    arr = reference["image_1"]
    x32 = (arr.astype(np.float32) / np.float32(255) - np.float32(0.5)) / np.float32(0.5)
    assert not np.array_equal(x32.transpose(2, 0, 1), reference["pixels_1"][0])


def test_reference_square_crop_portrait_truncates():
    img = Image.new("RGB", (300, 401), (10, 20, 30))
    crop = reference_square_crop(img, 128)
    # int(128 / 300 * 401) = 171, the crop box (0, 21.5, 128, 149.5) is rounded by PIL.
    assert crop.size == (128, 128)
    assert crop.getpixel((5, 5)) == (10, 20, 30)


# --- resize_area -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size", [(400, 300), (300, 400), (1920, 1080), (33, 900), (640, 2560), (1000, 1000), (17, 23)]
)
def test_resize_area_keeps_aspect_and_even_grid(size):
    width, height = size
    area = 384 * 384
    new_w, new_h = resize_area(width, height, area)
    s = math.sqrt(area / (width * height))
    for new, old in ((new_w, width), (new_h, height)):
        assert new % 32 == 0 and new >= 32
        assert abs(new - old * s) <= 16 or new == 32  # within half a step unless clamped up
    h, w = patch_grid(new_h, new_w, 16)
    assert h % 2 == 0 and w % 2 == 0


def test_resize_area_known_values():
    assert resize_area(400, 300, 384 * 384) == (448, 320)
    assert resize_area(384, 384, 384 * 384) == (384, 384)
    assert resize_area(400, 300, 384 * 384, multiple=16) == (448, 336)
    assert resize_area(100, 400, 256 * 256) == (128, 512)  # 1:4 stays 1:4


def test_resize_area_extreme_aspect():
    new_w, new_h = resize_area(16, 4096, 384 * 384)
    assert new_w == 32 and new_h == 6144
    new_w, new_h = resize_area(4096, 16, 64 * 64)
    assert (new_w, new_h) == (1024, 32)


def test_resize_area_bounds():
    new_w, new_h = resize_area(400, 300, 1024 * 1024, max_area=512 * 512)
    assert new_w * new_h <= 512 * 512 and new_w % 32 == 0 and new_h % 32 == 0
    assert new_w * new_h > 0.8 * 512 * 512
    assert new_w > new_h
    new_w, new_h = resize_area(400, 300, 64 * 64, min_area=256 * 256)
    assert new_w * new_h >= 256 * 256 and new_w % 32 == 0 and new_h % 32 == 0
    assert new_w * new_h < 1.3 * 256 * 256
    # Extreme aspect under a tight cap: the short side is clamped, the long side gives way.
    new_w, new_h = resize_area(16, 4096, 384 * 384, max_area=32 * 128)
    assert (new_w, new_h) == (32, 128)
    assert resize_area(400, 300, 384 * 384, min_area=1, max_area=10**9) == resize_area(400, 300, 384 * 384)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"multiple": 0}, "multiple"),
        ({"area": 0}, "area"),
        ({"area": -5.0}, "area"),
        ({"width": 0}, "width"),
        ({"height": -3}, "height"),
        ({"min_area": 500, "max_area": 100}, "min_area"),
        ({"min_area": 40 * 40, "max_area": 40 * 40}, "bounds"),
    ],
)
def test_resize_area_rejects_bad_values(kwargs, match):
    args = {"width": 400, "height": 300, "area": 384 * 384, **kwargs}
    with pytest.raises(ValueError, match=match):
        resize_area(**args)


# --- mode conversion -------------------------------------------------------------------------------


def test_rgba_over_white():
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., :3] = (10, 200, 30)
    rgba[0, :, 3] = 255
    rgba[1, :, 3] = 0
    rgba[2, :, 3] = 128
    out = np.asarray(to_rgb(Image.fromarray(rgba)))
    assert (out[0] == (10, 200, 30)).all()
    assert (out[1] == 255).all()
    expected = np.round(np.array([10, 200, 30]) * 128 / 255 + 255 * 127 / 255)
    assert np.abs(out[2].astype(int) - expected).max() <= 1


def test_la_and_palette_transparency_over_white():
    la = Image.merge("LA", [Image.new("L", (2, 2), 7), Image.new("L", (2, 2), 0)])
    assert (np.asarray(to_rgb(la)) == 255).all()
    pal = Image.new("P", (3, 2), 1)
    pal.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    pal.putpixel((0, 0), 0)
    pal.info["transparency"] = 0
    out = np.asarray(to_rgb(pal))
    assert tuple(out[0, 0]) == (255, 255, 255)
    assert tuple(out[1, 2]) == (200, 10, 10)


def test_palette_l_and_1_modes():
    pal = Image.new("P", (2, 2), 2)
    pal.putpalette([0, 0, 0, 0, 0, 0, 5, 6, 7] + [0] * 759)
    assert (np.asarray(to_rgb(pal)) == (5, 6, 7)).all()
    grey = Image.fromarray(np.array([[0, 77], [128, 255]], np.uint8))
    out = np.asarray(to_rgb(grey))
    assert out.shape == (2, 2, 3) and (out[..., 0] == [[0, 77], [128, 255]]).all()
    assert (out[..., 0] == out[..., 2]).all()
    bw = Image.new("1", (2, 1), 1)
    assert (np.asarray(to_rgb(bw)) == 255).all()


def test_16_bit_grey_scales_by_bit_depth():
    values = np.array([[0, 257, 32896, 65535]], np.uint16)
    img16 = Image.fromarray(values)
    assert img16.mode == "I;16"
    out = np.asarray(to_rgb(img16))
    assert out[0, :, 0].tolist() == [0, 1, 128, 255]
    big = Image.frombytes("I;16B", (4, 1), values.astype(">u2").tobytes())
    assert np.asarray(to_rgb(big))[0, :, 1].tolist() == [0, 1, 128, 255]
    as_i = Image.fromarray(values.astype(np.int32))
    assert np.asarray(to_rgb(as_i))[0, :, 2].tolist() == [0, 1, 128, 255]
    eight_bit_in_i = Image.fromarray(np.array([[0, 100, 255]], np.int32))
    assert np.asarray(to_rgb(eight_bit_in_i))[0, :, 0].tolist() == [0, 100, 255]


def test_float_mode():
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32))
    assert np.asarray(to_rgb(unit))[0, :, 0].tolist() == [0, 128, 255]
    wide = Image.fromarray(np.array([[-3.0, 100.0, 300.0, np.nan]], np.float32))
    assert np.asarray(to_rgb(wide))[0, :, 0].tolist() == [0, 100, 255, 0]


def test_cmyk_and_ycbcr():
    cmyk = Image.new("CMYK", (2, 2), (0, 255, 255, 0))
    assert (np.asarray(to_rgb(cmyk)) == (255, 0, 0)).all()
    white = Image.new("CMYK", (1, 1), (0, 0, 0, 0))
    assert (np.asarray(to_rgb(white)) == 255).all()
    ycc = Image.new("RGB", (2, 2), (40, 90, 200)).convert("YCbCr")
    assert np.abs(np.asarray(to_rgb(ycc)).astype(int) - (40, 90, 200)).max() <= 2


def test_rgb_passthrough():
    img = Image.new("RGB", (3, 3), (1, 2, 3))
    assert to_rgb(img) is img


def test_zero_size_image_rejected():
    with pytest.raises(ValueError, match="zero area"):
        to_rgb(Image.new("RGB", (0, 5)))
    with pytest.raises(ValueError, match="zero area"):
        preprocess(patch_size=16, image=Image.new("L", (7, 0)))
    with pytest.raises(ValueError, match="zero area"):
        preprocess(patch_size=16, image=np.zeros((0, 4, 3), np.uint8))


# --- files -----------------------------------------------------------------------------------------


def test_load_image_round_trip(tmp_path):
    arr = np.arange(5 * 7 * 3, dtype=np.uint8).reshape(5, 7, 3)
    path = tmp_path / "ok.png"
    Image.fromarray(arr).save(path)
    img = load_image(path)
    assert img.size == (7, 5)
    assert np.array_equal(np.asarray(img), arr)
    x_3HW, grid = preprocess(patch_size=16, image=str(path), mode="resize", area=32 * 32)
    assert x_3HW.shape == (3, 32, 32) and grid == (2, 2)


def test_load_image_errors(tmp_path):
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"this is not an image at all" * 10)
    with pytest.raises(ValueError, match="garbage.jpg"):
        load_image(garbage)
    with pytest.raises(ValueError, match="not found"):
        load_image(tmp_path / "missing.png")
    full = tmp_path / "full.png"
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(full)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated.png"):
        load_image(truncated)


def test_corrupt_png_data_behind_an_intact_header_is_refused(tmp_path):
    """Issue 13, case 8: Pillow's load() decodes this file, to other pixels; its chunk checksum does not match."""
    from bad_files import corrupt_png_keeping_checksums, silently_corrupt_png

    path = tmp_path / "bad.png"
    Image.new("RGB", (64, 48), (200, 30, 30)).save(path)
    assert verify_image(path) == (64, 48)
    silently_corrupt_png(path)
    with Image.open(path) as img:
        img.load()  # no error from Pillow's decoder
    for check in (verify_image, load_image):
        with pytest.raises(ValueError, match="bad.png.*checksum"):
            check(path)
    # damage that keeps the checksums right passes verify_image, and the full decode catches it
    noise = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(noise)
    corrupt_png_keeping_checksums(noise)
    assert verify_image(noise) == (32, 32)
    with pytest.raises(ValueError, match="noise.png"):
        load_image(noise)


# --- preprocess ------------------------------------------------------------------------------------


def test_preprocess_resize_range_and_grid():
    rng = np.random.default_rng(1)
    arr = rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)
    arr[0, 0] = 0
    arr[0, 1] = 255
    x_3HW, grid = preprocess(patch_size=16, image=arr, area=256 * 256)
    new_w, new_h = resize_area(400, 300, 256 * 256)
    assert x_3HW.dtype == torch.float32 and x_3HW.shape == (3, new_h, new_w)
    assert grid == (new_h // 16, new_w // 16) and grid[0] % 2 == 0 and grid[1] % 2 == 0
    assert x_3HW.min() >= -1.0 and x_3HW.max() <= 1.0
    assert x_3HW.min() < -0.9 and x_3HW.max() > 0.9


def test_preprocess_none_pads_and_rejects_tiny():
    arr = np.full((20, 33, 3), 255, np.uint8)
    x_3HW, grid = preprocess(patch_size=16, image=arr, mode="none")
    assert x_3HW.shape == (3, 32, 48) and grid == (2, 3)
    assert torch.all(x_3HW[:, :20, :33] == 1.0) and torch.all(x_3HW[:, 20:] == 0.0)
    with pytest.raises(ValueError, match="15x40"):
        preprocess(patch_size=16, image=np.zeros((40, 15, 3), np.uint8), mode="none")


def test_preprocess_rejects_unknown_mode_and_inputs():
    with pytest.raises(ValueError, match="'crop'"):
        preprocess(patch_size=16, image=np.zeros((32, 32, 3), np.uint8), mode="crop")
    with pytest.raises(ValueError, match="float32"):
        preprocess(patch_size=16, image=np.zeros((32, 32, 3), np.float32))
    with pytest.raises(ValueError, match="multiple"):
        preprocess(patch_size=16, image=np.zeros((32, 32, 3), np.uint8), multiple=24)


def test_pad_to_multiple_and_patch_grid():
    x = torch.ones(3, 17, 32)
    y = pad_to_multiple(x, 16)
    assert y.shape == (3, 32, 32) and y[:, 17:].abs().sum() == 0 and y[:, :17].eq(1).all()
    assert pad_to_multiple(y, 16) is y
    assert patch_grid(17, 32, 16) == (2, 2) and patch_grid(16, 1, 16) == (1, 1)
    assert patch_grid(28, 29, 14) == (2, 3)
    with pytest.raises(ValueError, match="height=0"):
        patch_grid(0, 16, 16)


@pytest.mark.parametrize("patch_size, multiple, ok", [(16, 48, False), (16, 8, False), (16, 16, True), (16, 64, True),
                                                      (14, 28, True), (14, 32, False), (14, 14, True)])
def test_multiple_fits_the_patch_size(patch_size, multiple, ok):
    image = np.zeros((60, 90, 3), np.uint8)
    if not ok:
        with pytest.raises(ValueError, match=f"{patch_size}-pixel patches"):
            preprocess(image, patch_size=patch_size, multiple=multiple, area=56 * 84)
        return
    x_3HW, grid = preprocess(image, patch_size=patch_size, multiple=multiple, area=56 * 84)
    assert x_3HW.shape[-2] % multiple == 0 and x_3HW.shape[-1] % multiple == 0
    assert grid == (x_3HW.shape[-2] // patch_size, x_3HW.shape[-1] // patch_size)
    assert predict_grid(90, 60, patch_size=patch_size, multiple=multiple, area=56 * 84) == grid


@pytest.mark.parametrize("mode", ["resize", "none", "square_crop"])
def test_predicted_grid_is_the_preprocessed_grid_at_patch_14(mode):
    image = np.zeros((101, 250, 3), np.uint8)
    _, grid = preprocess(image, patch_size=14, mode=mode, area=112 * 112, multiple=28)
    assert predict_grid(250, 101, patch_size=14, mode=mode, area=112 * 112, multiple=28) == grid
