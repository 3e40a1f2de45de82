"""The one decode path: any image cell -> uint8 (H, W, 3) at the model's size, or a row error.

Accepted cells: encoded bytes (JPEG/PNG/WebP/BMP/GIF/TIFF), Hugging Face
``datasets`` image structs ``{"bytes": ..., "path": ...}``, and tensors (numpy
arrays from Arrow ``fixed_shape_tensor``, Ray's tensor type or nested lists)
of shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4).  Grayscale, RGBA,
palette, CMYK and 16-bit images are converted.  Imports no TensorFlow.

A cell that cannot be decoded raises :class:`DecodeError` with a message that
becomes the output row's ``error``.

Examples:
    >>> import io, numpy as np
    >>> from PIL import Image
    >>> buf = io.BytesIO(); Image.new("L", (10, 20), 128).save(buf, "PNG")
    >>> decode_image(buf.getvalue(), size=(8, 8)).shape
    (8, 8, 3)
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from PIL import Image

RESIZE_POLICIES = ("stretch", "center_crop", "pad")
DEFAULT_MAX_PIXELS = 100_000_000
# Our own guard (max_pixels, checked from the header before any pixel is decoded) replaces PIL's global one.
Image.MAX_IMAGE_PIXELS = None


class DecodeError(ValueError):
    """This image cannot be explained; the message is written to the row's ``error``."""


@dataclass(frozen=True)
class DecodeOptions:
    size: tuple[int, int]  # (H, W) of the model input
    resize: str = "stretch"
    max_pixels: int = DEFAULT_MAX_PIXELS
    jpeg_draft: bool = False  # decode JPEGs at 1/2, 1/4 or 1/8 scale when that still covers the model input

    def __post_init__(self):
        if self.resize not in RESIZE_POLICIES:
            raise ValueError(f"unknown resize policy {self.resize!r}; choose one of {RESIZE_POLICIES}")
        if self.max_pixels < 1:
            raise ValueError("max_pixels must be positive")

    def decode(self, cell) -> np.ndarray:
        """One image cell to uint8 (H, W, 3) with these options (see :func:`decode_image`)."""
        return decode_image(cell, self.size, self.resize, self.max_pixels, self.jpeg_draft)

    @classmethod
    def from_dict(cls, values: dict) -> DecodeOptions:
        """Back from ``dataclasses.asdict`` as stored (JSON) in an output's metadata; absent fields default."""
        return cls(**{**values, "size": tuple(values["size"])})


def decode_image(cell, size: tuple[int, int], resize: str = "stretch",
                 max_pixels: int = DEFAULT_MAX_PIXELS, jpeg_draft: bool = False) -> np.ndarray:
    """Decode one cell to uint8 (size[0], size[1], 3).

    ``jpeg_draft`` lets the JPEG decoder scale by 1/2, 1/4 or 1/8 in the DCT domain (PIL's draft mode) as long
    as the result is still at least as large as what ``resize`` scales the image to; the resize then finishes.
    Several times faster for photos much larger than the model input; the pixels differ slightly from a full
    decode (see benchmarks/results/decode.md).
    """
    draft = (lambda full: _scaled_size(full, size, resize)) if jpeg_draft else None
    return _fit(_open_cell(cell, "image", max_pixels, draft=draft), size, resize)


def _open_cell(cell, what: str, max_pixels: int, binary: bool = False, draft=None) -> Image.Image:
    """A cell (encoded bytes, HF struct or tensor) as an RGB image; ``binary`` tensors map non-zero to white."""
    if cell is None:
        raise DecodeError(f"{what} is missing (null)")
    if isinstance(cell, dict):
        data = cell.get("bytes")
        if data is None:
            raise DecodeError(f"{what} struct has no bytes (path={cell.get('path')!r}); embed the bytes")
        cell = data
    if isinstance(cell, (bytes, bytearray, memoryview)):
        return _open_encoded(bytes(cell), max_pixels, draft)
    if binary:
        array = np.asarray(cell)
        cell = (array > 0).astype(np.uint8) * 255
    return _from_tensor(cell, max_pixels)


def decode_mask(cell, size: tuple[int, int], max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """A ground-truth region as uint8 0/1 (size[0], size[1]): a mask image/tensor (non-zero = inside,
    stretched with nearest neighbour) or a box ``[y0, x0, y1, x1]`` in [0, 1] of the image's height/width."""
    height, width = size
    values = np.asarray(cell, dtype=object) if isinstance(cell, (list, tuple)) else None
    if values is not None and values.shape == (4,):
        try:
            y0, x0, y1, x1 = (float(v) for v in values)
        except (TypeError, ValueError):
            raise DecodeError(f"box {cell!r} is not four numbers") from None
        if not (0 <= y0 < y1 <= 1 and 0 <= x0 < x1 <= 1):
            raise DecodeError(f"box {cell!r} is not [y0, x0, y1, x1] with 0 <= y0 < y1 <= 1, 0 <= x0 < x1 <= 1")
        top, left = int(np.floor(y0 * height)), int(np.floor(x0 * width))
        out = np.zeros(size, np.uint8)
        out[top:max(int(np.ceil(y1 * height)), top + 1), left:max(int(np.ceil(x1 * width)), left + 1)] = 1
        return out
    image = _open_cell(cell, "mask", max_pixels, binary=True).convert("L").resize((width, height), Image.NEAREST)
    return (np.asarray(image) > 127).astype(np.uint8)


def _open_encoded(data: bytes, max_pixels: int, draft=None) -> Image.Image:
    if not data:
        raise DecodeError("image is empty (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data))
    except Exception as exc:  # noqa: BLE001 - PIL raises many types
        raise DecodeError(f"not a decodable image ({len(data)} bytes): {exc}") from None
    width, height = image.size
    if width * height > max_pixels:
        raise DecodeError(f"image of {width}x{height} pixels exceeds the limit of {max_pixels} pixels "
                          "(decompression-bomb guard; raise max_pixels to allow it)")
    if draft is not None and image.format == "JPEG" and image.mode in ("RGB", "L", "YCbCr"):
        image.draft(image.mode, draft((width, height)))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image.load()
    except Exception as exc:  # noqa: BLE001 - truncated or corrupt data
        raise DecodeError(f"corrupt or truncated {image.format or 'image'}: {exc}") from None
    return _to_rgb(image)


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8))
    elif image.mode == "F":
        raise DecodeError("floating-point images are not supported; store uint8 or 16-bit pixels")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA"):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return background
    return image.convert("RGB")


