"""The job's memory as rows grow 100x: flat or linear?

    python -m benchmarks.job_memory [--sizes 200 2000 20000] [--size 64] [--repeats 2]

Runs ``worker.job.driver.run`` on a local Ray cluster started in this process, at each size (HF-style Parquet of
PNG digits, the small CNN (tests.models.small_cnn)), sizes interleaved over the repeats, and samples every 0.25 s the proportional set size (PSS: shared
pages, such as the object store's, counted once across processes) of the driver and of every process Ray
started for it (GCS, raylet, workers, actors); a least-squares slope over every run gives MB per 1 000 rows.
Linux only (reads /proc).
Writes benchmarks/results/job_memory.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import sys
import tempfile
import time

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from benchmarks.common import PeakSampler, digits_job_input, git_revision, local_ray, machine, provenance, write


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            tree.setdefault(ppid, []).append(int(name))
    return tree


def _pss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _tree_pss_mb() -> dict[str, float]:
    """PSS of this process and of it plus all its descendants."""
    tree, todo, pids = _children(), [os.getpid()], []
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo.extend(tree.get(pid, []))
    driver = _pss_mb(pids[0])
    return {"driver": driver, "total": driver + sum(_pss_mb(p) for p in pids[1:])}


def measure(data, model, out, batch):
    from worker.job import JobConfig, run

    start = time.perf_counter()
    with PeakSampler(_tree_pss_mb, 0.25) as sampler:
        summary = run(JobConfig(model=model, input=data, output=out, preprocessing="scale01", batch_size=batch),
                      echo=lambda *_: None)
    seconds = time.perf_counter() - start
    assert summary["complete"] and summary["rows_this_run"] == summary["rows_in"], summary
    return {"seconds": round(seconds, 2), "driver_peak_pss_mb": round(sampler.peak["driver"], 1),
            "all_processes_peak_pss_mb": round(sampler.peak["total"], 1)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[200, 2000, 20000])
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args(argv)
    if len(set(args.sizes)) < 3:
        p.error("a slope that can tell flat from linear needs three sizes or more")
    ray = local_ray()
    tmp = tempfile.mkdtemp(prefix="job-memory-")
    runs = []
    try:
        inputs = {rows: digits_job_input(os.path.join(tmp, str(rows)), rows, args.size) for rows in args.sizes}
        for repeat in range(args.repeats):
            for rows in (args.sizes if repeat % 2 == 0 else args.sizes[::-1]):
                data, model = inputs[rows]
                runs.append({"rows": rows, "repeat": repeat,
                             **measure(data, model, os.path.join(tmp, f"out{rows}-{repeat}"), args.batch_size)})
                print(runs[-1], flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        ray.shutdown()

    keys = ("driver_peak_pss_mb", "all_processes_peak_pss_mb")
    slope = {key: round(float(np.polyfit([r["rows"] for r in runs], [r[key] for r in runs], 1)[0]) * 1000, 2)
             for key in keys}
    results = {"date": datetime.date.today().isoformat(), "machine": machine(), "revision": git_revision(),
               "command": "python -m benchmarks.job_memory " + " ".join(sys.argv[1:] if argv is None else argv),
               "image_size": args.size, "batch_size": args.batch_size, "runs": runs, "mb_per_1000_rows": slope}
    md = "\n".join([
        f"# Job memory as rows grow {max(args.sizes) // min(args.sizes)}x ({results['date']})", "",
        *provenance(results),
        f"`worker.job.driver.run` on a local Ray cluster, HF-style Parquet of {args.size}x{args.size} PNG digits, the "
        f"question's CNN, batch {args.batch_size}; sizes interleaved, {args.repeats} repeats. Peak PSS (shared pages "
        "counted once) sampled every 0.25 s; 'all processes' is the driver plus every process Ray started (GCS, "
        "raylet, workers, actors).", "",
        "| rows | repeat | seconds | driver peak PSS (MB) | all processes peak PSS (MB) |",
        "|---|---|---|---|---|",
        *[f"| {r['rows']} | {r['repeat']} | {r['seconds']} | {r['driver_peak_pss_mb']} | "
          f"{r['all_processes_peak_pss_mb']} |" for r in sorted(runs, key=lambda r: (r["rows"], r["repeat"]))], "",
        f"Least-squares slope over every run: driver **{slope['driver_peak_pss_mb']} MB per 1 000 rows**, all "
        f"processes **{slope['all_processes_peak_pss_mb']} MB per 1 000 rows**.", ""])
    write(results, "job_memory", md)
    print(md)


if __name__ == "__main__":
    main()
