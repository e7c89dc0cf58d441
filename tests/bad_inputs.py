"""Odd and broken image files, each with what ingest must do with it."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def _png(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kw)
    return buf.getvalue()


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", **kw)
    return buf.getvalue()


def gradient_rgb(w: int = 48, h: int = 40) -> Image.Image:
    a = np.zeros((h, w, 3), np.uint8)
    a[..., 0] = np.linspace(0, 255, w, dtype=np.uint8)[None, :]
    a[..., 1] = np.linspace(0, 255, h, dtype=np.uint8)[:, None]
    a[..., 2] = 128
    return Image.fromarray(a)


def exif_rotated_jpeg() -> bytes:
    """A 48x32 (landscape) JPEG whose EXIF says 'rotate 90°': it must come out portrait-derived."""
    img = gradient_rgb(48, 32)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    return _jpeg(img, exif=exif.tobytes(), quality=95)


def sixteen_bit_png() -> bytes:
    a = (np.linspace(0, 65535, 40 * 40).reshape(40, 40)).astype(np.uint16)
    return _png(Image.fromarray(a, mode="I;16"))


def palette_with_transparency() -> bytes:
    img = Image.new("P", (40, 40), 0)
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 6))
    for x in range(20):
        for y in range(40):
            img.putpixel((x, y), 1)
    return _png(img, transparency=0)  # index 0 (red) fully transparent -> white


def header_bomb(side: int = 30000) -> bytes:
    """A small PNG whose header claims side × side pixels (a decompression bomb: the decoder would
    allocate gigabytes); only the header is valid."""
    import struct
    import zlib

    png = bytearray(_png(gradient_rgb(8, 8)))
    ihdr = png[12:29]  # b"IHDR" + 13 data bytes
    ihdr[4:12] = struct.pack(">II", side, side)
    png[12:29] = ihdr
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)) & 0xFFFFFFFF)
    return bytes(png)


def nan_tiff() -> bytes:
    a = np.linspace(0, 1, 40 * 40, dtype=np.float32).reshape(40, 40)
    a[5:9, 5:9] = np.nan
    a[0, 0] = np.inf
    buf = io.BytesIO()
    Image.fromarray(a, mode="F").save(buf, format="TIFF")
    return buf.getvalue()


def cases() -> dict[str, tuple[bytes, str | None]]:
    """name -> (file bytes, expected rejection error or None when it must be converted)."""
    good = _png(gradient_rgb())
    return {
        "truncated.png": (good[: len(good) // 2], "OSError"),
        "corrupt.jpg": (_jpeg(gradient_rgb())[:20] + b"\x00garbage" * 50, "UnidentifiedImageError"),
        "empty.png": (b"", "EmptyFile"),
        "text.png": (b"this is a text file, not an image\n" * 4, "UnidentifiedImageError"),
        "tiny.png": (_png(gradient_rgb(6, 6)), "TooSmall"),
        "cmyk.jpg": (_jpeg(gradient_rgb().convert("CMYK")), None),
        "sixteen.png": (sixteen_bit_png(), None),
        "palette_alpha.png": (palette_with_transparency(), None),
        "exif_rotated.jpg": (exif_rotated_jpeg(), None),
        "grey.png": (_png(gradient_rgb().convert("L")), None),
        "bomb.png": (header_bomb(), "DecompressionBomb"),
        "nan.tiff": (nan_tiff(), "NonFinitePixels"),
        "_DSC0001.png": (_png(gradient_rgb(44, 40)), None),  # camera names start with "_": read
    }


def write_cases(folder: Path) -> dict[str, tuple[bytes, str | None]]:
    folder.mkdir(parents=True, exist_ok=True)
    c = cases() | {"a::b.png": (_png(gradient_rgb(40, 44)), None)}  # a legal name, not a chained URL
    for name, (data, _) in c.items():
        (folder / name).write_bytes(data)
    return c
