"""Native-resolution image preprocessing for the ViQ encoder (Pillow + numpy + torch only).

The encoder sees each image at (close to) its own aspect ratio: an area-preserving resize to sides
that are multiples of `multiple` (32 by default, so a 16-pixel patch grid is even, which the MLLM
projector's 2x2 pooling needs), a normalisation to [-1, 1] with mean = std = 0.5, and a zero pad to
whole patches (zero is mid-grey after normalisation). The ViQ authors' two input paths are
reproduced bit for bit: their processor (normalise only, then pad) and their demo's square crop.

Shape legend:
    x_3HW   normalised image, 3 channels, H x W pixels (float32, values in [-1, 1])
    (h, w)  patch grid: h = ceil(H / p), w = ceil(W / p) for the encoder's patch size p
PIL sizes are (width, height); tensors and grids are (height, width). The patch size is always the
encoder's (EncoderConfig.patch_size), passed in by the caller: SigLIP-style towers come in 14 and 16.
"""

from __future__ import annotations

import math
import numbers
import os
import struct
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

MODES = ("resize", "none", "square_crop")

_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_INT_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})


def _open_error(path, err: Exception) -> ValueError:
    if isinstance(err, FileNotFoundError):
        return ValueError(f"cannot read image {str(path)!r}: file not found")
    if isinstance(err, UnidentifiedImageError):
        return ValueError(f"cannot read image {str(path)!r}: not a recognised image format")
    # Pillow reports truncated or corrupt data as OSError, bad checksums as SyntaxError, a few short
    # reads as struct.error or EOFError
    return ValueError(f"cannot read image {str(path)!r}: {err}")


_IMAGE_ERRORS = (OSError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError)


