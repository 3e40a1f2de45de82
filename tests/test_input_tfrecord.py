"""TFRecord files of tf.train.Example as the job's input, written by TensorFlow's own writer and read without
TensorFlow: feature keys, passed-through features, ids, bad records as error rows, a killed run resumed."""

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests import jobdata
from tests.images import encode, real_rgb
from worker.data import tfrecord
from worker.data.dataset import plan_input, read_unit
from worker.data.schema import read_metadata
from worker.job import JobConfig, run


def example(image: bytes | None, label: int | None, name: str, boxes=(), label_key="image/class/label",
            image_key="image/encoded"):
    import tensorflow as tf

    feature = {"image/filename": tf.train.Feature(bytes_list=tf.train.BytesList(value=[name.encode()])),
               "image/height": tf.train.Feature(int64_list=tf.train.Int64List(value=[32])),
               "image/object/bbox/xmin": tf.train.Feature(float_list=tf.train.FloatList(value=list(boxes)))}
    if image is not None:
        feature[image_key] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[image]))
    if label is not None:
        feature[label_key] = tf.train.Feature(int64_list=tf.train.Int64List(value=[label]))
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def write(path, records):
    import tensorflow as tf

    with tf.io.TFRecordWriter(str(path)) as writer:
        for record in records:
            writer.write(record)


