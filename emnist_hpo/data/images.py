"""Real-world character images to EMNIST inputs (Pillow and NumPy only).

:func:`to_emnist` turns a photo or scan of one handwritten character (PNG,
JPEG, ...; any size; colour, grey, palette or with alpha; dark ink on light
paper or the reverse) into the uint8 28x28 white-on-black image the models were
trained on, following the conversion NIST used for EMNIST (Cohen et al. 2017,
"EMNIST: an extension of MNIST to handwritten letters", section II-A): Gaussian
blur (sigma 1), crop to the region of interest, centre it in a square frame
with a 2-pixel border keeping the aspect ratio, downsample to 28x28 with
bicubic interpolation, scale intensities to 0..255.

NIST's originals are 128x128 scans, so a real image is first brought to that
scale: the background is found from the image's border (light paper is
inverted to EMNIST's white ink on black), the ink's bounding box (ignoring
specks) is resized to 124 pixels on its longer side, and strokes much thinner
than NIST's pen are thickened; then the steps above run. The 2-pixel border is
taken at the 28x28 output, where EMNIST's own characters span 24 pixels.

Every problem with an input (not an image, empty, truncated, too small, blank,
too large for memory, NaN or infinite pixels in a float TIFF) is an :class:`ImageError` naming the file and the rule.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image, ImageOps, UnidentifiedImageError

from emnist_hpo.errors import EmnistHpoError

#: The most pixels an input may have (decompression-bomb and memory guard: 40 MP, e.g. 8000x5000).
MAX_PIXELS = 40_000_000
#: The smallest side an input may have (a character needs some pixels).
MIN_SIDE = 8
#: The biggest file read (bytes).
MAX_FILE_BYTES = 64 * 1024 * 1024
#: Longer side (pixels) the ink's bounding box is scaled to: NIST's 128x128 scans, less a margin.
NIST_SIDE = 124
#: Side of the model's input.
OUTPUT_SIDE = 28
#: Border (pixels of the 28x28 output) around the character's longer side: EMNIST's characters
#: span 24 of the 28 pixels (measured on the sample's images: 23.4 on average above intensity 30).
BORDER = 2
#: Gaussian blur sigma at NIST's scale.
BLUR_SIGMA = 1.0
#: Stroke width (pixels at NIST's scale) a finer pen is thickened to. EMNIST's strokes are ~17 px
#: there (3.3 of 28 px above intensity 128); thickening fine strokes to 12 px took a 1-epoch digits
#: model from 81% to 86% on thin-pen renderings of 200 test images.
MIN_STROKE = 12.0
#: Least contrast (0..255) between ink and background for an image not to count as blank.
MIN_CONTRAST = 24
#: Share of ink mass ignored at each side of the bounding box (specks of dust, sensor noise).
TRIM = 0.002
#: Longest side of the working copy: larger inputs are reduced first (speed, memory).
WORK_SIDE = 1024


class ImageError(EmnistHpoError):
    """An input image that cannot be turned into an EMNIST character."""


@dataclass
class Prepared:
    image: np.ndarray  # uint8 (28, 28), upright, white ink on black
    inverted: bool  # whether the input was dark ink on a light background
    box: tuple[int, int, int, int]  # ink bounding box (left, top, right, bottom) in the input's pixels
    size: tuple[int, int]  # the input's (width, height)


def load_grey(path: str | Path) -> np.ndarray:
    """The image at ``path`` as float32 greys 0..255 (alpha flattened, EXIF orientation applied)."""
    path = Path(path)
    name = str(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ImageError(f"{name}: cannot read the file ({exc.strerror or exc})") from None
    if path.is_dir():
        raise ImageError(f"{name}: is a directory, not an image file")
    if size == 0:
        raise ImageError(f"{name}: the file is empty (0 bytes)")
    if size > MAX_FILE_BYTES:
        raise ImageError(f"{name}: the file has {size:,} bytes; the limit is {MAX_FILE_BYTES:,}")
    data = path.read_bytes()
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageError(
                f"{name}: refused as a possible decompression bomb ({' '.join(str(exc).split())[:160]}); "
                f"the limit is {MAX_PIXELS:,} pixels"
            ) from None
        except UnidentifiedImageError:
            raise ImageError(f"{name}: not an image Pillow can read (PNG, JPEG, BMP, GIF, TIFF, WebP, ...)") from None
        except Exception as exc:  # noqa: BLE001 - a corrupt header
            raise ImageError(f"{name}: not a readable image ({' '.join(str(exc).split())[:200]})") from None
        w, h = img.size
        if w * h > MAX_PIXELS:
            raise ImageError(
                f"{name}: the image is {w}x{h} ({w * h:,} pixels); the limit is {MAX_PIXELS:,} pixels "
                "(scale it down first)"
            )
        if min(w, h) < MIN_SIDE:
            raise ImageError(f"{name}: the image is {w}x{h} pixels; each side must be at least {MIN_SIDE}")
        try:
            if img.format == "JPEG" and max(w, h) > 2 * WORK_SIDE:
                img.draft("RGB", (w * WORK_SIDE // max(w, h), h * WORK_SIDE // max(w, h)))  # DCT scaling
            img.load()
            img = ImageOps.exif_transpose(img)
            grey = _to_grey(img, name)
        except ImageError:
            raise
        except Exception as exc:  # noqa: BLE001 - truncated or corrupt pixel data
            raise ImageError(f"{name}: the image data cannot be decoded ({' '.join(str(exc).split())[:200]})") from None
    return grey


def _to_grey(img: Image.Image, name: str = "<image>") -> np.ndarray:
    """Greys 0..255 of any Pillow mode; transparent areas take the colour that contrasts with the ink."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        # float64: the span of a float32 image (up to 6.8e38) overflows float32
        a = np.asarray(img, dtype=np.float64)
        bad = int(a.size - np.count_nonzero(np.isfinite(a)))
        if bad:  # a float TIFF with NaN or inf: no intensity scale exists
            raise ImageError(f"{name}: {bad:,} of {a.size:,} pixels are NaN or infinite; pixel values must be finite")
        lo, hi = float(a.min()), float(a.max())
        return ((a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)).astype(np.float32)
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info)
    if not has_alpha:
        return np.asarray(img.convert("L"), dtype=np.float32)
    rgba = img.convert("RGBA")
    alpha = np.asarray(rgba.getchannel("A"), dtype=np.float32) / 255.0
    grey = np.asarray(rgba.convert("L"), dtype=np.float32)
    opaque = alpha > 0.5
    if opaque.all() or not opaque.any():
        return grey if opaque.any() else np.zeros_like(grey)
    # ink drawn on a transparent sheet: put it on a background of the opposite brightness
    background = 0.0 if grey[opaque].mean() > 127.5 else 255.0
    return grey * alpha + background * (1.0 - alpha)


