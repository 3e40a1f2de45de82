"""Image folders as the job's input: labels in Keras's order, ids the relative paths, bad files as error rows,
a 1-channel model on grayscale files, listings on a real S3-compatible server, a killed run resumed."""

import os

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tests import jobdata
from tests.conftest import moto_server, s3_environment
from tests.images import encode, real_rgb
from worker.data.dataset import plan_input
from worker.data.schema import read_maps, read_metadata
from worker.job import JobConfig, run

FORMATS = ["PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF"]
SUFFIX = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp", "BMP": ".bmp", "GIF": ".gif", "TIFF": ".tiff"}


def photo_tree(root):
    """Real photos in class subfolders (each format, a nested folder, an empty class, a grayscale file), a
    hidden file, a text file and a truncated JPEG; returns {relative path: image or None for a bad file}."""
    photos = real_rgb(size=(40, 48))
    files = {}
    for c, name in enumerate(["rocket", "astronaut", "Zebra", "coffee"]):  # sorting: capitals first
        for i, fmt in enumerate(FORMATS):
            rel = f"{name}/{'deep/' if i == 5 else ''}{fmt.lower()}_{i}{SUFFIX[fmt]}"
            files[rel] = (photos[(c + i) % 4], fmt)
    files["coffee/gray.png"] = (np.asarray(Image.fromarray(photos[1]).convert("L")), "PNG")
    for rel, (image, fmt) in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode(image, fmt))
    (root / "empty_class").mkdir()  # Keras gives an empty class folder an index too
    (root / "astronaut" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (root / "rocket" / "notes.txt").write_text("not an image")
    (root / "coffee" / "broken.jpg").write_bytes(encode(files["coffee/png_0.png"][0], "JPEG")[:300])
    return {**{rel: image for rel, (image, _) in files.items()}, "rocket/notes.txt": None, "coffee/broken.jpg": None}


def keras_labels(root) -> tuple[list[str], dict[str, int]]:
    """keras.utils.image_dataset_from_directory's own class names and label of each file, on the same tree."""
    import shutil

    import keras

    # a copy without the truncated JPEG: Keras's iterator stops at it ("jpeg::Uncompress failed")
    whole = root.parent / f"{root.name}-for-keras"
    shutil.copytree(root, whole, ignore=lambda _, names: [n for n in names if n.startswith("broken")])
    ds = keras.utils.image_dataset_from_directory(str(whole), shuffle=False, batch_size=None, image_size=(8, 8))
    labels = [int(y) for _, y in ds.as_numpy_iterator()]
    return ds.class_names, {os.path.relpath(p, whole): y for p, y in zip(ds.file_paths, labels)}


def gray_model(path, size=25, classes=5):
    """A small 1-channel CNN (seeded, untrained): conv-ReLU blocks, a ReLU dense layer, softmax."""
    import keras
    from keras import layers

    keras.utils.set_random_seed(5)
    x = image = keras.Input((size, size, 1))
    for filters in (8, 16):
        x = layers.MaxPool2D()(layers.Conv2D(filters, 3, padding="same", activation="relu")(x))
    x = layers.Dense(16, activation="relu")(layers.Flatten()(x))
    keras.Model(image, layers.Dense(classes, activation="softmax")(x)).save(str(path))
    return str(path)


def lfw_faces(n):
    """Grayscale faces (uint8 (n, 25, 25)) that ship with scikit-image."""
    from skimage.data import lfw_subset

    return (lfw_subset()[:n] * 255).round().astype(np.uint8)


def test_folder_job_labels_in_keras_order_and_bad_files_as_error_rows(ray_local, tmp_path):
    """Colour photos and a grayscale file through a 1-channel model: the job's map of the grayscale file is the
    engine's of its (N, H, W) gray pixels."""
    from worker import GuidedBackprop
    from worker.data.decode import decode_image

    model = gray_model(tmp_path / "gray.keras")
    tree = tmp_path / "photos"
    files = photo_tree(tree)
    out = tmp_path / "out"
    options = dict(preprocessing="scale01", batch_size=8, target="label", reduction="none", map_dtype="float32")
    summary = run(JobConfig(model=model, input=str(tree), output=str(out), **options))
    assert summary["rows_in"] == summary["rows_out"] == len(files) and summary["complete"]
    assert summary["duplicate_ids"] == 0 and summary["errors_this_run"] == 2
    table = pq.read_table(str(out)).sort_by("id")
    assert sorted(table["id"].to_pylist()) == sorted(files)
    errors = {i: e for i, e in zip(table["id"].to_pylist(), table["error"].to_pylist()) if e}
    assert sorted(errors) == ["coffee/broken.jpg", "rocket/notes.txt"]
    assert all(e.startswith("decode: ") for e in errors.values())

    class_names, expected = keras_labels(tree)
    ours = dict(zip(table["id"].to_pylist(), table["label"].to_pylist()))
    assert set(expected) <= set(ours)  # Keras lists fewer formats (no WebP, no TIFF)
    assert {rel: ours[rel] for rel in expected} == expected
    assert {rel for rel in ours if rel.endswith((".webp", ".tiff"))} and len(set(expected.values())) == 4
    meta = read_metadata(table.schema)
    assert meta["input"]["class_names"] == class_names and meta["input"]["format"] == "images"
    assert meta["config"]["label_column"] == "label"
    assert table.filter(table["error"].is_null())["target_class"].to_pylist() == [
        ours[i] for i, e in zip(table["id"].to_pylist(), table["error"].to_pylist()) if e is None]

    gray = decode_image((tree / "coffee" / "gray.png").read_bytes(), (25, 25))[None, ..., 0]
    engine = GuidedBackprop(model, batch_size=1, **{k: v for k, v in options.items() if k != "batch_size"})
    want = engine.explain(gray, [ours["coffee/gray.png"]]).as_float32()
    got = read_maps(table.filter(pc.equal(table["id"], "coffee/gray.png")))
    np.testing.assert_allclose(got.reshape(want.shape), want, rtol=1e-3, atol=1e-4 * np.abs(want).max())

    # the explorer names the folder's classes and finds a row's image in the tree by its id
    from worker.explore.pictures import Pictures
    from worker.explore.slices import Output

    opened = Output(str(out))
    assert opened.class_names == class_names and opened.class_name(ours["coffee/gray.png"]) == "coffee"
    shown = Pictures(opened.config).image({"id": "coffee/gray.png", "map": got.reshape(25, 25)})
    np.testing.assert_array_equal(shown[..., 0], gray[0])

    # the same folder again: nothing to do (no actors start)
    assert run(JobConfig(model=model, input=str(tree), output=str(out), **options))["rows_this_run"] == 0


def test_the_engine_takes_grayscale_batches_for_a_one_channel_model(tmp_path):
    from worker import GuidedBackprop

    engine = GuidedBackprop(gray_model(tmp_path / "gray.keras"), batch_size=4, preprocessing="scale01",
                            reduction="none", map_dtype="float32")
    faces = lfw_faces(4)
    plain = engine.explain(faces).as_float32()
    for batch in (faces[..., None], np.repeat(faces[..., None], 3, axis=-1)):  # the RGB as the job decodes gray
        np.testing.assert_allclose(engine.explain(batch).as_float32(), plain, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match=r"\(N, H, W, 1\) or \(N, H, W\); got \(25, 25, 3\)"):
        engine.explain(np.zeros((25, 25, 3), np.uint8))  # one RGB image, not a batch of gray ones


def test_listing_an_s3_folder_finds_its_classes(tmp_path):
    import pyarrow.fs as pafs

    with moto_server() as port, s3_environment(f"http://127.0.0.1:{port}"):
        import boto3

        boto3.client("s3").create_bucket(Bucket="photos")
        tree = tmp_path / "photos"
        files = photo_tree(tree)
        os.rmdir(tree / "empty_class")  # an object store has no empty folders
        s3 = pafs.FileSystem.from_uri("s3://photos")[0]
        pafs.copy_files(str(tree), "photos/train", destination_filesystem=s3)
        source = plan_input("s3://photos/train/", ["image", "label"])
        class_names, expected = keras_labels(tree)
        assert source.format == "images" and source.class_names == class_names
        listed = {m: v for u in source.units for m, v in zip(u.members, u.labels)}
        assert sorted(listed) == sorted(files) and {rel: listed[rel] for rel in expected} == expected


def test_the_audit_reads_folder_rows_by_id(tmp_path):
    from worker.audit.sample import decoded_rows
    from worker.data.decode import DecodeOptions

    photo_tree(tmp_path / "photos")
    config = JobConfig(model="m.keras", input=str(tmp_path / "photos"), output="o", label_column="label")
    rows = decoded_rows(config, DecodeOptions((8, 8)), with_labels=True, ids=["rocket/png_0.png", "coffee/gray.png"])
    assert [(row_id, image.shape, label) for row_id, image, label, _ in rows] == [
        ("coffee/gray.png", (8, 8, 3), 2), ("rocket/png_0.png", (8, 8, 3), 4)]  # Zebra astronaut coffee empty rocket


def test_a_folder_without_images_or_classes_fails_before_any_cluster_time(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match="no Parquet files found at .*, nor TFRecord or image files .*--input-format"):
        run(JobConfig(model="absent.keras", input=str(tmp_path / "docs"), output=str(tmp_path / "o")))
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "a.png").write_bytes(encode(real_rgb()[0]))
    with pytest.raises(ValueError, match="target 'label' needs labels: the image folder .* has no class subfolders"):
        run(JobConfig(model="absent.keras", input=str(flat), output=str(tmp_path / "o"), target="label"))


@pytest.mark.slow  # two jobs in fresh Ray clusters
def test_folder_run_killed_and_resumed(ray_local, job_model, tmp_path):
    from tests.images import digits_images

    images, labels = digits_images(32, limit=160)
    tree = tmp_path / "digits"
    for i, (image, label) in enumerate(zip(images, labels)):
        (tree / f"d{label}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image[..., 0]).save(tree / f"d{label}" / f"{i:04d}.png")
    out = tmp_path / "out"
    table = jobdata.kill_and_resume(jobdata.explain_command(job_model, tree, out), out, 160)
    assert table["error"].null_count == 160
    assert sorted(table["id"].to_pylist()) == sorted(f"d{y}/{i:04d}.png" for i, y in enumerate(labels))
    # a file added to the folder: the next run explains only it
    Image.fromarray(images[0][..., 0]).save(tree / "d3" / "new.png")
    again = run(JobConfig(model=job_model, input=str(tree), output=str(out), preprocessing="scale01", batch_size=4,
                          rows_per_file=8))
    assert again["rows_this_run"] == 1 and again["rows_out"] == 161 and again["duplicate_ids"] == 0