def shards(root, images, labels, per_file):
    root.mkdir(parents=True, exist_ok=True)
    count = -(-len(images) // per_file)
    for f in range(count):
        part = range(f * per_file, min(len(images), (f + 1) * per_file))
        write(root / f"train.tfrecord-{f:05d}-of-{count:05d}",
              [example(encode(images[i]), int(labels[i]), f"img{i}.png", boxes=[0.1] * (i % 3)) for i in part])


def test_features_as_tensorflow_parses_them(tmp_path):
    """Our reader against tf.io.parse_single_example on the records TensorFlow's writer wrote."""
    import tensorflow as tf

    photos = real_rgb(size=(16, 16))
    records = [example(encode(p), i, f"p{i}", boxes=[0.25 * i, -1.5][:i % 3]) for i, p in enumerate(photos)]
    write(tmp_path / "a.tfrecords", records)
    source = plan_input(str(tmp_path), ["image", "label"])
    assert source.format == "tfrecord" and source.rows == 4
    table = read_unit(source.fs, source.units[0], ["image", "label"], None)
    spec = {"image/encoded": tf.io.FixedLenFeature([], tf.string),
            "image/class/label": tf.io.FixedLenFeature([], tf.int64),
            "image/filename": tf.io.FixedLenFeature([], tf.string),
            "image/object/bbox/xmin": tf.io.VarLenFeature(tf.float32)}
    theirs = [tf.io.parse_single_example(r, spec) for r in tf.data.TFRecordDataset(str(tmp_path / "a.tfrecords"))]
    assert table["id"].to_pylist() == [f"a.tfrecords#{i}" for i in range(4)]
    assert table["image"].to_pylist() == [t["image/encoded"].numpy() for t in theirs]
    assert table["label"].to_pylist() == [int(t["image/class/label"]) for t in theirs]
    assert table["image/filename"].to_pylist() == [t["image/filename"].numpy() for t in theirs]
    assert table["image/height"].to_pylist() == [32] * 4
    for ours, t in zip(table["image/object/bbox/xmin"].to_pylist(), theirs):
        np.testing.assert_array_equal(np.float32(ours), tf.sparse.to_dense(t["image/object/bbox/xmin"]).numpy())
    for record in records:
        assert {k: v for k, (_, v) in tfrecord.parse_example(record).items() if k == "image/class/label"} == {
            "image/class/label": [tf.train.Example.FromString(record).features.feature["image/class/label"]
                                  .int64_list.value[0]]}


def test_tfrecord_job_with_bad_records_and_files(ray_local, job_model, tmp_path):
    from tests.images import digits_images

    images, labels = digits_images(32, limit=20)
    data = tmp_path / "records"
    shards(data, images[:16], labels[:16], per_file=8)
    # a shard with a record of no image, one of no label, one not an image, one not an Example, and cut short
    write(data / "odd.tfrecord", [example(None, 1, "none"), example(encode(images[16]), None, "nolabel"),
                                  example(b"GIF89a but not", 2, "junk"), b"\x07\x08 not a protobuf",
                                  example(encode(images[17]), int(labels[17]), "ok")])
    whole = (data / "odd.tfrecord").read_bytes()
    (data / "odd.tfrecord").write_bytes(whole[:-20])  # the last record cut short
    (data / "zz.tfrecord").write_bytes(b"plain text, not a TFRecord file")
    out = tmp_path / "out"
    summary = run(JobConfig(model=job_model, input=str(data), output=str(out), preprocessing="scale01",
                            batch_size=8, target="label"))
    assert summary["rows_in"] == summary["rows_out"] == 16 + 5 + 1 and summary["duplicate_ids"] == 0
    table = pq.read_table(str(out)).sort_by("id")
    errors = {i: e for i, e in zip(table["id"].to_pylist(), table["error"].to_pylist()) if e}
    assert sorted(errors) == [f"odd.tfrecord#{i}" for i in range(5)] + ["zz.tfrecord#0"]
    assert "'image/encoded' holds 0" in errors["odd.tfrecord#0"]
    assert errors["odd.tfrecord#1"].startswith("label")
    assert errors["odd.tfrecord#2"].startswith("decode: ")
    assert "not a tf.train.Example" in errors["odd.tfrecord#3"]
    assert "truncated" in errors["odd.tfrecord#4"] and "checksum" in errors["zz.tfrecord#0"]
    good = table.filter(table["error"].is_null())
    assert good["target_class"].to_pylist() == good["label"].to_pylist()
    assert sorted(good["label"].to_pylist()) == sorted(labels[:16].tolist())
    assert {n.decode() for n in good["image/filename"].to_pylist()} == {f"img{i}.png" for i in range(16)}
    assert read_metadata(table.schema)["input"]["format"] == "tfrecord"


def test_feature_keys_are_configurable(tmp_path):
    photos = real_rgb(size=(32, 32))
    write(tmp_path / "x.tfrecord", [example(encode(p), i, f"p{i}", image_key="jpeg", label_key="class")
                                    for i, p in enumerate(photos)])
    with pytest.raises(ValueError, match="the feature .image/encoded. .*--image-feature.*'jpeg'"):
        run(JobConfig(model="absent.keras", input=str(tmp_path), output=str(tmp_path / "o"), target="label"))
    source = plan_input(str(tmp_path / "x.tfrecord"), ["image", "label", "image/filename"], image_feature="jpeg",
                        label_feature="class")
    table = read_unit(source.fs, source.units[0], [], None)
    assert table.column_names == ["id", "image", "label", "image/filename", "__read_error"]
    assert table["label"].to_pylist() == [0, 1, 2, 3] and table["image"].to_pylist() == [encode(p) for p in photos]
    with pytest.raises(ValueError, match=r"no column\(s\) \['image/width'\]"):
        plan_input(str(tmp_path), ["image", "image/width"], image_feature="jpeg")


@pytest.mark.slow  # two jobs in fresh Ray clusters
def test_tfrecord_run_killed_and_resumed(ray_local, job_model, tmp_path):
    from tests.images import digits_images

    images, labels = digits_images(32, limit=160)
    data = tmp_path / "records"
    shards(data, images, labels, per_file=100)
    out = tmp_path / "out"
    table = jobdata.kill_and_resume(jobdata.explain_command(job_model, data, out), out, 160)
    assert table["error"].null_count == 160
    assert sorted(table["image/filename"].to_pylist()) == sorted(f"img{i}.png".encode() for i in range(160))