def _reduce(grey: np.ndarray, side: int) -> np.ndarray:
    h, w = grey.shape
    if max(h, w) <= side:
        return grey
    scale = side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(grey).resize(size, Image.Resampling.BOX), dtype=np.float32)


def _gaussian(a: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of a float image (zeros outside it)."""
    r = max(1, int(3.0 * sigma + 0.5))
    x = np.arange(-r, r + 1, dtype=np.float32)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    k /= k.sum()
    a = sliding_window_view(np.pad(a, ((r, r), (0, 0))), 2 * r + 1, axis=0) @ k
    return sliding_window_view(np.pad(a, ((0, 0), (r, r))), 2 * r + 1, axis=1) @ k


def _dilate(a: np.ndarray, size: int) -> np.ndarray:
    """Grey dilation (max filter) with a ``size`` x ``size`` square."""
    r = size // 2
    a = sliding_window_view(np.pad(a, ((r, r), (0, 0))), size, axis=0).max(axis=-1)
    return sliding_window_view(np.pad(a, ((0, 0), (r, r))), size, axis=1).max(axis=-1)


def _border(a: np.ndarray) -> np.ndarray:
    h, w = a.shape
    k = max(1, min(h, w) // 20)
    return np.concatenate([a[:k].ravel(), a[-k:].ravel(), a[:, :k].ravel(), a[:, -k:].ravel()])


def _otsu(values: np.ndarray) -> float:
    """Otsu's threshold of values in 0..255."""
    hist, edges = np.histogram(values, bins=256, range=(0.0, 256.0))
    p = hist.astype(np.float64) / max(hist.sum(), 1)
    omega = np.cumsum(p)
    mu = np.cumsum(p * np.arange(256))
    denom = omega * (1.0 - omega)
    with np.errstate(divide="ignore", invalid="ignore"):
        between = np.where(denom > 0, (mu[-1] * omega - mu) ** 2 / denom, 0.0)
    return float(edges[int(np.argmax(between)) + 1])


def _mass_bounds(profile: np.ndarray, trim: float) -> tuple[int, int]:
    """Indices [lo, hi) holding all but ``trim`` of the mass at each end."""
    c = np.cumsum(profile)
    total = c[-1]
    lo = int(np.searchsorted(c, trim * total, side="right"))
    hi = int(np.searchsorted(c, (1.0 - trim) * total, side="left")) + 1
    return lo, max(hi, lo + 1)


def _stroke_width(mask: np.ndarray) -> float:
    """Mean stroke width of a binary mask: 2 * area / boundary pixels."""
    area = int(mask.sum())
    if area == 0:
        return 0.0
    padded = np.pad(mask, 1)
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    boundary = int((mask & ~inner).sum())
    return 2.0 * area / max(boundary, 1)


def to_emnist(grey: np.ndarray, name: str = "<image>") -> Prepared:
    """A grey image (float 0..255, any size) as an EMNIST input (uint8 28x28, white on black, upright)."""
    grey = np.asarray(grey, dtype=np.float32)
    if grey.ndim != 2 or min(grey.shape) < MIN_SIDE:
        raise ImageError(f"{name}: expected a 2-D image at least {MIN_SIDE}x{MIN_SIDE}, got shape {grey.shape}")
    if not np.isfinite(grey).all():
        raise ImageError(f"{name}: the image has NaN or infinite values; pixel values must be finite")
    full_h, full_w = grey.shape
    work = _reduce(grey, WORK_SIDE)
    scale = work.shape[1] / full_w
    # polarity: the background is what the border mostly shows; EMNIST is white ink on black
    background = float(np.median(_border(work)))
    inverted = background > 127.5
    if inverted:
        work, background = 255.0 - work, 255.0 - background
    ink = np.clip(work - background, 0.0, None)
    # smooth sensor noise before deciding what is ink (sigma ~ 1/200 of the image)
    sigma = max(0.5, max(work.shape) / 200.0)
    smooth = _gaussian(ink, sigma)
    peak = float(np.percentile(smooth, 99.9))
    if peak < MIN_CONTRAST:
        raise ImageError(
            f"{name}: the image looks blank (ink contrast {peak:.0f} of 255; at least {MIN_CONTRAST} needed)"
        )
    mask = smooth > max(_otsu(np.clip(smooth * (255.0 / peak), 0, 255)) * peak / 255.0, 0.25 * peak)
    top, bottom = _mass_bounds(mask.sum(axis=1).astype(np.float64), TRIM)
    left, right = _mass_bounds(mask.sum(axis=0).astype(np.float64), TRIM)
    box = (
        int(left / scale), int(top / scale),
        min(full_w, int(np.ceil(right / scale))), min(full_h, int(np.ceil(bottom / scale))),
    )
    # the region of interest at NIST's scale: longer side 124 px, intensities 0..1
    roi = ink[top:bottom, left:right]
    roi = np.clip(roi / max(float(np.percentile(roi[mask[top:bottom, left:right]], 99)), 1e-6), 0.0, 1.0)
    f = NIST_SIDE / max(roi.shape)
    size = (max(1, round(roi.shape[1] * f)), max(1, round(roi.shape[0] * f)))
    resample = Image.Resampling.BOX if f < 1 else Image.Resampling.BICUBIC
    roi_img = Image.fromarray(roi.astype(np.float32)).resize(size, resample)
    roi = np.clip(np.asarray(roi_img, dtype=np.float32), 0.0, 1.0)
    width = _stroke_width(roi > 0.5)
    if 0 < width < MIN_STROKE:  # a fine pen: thicken to NIST's stroke
        grow = int(round(MIN_STROKE - width)) | 1
        roi = _dilate(roi, grow)
    # NIST: Gaussian blur, re-crop, centre in a square frame with a 2-pixel border, bicubic to 28x28
    pad = 4 * int(BLUR_SIGMA + 1)
    blurred = _gaussian(np.pad(roi, pad), BLUR_SIGMA)
    rows = np.flatnonzero(blurred.max(axis=1) > 0.01)
    cols = np.flatnonzero(blurred.max(axis=0) > 0.01)
    blurred = blurred[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    h, w = blurred.shape
    side = round(max(h, w) * OUTPUT_SIDE / (OUTPUT_SIDE - 2 * BORDER))
    square = np.zeros((side, side), dtype=np.float32)
    square[(side - h) // 2:(side - h) // 2 + h, (side - w) // 2:(side - w) // 2 + w] = blurred
    small = np.asarray(
        Image.fromarray(square).resize((OUTPUT_SIDE, OUTPUT_SIDE), Image.Resampling.BICUBIC), dtype=np.float32
    )
    small = np.clip(small, 0.0, None)
    small *= 255.0 / max(float(small.max()), 1e-6)  # intensities scaled to 0..255
    return Prepared(np.clip(np.round(small), 0, 255).astype(np.uint8), inverted, box, (full_w, full_h))


def prepare_file(path: str | Path) -> Prepared:
    """Read ``path`` and convert it (see the module docstring); :class:`ImageError` on any problem."""
    return to_emnist(load_grey(path), name=str(path))
