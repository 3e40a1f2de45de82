"""Each attribution method's cost relative to forward-only inference, side by side in one process.

    python -m benchmarks.methods [--models resnet50 mobilenetv2] [--batch-size 16] [--rounds 5] [--smooth 4]

For each model (random weights, fixed seed; no download) at 224 x 224, rounds interleave: forward (uint8 ->
preprocessing -> model, one tf.function), then every method of the engine on the same batch (float16 max-abs
maps, the engine's defaults for this host), SmoothGrad over guided backprop with ``--smooth`` noisy copies.
Per round, each method's speed over the same round's forward speed; the table gives the median ratio and its
range over the rounds.  Writes benchmarks/results/methods.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from benchmarks.common import git_revision, interleaved, machine, provenance, write  # noqa: E402
from benchmarks.engine import build  # noqa: E402


def contenders(name: str, batch_size: int, smooth: int) -> dict:
    from worker import Deconvnet, GradCAM, Gradient, GuidedBackprop, GuidedGradCAM
    from worker.engine.preprocessing import Preprocessing

    model, preset = build(name)
    images = np.random.default_rng(0).integers(0, 256, (batch_size, 224, 224, 3), dtype=np.uint8)
    preprocessing = Preprocessing(preset)

    @tf.function(autograph=False)
    def forward(x):
        return model(preprocessing.apply(x, (224, 224), 3), training=False)

    batch = tf.constant(images)
    forward(batch)
    options = {"batch_size": batch_size, "preprocessing": preset}
    engines = {
        "guided_backprop": GuidedBackprop(model, **options),
        "deconvnet": Deconvnet(model, **options),
        "gradient": Gradient(model, **options),
        "gradcam": GradCAM(model, **options),
        "guided_gradcam": GuidedGradCAM(model, **options),
        f"smoothgrad_{smooth}": GuidedBackprop(model, smooth=smooth, **options),
    }
    runs = {"forward": lambda: forward(batch).numpy()}
    runs.update({method: (lambda e=engine: e.explain(images)) for method, engine in engines.items()})
    return runs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["resnet50", "mobilenetv2"])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--smooth", type=int, default=4)
    args = p.parse_args(argv)
    results = {"machine": machine(), "revision": git_revision(), "date": datetime.date.today().isoformat(),
               "command": "python -m benchmarks.methods " + " ".join(argv or sys.argv[1:]),
               "batch_size": args.batch_size, "models": {}}
    for name in args.models:
        runs = contenders(name, args.batch_size, args.smooth)
        speeds = interleaved(runs, args.rounds, args.batch_size)
        forward = speeds["forward"]["all"]
        rows = {}
        for method, s in speeds.items():
            ratios = [x / f for x, f in zip(s["all"], forward)]
            rows[method] = {"images_per_s": s["per_second"], "all": s["all"],
                            "vs_forward": round(statistics.median(ratios), 3),
                            "vs_forward_range": [round(min(ratios), 3), round(max(ratios), 3)]}
        results["models"][name] = rows
        print(name, {m: r["vs_forward"] for m, r in rows.items()}, flush=True)
    lines = ["# Methods: cost relative to forward-only", "", *provenance(results),
             f"224 x 224, batch {args.batch_size}, fp32, {args.rounds} interleaved rounds; ratio = the method's "
             "images/s over forward-only images/s in the same round (median, and its range over the rounds).", "",
             "| model | method | images/s (median) | x forward | range |", "|---|---|---|---|---|"]
    for name, rows in results["models"].items():
        for method, r in rows.items():
            low, high = r["vs_forward_range"]
            lines.append(f"| {name} | {method} | {r['images_per_s']} | {r['vs_forward']} | {low}-{high} |")
    write(results, "methods", "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
