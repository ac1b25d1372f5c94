"""Image conversion for the shard writers: any real-world file -> RGB -> square crop -> JPEG bytes.

ImageNet has grayscale and CMYK JPEGs and a PNG named ``.JPEG``; Pillow sniffs the format from the
content, so everything goes through :func:`open_rgb`, which returns an RGB image or raises
:class:`UndecodableImage` (the writer then skips and lists the file).

Resizing follows the usual GAN preprocessing: the centre square of side ``min(w, h)`` is resampled
to ``resolution`` with Pillow's antialiased bicubic filter in one step (same pixels as "resize the
short side, then centre-crop", without an intermediate rounding). An RGB JPEG that already has the
target size (or any RGB JPEG when originals are kept) is stored byte for byte, so it is never
compressed twice.
"""

from __future__ import annotations

import io
import warnings
from typing import Optional, Tuple

import numpy as np
from PIL import Image

# One ILSVRC image is 89M pixels of a near-uniform colour; Pillow's bomb check is for hostile input.
Image.MAX_IMAGE_PIXELS = None


class UndecodableImage(Exception):
    """The bytes are not an image Pillow can fully decode (truncated, corrupt, unknown format)."""


class TooSmall(Exception):
    """The image's shorter side is below the ``min_size`` asked for (``prepare --min-size``)."""


def open_rgb(data: bytes) -> Tuple[Image.Image, str, str]:
    """Decode ``data`` completely and return ``(rgb_image, original_format, original_mode)``.

    Transparent images are composited on white (dropping alpha would expose arbitrary colours).
    """
    try:
        with warnings.catch_warnings():
            # "Possibly corrupt EXIF" and friends: the pixels still decode; not a reason to skip.
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data))
            fmt = img.format or "unknown"
            img.load()  # forces a full decode: a truncated file raises here, not in a worker later
    except Exception as exc:  # Pillow raises many types (OSError, SyntaxError, ValueError, ...)
        raise UndecodableImage(f"{type(exc).__name__}: {exc}") from None
    return to_rgb(img), fmt, img.mode


def to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I", "I;16", "I;16B", "I;16L", "F"):  # 16-bit / float grayscale (PNG, TIFF)
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if arr.max() > 255 else 255.0
        img = Image.fromarray((arr * (255.0 / top)).clip(0, 255).astype(np.uint8), "L")
        mode = "L"
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    # L, 1, CMYK (Pillow undoes Adobe's inverted CMYK), YCbCr, LAB, HSV
    return img.convert("RGB")


def centre_square(img: Image.Image, resolution: int) -> Image.Image:
    """The centre square of side min(w, h), resampled to ``resolution`` x ``resolution``."""
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    if side == resolution and (w, h) == (side, side):
        return img
    return img.resize((resolution, resolution), Image.Resampling.BICUBIC,
                      box=(left, top, left + side, top + side))


def encode_jpeg(img: Image.Image, quality: int) -> bytes:
    out = io.BytesIO()
    # 4:4:4: chroma subsampling visibly blurs colour edges at 32-128 px, the sizes GANs train on.
    img.save(out, format="JPEG", quality=quality, subsampling=0)
    return out.getvalue()


def convert_file(data: bytes, resolution: Optional[int], quality: int,
                 min_size: int = 0) -> Tuple[bytes, Tuple[int, int]]:
    """File bytes -> (JPEG bytes, (height, width)). ``resolution=None`` keeps the original size.

    ``min_size``: raise :class:`TooSmall` when the shorter side is below it (the official 256 px
    ImageNet preprocessing keeps only images whose sides are both at least 256).
    """
    img, fmt, mode = open_rgb(data)
    if min(img.size) < min_size:
        raise TooSmall(f"{img.width}x{img.height} is below --min-size {min_size}")
    was_rgb_jpeg = fmt == "JPEG" and mode == "RGB"
    if resolution is None:
        if was_rgb_jpeg:
            return data, (img.height, img.width)
        return encode_jpeg(img, quality), (img.height, img.width)
    if was_rgb_jpeg and img.size == (resolution, resolution):
        return data, (resolution, resolution)
    return encode_jpeg(centre_square(img, resolution), quality), (resolution, resolution)


def convert_array(pixels: np.ndarray, resolution: Optional[int], quality: int,
                  min_size: int = 0) -> Tuple[bytes, Tuple[int, int]]:
    """uint8 HWC RGB array (CIFAR, STL-10) -> (JPEG bytes, (height, width))."""
    img = Image.fromarray(np.ascontiguousarray(pixels), "RGB")
    if min(img.size) < min_size:
        raise TooSmall(f"{img.width}x{img.height} is below --min-size {min_size}")
    if resolution is not None:
        img = centre_square(img, resolution)
    return encode_jpeg(img, quality), (img.height, img.width)


def jpeg_size(data: bytes) -> Tuple[int, int]:
    """(height, width) from a JPEG header without decoding the pixels."""
    with Image.open(io.BytesIO(data)) as img:
        return img.height, img.width
