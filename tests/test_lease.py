"""One run at a time per output: claims race and one wins, a dead holder's lease is taken over, and two
scheduled runs started together for the same date write once."""

import json
import os
import subprocess
import sys
import threading
import time

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import yaml

from tests import jobdata
from worker.data.lease import LEASE_FILE, Lease, OutputBusyError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_claims_that_race_leave_one_winner(tmp_path):
    fs, winners, losers = pafs.LocalFileSystem(), [], []
    start = threading.Barrier(6)

    def claim():
        lease = Lease(fs, str(tmp_path / "out"), settle_s=0.3)
        start.wait()
        try:
            winners.append(lease.acquire())
        except OutputBusyError as exc:
            losers.append(str(exc))

    threads = [threading.Thread(target=claim) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(winners) == 1 and len(losers) == 5, (winners, losers)
    assert all("being written by another run" in m for m in losers)
    winners[0].release()
    assert not (tmp_path / "out" / LEASE_FILE).exists()
    Lease(fs, str(tmp_path / "out"), settle_s=0).acquire().release()  # free again


def test_dead_or_stale_holders_are_taken_over(tmp_path):
    fs = pafs.LocalFileSystem()
    (tmp_path / "out").mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket

    lease_path = tmp_path / "out" / LEASE_FILE
    lease_path.write_text(json.dumps({"owner": "x", "host": socket.gethostname(), "pid": int(dead.stdout),
                                      "heartbeat": time.time()}))
    Lease(fs, str(tmp_path / "out"), settle_s=0).acquire().release()  # its driver was killed on this host
    lease_path.write_text(json.dumps({"owner": "x", "host": "elsewhere", "pid": 1, "heartbeat": time.time()}))
    with pytest.raises(OutputBusyError, match="host elsewhere"):
        Lease(fs, str(tmp_path / "out"), settle_s=0).acquire()
    lease_path.write_text(json.dumps({"owner": "x", "host": "elsewhere", "pid": 1, "heartbeat": time.time() - 600}))
    Lease(fs, str(tmp_path / "out"), settle_s=0).acquire().release()  # no heartbeat for 10 minutes


@pytest.mark.slow
def test_two_scheduled_runs_for_the_same_date_write_once(job_model, tmp_path):
    images, labels = jobdata.digits(60)
    (tmp_path / "in").mkdir()
    jobdata.write_hf(tmp_path / "in" / "day.parquet", images, labels, row_group=20)
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump({"model": job_model, "input": str(tmp_path / "in"), "incremental": True,
                                        "output_root": str(tmp_path / "out"), "preprocessing": "scale01",
                                        "batch_size": 8}))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cmd = [sys.executable, "-m", "jobs.scheduled", "--config", str(job_file), "--date", "2026-11-29"]
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=400)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[-2000:] for o in outs]
    skipped = [o for o in outs if "not started:" in o]
    assert len(skipped) == 1, [o[-2000:] for o in outs]  # one wrote, the other said why it did not
    ids = pq.read_table(str(tmp_path / "out" / "date=2026-11-29"), columns=["id"])["id"].to_pylist()
    assert len(ids) == len(set(ids)) == 60
    manifests = list((tmp_path / "out" / "_manifests").glob("*.json"))
    assert len(manifests) == 1 and len(json.loads(manifests[0].read_text())["files"]) == 1
    assert not (tmp_path / "out" / LEASE_FILE).exists()