def _from_tensor(cell, max_pixels: int) -> Image.Image:
    try:
        array = np.asarray(cell if not isinstance(cell, list) else np.array(cell, dtype=object).tolist())
        if array.dtype == object:
            array = np.stack([np.stack(list(row)) for row in array])
    except Exception as exc:  # noqa: BLE001
        raise DecodeError(f"tensor cell is not a regular array: {exc}") from None
    if array.ndim == 3 and array.shape[-1] in (1, 3, 4):
        pass
    elif array.ndim == 2:
        array = array[..., None]
    else:
        raise DecodeError(f"tensor of shape {array.shape} is not an image (H, W), (H, W, 1), (H, W, 3) or (H, W, 4)")
    if array.shape[0] * array.shape[1] > max_pixels:
        raise DecodeError(f"image of {array.shape[1]}x{array.shape[0]} pixels exceeds the limit of {max_pixels}")
    if array.dtype == np.uint8:
        pixels = array
    elif np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating):
        if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
            raise DecodeError("tensor has NaN or infinite values")
        if array.min() < 0 or array.max() > 255:
            raise DecodeError(f"tensor values span [{array.min()}, {array.max()}], outside pixel range [0, 255]")
        pixels = np.round(array).astype(np.uint8)
    else:
        raise DecodeError(f"tensor dtype {array.dtype} is not a pixel type")
    if pixels.shape[-1] == 1:
        pixels = np.repeat(pixels, 3, axis=-1)
    elif pixels.shape[-1] == 4:
        return _to_rgb(Image.fromarray(pixels, "RGBA"))
    return Image.fromarray(np.ascontiguousarray(pixels), "RGB")


def _scaled_size(full: tuple[int, int], size: tuple[int, int], policy: str) -> tuple[int, int]:
    """The (width, height) a ``full``-sized (width, height) image is resized to, before a crop or pad."""
    height, width = size
    if policy == "center_crop":
        scale = max(width / full[0], height / full[1])
        return max(width, round(full[0] * scale)), max(height, round(full[1] * scale))
    if policy == "pad":
        scale = min(width / full[0], height / full[1])
        return max(1, round(full[0] * scale)), max(1, round(full[1] * scale))
    return width, height


def _fit(image: Image.Image, size: tuple[int, int], policy: str) -> np.ndarray:
    height, width = size
    if image.size != (width, height):
        resized = image.resize(_scaled_size(image.size, size, policy), Image.BILINEAR)
        if policy == "center_crop":
            left, top = (resized.width - width) // 2, (resized.height - height) // 2
            image = resized.crop((left, top, left + width, top + height))
        elif policy == "pad":
            canvas = Image.new("RGB", (width, height), (0, 0, 0))
            canvas.paste(resized, ((width - resized.width) // 2, (height - resized.height) // 2))
            image = canvas
        else:
            image = resized
    return np.asarray(image, dtype=np.uint8)


def image_cells(column) -> list:
    """Python cells of an image column: bytes, HF structs, or ndarrays for tensor columns."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if isinstance(column.type, pa.FixedShapeTensorType):
        valid = column.is_valid().to_numpy(zero_copy_only=False)
        arrays = column.fill_null(0).to_numpy_ndarray() if column.null_count else column.to_numpy_ndarray()
        return [a if ok else None for a, ok in zip(arrays, valid)]
    if isinstance(column, pa.ExtensionArray) and hasattr(column, "to_numpy"):  # Ray's tensor types
        return list(column.to_numpy(zero_copy_only=False))
    return column.to_pylist()


def encode_png(pixels: np.ndarray) -> bytes:
    """uint8 pixels (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) as PNG bytes: the inverse of decoding an encoded
    cell, for pictures and for data staged as files.

    >>> decode_image(encode_png(np.full((4, 6, 1), 7, np.uint8)), size=(4, 6))[0, 0].tolist()
    [7, 7, 7]
    """
    pixels = np.asarray(pixels, np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels[..., 0] if pixels.ndim == 3 and pixels.shape[-1] == 1 else pixels).save(buffer, "PNG")
    return buffer.getvalue()
