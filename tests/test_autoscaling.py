"""A real autoscaling Ray cluster on loopback whose workers start from zero, as the cluster launcher's
(``min_workers: 0``, a 0-CPU head) and KubeRay's in-tree autoscaler run them: Ray's fake multi-node provider
behind a 0-CPU head, worker nodes of 2 CPUs from 0 to 2, token authentication on, attached through RAY_ADDRESS
as ``ray job submit`` runs an entrypoint. The driver must ask the autoscaler for its actors (it sees no node
that could hold them) and then wait; an ask no node type can hold still ends after --actor-start-timeout.
deploy/cronjob's submitter script runs against the same cluster's job API, as the CronJob path's pods do.

The cluster is started here with ``ray start --head --block`` in a process group of its own, on free ports and
in its own temp dir, and only that group is stopped afterwards (``AutoscalingCluster.start()`` runs
``ray stop --force``, which would stop every Ray on the machine).
"""

import glob
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from types import SimpleNamespace

import pytest

from tests import jobdata
from tests.conftest import free_port

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER_CPUS = 2


def _autoscaling_config(gcs_address):
    return {
        "cluster_name": "gs-autoscaling",
        "max_workers": 2,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 5,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": gcs_address},
        "auth": {"ssh_user": "ray"},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            "cpu_worker": {"resources": {"CPU": WORKER_CPUS, "object_store_memory": 200 * 2**20},
                           "node_config": {}, "min_workers": 0, "max_workers": 2},
        },
        "head_node_type": "ray.head.default",
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [], "setup_commands": [],
        "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


def _mine(marker):
    """Pids of processes whose command line names this cluster's temp dir (all of them are ours)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if marker.encode() in f.read():
                        pids.append(int(entry))
            except OSError:
                pass
    return pids


@pytest.fixture(scope="module")
def autoscaling_cluster():
    temp_dir = tempfile.mkdtemp(prefix="gs-as-", dir="/tmp")  # short: Unix socket paths are limited
    port = free_port()
    config = os.path.join(temp_dir, "autoscaling.yaml")
    with open(config, "w") as f:
        json.dump(_autoscaling_config(f"127.0.0.1:{port}"), f)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    cluster_env = {**env, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
    dashboard = free_port()  # the job API, which the CronJob's submitter talks to
    cmd = ["ray", "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=0",
           f"--autoscaling-config={config}", f"--temp-dir={temp_dir}", "--include-dashboard=true",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--ray-client-server-port={free_port()}",
           f"--dashboard-agent-listen-port={free_port()}", "--object-store-memory=100000000"]
    log = open(os.path.join(temp_dir, "head.log"), "w")
    head = subprocess.Popen(cmd, env=cluster_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while _status(address, env) is None or _submissions(f"http://127.0.0.1:{dashboard}", env) is None:
            assert head.poll() is None, open(log.name).read()[-3000:]
            assert time.monotonic() < deadline, "the autoscaling head did not start within 120 s"
            time.sleep(2)
        yield SimpleNamespace(address=address, env=env, temp_dir=temp_dir, dashboard=f"http://127.0.0.1:{dashboard}")
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(head.pid, sig)
            except ProcessLookupError:
                pass
            try:
                head.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
        for pid in _mine(temp_dir):  # anything of this cluster that left the process group
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _ask(code, tag, env):
    """What a short-lived Python process prints after ``tag`` (JSON), or None while the cluster is not up."""
    proc = subprocess.run([sys.executable, "-c", f"import json; {code}"], env=env, capture_output=True, text=True,
                          timeout=60)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(tag + " ")]
    return json.loads(lines[-1][len(tag) + 1:]) if proc.returncode == 0 and lines else None


def _status(address, env):
    """The cluster's nodes' CPUs from a short-lived driver, or None while the head is not up."""
    return _ask("import ray; ray.init(address=%r, logging_level='ERROR'); print('NODES', json.dumps("
                "[n['Resources'].get('CPU', 0) for n in ray.nodes() if n['Alive']]))" % address, "NODES", env)


def _submissions(url, env):
    """The submission ids of the cluster's Ray jobs, through its job API (None while it is not up)."""
    return _ask("from ray.job_submission import JobSubmissionClient; print('JOBS', json.dumps("
                "[j.submission_id for j in JobSubmissionClient(%r).list_jobs()]))" % url, "JOBS", env)


