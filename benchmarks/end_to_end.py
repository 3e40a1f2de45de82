"""End to end: rows/s Parquet -> Parquet through Ray Data vs the engine alone on the same images.

    python -m benchmarks.end_to_end [--rows 1200] [--size 128] [--rounds 2]

Both sides start from the same HF-style Parquet file and end with a Parquet file
of maps, and both include building the engine (load + trace + warm-up):
  engine_alone  one process: read, decode (PIL), GuidedBackprop.explain, write
  ray_job       worker.job.run on a local Ray cluster already started (as on a real cluster)
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

from benchmarks.common import git_revision, machine, write  # noqa: E402


def make_data(directory, rows, size):
    from worker.demo import digits_images, question_model, write_hf_parquet

    images, labels = digits_images(size)
    reps = int(np.ceil(rows / len(images)))
    images, labels = np.concatenate([images] * reps)[:rows], np.concatenate([labels] * reps)[:rows]
    data = os.path.join(directory, "data.parquet")
    write_hf_parquet(data, images, labels, rows_per_group=128)
    model = os.path.join(directory, "model.keras")
    question_model(size, classes=10).save(model)
    return data, model


def engine_alone(data, model, out, batch):
    from worker import GuidedBackprop
    from worker.decode import decode_image
    from worker.schema import map_column

    start = time.perf_counter()
    engine = GuidedBackprop(model, batch_size=batch, preprocessing="scale01")
    h, w = engine.source.input_size
    table = pq.read_table(data)
    images = np.stack([decode_image(c, (h, w)) for c in table["image"].to_pylist()])
    result = engine.explain(images)
    pq.write_table(pa.table({"map": map_column(result.maps[:, 0], np.ones(len(images), bool), (h, w))}), out)
    return time.perf_counter() - start


def ray_job(data, model, out, batch):
    from worker.job import JobConfig, run

    start = time.perf_counter()
    run(JobConfig(model=model, input=data, output=out, preprocessing="scale01", batch_size=batch, overwrite=True),
        echo=lambda *_: None)
    return time.perf_counter() - start


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1200)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args(argv)
    import ray

    ray.init(logging_level="ERROR", include_dashboard=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    tmp = tempfile.mkdtemp(prefix="e2e-bench-")
    try:
        data, model = make_data(tmp, args.rows, args.size)
        times = {"engine_alone": [], "ray_job": []}
        for r in range(args.rounds):
            times["engine_alone"].append(engine_alone(data, model, os.path.join(tmp, f"alone{r}.parquet"),
                                                      args.batch_size))
            times["ray_job"].append(ray_job(data, model, os.path.join(tmp, "job"), args.batch_size))
            print({k: v[-1] for k, v in times.items()}, flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        ray.shutdown()
    rps = {k: round(args.rows / float(np.median(v)), 2) for k, v in times.items()}
    results = {"date": datetime.date.today().isoformat(), "machine": machine(), "revision": git_revision(),
               "command": "python -m benchmarks.end_to_end " + " ".join(sys.argv[1:] if argv is None else argv),
               "rows": args.rows, "image_size": args.size, "batch_size": args.batch_size,
               "seconds": {k: [round(x, 2) for x in v] for k, v in times.items()}, "rows_per_second": rps,
               "ratio_ray_job/engine_alone": round(rps["ray_job"] / rps["engine_alone"], 3)}
    md = "\n".join([
        f"# End-to-end benchmark ({results['date']})", "",
        f"Machine: {results['machine']['cpu']}, {results['machine']['cores']} cores. Revision {results['revision']}.",
        f"Command: `{results['command']}`", "",
        f"{args.rows} rows of {args.size}x{args.size} PNG images (HF-style Parquet), the question's CNN, "
        f"batch {args.batch_size}; both sides include engine build and Parquet I/O.", "",
        "| | rows/s | seconds per round |", "|---|---|---|",
        *[f"| {k} | {rps[k]} | {results['seconds'][k]} |" for k in rps], "",
        f"Ratio ray_job / engine_alone: **{results['ratio_ray_job/engine_alone']}**", ""])
    write(results, "end_to_end", md)
    print(md)


if __name__ == "__main__":
    main()
