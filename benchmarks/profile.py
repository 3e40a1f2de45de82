"""Where the engine's time goes: per-op-type time of one guided-backprop batch, forward vs backward side.

    python -m benchmarks.profile [--model resnet50] [--batch-size 16]

Freezes the engine's compiled function (and the forward-only function), runs each in a TF1 session with a
full trace (grappler's fusions included, as in the engine) and sums the kernels' time by op type; ops under
``gradients/`` are the backward pass.  Run with ``--conv-gradients framework`` to see TensorFlow's
backprop-input kernels instead of the forward-kernel gradients.  Writes benchmarks/results/profile.{json,md}.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import tensorflow as tf

from benchmarks.common import git_revision, machine, provenance, write
from benchmarks.engine import build


def trace(concrete, feeds, threads, repeats=3):
    """{(side, op type): ms}, wall ms per call, for a concrete function run in a session with a full trace."""
    from tensorflow.python.framework.convert_to_constants import (
        convert_variables_to_constants_v2,
    )

    frozen = convert_variables_to_constants_v2(concrete)
    graph = tf.Graph()
    with graph.as_default():
        tf.import_graph_def(frozen.graph.as_graph_def(), name="")
    types = {node.name: node.op for node in graph.as_graph_def().node}
    feed = {t.name: value for t, value in zip(frozen.inputs, feeds)}
    fetch = [t.name for t in frozen.outputs]
    config = tf.compat.v1.ConfigProto(intra_op_parallelism_threads=threads, inter_op_parallelism_threads=threads)
    times: collections.Counter = collections.Counter()
    with tf.compat.v1.Session(graph=graph, config=config) as session:
        for _ in range(2):
            session.run(fetch, feed)
        start = time.perf_counter()
        for _ in range(repeats):
            session.run(fetch, feed)
        wall = (time.perf_counter() - start) / repeats * 1000
        for _ in range(repeats):
            metadata = tf.compat.v1.RunMetadata()
            session.run(fetch, feed, options=tf.compat.v1.RunOptions(trace_level=3), run_metadata=metadata)
            for device in metadata.step_stats.dev_stats:
                for node in device.node_stats:
                    side = "backward" if node.node_name.startswith("gradients") else "forward"
                    times[(side, types.get(node.node_name, "(runtime)"))] += node.all_end_rel_micros / 1e3 / repeats
    return times, wall


def main(argv=None):
    from worker import GuidedBackprop
    from worker.engine.preprocessing import Preprocessing

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--conv-gradients", default="auto", choices=["auto", "forward", "framework"])
    p.add_argument("--threads", type=int, default=os.cpu_count())
    args = p.parse_args(argv)
    model, preset = build(args.model)
    size, batch = model.input_shape[1:3], args.batch_size
    pre = Preprocessing(preset)
    images = np.random.default_rng(0).integers(0, 256, (batch, *size, 3), dtype=np.uint8)
    engine = GuidedBackprop(model, batch_size=batch, preprocessing=preset, conv_gradients=args.conv_gradients,
                            warmup=False)
    forward = tf.function(lambda x: model(pre.apply(x, size, 3), training=False)).get_concrete_function(
        tf.TensorSpec((batch, *size, 3), tf.uint8))
    fwd_times, fwd_wall = trace(forward, [images], args.threads)
    eng_times, eng_wall = trace(engine._concrete_for(size), [images, np.zeros(batch, np.int32)], args.threads)
    total = sum(eng_times.values())
    rows = [{"side": side, "op": op, "ms": round(ms, 1), "share": round(ms / total, 4)}
            for (side, op), ms in eng_times.most_common()]
    side_ms = {s: round(sum(ms for (side, _), ms in eng_times.items() if side == s), 1)
               for s in ("forward", "backward")}
    results = {"date": datetime.date.today().isoformat(), "machine": machine(), "revision": git_revision(),
               "command": "python -m benchmarks.profile " + " ".join(sys.argv[1:] if argv is None else argv),
               "model": args.model, "batch_size": batch, "conv_gradients": engine.conv_gradients,
               "wall_ms_per_batch": {"forward_only": round(fwd_wall, 1), "engine": round(eng_wall, 1)},
               "forward_only_op_ms": round(sum(fwd_times.values()), 1), "engine_op_ms_by_side": side_ms,
               "engine_ops": rows}
    md = "\n".join([
        f"# Engine profile ({results['date']})", "",
        *provenance(results),
        f"{args.model}, batch {batch}, conv_gradients={engine.conv_gradients}. Wall time per batch: forward only "
        f"{results['wall_ms_per_batch']['forward_only']} ms, engine {results['wall_ms_per_batch']['engine']} ms "
        f"(ratio {round(fwd_wall / eng_wall, 3)}). Kernel time summed by op type (grappler's fused ops are named "
        "after the op they replaced, so the forward convolutions, fused with BatchNorm, show as `Mul`): "
        f"forward-only graph {results['forward_only_op_ms']} ms; engine forward side {side_ms['forward']} ms, "
        f"backward side {side_ms['backward']} ms.", "",
        "| side | op | ms | share |", "|---|---|---|---|",
        *[f"| {r['side']} | {r['op']} | {r['ms']} | {100 * r['share']:.1f} % |" for r in rows if r["share"] >= 0.002],
        ""])
    write(results, "profile", md)
    print(md)


if __name__ == "__main__":
    main()
