"""Audit throughput: maps/s for the per-row statistics and for the Ray Data audit (aggregates + clustering).

    python -m benchmarks.audit [--rows 10000 100000] [--size 32]

Synthetic job outputs (10 classes, float16 maps, statistics columns) are written as Parquet, then audited
with worker.audit.run.run_audit on a local Ray. Reports maps/s and the driver's peak RSS growth per run, which
should stay flat as rows grow (partials are small; the clustering sample is capped).
Writes benchmarks/results/audit.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import os
import resource
import shutil
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.common import git_revision, machine, write


def synthetic_output(directory, rows, size, classes=10, rows_per_file=10_000, seed=0):
    from worker.data.schema import map_column
    from worker.data.stats import map_statistics

    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    blob = np.exp(-((yy - size / 2) ** 2 + (xx - size / 2) ** 2) / (size * 2.0))
    for start in range(0, rows, rows_per_file):
        n = min(rows_per_file, rows - start)
        labels = rng.integers(0, classes, n)
        maps = (rng.random((n, size, size)) * 0.2 + blob).astype(np.float16)
        stats = map_statistics(maps)
        table = pa.table({"id": [f"r{start + i}" for i in range(n)], "label": labels, "predicted_class": labels,
                          "map": map_column(maps, np.ones(n, bool), (size, size)),
                          "error": pa.nulls(n, pa.string()), **stats})
        pq.write_table(table, os.path.join(directory, f"part-{start:09d}.parquet"))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", nargs="+", default=["10000x10", "100000x10", "100000x1"],
                   help="ROWSxCLASSES; 100000x1 clusters 100 000 maps of one class")
    p.add_argument("--size", type=int, default=32)
    args = p.parse_args(argv)
    import ray

    from worker.audit import run_audit
    from worker.data.stats import map_statistics

    ray.init(logging_level="ERROR", include_dashboard=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    tmp = tempfile.mkdtemp(prefix="audit-bench-")
    runs = []
    try:
        maps = np.random.default_rng(1).random((10_000, args.size, args.size)).astype(np.float16)
        start = time.perf_counter()
        map_statistics(maps)
        stats_rate = 10_000 / (time.perf_counter() - start)
        for spec in args.runs:
            rows, classes = (int(v) for v in spec.split("x"))
            out = os.path.join(tmp, f"out{spec}")
            synthetic_output(out, rows, args.size, classes)
            rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            start = time.perf_counter()
            result = run_audit(out, os.path.join(tmp, f"report{spec}"))
            seconds = time.perf_counter() - start
            rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            runs.append({"rows": rows, "classes": classes, "seconds": round(seconds, 2), "maps_per_second": round(rows / seconds, 1),
                         "clusters_per_class": {g: len(c) for g, c in result["clusters"].items()},
                         "driver_peak_rss_growth_mb": round(rss_after - rss_before, 1)})
            print(runs[-1], flush=True)
            shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        ray.shutdown()
    results = {"date": datetime.date.today().isoformat(), "machine": machine(), "revision": git_revision(),
               "command": "python -m benchmarks.audit " + " ".join(sys.argv[1:] if argv is None else argv),
               "map_size": args.size, "statistics_maps_per_second": round(stats_rate, 1), "runs": runs}
    lines = [f"# Audit benchmark ({results['date']})", "", f"Machine: {results['machine']['cpu']}, "
             f"{results['machine']['cores']} cores. Revision {results['revision']}. Command: `{results['command']}`",
             "", f"Per-row statistics (numpy, in the worker): **{results['statistics_maps_per_second']} maps/s** "
             f"({args.size}x{args.size}).", "", "Full audit (Ray Data aggregates, SpRAy on a 1000-map sample per "
             "class, assignment pass, report):", "", "| rows | classes | seconds | maps/s | driver peak RSS growth (MB) |",
             "|---|---|---|---|---|", *[f"| {r['rows']} | {r['classes']} | {r['seconds']} | {r['maps_per_second']} | "
                                    f"{r['driver_peak_rss_growth_mb']} |" for r in runs], ""]
    write(results, "audit", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
