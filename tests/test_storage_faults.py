"""Storage that fails mid-run, on real parts: a loopback S3 server (moto) behind a fault-injecting proxy
(refused connections, resets, 503 SlowDown), a real tmpfs that fills up or is read-only, real files that
vanish or are truncated. Each case either completes or ends with one line within the retry policy's bound
(worker.data.retry), after which the same command, run again, completes with every row exactly once."""

import os
import shutil
import subprocess
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from tests import jobdata
from tests.conftest import moto_server, s3_environment, start_ray
from tests.faultproxy import FaultProxy
from worker.data import retry, sink
from worker.job import JobConfig, run

BUCKET = "saliency-faults"


@pytest.fixture(scope="module")
def store():
    """moto on loopback, a fault proxy in front of it (what the job talks to), and Ray started after both, so its
    workers inherit the proxy's endpoint."""
    with moto_server() as port:
        proxy = FaultProxy(port).start()
        with s3_environment(proxy.endpoint):
            import boto3

            boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}").create_bucket(Bucket=BUCKET)
            # the server itself, past the proxy: what is really stored
            direct = pafs.S3FileSystem(endpoint_override=f"http://127.0.0.1:{port}", access_key="test",
                                       secret_key="test", region="us-east-1")
            try:
                yield proxy, direct
            finally:
                proxy.close()


