"""SmoothGrad's memory as its copies grow: flat in N with bounded passes, linear with one pass of everything.

    python -m benchmarks.smooth_memory [--model ResNet50] [--size 224] [--batch 4] [--copies 0 8 24 50]
                                       [--one-pass-up-to 8] [--repeats 2] [--large 50:16]

Each measurement is a fresh process (``GuidedBackprop`` on the keras.applications model, random weights: the cost
is the same), explaining one batch of ``--batch`` digits images with ``smooth=N``: the default passes
(``pass_images`` = the batch size) against one pass of every image and copy (``pass_images`` large), the one-pass
runs only up to ``--one-pass-up-to`` copies (it grows by the model's memory per input).  The peak resident set
size (RSS) is sampled every 0.05 s during ``explain`` (the trace included), with the RSS before the engine was
built beside it; runs are interleaved over the repeats.  ``--large N:B`` adds one run of ``smooth=N`` at batch B
(the textbook setting at the job's default batch size).  On a GPU the allocator's peak
(``tf.config.experimental.get_memory_info``) is reported instead of the RSS.
Writes benchmarks/results/smooth_memory.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from benchmarks.common import PeakSampler, child_json, git_revision, machine, provenance, spread, write


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def child(model_name: str, size: int, batch: int, copies: int, pass_images: int) -> dict:
    import keras
    import tensorflow as tf

    from tests.images import digits_images
    from worker import GuidedBackprop

    images = digits_images(size, limit=batch)[0]
    keras.utils.set_random_seed(0)
    model = getattr(keras.applications, model_name)(weights=None, input_shape=(size, size, 3))
    gpu = bool(tf.config.list_physical_devices("GPU"))
    before = _rss_mb()
    engine = GuidedBackprop(model, batch_size=batch, smooth=copies, pass_images=pass_images, preprocessing="caffe")
    started = time.perf_counter()
    with PeakSampler(lambda: {"rss": _rss_mb()}, 0.05) as sampler:
        out = engine.explain(images)
    seconds = time.perf_counter() - started
    result = {"rss_before_mb": round(before, 1), "peak_rss_mb": round(sampler.peak["rss"], 1),
              "seconds": round(seconds, 2), "passes": engine.report["passes"],
              "problems": int(sum(p is not None for p in out.problems))}
    if gpu:
        result["gpu_peak_mb"] = round(tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2 ** 20, 1)
    return result


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="ResNet50")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--copies", type=int, nargs="+", default=[0, 8, 24, 50])
    p.add_argument("--one-pass-up-to", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--large", default="50:16", help="N:B, one run of smooth=N at batch B ('' for none)")
    p.add_argument("--child", nargs=3, type=int, metavar=("BATCH", "COPIES", "PASS_IMAGES"))
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.model, args.size, *args.child)))
        return

    def measure(batch, copies, pass_images):
        return child_json(["-m", "benchmarks.smooth_memory", "--model", args.model, "--size", str(args.size),
                           "--child", str(batch), str(copies), str(pass_images)])

    runs = {}
    for _ in range(args.repeats):  # interleaved: every setting once per repeat
        for n in args.copies:
            for mode, pass_images in (("bounded", 0), ("one pass", 100000)):
                if mode == "one pass" and n > args.one_pass_up_to:
                    continue
                runs.setdefault((mode, n, args.batch), []).append(measure(args.batch, n, pass_images))
                print(mode, n, runs[(mode, n, args.batch)][-1], file=sys.stderr, flush=True)
    if args.large:
        n, b = (int(v) for v in args.large.split(":"))
        runs[("bounded", n, b)] = [measure(b, n, 0)]
        print("bounded", n, b, runs[("bounded", n, b)][-1], file=sys.stderr, flush=True)

    results = {"machine": machine(), "revision": git_revision(), "date": datetime.date.today().isoformat(),
               "command": "python -m benchmarks.smooth_memory " + " ".join(sys.argv[1:]),
               "model": args.model, "size": args.size,
               "runs": [{"mode": m, "copies": n, "batch": b, "samples": v} for (m, n, b), v in runs.items()]}
    key = "gpu_peak_mb" if "gpu_peak_mb" in next(iter(runs.values()))[0] else "peak_rss_mb"
    lines = [f"# SmoothGrad memory: {args.model} at {args.size} px, bounded passes vs one pass", "",
             *provenance(results),
             f"Date {results['date']}. Peak {'GPU allocator' if key == 'gpu_peak_mb' else 'RSS'} during `explain` "
             "(trace included), median (min-max) over the repeats; RSS before the engine was built beside it.", "",
             "| copies N | batch | passes | inputs per pass | peak MB, bounded | peak MB, one pass | "
             "s, bounded | s, one pass | RSS before, MB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for n, b in sorted({(n, b) for (_, n, b) in runs}):
        bounded, one = runs.get(("bounded", n, b)), runs.get(("one pass", n, b))
        plan = bounded[0]["passes"]
        per_pass = plan["images"] * (1 + plan["copies"]) * plan["targets"]
        passes = f"{-(-b // plan['images']) * plan['copy_passes'] * plan['target_passes']}"
        cell = (lambda rs, k: spread([r[k] for r in rs], 1) if rs else "not run")
        lines.append(f"| {n} | {b} | {passes} | {per_pass} | {cell(bounded, key)} | {cell(one, key)} | "
                     f"{cell(bounded, 'seconds')} | {cell(one, 'seconds')} | {cell(bounded, 'rss_before_mb')} |")
    write(results, "smooth_memory", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
