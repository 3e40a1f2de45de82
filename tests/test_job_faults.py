"""Faults: an explain actor SIGKILLed mid-run, a poison row, a decompression bomb inside a job."""

import json
import os
import signal
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorflow as tf  # module level: a Lambda must not close over a local import

from tests import jobdata
from tests.images import bomb_png, encode
from worker.data.decode import DecodeOptions
from worker.job import run
from worker.job.config import JobConfig
from worker.job.stages import ExplainBatch, decode_stage


@pytest.mark.slow
def test_actor_killed_mid_run(ray_local, tmp_path):
    # the actor is killed while it still holds rows: two seconds after it has recorded itself (its engine built,
    # its first batches compiling), of some ten seconds of explaining; a new actor recording itself afterwards
    # shows it was (when the kill waited for the first committed part, the actor had explained every row before
    # Ray Data's first write task committed one, on a faster avx512 host, and the kill proved nothing)
    from tests.models import small_cnn

    model = tmp_path / "question96.keras"
    small_cnn(96, classes=10, seed=3).save(str(model))
    images, labels = jobdata.digits(1797, size=96)
    n = len(images)
    jobdata.write_hf(tmp_path / "d.parquet", images, labels, row_group=8)
    out = tmp_path / "out"
    result = {}
    job = threading.Thread(target=lambda: result.update(run(JobConfig(
        model=str(model), input=str(tmp_path / "d.parquet"), output=str(out), preprocessing="scale01",
        batch_size=4, rows_per_file=8), echo=lambda *_: None)))
    job.start()
    deadline = time.time() + 240
    while time.time() < deadline and not list(out.glob("_workers/*.json")):
        time.sleep(0.05)
    time.sleep(2)
    committed = sum(pq.ParquetFile(p).metadata.num_rows for p in out.glob("part-*.parquet"))
    assert job.is_alive() and committed < n // 2, "the job was nearly done before its actor could be killed"
    victim = json.loads(next((out / "_workers").glob("*.json")).read_text())["pid"]
    os.kill(victim, signal.SIGKILL)
    job.join(timeout=600)
    assert result, "the job did not complete after its actor was killed"
    assert result["rows_out"] == n and result["duplicate_ids"] == 0 and result["complete"]
    assert len(list((out / "_workers").glob("*.json"))) >= 2  # a new actor took over
    ids = pq.read_table(str(out))["id"].to_pylist()
    assert len(ids) == len(set(ids)) == n


class _PoisonedEngine:
    """Stands in for the model: fails deterministically on any batch holding an all-white image."""

    def __init__(self, real):
        self.real, self.target, self.calls = real, real.target, 0

    def explain(self, images, labels=None):
        self.calls += 1
        if (images.reshape(len(images), -1).min(axis=1) == 255).any():
            raise RuntimeError("poisoned input")
        return self.real.explain(images, labels)


def test_poison_row_is_isolated(job_model):
    images, _ = jobdata.digits(7)
    images[3] = 255  # the poison
    table = pa.table({"id": [f"r{i}" for i in range(7)], "image": [encode(im) for im in images]})
    cfg = JobConfig(model=job_model, input="-", output="-", preprocessing="scale01", batch_size=4)
    decoded = decode_stage(table, image_column="image", label_column=None, needs_label=False, num_classes=10,
                           options=DecodeOptions((32, 32)))
    actor = ExplainBatch.__new__(ExplainBatch)
    actor.config, actor.map_shape, actor.k = cfg, (32, 32), 1
    from worker.job.config import build_engine

    actor.engine = _PoisonedEngine(build_engine(cfg, job_model))
    out = actor._explain_table(decoded)
    errors = out["error"].to_pylist()
    assert errors[3] == "explain: RuntimeError: poisoned input"
    assert [e is None for e in errors] == [True, True, True, False, True, True, True]
    assert out["map"].null_count == 1 and out.num_rows == 7
    assert actor.engine.calls == 1 + 7  # one failed batch, then each row once; no endless retry