def verify_image(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) of the image at `path` once Pillow's integrity checks pass (for PNG, every
    chunk's checksum), without decoding the pixels; ValueError naming the file otherwise.

    A PNG whose compressed data is damaged can still decode, to wrong pixels, without an error: the
    checksums are what tells. Formats without checks of their own (JPEG) pass on a readable header.
    """
    try:
        with Image.open(path) as img:
            size = img.size
            img.verify()
    except _IMAGE_ERRORS as err:
        raise _open_error(path, err) from err
    return size


def load_image(path: str | os.PathLike) -> Image.Image:
    """Verify (verify_image) and fully decode the image at `path`, so that corrupt data fails here,
    naming the file, rather than reaching the model as wrong pixels or failing mid-batch."""
    verify_image(path)
    try:
        with Image.open(path) as img:  # Pillow's verify leaves the image unusable: open it again
            img.load()
    except _IMAGE_ERRORS as err:
        raise _open_error(path, err) from err
    return img


def _check_nonempty(img: Image.Image) -> None:
    if img.width <= 0 or img.height <= 0:
        raise ValueError(f"image has zero area: size (width, height) = {img.size}")


def _composite_over_white(img: Image.Image) -> Image.Image:
    # Transparent pixels carry arbitrary colour values; white is the conventional backdrop and keeps
    # fully transparent regions from showing up as black blocks in the codes.
    rgba = img.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _int_gray_to_l(img: Image.Image) -> Image.Image:
    # Pillow's own convert() clips 16/32-bit grey at 255, which turns most pictures white; scale by
    # the bit depth instead. "I;16*" modes are 16-bit by definition. Mode "I" does not say how many
    # bits are used (16-bit PNGs and 8-bit data converted to "I" both land there), so the smallest
    # of 8/16/32 bits that holds the maximum value decides. Negative values have no standard display
    # mapping and are clipped to 0.
    arr = np.asarray(img).astype(np.float64)
    if img.mode == "I":
        peak = float(arr.max()) if arr.size else 0.0
        bits = next(b for b in (8, 16, 32) if peak <= 2**b - 1)
    else:
        bits = 16
    scaled = np.clip(arr, 0, None) * (255.0 / (2**bits - 1))
    return Image.fromarray(np.floor(scaled + 0.5).astype(np.uint8))


def _float_gray_to_l(img: Image.Image) -> Image.Image:
    # Float images come either as [0, 1] intensities or on the 0..255 scale; values all inside
    # [0, 1] are read as the former. NaN becomes black so one bad pixel cannot poison a batch.
    arr = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=255.0, neginf=0.0)
    if arr.size and arr.min() >= 0.0 and arr.max() <= 1.0:
        arr = arr * 255.0
    scaled = np.clip(arr, 0.0, 255.0)
    return Image.fromarray(np.floor(scaled + 0.5).astype(np.uint8))


def to_rgb(img: Image.Image) -> Image.Image:
    """Return `img` as an 8-bit RGB image (the same object when it already is one)."""
    if not isinstance(img, Image.Image):
        raise ValueError(f"expected a PIL image, got {type(img).__name__}")
    _check_nonempty(img)
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode in _ALPHA_MODES:
        return _composite_over_white(img)
    if mode in _INT_MODES:
        return _int_gray_to_l(img).convert("RGB")
    if mode == "F":
        return _float_gray_to_l(img).convert("RGB")
    if "transparency" in img.info:
        return _composite_over_white(img)
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as err:
        raise ValueError(f"cannot convert image mode {mode!r} to RGB: {err}") from err


def check_multiple(multiple: int, patch_size: int) -> None:
    """A resize multiple must give whole patches: the patch size itself, or a multiple of two patches
    (an even patch grid, which the projector's 2x2 pooling needs)."""
    ok = isinstance(multiple, numbers.Integral) and multiple > 0
    if not ok or (multiple != patch_size and multiple % (2 * patch_size) != 0):
        raise ValueError(
            f"multiple must be {patch_size} or a positive multiple of {2 * patch_size} "
            f"(an even grid of {patch_size}-pixel patches for 2x2 pooling), got {multiple!r}"
        )


def _check_patch_size(patch_size: int) -> None:
    if not isinstance(patch_size, numbers.Integral) or patch_size <= 0:
        raise ValueError(f"patch_size must be a positive integer, got {patch_size!r}")


def _snap(x: float, multiple: int, how: str) -> int:
    """Snap a side length to a multiple of `multiple`, never below one `multiple`."""
    q = x / multiple
    # Round half up, not Python's round-half-to-even, so that sizes grow monotonically with area.
    steps = {"round": math.floor(q + 0.5), "floor": math.floor(q), "ceil": math.ceil(q)}[how]
    return max(int(steps), 1) * int(multiple)


def _fit(width: int, height: int, area: float, multiple: int, how: str) -> tuple[int, int]:
    s = math.sqrt(area / (width * height))
    return _snap(width * s, multiple, how), _snap(height * s, multiple, how)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_resize_args(width, height, area, min_area, max_area) -> None:
    for name, value in (("width", width), ("height", height)):
        if not isinstance(value, numbers.Integral) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    for name, value in (("area", area), ("min_area", min_area), ("max_area", max_area)):
        if value is not None and not (_is_real(value) and math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    if min_area is not None and max_area is not None and min_area > max_area:
        raise ValueError(f"min_area ({min_area}) is larger than max_area ({max_area})")


def _bounded(width, height, size, multiple, lo, hi) -> tuple[int, int]:
    """Move `size` into the area bounds [lo, hi], keeping the aspect ratio as well as the grid allows."""
    target = hi if size[0] * size[1] > hi else lo
    s = math.sqrt(target / (width * height))
    w_opts = {_snap(width * s, multiple, "floor"), _snap(width * s, multiple, "ceil")}
    h_opts = {_snap(height * s, multiple, "floor"), _snap(height * s, multiple, "ceil")}
    fits = [(w, h) for w in w_opts for h in h_opts if lo <= w * h <= hi]
    if fits:
        aspect = math.log(width / height)
        return min(fits, key=lambda c: (abs(c[0] * c[1] - target), abs(math.log(c[0] / c[1]) - aspect)))
    if target == hi:
        # Extreme aspect: the short side is already one `multiple`, so only the long side can give.
        short = multiple
        long_side = (int(hi) // (short * multiple)) * multiple
        if long_side >= multiple and long_side * short >= lo:
            return (long_side, short) if width >= height else (short, long_side)
    raise ValueError(
        f"no size made of multiples of {multiple} near the aspect of {width}x{height} has an area in "
        f"[min_area={lo}, max_area={hi}]; widen the bounds"
    )


def resize_area(
    width: int,
    height: int,
    area: float,
    multiple: int = 32,
    min_area: float | None = None,
    max_area: float | None = None,
) -> tuple[int, int]:
    """Area-preserving target size (new_w, new_h) with both sides multiples of `multiple`.

    s = sqrt(area / (width * height)); each side becomes round(side * s / multiple) * multiple, at
    least `multiple`. If the result's area falls outside [min_area, max_area], the sides are rescaled
    to the violated bound and each floored or ceiled to the grid; of the combinations that land
    inside the bounds the one nearest the bound wins (ties: nearest aspect), so a max_area result
    is in practice floored. ValueError if the grid leaves no size inside the bounds.
    """
    if not isinstance(multiple, numbers.Integral) or multiple <= 0:
        raise ValueError(f"multiple must be a positive integer, got {multiple!r}")
    _check_resize_args(width, height, area, min_area, max_area)
    size = _fit(int(width), int(height), area, multiple, "round")
    lo = 0 if min_area is None else min_area
    hi = math.inf if max_area is None else max_area
    if lo <= size[0] * size[1] <= hi:
        return size
    return _bounded(int(width), int(height), size, multiple, lo, hi)


def patch_grid(height: int, width: int, patch_size: int) -> tuple[int, int]:
    """Patch grid (h, w) of an H x W image once zero-padded to whole patches."""
    if not all(isinstance(v, numbers.Integral) and v > 0 for v in (height, width)):
        raise ValueError(f"image size must be positive integers, got height={height}, width={width}")
    _check_patch_size(patch_size)
    return -(-int(height) // patch_size), -(-int(width) // patch_size)


def normalize(img: Image.Image | np.ndarray) -> torch.Tensor:
    """RGB uint8 -> float32 x_3HW = ((x / 255) - 0.5) / 0.5.

    The arithmetic runs in float64 and is cast once at the end because that is what the authors'
    CLIPImageProcessor (numpy) does; their pixel tensors are then reproduced bit for bit, while the
    same formula in float32 differs by up to 1.2e-7 (one ulp), enough to flip FSQ codes near a
    rounding boundary.
    """
    arr = _as_uint8_rgb_array(img)
    x = (arr.astype(np.float64) / 255.0 - 0.5) / 0.5
    return torch.from_numpy(np.ascontiguousarray(x.astype(np.float32).transpose(2, 0, 1)))


def _as_uint8_rgb_array(img: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(img, np.ndarray):
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(f"expected a uint8 array of shape [H, W, 3], got {img.dtype} {img.shape}")
        if img.shape[0] == 0 or img.shape[1] == 0:
            raise ValueError(f"image has zero area: shape {img.shape}")
        return img
    return np.asarray(to_rgb(img), dtype=np.uint8)


def pad_to_multiple(x_3HW: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad the last two dims (H, W) on the bottom/right to multiples of `multiple`."""
    if not isinstance(multiple, int) or multiple <= 0:
        raise ValueError(f"multiple must be a positive integer, got {multiple!r}")
    if x_3HW.dim() < 2:
        raise ValueError(f"expected a tensor [..., H, W], got shape {tuple(x_3HW.shape)}")
    height, width = x_3HW.shape[-2:]
    pad_h, pad_w = -height % multiple, -width % multiple
    if pad_h == 0 and pad_w == 0:
        return x_3HW
    return F.pad(x_3HW, (0, pad_w, 0, pad_h))


def reference_square_crop(img: Image.Image, target: int) -> Image.Image:
    """The ViQ authors' demo crop: short side to `target`, PIL default resize, centre target^2 crop.

    Reproduced literally (int() truncation, default filter, float crop box that PIL rounds) so that
    its output matches their pixels exactly; it is not meant as a good general-purpose crop.
    """
    if not isinstance(target, int) or target <= 0:
        raise ValueError(f"target must be a positive integer, got {target!r}")
    _check_nonempty(img)
    width, height = img.size
    if width < height:
        new_w, new_h = target, int(target / width * height)
    else:
        new_h, new_w = target, int(target / height * width)
    img = img.resize((new_w, new_h))
    box = ((new_w - target) / 2, (new_h - target) / 2, (new_w + target) / 2, (new_h + target) / 2)
    return img.crop(box)


def _as_pil(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, (str, Path, os.PathLike)):
        return load_image(image)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
            raise ValueError(f"expected a uint8 array [H, W, 3] or [H, W], got {image.dtype} {image.shape}")
        if image.shape[0] == 0 or image.shape[1] == 0:
            raise ValueError(f"image has zero area: shape {image.shape}")
        return Image.fromarray(image)  # uint8 [H, W, 3] -> RGB, [H, W] -> L
    raise ValueError(f"expected a PIL image, a path or a uint8 numpy array, got {type(image).__name__}")


def preprocess(
    image,
    *,
    patch_size: int,
    mode: str = "resize",
    area: float = 384 * 384,
    multiple: int = 32,
    min_area: float | None = None,
    max_area: float | None = None,
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Image (PIL, path or uint8 [H, W, 3] array) -> (x_3HW in [-1, 1], patch grid (h, w)).

    mode "resize": area-preserving resize (BICUBIC) to multiples of `multiple`, then normalise.
    mode "none": normalise at the native size and zero-pad to whole patches (the authors' forward).
    mode "square_crop": the authors' demo crop to int(sqrt(area)) square, normalise, pad.
    """
    if mode not in MODES:
        raise ValueError(f"unknown preprocess mode {mode!r}; expected one of {MODES}")
    _check_patch_size(patch_size)
    img = to_rgb(_as_pil(image))
    if mode == "resize":
        check_multiple(multiple, patch_size)
        size = resize_area(img.width, img.height, area, multiple, min_area, max_area)
        if size != img.size:
            img = img.resize(size, resample=Image.Resampling.BICUBIC)
        x_3HW = normalize(img)
    elif mode == "none":
        check_min_size(img.width, img.height, patch_size)
        x_3HW = pad_to_multiple(normalize(img), patch_size)
    else:
        if not (_is_real(area) and area >= 1):
            raise ValueError(f"area must be at least 1 for square_crop, got {area!r}")
        x_3HW = pad_to_multiple(normalize(reference_square_crop(img, int(math.sqrt(area)))), patch_size)
    return x_3HW, patch_grid(x_3HW.shape[-2], x_3HW.shape[-1], patch_size)


def check_min_size(width: int, height: int, patch_size: int) -> None:
    """An image kept at its native size ("none") must hold at least one whole patch."""
    if width < patch_size or height < patch_size:
        raise ValueError(f"image of size {width}x{height} is smaller than one {patch_size}-pixel patch")


def predict_grid(width: int, height: int, *, patch_size: int, mode: str = "resize", area: float = 384 * 384,
                 multiple: int = 32, min_area: float | None = None, max_area: float | None = None
                 ) -> tuple[int, int]:
    """The patch grid ``preprocess`` gives a width x height image, from its size alone (no decoding)."""
    _check_patch_size(patch_size)
    if mode == "resize":
        check_multiple(multiple, patch_size)
        new_w, new_h = resize_area(width, height, area, multiple, min_area, max_area)
        return patch_grid(new_h, new_w, patch_size)
    if mode == "none":
        check_min_size(width, height, patch_size)
        return patch_grid(height, width, patch_size)
    if mode == "square_crop":
        side = int(math.sqrt(area))
        return patch_grid(side, side, patch_size)
    raise ValueError(f"unknown image mode {mode!r}; expected one of {MODES}")
