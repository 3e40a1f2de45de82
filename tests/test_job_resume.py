"""Kill the driver mid-run, run the same command again: it resumes, no row lost or duplicated."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests import jobdata
from worker.data.schema import read_maps
from worker.job import JobConfig, run


def _command(model, data, out):
    return [sys.executable, "-m", "jobs.explain", "--model", model, "--input", str(data), "--output", str(out),
            "--preprocessing", "scale01", "--batch-size", "4", "--rows-per-file", "8"]


@pytest.mark.slow  # three full jobs in fresh Ray clusters: ~2 minutes on 2 cores
def test_kill_driver_and_rerun(ray_local, job_model, tmp_path):
    images, labels = jobdata.digits(400)
    data = tmp_path / "data.parquet"
    jobdata.write_hf(data, images, labels, row_group=8)
    out = tmp_path / "out"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "RAY_ADDRESS": ""}
    env.pop("RAY_ADDRESS")
    proc = subprocess.Popen(_command(job_model, data, out), cwd=root, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and len(list(out.glob("part-*.parquet"))) < 3 and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = pq.read_table(str(out))  # what readers see after the crash: only whole files
    assert 0 < partial.num_rows < 400
    assert not any(p.name.endswith(".parquet") and not p.name.startswith("part-") for p in out.iterdir())

    rerun = subprocess.run(_command(job_model, data, out), cwd=root, env=env, capture_output=True, text=True,
                           timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming:" in rerun.stdout
    table = pq.read_table(str(out)).sort_by("id")
    ids = table["id"].to_pylist()
    assert len(ids) == 400 and len(set(ids)) == 400

    clean = tmp_path / "clean"
    run(JobConfig(model=job_model, input=str(data), output=str(clean), preprocessing="scale01", batch_size=4))
    expected = pq.read_table(str(clean)).sort_by("id")
    assert expected["id"].to_pylist() == ids
    want = read_maps(expected)
    np.testing.assert_allclose(read_maps(table), want, rtol=2e-3, atol=1e-3 * np.abs(want).max())