def test_decompression_bomb_is_a_row_error(ray_local, job_model, tmp_path):
    images, _ = jobdata.digits(3)
    cells = [encode(images[0]), bomb_png(), encode(images[1])]
    pq.write_table(pa.table({"image": pa.array(cells, pa.binary())}), str(tmp_path / "d.parquet"))
    summary = run(JobConfig(model=job_model, input=str(tmp_path / "d.parquet"), output=str(tmp_path / "out"),
                            preprocessing="scale01", max_pixels=50_000_000), echo=lambda *_: None)
    table = pq.read_table(str(tmp_path / "out")).sort_by("id")
    assert summary["rows_out"] == 3 and summary["errors_this_run"] == 1
    assert "20000x20000 pixels exceeds the limit of 50000000" in table["error"][1].as_py()
    assert np.isfinite(table["predicted_prob"].to_numpy(zero_copy_only=False)[[0, 2]]).all()


@pytest.mark.slow
def test_large_images_under_object_store_pressure(job_model, tmp_path):
    """Blocks of large encoded images bigger than the object store: Ray spills, the job completes."""
    from tests.conftest import start_ray

    rng = np.random.default_rng(0)
    cells = [encode(rng.integers(0, 256, (2000, 2000, 3), dtype=np.uint8)) for _ in range(8)]  # ~12 MB each
    pq.write_table(pa.table({"image": pa.array(cells, pa.binary())}), str(tmp_path / "big.parquet"),
                   row_group_size=4)
    ray = start_ray(num_cpus=2, object_store_memory=80 * 1024 * 1024)
    try:
        summary = run(JobConfig(model=job_model, input=str(tmp_path / "big.parquet"), output=str(tmp_path / "out"),
                                preprocessing="scale01", batch_size=4), echo=lambda *_: None)
    finally:
        ray.shutdown()
    assert summary["rows_out"] == 8 and summary["errors_this_run"] == 0 and summary["complete"]


@pytest.mark.slow
def test_poison_row_through_the_real_job(ray_local, tmp_path):
    """A real model that fails on one input (an all-white image trips an assertion in a Lambda): that row gets
    the error, and every other row's map is the one the engine gives for that row's own image."""
    import keras

    from worker import GuidedBackprop
    keras.utils.set_random_seed(1)
    image = keras.Input((32, 32, 3))
    checked = keras.layers.Lambda(lambda t: tf.tuple([t], control_inputs=[tf.debugging.assert_less(
        tf.reduce_max(tf.reduce_min(t, axis=[1, 2, 3])), 0.99, message="poisoned input")])[0])(image)
    h = keras.layers.Conv2D(4, 3, activation="relu")(checked)
    model = keras.Model(image, keras.layers.Dense(10)(keras.layers.Flatten()(h)))
    path = str(tmp_path / "poison.keras")
    model.save(path)
    images, labels = jobdata.digits(12)
    images[5] = 255  # the poison
    jobdata.write_hf(tmp_path / "d.parquet", images, labels, row_group=12)
    summary = run(JobConfig(model=path, input=str(tmp_path / "d.parquet"), output=str(tmp_path / "out"),
                            preprocessing="scale01", batch_size=4, map_dtype="float32",
                            allow_unsafe_deserialization=True), echo=lambda *_: None)
    assert summary["rows_out"] == 12 and summary["errors_this_run"] == 1
    table = pq.read_table(str(tmp_path / "out"))
    rows = {r: i for i, r in enumerate(table["id"].to_pylist())}
    errors = table["error"].to_pylist()
    assert "poisoned input" in errors[rows["d.parquet#5"]] and errors[rows["d.parquet#5"]].startswith("explain:")
    from worker.data.schema import read_maps

    maps = read_maps(table)
    engine = GuidedBackprop(path, preprocessing="scale01", batch_size=1, map_dtype="float32", safe_mode=False)
    for i in [0, 4, 6, 11]:  # beside the poison, in its batch and after it
        expected = engine.explain(images[i:i + 1]).maps[0, 0]
        np.testing.assert_allclose(maps[rows[f"d.parquet#{i}"]], expected, rtol=1e-5, atol=1e-7)
