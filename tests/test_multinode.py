"""A real multi-node Ray cluster on loopback (several raylets on this machine), attached through RAY_ADDRESS
as ``ray job submit`` runs an entrypoint: default flags plan actors that fit the nodes, an ask no node can
hold fails in bounded time saying why, and the job survives losing the node its actor runs on."""

import json
import os
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from tests import jobdata

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    worker = c.add_node(num_cpus=2)
    c.wait_for_nodes()
    try:
        yield c, worker
    finally:
        ray.shutdown()
        c.shutdown()


def _job(address, args):
    env = {**os.environ, "RAY_ADDRESS": address}
    return subprocess.Popen([sys.executable, "-m", "jobs.explain", *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _finish(proc, timeout):
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"the job did not finish within {timeout} s:\n{out[-3000:]}")
    return proc.returncode, out


def _data(tmp_path, n):
    images, labels = jobdata.digits(n)
    assert len(images) == n
    jobdata.write_hf(tmp_path / "d.parquet", images, labels, row_group=100)
    return str(tmp_path / "d.parquet")


def test_default_flags_fit_the_nodes_and_an_impossible_ask_says_why(cluster, job_model, tmp_path):
    c, _ = cluster
    data = _data(tmp_path, 200)
    common = ["--model", job_model, "--input", data, "--preprocessing", "scale01", "--batch-size", "16"]
    code, out = _finish(_job(c.address, [*common, "--output", str(tmp_path / "out")]), 300)
    assert code == 0, out[-3000:]
    summary = json.loads((tmp_path / "out" / "_summary.json").read_text())
    assert summary["complete"] and summary["rows_out"] == 200 and summary["duplicate_ids"] == 0
    plan = json.loads(pq.read_schema(sorted((tmp_path / "out").glob("part-*.parquet"))[0])
                      .metadata[b"guided_saliency"])["actors"]
    assert plan["num_cpus"] <= 2  # fits the largest node (the cluster's sum minus decode would be 2.25)

    started = time.monotonic()
    code, out = _finish(_job(c.address, [*common, "--output", str(tmp_path / "big"), "--cpus-per-actor", "3",
                                         "--actor-start-timeout", "5"]), 120)
    assert code == 2, out[-3000:]
    assert "asks for 3 CPUs and 0 GPUs, but the largest node has 2 CPUs" in out, out[-3000:]
    assert time.monotonic() - started < 100


def test_busy_nodes_fail_in_bounded_time_saying_why(cluster, job_model, tmp_path):
    import ray

    c, _ = cluster
    ray.init(address=c.address, logging_level="ERROR")
    try:
        @ray.remote(num_cpus=2)
        class Hog:  # holds the only node that can host the default actor
            def ready(self):
                return True

        hog = Hog.remote()
        ray.get(hog.ready.remote(), timeout=60)
        data = _data(tmp_path, 40)
        started = time.monotonic()
        code, out = _finish(_job(c.address, ["--model", job_model, "--input", data, "--output", str(tmp_path / "o"),
                                             "--preprocessing", "scale01", "--actor-start-timeout", "5"]), 120)
        assert code == 2, out[-3000:]
        assert "could not be placed within 5 s" in out and "are busy" in out, out[-3000:]
        assert time.monotonic() - started < 100
        ray.kill(hog)
    finally:
        ray.shutdown()


def _node_of(pid, c):
    """The cluster node whose raylet is an ancestor of process ``pid``."""
    import psutil

    raylets = {p.process.pid: node for node in [c.head_node, *c.worker_nodes]
               for p in node.all_processes.get("raylet", [])}
    proc = psutil.Process(pid)
    while proc is not None:
        if proc.pid in raylets:
            return raylets[proc.pid]
        proc = proc.parent()
    return None


def test_job_survives_losing_the_node_of_its_actor(cluster, job_model, tmp_path):
    c, _ = cluster
    c.add_node(num_cpus=2)  # somewhere for the actor to restart with decode CPUs to spare
    c.wait_for_nodes()
    n = 1700  # of scikit-learn's 1797 digits
    data = _data(tmp_path, n)
    out_dir = tmp_path / "out"
    proc = _job(c.address, ["--model", job_model, "--input", data, "--output", str(out_dir), "--preprocessing",
                            "scale01", "--batch-size", "16", "--actors", "1", "--cpus-per-actor", "1.5",
                            "--rows-per-file", "100"])  # 1.5 CPUs: not on the 1-CPU head, whose loss ends the job
    deadline = time.monotonic() + 300
    victim = None
    while time.monotonic() < deadline and proc.poll() is None:
        workers = list((out_dir / "_workers").glob("*.json")) if out_dir.exists() else []
        if workers and list(out_dir.glob("part-*.parquet")):  # the actor is explaining: kill its node
            pid = json.loads(workers[0].read_text())["pid"]
            victim = _node_of(pid, c)
            break
        time.sleep(0.2)
    assert victim is not None, "no actor was seen working before the job ended"
    assert victim is not c.head_node, "the driver's node cannot be the victim"
    committed_before = len(list(out_dir.glob("part-*.parquet")))
    c.remove_node(victim, allow_graceful=False)
    code, out = _finish(proc, 600)
    assert code == 0, out[-3000:]
    summary = json.loads((out_dir / "_summary.json").read_text())
    assert committed_before * 100 < n, "the node was killed after the job had written everything"
    assert summary["rows_out"] == n and summary["duplicate_ids"] == 0 and summary["complete"]
    ids = pq.read_table(str(out_dir), columns=["id"])["id"].to_pylist()
    assert len(ids) == len(set(ids)) == n
    assert len(list((out_dir / "_workers").glob("*.json"))) >= 2  # a second actor took over
