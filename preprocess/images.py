"""Decode and normalise one input image (the pure function the ingest job maps).

Every image becomes 8-bit RGB, EXIF orientation applied, resized so its shorter side equals the
target resolution (Lanczos, as VQGAN/MaskGIT data pipelines do) and centre-cropped to a square.
Anything unusable raises :class:`RejectedImage` with an error class and a message, which the
ingest job writes to the ``rejected`` dataset.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

MAX_PIXELS = Image.MAX_IMAGE_PIXELS  # Pillow's decompression-bomb threshold (89.5 M pixels)

class RejectedImage(Exception):
    """An input that cannot be used; ``error`` is a short class name, ``detail`` the reason."""

    def __init__(self, error: str, detail: str) -> None:
        super().__init__(f"{error}: {detail}")
        self.error = error
        self.detail = detail


@dataclass(frozen=True)
class NormalisedImage:
    key: str  # sha256 of the normalised pixels (shape included)
    png: bytes
    width: int  # source size, after EXIF rotation
    height: int


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; transparency is composited onto white."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        # 16-bit / 32-bit grey: Pillow's convert("L") clips instead of scaling.
        a = np.asarray(img, dtype=np.float64)
        if not np.isfinite(a).all():
            raise RejectedImage("NonFinitePixels", f"{int((~np.isfinite(a)).sum())} NaN or infinite pixel values")
        top = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        if img.mode == "F":
            top = max(float(a.max()), 1.0) if a.max() > 1.0 else 1.0
        a8 = np.clip(np.round(a / top * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(a8, mode="L").convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("LA", "La", "PA"):
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "RGBa"):
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, img.convert("RGBA")).convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV, RGB


def normalise_image(data: bytes, resolution: int, min_size: int, max_pixels: int = MAX_PIXELS) -> NormalisedImage:
    """Decode ``data`` and return the normalised PNG, its content key and the source size; an
    image of more than ``max_pixels`` is rejected from its header, before decoding."""
    if not data:
        raise RejectedImage("EmptyFile", "zero bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))  # reads the header only
            if img.size[0] * img.size[1] > max_pixels:
                raise RejectedImage("DecompressionBomb", f"{img.size[0]}x{img.size[1]} pixels exceed data.max_pixels "
                                                         f"= {max_pixels}")
            img.load()  # decode now: truncated data raises here, not later
            img = ImageOps.exif_transpose(img)
    except UnidentifiedImageError as e:
        head = data[:8]
        raise RejectedImage("UnidentifiedImageError", f"not a decodable image ({len(data)} bytes, starting {head!r})") from e
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:  # Pillow's own header check
        raise RejectedImage("DecompressionBomb", str(e)) from e
    except (OSError, SyntaxError, ValueError) as e:
        raise RejectedImage(type(e).__name__, str(e)) from e
    width, height = img.size
    if min(width, height) < min_size:
        raise RejectedImage("TooSmall", f"{width}x{height} is below the minimum side {min_size}")
    rgb = _to_rgb(img)
    scale = resolution / min(width, height)
    new_w, new_h = max(resolution, round(width * scale)), max(resolution, round(height * scale))
    rgb = rgb.resize((new_w, new_h), Image.Resampling.LANCZOS)
    left, top = (new_w - resolution) // 2, (new_h - resolution) // 2
    rgb = rgb.crop((left, top, left + resolution, top + resolution))
    pixels = np.asarray(rgb, dtype=np.uint8)  # (H, W, 3)
    key = hashlib.sha256(repr(pixels.shape).encode() + pixels.tobytes()).hexdigest()
    buf = io.BytesIO()
    rgb.save(buf, format="PNG")
    return NormalisedImage(key=key, png=buf.getvalue(), width=width, height=height)


def split_of(key: str, validation_fraction: float) -> str:
    """Deterministic train/validation split from the content key."""
    bucket = int(key[:8], 16) / 0xFFFFFFFF
    return "validation" if bucket < validation_fraction else "train"
