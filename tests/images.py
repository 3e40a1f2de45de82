"""Real test images from scikit-image / scikit-learn, encoded in the ways datasets store them."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def real_rgb(size=(40, 48)) -> list[np.ndarray]:
    from skimage import data

    out = []
    for name in ("astronaut", "chelsea", "coffee", "rocket"):
        img = Image.fromarray(getattr(data, name)()).resize(size[::-1], Image.BILINEAR)
        out.append(np.asarray(img.convert("RGB")))
    return out


def encode(image, fmt="PNG", mode=None) -> bytes:
    pil = Image.fromarray(image) if isinstance(image, np.ndarray) else image
    if mode:
        pil = pil.convert(mode)
    buf = io.BytesIO()
    pil.save(buf, format=fmt)
    return buf.getvalue()


def png16(image: np.ndarray) -> bytes:
    gray = np.asarray(Image.fromarray(image).convert("L"), np.uint16) * 257
    buf = io.BytesIO()
    Image.fromarray(gray).save(buf, format="PNG")
    return buf.getvalue()


def bomb_png(width=20_000, height=20_000) -> bytes:
    """A tiny PNG whose header claims width x height pixels (1-bit, compresses to almost nothing)."""
    buf = io.BytesIO()
    Image.new("1", (width, height)).save(buf, format="PNG")
    return buf.getvalue()
