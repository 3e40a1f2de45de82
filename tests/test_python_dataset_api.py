"""The whole job from Python: numpy arrays through the job (a 1-channel model, rows in their order, resume,
other data refused), and a tf.data.Dataset and a Hugging Face datasets.Dataset staged as the same Parquet input."""

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.test_input_folders import gray_model, lfw_faces
from worker.data.decode import DecodeOptions, image_cells
from worker.job import explain_dataset
from worker.job.frames import stage_input


def decoded(path, size) -> tuple[np.ndarray, object]:
    table = pq.read_table(str(path)).sort_by("index")
    options = DecodeOptions(size)
    return np.stack([options.decode(c) for c in image_cells(table["image"])]), table


def test_gray_arrays_through_the_job_with_a_one_channel_model(ray_local, tmp_path):
    from worker import GuidedBackprop

    model = gray_model(tmp_path / "gray.keras", classes=3)
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
    want = engine.explain(faces, labels).as_float32()
    np.testing.assert_allclose(result.maps().reshape(want.shape), want, rtol=1e-3, atol=1e-4 * np.abs(want).max())
    assert result.metadata()["config"]["input"] == out + "-input"

    again = explain_dataset(faces, model, out, labels=labels, **options)  # the same data: nothing left to do
    assert again.summary["rows_this_run"] == 0 and again.summary["rows_out"] == 10
    with pytest.raises(ValueError, match="holds maps of other data .* overwrite=True"):
        explain_dataset(faces[::-1].copy(), model, out, labels=labels, **options)
    with pytest.raises(TypeError, match="uint8 pixels 0-255"):
        explain_dataset(faces / 255.0, model, str(tmp_path / "float"), labels=labels, **options)


def test_a_tf_data_dataset_stages_as_its_arrays_do(tmp_path):
    import tensorflow as tf

    from tests.images import digits_images

    images, labels = digits_images(32, limit=40)
    notes = [f"n{i}" for i in range(40)]
    ds = tf.data.Dataset.from_tensor_slices({"image": images, "label": labels, "note": notes})
    from_tf = stage_input(ds, str(tmp_path / "tf"))
    from_arrays = stage_input({"image": images, "label": labels, "note": np.array(notes, object)},
                              str(tmp_path / "arrays"))
    assert from_tf.rows == 40 and from_tf.columns == ["index", "image", "label", "note"]
    pixels, table = decoded(tmp_path / "tf", (32, 32))
    np.testing.assert_array_equal(pixels, images)
    assert table["label"].to_pylist() == labels.tolist()
    assert [n.decode() for n in table["note"].to_pylist()] == notes
    pairs = stage_input(tf.data.Dataset.from_tensor_slices((images, labels)), str(tmp_path / "pairs"))
    assert pairs.columns == ["index", "image", "label"] and decoded(tmp_path / "pairs", (32, 32))[1]["label"] \
        .to_pylist() == labels.tolist()
    assert from_arrays.rows == 40
    # staged once: the same dataset again leaves the files as they are
    again = stage_input(ds, str(tmp_path / "tf"))
    assert again.digest == from_tf.digest


def test_a_hugging_face_dataset_stages_its_images_and_labels(tmp_path):
    import datasets
    from PIL import Image

    from tests.images import real_rgb

    photos = real_rgb(size=(40, 48))
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)})
    ds = datasets.Dataset.from_dict({"image": [Image.fromarray(p) for p in photos], "label": [3, 1, 4, 1]},
                                    features=features)
    result = stage_input(ds, str(tmp_path / "hf"))
    assert result.rows == 4 and result.columns == ["index", "image", "label"]
    pixels, table = decoded(tmp_path / "hf", (40, 48))
    want = np.stack([DecodeOptions((40, 48)).decode(ds.with_format("arrow")[i:i + 1]["image"].to_pylist()[0])
                     for i in range(4)])
    np.testing.assert_array_equal(pixels, want)
    assert np.abs(pixels.astype(int) - np.stack(photos)).mean() < 1  # PNG is lossless: the photos themselves
    assert table["label"].to_pylist() == [3, 1, 4, 1]