def _job(address, env, args, timeout):
    """Run ``python -m jobs.explain`` attached to the cluster: (exit code, output, epoch time of each line)."""
    proc = subprocess.Popen([sys.executable, "-m", "jobs.explain", *args], cwd=ROOT, text=True,
                            env={**env, "RAY_ADDRESS": address, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    killer = threading.Timer(timeout, proc.kill)
    killer.start()
    try:
        lines = [(time.time(), line) for line in proc.stdout]
    finally:
        killer.cancel()
    out = "".join(line for _, line in lines)
    assert proc.wait() != -signal.SIGKILL, f"the job did not finish within {timeout} s:\n{out[-3000:]}"
    return proc.returncode, out, lines


def _first(lines, text):
    return next((t for t, line in lines if text in line), None)


def _monitor_launches(temp_dir):
    """Times (epoch s) at which the autoscaler launched worker nodes, from its monitor log."""
    times = []
    for log in sorted(glob.glob(os.path.join(temp_dir, "session_*", "logs", "monitor.log"))):
        for line in open(log):
            if "Adding" in line and "node(s) of type cpu_worker" in line:
                stamp = re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d+)", line)
                if stamp:
                    t = time.mktime(time.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S"))
                    times.append(t + int(stamp.group(2)) / 1000)
    return times


def test_an_ask_no_node_type_holds_ends_after_the_timeout_saying_what_was_asked(autoscaling_cluster, job_model,
                                                                               tmp_path):
    address, env = autoscaling_cluster.address, autoscaling_cluster.env
    assert _status(address, env) == [0], "the cluster must start with its 0-CPU head alone"
    data = str(tmp_path / "d.parquet")
    jobdata.write_hf(data, *jobdata.digits(20), row_group=20)
    started = time.monotonic()
    code, out, _ = _job(address, env, ["--model", job_model, "--input", data, "--output", str(tmp_path / "out"),
                                    "--preprocessing", "scale01", "--cpus-per-actor", "3",
                                    "--actor-start-timeout", "20"], timeout=240)
    assert code == 2, out[-3000:]
    assert "was asked for 1 x 3 CPU" in out and "after 20 s" in out and "--actor-start-timeout" in out, out[-3000:]
    assert time.monotonic() - started < 200


def test_the_job_completes_on_workers_the_autoscaler_starts_from_zero(autoscaling_cluster, job_model, tmp_path):
    address, env, temp_dir = autoscaling_cluster.address, autoscaling_cluster.env, autoscaling_cluster.temp_dir
    assert _status(address, env) == [0], "the cluster must start with its 0-CPU head alone"
    data = str(tmp_path / "d.parquet")
    images, labels = jobdata.digits(200)
    jobdata.write_hf(data, images, labels, row_group=100)
    out_dir = tmp_path / "out"
    started = time.time()
    code, out, lines = _job(address, env, ["--model", job_model, "--input", data, "--output", str(out_dir),
                                    "--preprocessing", "scale01", "--batch-size", "16",
                                    "--actor-start-timeout", "300"], timeout=600)
    elapsed = time.time() - started
    assert code == 0, out[-3000:]
    summary = json.loads((out_dir / "_summary.json").read_text())
    assert summary["complete"] and summary["rows_out"] == 200 and summary["duplicate_ids"] == 0
    workers = [json.loads(p.read_text()) for p in (out_dir / "_workers").glob("*.json")]
    assert workers, "no explain actor reported where it ran"
    assert "is asked for 1 x 1 CPU" in out, out[-3000:]  # the driver raised the demand itself
    nodes = _status(address, env)
    # the demand starts one; Ray Data's queued read and decode tasks may ask for the second
    workers_up = sorted(nodes)[1:]
    assert sorted(nodes)[0] == 0 and 1 <= len(workers_up) <= 2 and set(workers_up) == {WORKER_CPUS}, nodes
    asked = _first(lines, "is asked for")
    launched = min((t for t in _monitor_launches(temp_dir) if t >= started - 1), default=None)
    assert launched is not None and launched >= asked - 1, "the worker was launched before the driver asked for it"
    print(f"\nautoscaling: the driver asked {asked - started:.1f} s into the job; the autoscaler launched a worker "
          f"{launched - asked:.1f} s after the ask; the job took {elapsed:.1f} s in all")


def test_the_cronjob_submitter_follows_the_one_ray_job_it_submitted(autoscaling_cluster, job_model, tmp_path):
    """deploy/cronjob's submitter script, as rendered, against this cluster's job API with token auth: a pod's
    retry (same Kubernetes Job name) follows the run it submitted rather than submitting another, and the pod's
    exit status is the Ray job's."""
    from tests.test_deploy import _cron_script, render

    env, url = autoscaling_cluster.env, autoscaling_cluster.dashboard
    _, script = _cron_script(render("cronjob"))

    def submitter(script, job_name):
        proc = subprocess.run(["bash", "-c", script], env={**env, "RAY_ADDRESS": url, "SUBMISSION_ID": job_name},
                              cwd=tmp_path, text=True, timeout=600, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        return proc.returncode, proc.stdout

    # as applied, on a head without /config/job.yaml: the Ray job fails, and so does the pod
    before = set(_submissions(url, env))
    code, out = submitter(script, "guided-saliency-cron-29410000")
    assert code == 1 and "guided-saliency-cron-29410000: FAILED" in out, out[-3000:]
    # the pod's retry: no second Ray job, the same outcome
    code, out = submitter(script, "guided-saliency-cron-29410000")
    assert code == 1 and "guided-saliency-cron-29410000: FAILED" in out, out[-3000:]
    assert set(_submissions(url, env)) - before == {"guided-saliency-cron-29410000"}

    # with a job file this machine has, the run completes and the pod succeeds
    data = tmp_path / "in"
    data.mkdir()
    jobdata.write_hf(data / "d.parquet", *jobdata.digits(40), row_group=20)
    job_file = tmp_path / "job.yaml"
    job_file.write_text(json.dumps({"model": job_model, "input": str(data), "output_root": str(tmp_path / "out"),
                                    "preprocessing": "scale01", "batch_size": 16, "actor_start_timeout_s": 300}))
    code, out = submitter(script.replace("/config/job.yaml", str(job_file)), "guided-saliency-cron-29411440")
    assert code == 0 and "guided-saliency-cron-29411440: SUCCEEDED" in out, out[-3000:]
    (summary,) = (tmp_path / "out").glob("date=*/_summary.json")
    assert json.loads(summary.read_text())["rows_out"] == 40