@pytest.fixture(scope="module")
def cluster(store):
    ray = start_ray(num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture(autouse=True)
def healthy(request):
    yield
    if "store" in request.fixturenames:
        proxy = request.getfixturevalue("store")[0]
        proxy.throttle, proxy.delay_s, proxy.hang = 0.0, 0.0, False
        if proxy._listener is None:
            proxy.up()


def _table(n=64):
    return pa.table({"x": np.arange(n)})


def _dataset(tmp_path, rows, files=1, size=32):
    images, labels = jobdata.digits(rows, size=size)
    data = tmp_path / "data"
    data.mkdir()
    step = rows // files
    for f in range(files):
        jobdata.write_hf(data / f"part-{f}.parquet", images[f * step:(f + 1) * step], labels[f * step:(f + 1) * step],
                         row_group=8)
    return data


def _config(model, data, output, **kw):
    return JobConfig(model=model, input=str(data), output=output, preprocessing="scale01", batch_size=4,
                     rows_per_file=8, **kw)


def _exactly_once(fs, root, rows):
    table = pq.read_table(root, filesystem=fs)
    ids = table["id"].to_pylist()
    assert len(ids) == rows and len(set(ids)) == rows, (len(ids), len(set(ids)))
    return table


def _background(fn):
    result = {}

    def target():
        started = time.monotonic()
        try:
            result["summary"] = fn()
        except Exception as exc:  # noqa: BLE001
            result["error"] = exc
        result["seconds"] = time.monotonic() - started

    thread = threading.Thread(target=target)
    thread.start()
    return thread, result


def _wait_for(predicate, timeout_s, what):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


# --- the policy itself, on the real S3 client (fast) ------------------------------------------------------------

def test_a_short_outage_is_waited_out(store):
    proxy, direct = store
    from worker.data.storage import filesystem

    fs, path = filesystem(f"s3://{BUCKET}/policy/short.parquet")
    proxy.down()
    threading.Timer(1.0, proxy.up).start()
    started = time.monotonic()
    retry.call(lambda: pq.write_table(_table(), path, filesystem=fs), "writing short.parquet")
    assert 1.0 <= time.monotonic() - started < 10
    assert pq.read_table(path, filesystem=direct).num_rows == 64


@pytest.mark.slow
@pytest.mark.rotate()  # one a commit: a store that never answers takes its whole bound, a minute
@pytest.mark.parametrize("failure", ["refuses", "never_answers"])
def test_a_store_that_fails_for_good_ends_in_bounded_time(failure, store):
    if failure == "refuses":
        _stays_down_ends_in_bounded_time_with_one_line(store)
    else:
        _never_answers_is_given_up_in_bounded_time(store)


def _stays_down_ends_in_bounded_time_with_one_line(store):  # the S3 client's own 3 attempts take ~3 s
    proxy, _ = store
    from worker.data.storage import filesystem

    fs, path = filesystem(f"s3://{BUCKET}/policy/down.parquet")
    proxy.down()
    started = time.monotonic()
    with pytest.raises(retry.StorageError) as caught:
        retry.call(lambda: pq.write_table(_table(), path, filesystem=fs), "writing down.parquet", window_s=3)
    elapsed = time.monotonic() - started
    assert 3 <= elapsed < 3 + retry.CALL_BOUND_S
    message = str(caught.value)
    assert "\n" not in message and message.startswith("writing down.parquet: ")
    assert "NETWORK_CONNECTION" in message and "retried" in message and "run the same command again" in message


def _never_answers_is_given_up_in_bounded_time(store):  # 3 attempts, each given up after 20 s without a byte
    proxy, _ = store
    from worker.data.storage import filesystem

    fs, path = filesystem(f"s3://{BUCKET}/policy/hang.parquet")
    proxy.hang = True
    started = time.monotonic()
    with pytest.raises(retry.StorageError, match="Timeout was reached"):
        retry.call(lambda: pq.write_table(_table(), path, filesystem=fs), "writing hang.parquet", window_s=0)
    elapsed = time.monotonic() - started
    assert retry.S3_REQUEST_TIMEOUT_S <= elapsed <= retry.CALL_BOUND_S, elapsed
    print(f"a store that never answers: one step given up after {elapsed:.1f} s")


def test_errors_worth_no_retry_fail_at_once(tmp_path):
    waits = []  # the policy's sleeps between tries: none for these (counted, not timed: a loaded host is slow)
    with pytest.raises(retry.StorageError, match="missing or not whole"):
        retry.call(lambda: pq.read_table(str(tmp_path / "absent.parquet")), "reading absent.parquet",
                   sleep=waits.append)
    (tmp_path / "cut.parquet").write_bytes(b"PAR1" + b"\0" * 20)
    with pytest.raises(retry.StorageError, match="cut.parquet: .*missing or not whole"):
        retry.call(lambda: pq.read_table(str(tmp_path / "cut.parquet")), "reading cut.parquet", sleep=waits.append)
    assert waits == []


# --- what an output directory may hold (fast: the sink's claim on real files) -----------------------------------

def _sink(root, fingerprint="job-a"):
    return sink.AtomicParquetDatasink(pafs.LocalFileSystem(), str(root), {"fingerprint": fingerprint},
                                      {"job": {"fingerprint": fingerprint}}, rows_per_file=8)


def _commit(datasink, ids):
    table = pa.table({"id": ids, "error": pa.array([None] * len(ids), pa.string())})
    datasink.on_write_start()
    return datasink.write([table], None)["files"][0]


def test_claim_refuses_a_foreign_file_in_its_own_output(tmp_path):
    out = tmp_path / "out"
    datasink = _sink(out)
    datasink.claim()
    _commit(datasink, ["a#0", "a#1"])
    pq.write_table(_table(), str(out / "extra.parquet"))  # someone else's file, dropped in
    with pytest.raises(sink.OutputExistsError, match=r"holds \['extra.parquet'\], which this job did not write"):
        _sink(out).claim()
    os.remove(out / "extra.parquet")
    assert _sink(out).claim()[0].tolist() == [b"a#0", b"a#1"]


def test_claim_refuses_a_truncated_or_another_jobs_part_naming_it(tmp_path):
    out = tmp_path / "out"
    datasink = _sink(out)
    datasink.claim()
    name = _commit(datasink, ["a#0", "a#1"])
    whole = (out / name).read_bytes()
    (out / name).write_bytes(whole[:len(whole) // 2])
    with pytest.raises(sink.OutputExistsError) as caught:
        _sink(out).claim()
    assert f"holds {name}: not a readable part file" in str(caught.value) and "\n" not in str(caught.value)
    assert "Move it out of the output and run the same command again" in str(caught.value)
    other = _sink(tmp_path / "other", fingerprint="job-b")
    other.claim()
    foreign = _commit(other, ["b#0"])
    os.remove(out / name)
    shutil.copy(tmp_path / "other" / foreign, out / foreign)
    with pytest.raises(sink.OutputExistsError, match=f"holds {foreign}: another job's part file"):
        _sink(out).claim()


def test_claim_refuses_a_truncated_job_file(tmp_path):
    out = tmp_path / "out"
    _sink(out).claim()
    text = (out / sink.JOB_FILE).read_text()
    (out / sink.JOB_FILE).write_text(text[:7])
    with pytest.raises(sink.OutputExistsError, match="not readable JSON .*--overwrite"):
        _sink(out).claim()
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]  # _job.json is written beside, then renamed


# --- whole jobs --------------------------------------------------------------------------------------------------

def _mount_tmpfs(path, options):
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if done.returncode:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must be able to mount a tmpfs (it runs as root): {done.stderr.strip()}")
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
    return path


@pytest.fixture
def volume(tmp_path):
    mounted = []

    def mount(options):
        mounted.append(_mount_tmpfs(tmp_path / f"vol{len(mounted)}", options))
        return mounted[-1]

    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.mark.slow
def test_full_output_volume_fails_with_one_line_then_resumes(cluster, job_model, tmp_path, volume):
    data = _dataset(tmp_path, 240)
    vol = volume("size=3m")
    ballast = vol / "ballast"
    ballast.write_bytes(os.urandom(2_600_000))  # the volume has room for a few parts, not for 240 rows
    out = vol / "out"
    cfg = _config(job_model, data, str(out))
    started = time.monotonic()
    with pytest.raises(retry.StorageError) as caught:
        run(cfg, echo=lambda *_: None)
    elapsed = time.monotonic() - started
    message = str(caught.value)
    assert "\n" not in message and "No space left on device" in message and str(out) in message
    assert "volume is full: free space on it, then run the same command again" in message
    # readers see whole parts only: nothing half-written, nothing left in staging
    assert not (out / sink.TMP_DIR).exists() or not list((out / sink.TMP_DIR).iterdir())
    parts = list(out.glob("part-*.parquet"))
    partial = sum(pq.read_metadata(str(p)).num_rows for p in parts)  # each part whole and readable
    assert partial < 240 and (not parts or pq.read_table(str(out)).num_rows == partial)
    ballast.unlink()
    summary = run(cfg, echo=lambda *_: None)
    assert summary["complete"] and summary["rows_resumed"] == partial and summary["duplicate_ids"] == 0
    _exactly_once(pafs.LocalFileSystem(), str(out), 240)
    print(f"full volume: failed after {elapsed:.1f} s with {partial} rows committed")


def test_read_only_output_fails_before_any_cluster_time(job_model, tmp_path, volume):
    data = _dataset(tmp_path, 8)
    vol = volume("size=1m,ro")
    started = time.monotonic()
    with pytest.raises(retry.StorageError) as caught:
        run(_config(job_model, data, str(vol)), echo=lambda *_: None)
    message = str(caught.value)
    assert "\n" not in message and "Read-only file system" in message and str(vol) in message
    assert "the output is not writable: make it writable or choose another output" in message
    assert time.monotonic() - started < 60


@pytest.mark.slow
@pytest.mark.rotate()  # one kind of change a run
@pytest.mark.parametrize("change", ["vanish", "truncate"])
def test_input_changing_mid_run_fails_naming_the_file_then_resumes(cluster, job_model, tmp_path, change):
    data = _dataset(tmp_path, 160, files=4)
    victim = data / "part-3.parquet"
    whole = victim.read_bytes()
    out = tmp_path / "out"
    cfg = _config(job_model, data, str(out))
    job, result = _background(lambda: run(cfg, echo=lambda *_: None))
    # the run has checked every footer and claimed its output: the input changes under it now
    _wait_for(lambda: (out / sink.JOB_FILE).exists() or not job.is_alive(), 240, "the output's claim")
    if change == "vanish":
        victim.unlink()
    else:
        victim.write_bytes(whole[:len(whole) // 3])
    job.join(timeout=600)
    assert "error" in result, "the run read the file before it changed; nothing was tested"
    message = str(result["error"])
    assert isinstance(result["error"], retry.StorageError) and "\n" not in message
    assert f"reading {victim} of the input" in message and "restore it, then run the same command again" in message
    victim.write_bytes(whole)
    summary = run(cfg, echo=lambda *_: None)
    assert summary["complete"] and summary["duplicate_ids"] == 0
    _exactly_once(pafs.LocalFileSystem(), str(out), 160)
    print(f"input {change}: failed after {result['seconds']:.1f} s")


def _first_part_on(direct, prefix):
    def present():
        infos = direct.get_file_info(pafs.FileSelector(prefix, allow_not_found=True))
        return any(i.base_name.startswith("part-") for i in infos)

    return present


def _run_until_first_part(store, job_model, tmp_path, name):
    """A 240-row run into s3://BUCKET/<name>/run in the background, each request slowed by the proxy so that the
    writes last long enough to cut; returns (config, thread, result) once its first part is committed."""
    proxy, direct = store
    cfg = _config(job_model, _dataset(tmp_path, 240), f"s3://{BUCKET}/{name}/run")
    proxy.delay_s = 0.1  # each part's upload takes a few round trips
    job, result = _background(lambda: run(cfg, echo=lambda *_: None))
    _wait_for(_first_part_on(direct, f"{BUCKET}/{name}/run"), 300, "the first committed part")
    assert job.is_alive(), "the run ended before the outage"
    return cfg, job, result


@pytest.mark.slow
@pytest.mark.rotate()  # one outage mid-run a commit: each is a job of minutes
@pytest.mark.parametrize("outage", ["20s", "for_good"])
def test_s3_outage_mid_run(outage, store, cluster, job_model, tmp_path):
    """A store that goes down mid-run: for 20 s the run waits it out; for good the run ends within the retry
    policy's bound, in one line, and the same command then resumes."""
    if outage == "20s":
        _outage_of_20_s_is_waited_out(store, job_model, tmp_path)
    else:
        _down_for_good_ends_within_the_bound_then_resumes(store, job_model, tmp_path)


def _outage_of_20_s_is_waited_out(store, job_model, tmp_path):
    proxy, direct = store
    _, job, result = _run_until_first_part(store, job_model, tmp_path, "outage")
    proxy.down()
    time.sleep(20)
    proxy.up()
    back = time.monotonic()
    job.join(timeout=600)
    assert "summary" in result, result.get("error")
    assert result["summary"]["complete"] and result["summary"]["duplicate_ids"] == 0
    _exactly_once(direct, f"{BUCKET}/outage/run", 240)
    print(f"20 s outage: the run went on and ended {time.monotonic() - back:.1f} s after the store came back")


def _down_for_good_ends_within_the_bound_then_resumes(store, job_model, tmp_path):
    proxy, direct = store
    cfg, job, result = _run_until_first_part(store, job_model, tmp_path, "down")
    proxy.down()
    down = time.monotonic()
    job.join(timeout=retry.GIVE_UP_S + 120)
    ended = time.monotonic() - down
    assert not job.is_alive(), "the run did not end while the store was down"
    assert "error" in result, "the run completed without the store"
    message = str(result["error"])
    assert isinstance(result["error"], retry.StorageError) and "\n" not in message, message
    assert "AWS Error NETWORK_CONNECTION" in message and "retried" in message
    assert "the store did not answer: run the same command again once it does" in message
    assert retry.WINDOW_S <= ended <= retry.GIVE_UP_S + 30  # the window, one step's bound, Ray's unwinding
    committed = pq.read_table(f"{BUCKET}/down/run", filesystem=direct).num_rows
    proxy.up()
    summary = run(cfg, echo=lambda *_: None)
    assert summary["complete"] and summary["rows_resumed"] == committed and summary["duplicate_ids"] == 0
    _exactly_once(direct, f"{BUCKET}/down/run", 240)
    print(f"store down: the run ended {ended:.1f} s after the outage began, {committed} rows committed")


@pytest.mark.slow
def test_s3_throttling_is_retried(store, cluster, job_model, tmp_path):
    proxy, direct = store
    data = _dataset(tmp_path, 240)
    output = f"s3://{BUCKET}/throttled/run"
    # a tenth of the requests: the S3 client's own retries absorb most (until its retry quota, 500 tokens at 5 a
    # retry, drains), the step's retries the rest. At 30 % a step of several requests can fail for a minute
    proxy.throttle = 0.1
    before = proxy.injected
    summary = run(_config(job_model, data, output), echo=lambda *_: None)
    injected = proxy.injected - before
    proxy.throttle = 0.0
    assert injected >= 5, injected
    assert summary["complete"] and summary["duplicate_ids"] == 0
    _exactly_once(direct, f"{BUCKET}/throttled/run", 240)
    print(f"throttling: {injected} of {proxy.requests} requests answered 503 SlowDown; {summary['seconds']} s")
