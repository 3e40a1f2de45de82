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


def digits_images(size: int = 32, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's handwritten digits as uint8 RGB (N, size, size, 3) images, and their labels."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    images, labels = digits.images, digits.target
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    out = np.empty((len(images), size, size, 3), np.uint8)
    for i, img in enumerate(images):
        gray = Image.fromarray((img * (255.0 / 16.0)).astype(np.uint8)).resize((size, size), Image.BILINEAR)
        out[i] = np.asarray(gray)[..., None]
    return out, labels.astype(np.int64)
