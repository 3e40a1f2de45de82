"""`ray job submit` against a real Ray head on loopback: a good job SUCCEEDS, a bad model FAILS clearly."""

import os
import re
import secrets
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from tests import jobdata
from tests.conftest import free_port
from worker.data.schema import read_metadata

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RAY = os.path.join(os.path.dirname(sys.executable), "ray")
pytestmark = pytest.mark.slow  # a Ray head with its dashboard, and two submitted jobs


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    import ray

    ray.shutdown()
    port, dash = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)})  # as in deploy/
    subprocess.run([RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
                    "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                    "--disable-usage-stats"], check=True, env=env, capture_output=True, timeout=120)
    try:
        yield f"http://127.0.0.1:{dash}", env
    finally:
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)


def _plain(result) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", result.stdout + result.stderr).lower()


def _submit(address, env, args, timeout=420):
    return subprocess.run([RAY, "job", "submit", "--address", address, "--working-dir", ROOT,
                           "--runtime-env-json", '{"excludes": [".git", "demo_output", "benchmarks/results"]}',
                           "--", sys.executable, "-m", "jobs.explain", *args],
                          env=env, capture_output=True, text=True, timeout=timeout)


def test_submit_succeeds_and_bad_model_fails(head, job_model, tmp_path):
    address, env = head
    images, labels = jobdata.digits(24)
    jobdata.write_hf(tmp_path / "d.parquet", images, labels, row_group=8)
    ok = _submit(address, env, ["--model", job_model, "--input", str(tmp_path / "d.parquet"),
                                "--output", str(tmp_path / "out"), "--preprocessing", "scale01", "--batch-size", "8",
                                "--method", "guided_gradcam", "--smooth", "2"])  # the newest path, submitted
    assert ok.returncode == 0, ok.stdout[-3000:] + ok.stderr[-3000:]
    assert "succeeded" in _plain(ok)
    table = pq.read_table(str(tmp_path / "out"))
    assert table.num_rows == 24 and table["error"].null_count == 24
    metadata = read_metadata(table.schema)
    assert metadata["method"] == "guided_gradcam" and metadata["smoothing"]["copies"] == 2

    anonymous = {k: v for k, v in env.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    refused = _submit(address, anonymous, ["--help"], timeout=120)
    assert refused.returncode != 0 and "token" in (refused.stdout + refused.stderr).lower()

    bad = _submit(address, env, ["--model", str(tmp_path / "missing.keras"), "--input", str(tmp_path / "d.parquet"),
                                 "--output", str(tmp_path / "out2")])
    assert bad.returncode != 0
    text = _plain(bad)
    assert "failed" in text and "does not exist" in text
    assert not (tmp_path / "out2").exists()
