"""GPU pinning without a GPU: two logical GPUs, two actors, each sees its own CUDA_VISIBLE_DEVICES."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests import jobdata
from tests.conftest import start_ray
from worker.data.schema import maps_to_numpy
from worker.job import JobConfig, run

pytestmark = pytest.mark.slow  # a Ray of its own with two logical GPUs, and a job on it


def test_two_logical_gpus_two_actors(job_model, tmp_path):
    ray = start_ray(num_cpus=4, num_gpus=2)
    try:
        images, labels = jobdata.digits(48)
        jobdata.write_hf(tmp_path / "d.parquet", images, labels, row_group=8)
        out = tmp_path / "out"
        summary = run(JobConfig(model=job_model, input=str(tmp_path / "d.parquet"), output=str(out),
                                preprocessing="scale01", batch_size=4, rows_per_file=8))
        assert summary["complete"] and summary["rows_out"] == 48
        workers = [json.loads(p.read_text()) for p in (out / "_workers").glob("*.json")]
        assert len(workers) == 2
        assert sorted(w["CUDA_VISIBLE_DEVICES"] for w in workers) == ["0", "1"]
        assert sorted(w["ray_gpu_ids"][0] for w in workers) == ["0", "1"]
        assert all(w["threads"] == 1 and not w["jit_compile"] for w in workers)  # TF found no real GPU
        maps = maps_to_numpy(pq.read_table(str(out))["map"])
        assert np.isfinite(maps).all() and maps.reshape(48, -1).max(1).min() > 0
    finally:
        ray.shutdown()
