"""Faults: an explain actor SIGKILLed mid-run, a poison row, a decompression bomb inside a job."""

import json
import os
import signal
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tests import jobdata
from tests.images import bomb_png, encode
from worker.config import JobConfig
from worker.job import run
from worker.stages import ExplainBatch, decode_stage
from worker.decode import DecodeOptions


def test_actor_killed_mid_run(ray_local, job_model, tmp_path):
    images, labels = jobdata.digits(960)
    jobdata.write_hf(tmp_path / "d.parquet", images, labels, row_group=8)
    out = tmp_path / "out"
    result = {}
    job = threading.Thread(target=lambda: result.update(run(JobConfig(
        model=job_model, input=str(tmp_path / "d.parquet"), output=str(out), preprocessing="scale01",
        batch_size=4, rows_per_file=8), echo=lambda *_: None)))
    job.start()
    deadline = time.time() + 240
    while time.time() < deadline and not list((out / "_workers").glob("*.json")):
        time.sleep(0.1)
    time.sleep(2)  # the actor has built its engine and is explaining batches
    assert job.is_alive(), "the job ended before its actor could be killed"
    victim = json.loads(next((out / "_workers").glob("*.json")).read_text())["pid"]
    os.kill(victim, signal.SIGKILL)
    job.join(timeout=600)
    assert result, "the job did not complete after its actor was killed"
    assert result["rows_out"] == 960 and result["duplicate_ids"] == 0 and result["complete"]
    assert len(list((out / "_workers").glob("*.json"))) >= 2  # a new actor took over
    ids = pq.read_table(str(out))["id"].to_pylist()
    assert len(ids) == len(set(ids)) == 960


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
    from worker.config import build_engine

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
