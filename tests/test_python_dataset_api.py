"""The whole job from Python over numpy arrays, a tf.data.Dataset and a Hugging Face datasets.Dataset: the same
Parquet as the command line's, rows in their order, resume, and other data refused for the same output."""

import numpy as np
import pytest

from tests.test_input_folders import gray_model, lfw_faces
from worker.job import explain_dataset


def test_gray_arrays_with_a_one_channel_model(ray_local, tmp_path):
    from worker import GuidedBackprop

    model = gray_model(tmp_path / "gray.keras")
    faces, labels = lfw_faces(10), np.arange(10) % 3
    out = str(tmp_path / "maps")
    options = dict(preprocessing="scale01", batch_size=4, reduction="none", map_dtype="float32", target="label")
    result = explain_dataset(faces, model, out, labels=labels, **options)
    assert result.summary["rows_out"] == 10 and result.summary["complete"] and not result.errors()
    table = result.table()
    assert table["index"].to_pylist() == list(range(10)) and table["label"].to_pylist() == labels.tolist()
    assert table["target_class"].to_pylist() == labels.tolist()
    engine = GuidedBackprop(model, batch_size=4, preprocessing="scale01", reduction="none", map_dtype="float32",
                            target="label")
    want = engine.explain(faces[..., None], labels).as_float32()
    np.testing.assert_allclose(result.maps().reshape(want.shape), want, rtol=1e-3, atol=1e-4 * np.abs(want).max())
    assert result.metadata()["config"]["input"] == out + "-input"

    again = explain_dataset(faces, model, out, labels=labels, **options)  # the same data: nothing left to do
    assert again.summary["rows_this_run"] == 0 and again.summary["rows_out"] == 10
    with pytest.raises(ValueError, match="holds maps of other data .* overwrite=True"):
        explain_dataset(faces[::-1].copy(), model, out, labels=labels, **options)
    with pytest.raises(TypeError, match="uint8 pixels 0-255"):
        explain_dataset(faces / 255.0, model, str(tmp_path / "float"), labels=labels, **options)


def test_tf_data_dataset(ray_local, job_model, tmp_path):
    import tensorflow as tf

    from tests.images import digits_images

    images, labels = digits_images(32, limit=12)
    ds = tf.data.Dataset.from_tensor_slices({"image": images, "label": labels, "note": [f"n{i}" for i in range(12)]})
    result = explain_dataset(ds, job_model, str(tmp_path / "maps"), preprocessing="scale01", batch_size=8,
                             target="label")
    table = result.table()
    assert result.summary["rows_out"] == 12 and table["target_class"].to_pylist() == labels.tolist()
    assert table["note"].to_pylist() == [f"n{i}".encode() for i in range(12)]
    assert result.maps().shape == (12, 32, 32) and not np.isnan(result.maps()).any()


def test_hugging_face_dataset(ray_local, job_model, tmp_path):
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    from tests.images import real_rgb

    photos = [Image.fromarray(p) for p in real_rgb(size=(40, 48))]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)})
    ds = datasets.Dataset.from_dict({"image": photos, "label": [3, 1, 4, 1]}, features=features)
    result = explain_dataset(ds, job_model, str(tmp_path / "maps"), preprocessing="scale01", batch_size=4,
                             target="label")
    assert result.summary["rows_out"] == 4 and result.table()["target_class"].to_pylist() == [3, 1, 4, 1]
    assert not result.errors()
