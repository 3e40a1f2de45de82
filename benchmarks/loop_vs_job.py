"""The job against the simplest loop, as a user runs them: whole processes, wall clock, rounds interleaved.

    python -m benchmarks.loop_vs_job [--sizes 300 1500 6000] [--rounds 5] [--size 96] [--batch-size 32] [--name N]

The same HF-style Parquet file of PNG digits and the small CNN (tests.models.small_cnn) go through
  loop  ``python -m benchmarks.loop_vs_job loop ...``: one process reads the Parquet in chunks, decodes with
        PIL, calls ``GuidedBackprop.explain`` and writes Parquet (what a user writes in ten lines);
  job   ``python -m jobs.explain ...`` with an embedded Ray (the README's path), the same batch size and
        preprocessing.
Each round runs both at every size, in alternating order. Reported per size: the median and range of each
side's seconds, of the job / loop rate ratio (paired within a round) and, for the job, where its time went:
process start and imports (wall minus the driver's own ``_summary.json`` seconds) and the driver's run.
A linear fit of seconds on rows over the sizes (two or more) gives each side's steady rate and fixed cost.
Writes benchmarks/results/loop_vs_job.{json,md} (``--name``: another name, for a run at other sizes).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

from benchmarks.common import digits_job_input, git_revision, machine, provenance, spread, write


def loop(data: str, model: str, out: str, batch_size: int) -> None:
    """The simplest single-process loop over the project's engine."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from worker import GuidedBackprop
    from worker.data.decode import decode_image
    from worker.data.schema import result_columns

    engine = GuidedBackprop(model, batch_size=batch_size, preprocessing="scale01")
    size = engine.source.input_size
    writer = None
    for chunk in pq.ParquetFile(data).iter_batches(batch_size=1024, columns=["image"]):
        images = np.stack([decode_image(cell, size) for cell in chunk.column("image").to_pylist()])
        valid = np.ones(len(images), bool)
        table = pa.table(result_columns(valid, engine.explain(images), [None] * len(images), size, "float16", 1))
        writer = writer or pq.ParquetWriter(out, table.schema)
        writer.write_table(table)
    writer.close()


def timed(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    return time.perf_counter() - start


def fit(rows: list[int], seconds: list[float]) -> tuple[float, float]:
    """Least squares seconds = fixed + rows / rate over every run: (rate rows/s, fixed s)."""
    slope, fixed = np.polyfit(np.asarray(rows, float), np.asarray(seconds, float), 1)
    return round(1 / slope, 1), round(fixed, 1)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["loop"]:
        data, model, out, batch = argv[1:]
        return loop(data, model, out, int(batch))
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[300, 1500, 6000])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--size", type=int, default=96, help="image side")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--name", default="loop_vs_job", help="results file name (benchmarks/results/NAME.md)")
    args = p.parse_args(argv)

    tmp = tempfile.mkdtemp(prefix="loop-vs-job-")
    runs = []
    try:
        inputs = {rows: digits_job_input(os.path.join(tmp, f"in{rows}"), rows, args.size) for rows in args.sizes}
        for r in range(args.rounds):
            for rows, (data, model) in inputs.items():
                out_loop, out_job = os.path.join(tmp, "loop.parquet"), os.path.join(tmp, "job")
                sides = {
                    "loop": [sys.executable, "-m", "benchmarks.loop_vs_job", "loop", data, model, out_loop,
                             str(args.batch_size)],
                    "job": [sys.executable, "-m", "jobs.explain", "--model", model, "--input", data, "--output",
                            out_job, "--batch-size", str(args.batch_size), "--preprocessing", "scale01",
                            "--overwrite"]}
                order = list(sides) if r % 2 == 0 else list(sides)[::-1]
                run = {"round": r, "rows": rows}
                for side in order:
                    run[side] = round(timed(sides[side]), 2)
                with open(os.path.join(out_job, "_summary.json")) as f:
                    summary = json.load(f)
                assert summary["rows_out"] == rows and summary["complete"], summary
                run["job_driver_run"] = summary["seconds"]
                run["ratio"] = round(run["loop"] / run["job"], 3)
                runs.append(run)
                print(run, flush=True)
                os.remove(out_loop)
                shutil.rmtree(out_job)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    # the fit of steady rate and fixed cost needs two sizes or more
    fits = ({side: fit([r["rows"] for r in runs], [r[side] for r in runs]) for side in ("loop", "job")}
            if len(set(args.sizes)) > 1 else {})
    by_size = {rows: [r for r in runs if r["rows"] == rows] for rows in args.sizes}
    results = {"date": datetime.date.today().isoformat(), "machine": machine(), "revision": git_revision(),
               "command": "python -m benchmarks.loop_vs_job " + " ".join(argv), "image_size": args.size,
               "batch_size": args.batch_size, "runs": runs,
               "fit": {side: {"rows_per_second": rate, "fixed_seconds": fixed} for side, (rate, fixed) in fits.items()}}
    md = "\n".join([
        f"# The job against the simplest loop ({results['date']})", "", *provenance(results),
        f"{args.size}x{args.size} PNG digits in one HF-style Parquet file, the small CNN (tests.models.small_cnn), batch "
        f"{args.batch_size}; whole processes (interpreter start and imports included), {args.rounds} "
        f"round{'s' if args.rounds > 1 else ''}, "
        "sides alternating. *ratio* is job rows/s over loop rows/s in the same round: median (min–max).", "",
        "| rows | loop s | job s | ratio job/loop | job: start + imports s | job: driver run s |",
        "|---|---|---|---|---|---|",
        *[f"| {rows} | {spread([r['loop'] for r in rs], 1)} | {spread([r['job'] for r in rs], 1)} | "
          f"**{spread([r['ratio'] for r in rs], 3)}** | {spread([r['job'] - r['job_driver_run'] for r in rs])} | "
          f"{spread([r['job_driver_run'] for r in rs], 1)} |" for rows, rs in by_size.items()], "",
        *(["Least-squares fit over every run, seconds = fixed + rows / rate:", "",
           "| side | steady rows/s | fixed cost (s) |", "|---|---|---|",
           *[f"| {side} | {f['rows_per_second']} | {f['fixed_seconds']} |" for side, f in results["fit"].items()],
           ""] if fits else [])])
    write(results, args.name, md)
    print(md)


if __name__ == "__main__":
    main()
