"""Time to first map in the Python API, as a user meets it: a fresh process, a saved model, one batch explained.

    python -m benchmarks.first_map [--model resnet50] [--batch-size 16] [--rounds 5]

The model (random weights, fixed seed) is saved once as ``.keras``; then rounds alternate fresh processes that
  engine           ``GuidedBackprop(path, ...)`` with its defaults, then ``explain(images)``
  engine_warmup    the same with ``warmup=True`` (the compiled function run once on zeros when built)
  recipe_eager     the question's recipe: load, swap ``layer.activation`` for a custom-gradient ReLU, one
                   ``GradientTape`` gradient, eagerly (it guides fewer ReLUs: see ``benchmarks.engine``)
Each reports its imports, its build (load + trace, and the warm-up where asked), its first ``explain``, the two
together (its time to first map) and the whole process's wall time from its start; median (min–max) over the
rounds.
Writes benchmarks/results/first_map.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import time

from benchmarks.common import (
    child_json,
    git_revision,
    machine,
    provenance,
    spread,
    write,
)

CHILD = """
import json, sys, time
start = time.perf_counter()
import os
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
import numpy as np
import tensorflow as tf
kind, path, preset, batch = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
if kind.startswith("engine"):
    from worker import GuidedBackprop
imported = time.perf_counter()
if kind.startswith("engine"):
    engine = GuidedBackprop(path, batch_size=batch, preprocessing=preset, warmup=kind == "engine_warmup")
    size = engine.source.input_size
    explain = lambda x: engine.explain(x).maps
else:
    import keras
    from benchmarks.engine import guided_relu_recipe
    from worker.engine.preprocessing import Preprocessing
    model = keras.models.load_model(path)
    guided_relu_recipe(model)
    size, pre = model.input_shape[1:3], Preprocessing(preset)
    def explain(images):
        x = pre.apply(tf.convert_to_tensor(images), size, 3)
        with tf.GradientTape() as tape:
            tape.watch(x)
            score = tf.reduce_sum(tf.reduce_max(model(x, training=False), axis=-1))
        return tf.reduce_max(tf.abs(tape.gradient(score, x)), axis=-1).numpy()
built = time.perf_counter()
images = np.random.default_rng(0).integers(0, 256, (batch, *size, 3), dtype=np.uint8)
maps = explain(images)
assert np.isfinite(np.asarray(maps, np.float32)).all()
done = time.perf_counter()
print(json.dumps({"imports": imported - start, "build": built - imported, "first_explain": done - built}))
"""

KINDS = ("engine", "engine_warmup", "recipe_eager")


def child(kind: str, path: str, preset: str, batch: int) -> dict:
    start = time.perf_counter()
    timings = child_json(["-c", CHILD, kind, path, preset, str(batch)])
    wall = time.perf_counter() - start
    timings["to_first_map"] = timings["build"] + timings["first_explain"]
    return {**{k: round(v, 2) for k, v in timings.items()}, "wall": round(wall, 2)}


STAGES = ("imports", "build", "first_explain", "to_first_map", "wall")


def markdown(results: dict) -> str:
    warm, cold = results["runs"]["engine_warmup"], results["runs"]["engine"]
    return "\n".join([
        f"# Time to first map in the Python API ({results['date']})", "", *provenance(results),
        f"{results['model']} saved as `.keras`, batch {results['batch_size']}; each run a fresh process; "
        f"{results['rounds']} rounds, the kinds alternating; seconds, median (min–max). *build*: load + trace "
        "(+ the warm-up batch where asked); *to first map*: build + first explain, in the same run; *wall*: the "
        "whole process, interpreter start and exit included.", "",
        "| kind | " + " | ".join(s.replace("_", " ") for s in STAGES) + " |", "|---|" + "---|" * len(STAGES),
        *[f"| {kind} | " + " | ".join(spread([run[s] for run in rs], 1) for s in STAGES) + " |"
          for kind, rs in results["runs"].items()], "",
        "Saved by building without the warm-up batch (engine_warmup − engine, paired by round): to first map "
        f"{spread([a['to_first_map'] - b['to_first_map'] for a, b in zip(warm, cold)], 1)} s, whole process "
        f"{spread([a['wall'] - b['wall'] for a, b in zip(warm, cold)], 1)} s.", ""])


def main(argv=None):
    from benchmarks.engine import build

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    runs = {kind: [] for kind in KINDS}
    with tempfile.TemporaryDirectory(prefix="first-map-") as tmp:
        model, preset = build(args.model)
        path = os.path.join(tmp, f"{args.model}.keras")
        model.save(path)
        del model
        for r in range(args.rounds):
            order = KINDS if r % 2 == 0 else KINDS[::-1]
            for kind in order:
                runs[kind].append(child(kind, path, preset, args.batch_size))
            print(r, {k: v[-1] for k, v in runs.items()}, flush=True)
    results = {"date": datetime.date.today().isoformat(), "machine": machine(), "revision": git_revision(),
               "command": "python -m benchmarks.first_map " + " ".join(sys.argv[1:] if argv is None else argv),
               "model": args.model, "batch_size": args.batch_size, "rounds": args.rounds, "runs": runs}
    md = markdown(results)
    write(results, "first_map", md)
    print(md)


if __name__ == "__main__":
    main()
