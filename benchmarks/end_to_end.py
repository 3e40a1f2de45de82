"""End to end: rows/s Parquet -> Parquet through Ray Data vs the engine alone on the same images.

    python -m benchmarks.end_to_end [--rows 1200] [--size 128] [--rounds 2]

Both sides start from the same HF-style Parquet file and end with a Parquet file
of maps, and both include building the engine (load + trace + warm-up):
  engine_alone  one process: read, decode (PIL), GuidedBackprop.explain, write
  ray_job       worker.job.driver.run on a local Ray cluster already started (as on a real cluster)
Rounds alternate the two. Also reports peak RSS of the job's driver as rows grow.
Writes benchmarks/results/end_to_end.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from benchmarks.common import git_revision, local_ray, machine, provenance, write  # noqa: E402


def make_data(directory, rows, size):
    from worker.demo import digits_images, question_model, write_hf_parquet

    images, labels = digits_images(size)
    reps = int(np.ceil(rows / len(images)))
    images, labels = np.concatenate([images] * reps)[:rows], np.concatenate([labels] * reps)[:rows]
    os.makedirs(directory, exist_ok=True)
    data = os.path.join(directory, "data.parquet")
    write_hf_parquet(data, images, labels, rows_per_group=128)
    model = os.path.join(directory, "model.keras")
    question_model(size, classes=10).save(model)
    return data, model


def engine_alone(data, model, out, batch):
    from worker import GuidedBackprop
    from worker.data.decode import decode_image
    from worker.data.schema import result_columns

    start = time.perf_counter()
    engine = GuidedBackprop(model, batch_size=batch, preprocessing="scale01")
    h, w = engine.source.input_size
    table = pq.read_table(data)
    images = np.stack([decode_image(c, (h, w)) for c in table["image"].to_pylist()])
    result = engine.explain(images)
    valid = np.ones(len(images), bool)
    pq.write_table(pa.table(result_columns(valid, result, [None] * len(images), (h, w), "float16", 1)), out)
    return time.perf_counter() - start


def ray_job(data, model, out, batch):
    from worker.job import JobConfig, run

    start = time.perf_counter()
    run(JobConfig(model=model, input=data, output=out, preprocessing="scale01", batch_size=batch, overwrite=True),
        echo=lambda *_: None)
    return time.perf_counter() - start


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=600, help="the small run; the large run has 3x as many rows")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    args = p.parse_args(argv)
    ray = local_ray()
    tmp = tempfile.mkdtemp(prefix="e2e-bench-")
    sizes = (args.rows, 3 * args.rows)
    times = {"engine_alone": {}, "ray_job": {}}
    try:
        for rows in sizes:
            data, model = make_data(os.path.join(tmp, str(rows)), rows, args.size)
            times["engine_alone"][rows] = engine_alone(data, model, os.path.join(tmp, f"alone{rows}.parquet"),
                                                       args.batch_size)
            times["ray_job"][rows] = ray_job(data, model, os.path.join(tmp, f"job{rows}"), args.batch_size)
            print(rows, {k: round(v[rows], 2) for k, v in times.items()}, flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        ray.shutdown()
    small, large = sizes
    total = {k: round(large / v[large], 2) for k, v in times.items()}
    steady = {k: round((large - small) / (v[large] - v[small]), 2) for k, v in times.items()}
    fixed = {k: round(v[small] - small / steady[k], 2) for k, v in times.items()}
    results = {"date": datetime.date.today().isoformat(), "machine": machine(), "revision": git_revision(),
               "command": "python -m benchmarks.end_to_end " + " ".join(sys.argv[1:] if argv is None else argv),
               "rows": list(sizes), "image_size": args.size, "batch_size": args.batch_size,
               "seconds": {k: {str(r): round(t, 2) for r, t in v.items()} for k, v in times.items()},
               "rows_per_second_large_run": total, "rows_per_second_steady": steady, "fixed_seconds": fixed,
               "ratio_steady_ray_job/engine_alone": round(steady["ray_job"] / steady["engine_alone"], 3),
               "ratio_large_run_ray_job/engine_alone": round(total["ray_job"] / total["engine_alone"], 3)}
    md = "\n".join([
        f"# End-to-end benchmark ({results['date']})", "",
        *provenance(results),
        f"HF-style Parquet of {args.size}x{args.size} PNG digits, the question's CNN, batch {args.batch_size}. Both "
        f"sides include engine build and Parquet I/O; runs of {small} and {large} rows give the steady rate "
        "(marginal rows/s) and the fixed cost (start-up: actor process, TensorFlow import, model build).", "",
        "| | seconds (small) | seconds (large) | rows/s, large run | steady rows/s | fixed cost (s) |",
        "|---|---|---|---|---|---|",
        *[f"| {k} | {times[k][small]:.2f} | {times[k][large]:.2f} | {total[k]} | {steady[k]} | {fixed[k]} |"
          for k in times], "",
        f"Steady ratio ray_job / engine_alone: **{results['ratio_steady_ray_job/engine_alone']}**; "
        f"on the whole large run: {results['ratio_large_run_ray_job/engine_alone']}.", ""])
    write(results, "end_to_end", md)
    print(md)


if __name__ == "__main__":
    main()
