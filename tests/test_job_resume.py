"""Kill the driver mid-run, run the same command again: it resumes, no row lost or duplicated."""

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests import jobdata
from worker.data.schema import read_maps
from worker.job import JobConfig, run


@pytest.mark.slow  # three full jobs in fresh Ray clusters: ~2 minutes on 2 cores
def test_kill_driver_and_rerun(ray_local, job_model, tmp_path):
    images, labels = jobdata.digits(400)
    data = tmp_path / "data.parquet"
    jobdata.write_hf(data, images, labels, row_group=8)
    out = tmp_path / "out"
    table = jobdata.kill_and_resume(jobdata.explain_command(job_model, data, out), out, 400).sort_by("id")
    ids = table["id"].to_pylist()

    clean = tmp_path / "clean"
    run(JobConfig(model=job_model, input=str(data), output=str(clean), preprocessing="scale01", batch_size=4))
    expected = pq.read_table(str(clean)).sort_by("id")
    assert expected["id"].to_pylist() == ids
    want = read_maps(expected)
    np.testing.assert_allclose(read_maps(table), want, rtol=2e-3, atol=1e-3 * np.abs(want).max())
