"""The one decode path, on real images in every encoding and mode (no Ray, no TensorFlow)."""

import sys

import numpy as np
import pytest

from tests.images import bomb_png, encode, png16, real_rgb
from worker.data.decode import DecodeError, decode_image

SIZE = (32, 32)


@pytest.fixture(scope="module")
def photo():
    return real_rgb()[0]


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "BMP"])
def test_encoded_formats(photo, fmt):
    out = decode_image(encode(photo, fmt), SIZE)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    expected = decode_image(photo, SIZE)
    assert np.abs(out.astype(int) - expected).mean() < 12  # lossy formats stay close


def test_modes_convert(photo):
    gray = decode_image(encode(photo, mode="L"), SIZE)
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    rgba = decode_image(encode(photo, mode="RGBA"), SIZE)
    np.testing.assert_array_equal(rgba, decode_image(encode(photo), SIZE))
    palette = decode_image(encode(photo, mode="P"), SIZE)
    assert np.abs(palette.astype(int) - decode_image(photo, SIZE)).mean() < 20
    sixteen = decode_image(png16(photo), SIZE)
    np.testing.assert_allclose(sixteen.astype(int), gray.astype(int), atol=1)


def test_hf_struct_and_tensors(photo):
    via_struct = decode_image({"bytes": encode(photo), "path": "x.png"}, SIZE)
    np.testing.assert_array_equal(via_struct, decode_image(photo, SIZE))
    np.testing.assert_array_equal(decode_image(photo.tolist(), SIZE), decode_image(photo, SIZE))
    assert decode_image(photo[..., 0], SIZE).shape == (32, 32, 3)
    assert decode_image(photo.astype(np.float32), SIZE).dtype == np.uint8


@pytest.mark.parametrize("cell, message", [
    (b"", "empty"),
    (b"\x89PNG garbage", "not a decodable image"),
    (None, "missing"),
    ({"bytes": None, "path": "a.png"}, "no bytes"),
    (np.zeros((4, 4, 5), np.uint8), "not an image"),
    (np.full((4, 4, 3), np.nan, np.float32), "NaN"),
    (np.full((4, 4, 3), 300.0), "outside pixel range"),
    (np.zeros((4, 4, 3), np.complex64), "not a pixel type"),
])
def test_bad_cells(cell, message):
    with pytest.raises(DecodeError, match=message):
        decode_image(cell, SIZE)


def test_truncated_jpeg(photo):
    data = encode(photo, "JPEG")
    with pytest.raises(DecodeError, match="truncated|corrupt|decodable"):
        decode_image(data[: len(data) // 2], SIZE)


def test_decompression_bomb_guard():
    data = bomb_png()
    assert len(data) < 1_000_000
    with pytest.raises(DecodeError, match="20000x20000 pixels exceeds the limit"):
        decode_image(data, SIZE)


@pytest.mark.parametrize("policy", ["stretch", "center_crop", "pad"])
def test_resize_policies(photo, policy):
    out = decode_image(photo, (20, 20), resize=policy)
    assert out.shape == (20, 20, 3)
    if policy == "pad":  # a 40-high, 48-wide image padded into a square: black bars top and bottom
        assert out[0].max() == 0 and out[-1].max() == 0 and out[10, 10].max() > 0


def test_decode_imports_no_tensorflow():
    import subprocess

    code = "import worker.data.decode, worker.data.dataset, worker.data.schema, sys; print('tensorflow' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


@pytest.mark.parametrize("policy", ["stretch", "center_crop", "pad"])
def test_jpeg_draft_decodes_large_photos_at_reduced_scale(policy):
    from skimage import data

    full = data.astronaut()  # 512 x 512: the decoder may scale by 1/8 for a 64 x 48 input
    jpeg = encode(full, "JPEG")
    plain = decode_image(jpeg, (48, 64), policy)
    draft = decode_image(jpeg, (48, 64), policy, jpeg_draft=True)
    assert draft.shape == plain.shape == (48, 64, 3)
    difference = np.abs(draft.astype(int) - plain.astype(int))
    assert difference.max() > 0, "draft mode was not used"
    assert difference.mean() < 4, difference.mean()  # a DCT-domain downscale, then the same resize
    # images not larger than the model input, and other formats, decode exactly as without draft mode
    small = encode(real_rgb()[0], "JPEG")
    assert (decode_image(small, (48, 64), policy, jpeg_draft=True) == decode_image(small, (48, 64), policy)).all()
    png = encode(full, "PNG")
    assert (decode_image(png, (48, 64), policy, jpeg_draft=True) == decode_image(png, (48, 64), policy)).all()


def test_cmyk_jpeg_comes_back_as_rgb(photo):
    from io import BytesIO

    from PIL import Image

    buffer = BytesIO()
    Image.fromarray(photo).convert("CMYK").save(buffer, format="JPEG", quality=95)
    out = decode_image(buffer.getvalue(), SIZE)
    assert out.shape == (32, 32, 3)
    assert np.abs(out.astype(int) - decode_image(photo, SIZE)).mean() < 12  # close to the RGB original


def test_a_translucent_image_is_composited_on_white():
    """Alpha blends the colour with a white background, pixel by pixel (no resize: the model's size)."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    alpha = rng.integers(0, 256, (16, 16), dtype=np.uint8)
    alpha[0], alpha[1] = 0, 255  # fully transparent and fully opaque rows
    out = decode_image(encode(np.dstack([rgb, alpha]), mode="RGBA"), (16, 16)).astype(float)
    a = alpha[..., None] / 255.0
    np.testing.assert_allclose(out, rgb * a + 255 * (1 - a), atol=1.01)
    assert out[alpha == 0].min() == 255 and (out[alpha == 255] == rgb[alpha == 255]).all()


def test_the_bomb_guard_runs_before_any_pixel_is_decoded(monkeypatch):
    """The header is read, the size refused, and PIL's decoder never runs (a bomb costs no memory)."""
    from PIL import ImageFile

    loads = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(self.size) or real_load(self))
    with pytest.raises(DecodeError, match="exceeds the limit"):
        decode_image(bomb_png(), SIZE)
    assert loads == []
    decode_image(encode(np.zeros((8, 8, 3), np.uint8)), SIZE)
    assert loads and set(loads) == {(8, 8)}  # the patch does see a real decode
