"""The engine's CPU defaults against the alternatives they were chosen over, on ResNet50.

    python -m benchmarks.choices [--rounds 5] [--batch-size 16]

Contenders, each built once, rounds interleaved in one process (random weights, fixed seed, no download):
  graph          the default on CPU: plain graph mode, guided gates as ``Relu`` on the gradient then the
                 framework's ``ReluGrad`` on the ReLU's output (two fused kernels)
  xla            the same with ``jit_compile=True`` (the GPU default)
  select_gates   graph mode with the textbook gate, ``where(x > 0 and grad > 0, grad, 0)`` on the
                 pre-activation (comparisons + select; the pre-activation kept alive for the backward pass)
Reported: images/s, median (min–max) over the rounds, each contender's ratio to ``graph`` paired by round,
and the largest difference of its maps to ``graph``'s.
Then the zero-interleave of a strided 1x1 convolution's input gradient (a 6-D ``Pad`` in ``worker.engine.ops``)
against two other ways to write it, on ResNet50's three strided shapes at the same batch: a channel concat with
zeros then ``depth_to_space``, and two ``stack``s with zeros. Writes benchmarks/results/choices.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from benchmarks.common import git_revision, machine, provenance, spread, write  # noqa: E402

SELECT_RELU, SELECT_RELU6 = "BenchmarkSelectRelu", "BenchmarkSelectRelu6"


@tf.RegisterGradient(SELECT_RELU)
def _select_relu(op, grad):
    return tf.where((op.inputs[0] > 0) & (grad > 0), grad, tf.zeros_like(grad))


@tf.RegisterGradient(SELECT_RELU6)
def _select_relu6(op, grad):
    x = op.inputs[0]
    return tf.where((x > 0) & (x < 6) & (grad > 0), grad, tf.zeros_like(grad))


def contenders(batch: int) -> dict:
    import keras

    from worker import GuidedBackprop

    class SelectGates(GuidedBackprop):
        gradient_overrides = {"Relu": SELECT_RELU, "Relu6": SELECT_RELU6}

    keras.utils.set_random_seed(0)
    model = keras.applications.ResNet50(weights=None)
    common = {"batch_size": batch, "preprocessing": "caffe", "map_dtype": "float32"}
    return {"graph": GuidedBackprop(model, jit_compile=False, **common),
            "xla": GuidedBackprop(model, jit_compile=True, **common),
            "select_gates": SelectGates(model, jit_compile=False, **common)}


def _depth_to_space(g, stride, like):
    zeros = tf.zeros_like(g)
    return tf.nn.depth_to_space(tf.concat([g] + [zeros] * (stride * stride - 1), -1), stride)


def _stacks(g, stride, like):
    n, h, w, c = g.shape
    row = tf.reshape(tf.stack([g, tf.zeros_like(g)], 3), [n, h, 2 * w, c])
    return tf.reshape(tf.stack([row, tf.zeros_like(row)], 2), [n, 2 * h, 2 * w, c])


def interleaves(batch: int, rounds: int) -> dict:
    """ms per pass over ResNet50's three strided 1x1 gradient shapes, for each way to zero-interleave."""
    from worker.engine.ops import _interleave

    shapes = [(batch, 28, 28, 256), (batch, 14, 14, 512), (batch, 7, 7, 1024)]
    ways = {"pad (the engine's)": _interleave, "concat + depth_to_space": _depth_to_space, "two stacks": _stacks}
    rng = np.random.default_rng(0)
    grads = [tf.constant(rng.standard_normal(s).astype(np.float32)) for s in shapes]
    likes = [tf.zeros((n, 2 * h, 2 * w, c)) for n, h, w, c in shapes]
    functions = {}
    for name, way in ways.items():
        @tf.function
        def one_pass(way=way):
            return [tf.reduce_sum(way(g, 2, like)) for g, like in zip(grads, likes)]
        for g, like in zip(grads, likes):  # the same tensor as the engine's, exactly
            assert np.array_equal(way(g, 2, like).numpy(), _interleave(g, 2, like).numpy()), name
        one_pass()
        functions[name] = one_pass
    ms = {name: [] for name in ways}
    for r in range(rounds):
        for name in (list(ways) if r % 2 == 0 else list(ways)[::-1]):
            start = time.perf_counter()
            for _ in range(10):
                functions[name]()
            ms[name].append((time.perf_counter() - start) * 100)
    return ms


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=16)
    args = p.parse_args(argv)
    engines = contenders(args.batch_size)
    images = np.random.default_rng(0).integers(0, 256, (args.batch_size, 224, 224, 3), dtype=np.uint8)
    maps = {name: e.explain(images).as_float32() for name, e in engines.items()}  # also the warm-up
    rates = {name: [] for name in engines}
    for r in range(args.rounds):
        for name in (list(engines) if r % 2 == 0 else list(engines)[::-1]):
            start = time.perf_counter()
            engines[name].explain(images)
            rates[name].append(args.batch_size / (time.perf_counter() - start))
        print(r, {k: round(v[-1], 2) for k, v in rates.items()}, flush=True)
    interleave_ms = interleaves(args.batch_size, args.rounds)
    scale = float(np.abs(maps["graph"]).max())
    results = {"date": datetime.date.today().isoformat(), "machine": machine(), "revision": git_revision(),
               "command": "python -m benchmarks.choices " + " ".join(argv), "rounds": args.rounds,
               "batch_size": args.batch_size, "images_per_second": rates,
               "ratio_to_graph": {k: [a / b for a, b in zip(v, rates["graph"])] for k, v in rates.items()},
               "max_map_difference_relative": {k: float(np.abs(m - maps["graph"]).max()) / scale
                                               for k, m in maps.items()},
               "interleave_ms": interleave_ms}
    base = interleave_ms["pad (the engine's)"]
    md = "\n".join([
        f"# The engine's CPU defaults against their alternatives ({results['date']})", "", *provenance(results),
        f"ResNet50 (random weights) at 224 x 224, batch {args.batch_size}, fp32, guided backprop; {args.rounds} rounds "
        "interleaved in one process, median (min–max).", "",
        "| contender | images/s | ratio to graph (paired by round) | largest map difference / map peak |",
        "|---|---|---|---|",
        *[f"| {k} | {spread(rates[k], 2)} | **{spread(results['ratio_to_graph'][k], 3)}** | "
          f"{results['max_map_difference_relative'][k]:.2g} |" for k in engines], "",
        "The strided 1x1 convolutions' zero-interleave, ms per pass over ResNet50's three strided shapes (each "
        "way checked equal to the engine's), median (min–max), with its time over the pad's paired by round:", "",
        "| way | ms | time / pad's |", "|---|---|---|",
        *[f"| {k} | {spread(v, 1)} | {spread([a / b for a, b in zip(v, base)], 2)} |"
          for k, v in interleave_ms.items()], ""])
    write(results, "choices", md)
    print(md)


if __name__ == "__main__":
    main()
