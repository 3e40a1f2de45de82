"""Scale rehearsal: a million rows through the real job, a kill at about half, the resume, a no-op re-run.

    python -m benchmarks.scale [--rows 1000000] [--files 4] [--size 16] [--batch-size 256]

Tiny PNG images (scikit-learn's digits at 16 x 16) and a one-convolution model, so that the model is not the
bottleneck and what grows with the row count shows: the driver (planning, the resume index of done ids, the
end-of-run duplicate check), read tasks (each gets the done ids), Ray's processes.  Every run is
``python -m jobs.explain`` in its own process (Ray started in it, as the README's first command does); the
proportional set size (PSS, shared pages counted once) of the driver and of every process under it is
sampled every 0.5 s.  Runs, in order: the full job; a second job killed (SIGKILL to its whole process group)
once about half its rows are committed, then the same command again (resume); the same command once more
(nothing to do).  The engine alone (one process: read Parquet, decode with the job's decode path,
``explain``) on the first 50 000 rows gives the rate to compare with.  Linux only (reads /proc).
Writes benchmarks/results/scale.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from benchmarks.common import git_revision, machine, provenance, write
from benchmarks.job_memory import _children, _pss_mb

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class TreeSampler(threading.Thread):
    """Peak PSS of process ``root`` and of all its descendants."""

    def __init__(self, root: int, interval: float = 0.5):
        super().__init__(daemon=True)
        self.root, self.interval = root, interval
        self.stop, self.driver_peak, self.total_peak = threading.Event(), 0.0, 0.0

    def run(self):
        while not self.stop.is_set():
            tree, todo, pids = _children(), [self.root], []
            while todo:
                pid = todo.pop()
                pids.append(pid)
                todo.extend(tree.get(pid, []))
            driver = _pss_mb(self.root)
            self.driver_peak = max(self.driver_peak, driver)
            self.total_peak = max(self.total_peak, driver + sum(_pss_mb(p) for p in pids[1:]))
            self.stop.wait(self.interval)


def make_data(directory: str, rows: int, files: int, size: int) -> tuple[str, str]:
    import io

    import keras
    from PIL import Image

    from worker.demo import digits_images

    images, labels = digits_images(size)
    cells = []
    for img in images:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        cells.append(buf.getvalue())
    cells = np.array(cells, dtype=object)
    data = os.path.join(directory, "data")
    os.makedirs(data, exist_ok=True)
    per_file = -(-rows // files)
    for f in range(files):
        start, stop = f * per_file, min(rows, (f + 1) * per_file)
        index = np.arange(start, stop) % len(cells)
        table = pa.table({"image": pa.array(cells[index].tolist(), pa.binary()),
                          "label": pa.array(labels[index].astype(np.int64))})
        pq.write_table(table, os.path.join(data, f"part-{f:03d}.parquet"), row_group_size=16384)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((size, size, 3)), keras.layers.Rescaling(1 / 255),
                              keras.layers.Conv2D(8, 3, activation="relu"), keras.layers.GlobalAveragePooling2D(),
                              keras.layers.Dense(10)])
    path = os.path.join(directory, "tiny.keras")
    model.save(path)
    return data, path


def engine_alone(data: str, model: str, batch: int, rows: int) -> float:
    """Rows/s of one process: read, decode (the job's decode path), explain; model build excluded."""
    from worker import GuidedBackprop
    from worker.data.decode import DecodeOptions

    engine = GuidedBackprop(model, batch_size=batch)
    options = DecodeOptions(engine.source.input_size)
    files = sorted(os.path.join(data, f) for f in os.listdir(data))
    start = time.perf_counter()
    done = 0
    for batch_table in pq.ParquetFile(files[0]).iter_batches(batch_size=batch * 16, columns=["image"]):
        images = np.stack([options.decode(c) for c in batch_table["image"].to_pylist()])
        engine.explain(images)
        done += len(images)
        if done >= rows:
            break
    return done / (time.perf_counter() - start)


def committed_rows(out: str) -> int:
    total = 0
    for name in os.listdir(out) if os.path.isdir(out) else []:
        if name.startswith("part-") and name.endswith(".parquet"):
            try:
                total += pq.ParquetFile(os.path.join(out, name)).metadata.num_rows
            except Exception:  # noqa: BLE001 - a file being renamed into place
                pass
    return total


def run_job(data, model, out, batch, kill_at: int | None = None) -> dict:
    cmd = [sys.executable, "-m", "jobs.explain", "--model", model, "--input", data, "--output", out,
           "--batch-size", str(batch), "--rows-per-file", "8192", "--no-statistics"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    sampler = TreeSampler(proc.pid)
    sampler.start()
    killed_at = None
    if kill_at is not None:
        while proc.poll() is None:
            rows = committed_rows(out)
            if rows >= kill_at:
                os.killpg(proc.pid, signal.SIGKILL)
                killed_at = rows
                break
            time.sleep(0.5)
    output, _ = proc.communicate()
    seconds = time.perf_counter() - start
    sampler.stop.set()
    sampler.join()
    if killed_at is None:
        subprocess.run(["ray", "stop", "--force"], capture_output=True)  # nothing should be left; be sure
    result = {"seconds": round(seconds, 1), "driver_peak_pss_mb": round(sampler.driver_peak, 1),
              "all_processes_peak_pss_mb": round(sampler.total_peak, 1), "returncode": proc.returncode}
    if killed_at is not None:
        result["killed_with_rows_committed"] = killed_at
        subprocess.run(["pkill", "-9", "-f", "ray::"], capture_output=True)  # orphans of the killed tree
        return result
    summary_path = os.path.join(out, "_summary.json")
    if proc.returncode != 0 or not os.path.exists(summary_path):
        raise RuntimeError(f"job failed ({proc.returncode}):\n{output[-3000:]}")
    with open(summary_path) as f:
        summary = json.load(f)
    return {**result, **{k: summary[k] for k in ("rows_in", "rows_out", "rows_resumed", "rows_this_run",
                                                  "duplicate_ids", "complete", "rows_per_second")}}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--files", type=int, default=4)
    p.add_argument("--size", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--engine-rows", type=int, default=50_000)
    args = p.parse_args(argv)
    tmp = tempfile.mkdtemp(prefix="scale-")
    try:
        started = time.perf_counter()
        data, model = make_data(tmp, args.rows, args.files, args.size)
        data_seconds = round(time.perf_counter() - started, 1)
        print(f"data: {args.rows} rows in {data_seconds} s", flush=True)
        engine_rate = engine_alone(data, model, args.batch_size, min(args.engine_rows, args.rows))
        print(f"engine alone: {engine_rate:.0f} rows/s", flush=True)
        runs = {"full": run_job(data, model, os.path.join(tmp, "full"), args.batch_size)}
        print(runs, flush=True)
        resumed = os.path.join(tmp, "resumed")
        runs["killed"] = run_job(data, model, resumed, args.batch_size, kill_at=args.rows // 2)
        print(runs, flush=True)
        runs["resume"] = run_job(data, model, resumed, args.batch_size)
        runs["no-op re-run"] = run_job(data, model, resumed, args.batch_size)
        print(runs, flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for name in ("full", "resume", "no-op re-run"):
        r = runs[name]
        assert r["complete"] and r["rows_out"] == args.rows and r["duplicate_ids"] == 0, (name, r)
    full = runs["full"]
    results = {"date": datetime.date.today().isoformat(), "machine": machine(), "revision": git_revision(),
               "command": "python -m benchmarks.scale " + " ".join(sys.argv[1:] if argv is None else argv),
               "rows": args.rows, "files": args.files, "image_size": args.size, "batch_size": args.batch_size,
               "engine_alone_rows_per_second": round(engine_rate, 1), "runs": runs,
               "job_rows_per_second_whole_run": round(args.rows / full["seconds"], 1)}
    md = "\n".join([
        f"# Scale rehearsal: {args.rows:,} rows ({results['date']})", "",
        *provenance(results),
        f"{args.rows:,} PNG images of {args.size}x{args.size} (scikit-learn digits) in {args.files} files, a "
        f"one-convolution model, batch {args.batch_size}, `python -m jobs.explain` with Ray started in the job's "
        "process. Peak PSS sampled every 0.5 s. One run of each (a rehearsal, not a ratio: the engine rate is "
        "the reference point).", "",
        "| run | seconds | rows this run | driver peak PSS (MB) | all processes peak PSS (MB) | note |",
        "|---|---|---|---|---|---|",
        *[f"| {name} | {r['seconds']} | {r.get('rows_this_run', '')} | {r['driver_peak_pss_mb']} | "
          f"{r['all_processes_peak_pss_mb']} | "
          + (f"killed with {r['killed_with_rows_committed']:,} rows committed" if 'killed_with_rows_committed' in r
             else f"rows out {r['rows_out']:,}, resumed {r['rows_resumed']:,}, duplicates {r['duplicate_ids']}")
          + " |" for name, r in runs.items()], "",
        f"Engine alone (one process: read, decode, explain; first {min(args.engine_rows, args.rows):,} rows): "
        f"**{engine_rate:,.0f} rows/s**. The whole job: **{results['job_rows_per_second_whole_run']:,} rows/s** "
        f"({results['job_rows_per_second_whole_run'] / engine_rate:.2f}x), start-up included.", ""])
    write(results, "scale", md)
    print(md)


if __name__ == "__main__":
    main()
