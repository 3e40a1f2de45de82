"""Engine throughput vs forward-only inference vs the original question's recipe (and xplique if installed).

    python -m benchmarks.engine [--models resnet50 mobilenetv2 small_cnn] [--batch-size 16] [--rounds 5]

For each model (random weights, fixed seed; no download): images/s of
  forward      uint8 -> preprocessing -> model, one tf.function (the ceiling)
  engine_fp32  worker.GuidedBackprop, max-abs float16 maps
  engine_fp32_framework_conv  the same with conv_gradients="framework" (TensorFlow's backprop-input kernels)
  engine_bf16  the same with precision="bfloat16" (cosine to fp32 maps reported)
  recipe_eager the question's second answer: swap layer.activation for a tf.custom_gradient ReLU, GradientTape
  recipe_graph the same recipe inside tf.function
  xplique      xplique.attributions.GuidedBackprop, when installed (benchmarks/install_xplique.sh)
plus time to first map, the share of ReLUs each recipe really guides (cosine of its map to ours), peak RSS.
Writes benchmarks/results/engine.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from benchmarks.common import git_revision, interleaved, machine, peak_rss_mb, spread, write  # noqa: E402


def build(name: str):
    import keras

    keras.utils.set_random_seed(0)
    if name == "resnet50":
        return keras.applications.ResNet50(weights=None), "caffe"
    if name == "mobilenetv2":
        return keras.applications.MobileNetV2(weights=None), "tf"
    if name == "small_cnn":
        from tests.models import small_cnn

        return small_cnn(224, classes=2), "scale01"
    raise ValueError(name)


def guided_relu_recipe(model) -> int:
    """The question's recipe, in place: every layer whose .activation is relu gets a custom-gradient ReLU;
    returns how many layers it swapped."""
    import keras

    @tf.custom_gradient
    def guided_relu(x):
        def grad(dy):
            return tf.cast(dy > 0, dy.dtype) * tf.cast(x > 0, dy.dtype) * dy
        return tf.nn.relu(x), grad

    swapped = 0
    for layer in model.layers[1:]:
        if getattr(layer, "activation", None) is keras.activations.relu:
            layer.activation = guided_relu
            swapped += 1
    return swapped


def recipe_model(name: str):
    """A fresh copy of ``name`` with the recipe applied, and how many layers it swapped."""
    model, _ = build(name)
    return model, guided_relu_recipe(model)


def cosine(a, b):
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return float(np.min((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-30)))


def bench_model(name, batch, rounds, calls):
    from worker import GuidedBackprop
    from worker.engine.preprocessing import Preprocessing

    model, preset = build(name)
    size = model.input_shape[1:3]
    images = np.random.default_rng(0).integers(0, 256, (batch, *size, 3), dtype=np.uint8)
    pre = Preprocessing(preset)

    @tf.function(input_signature=[tf.TensorSpec((batch, *size, 3), tf.uint8)])
    def forward(x):
        return model(pre.apply(x, size, 3), training=False)

    t0 = time.perf_counter()
    fp32 = GuidedBackprop(model, batch_size=batch, preprocessing=preset)
    fp32.explain(images)
    first_map = time.perf_counter() - t0
    bf16 = GuidedBackprop(model, batch_size=batch, preprocessing=preset, precision="bfloat16")
    framework_conv = GuidedBackprop(model, batch_size=batch, preprocessing=preset, conv_gradients="framework")
    rmodel, swapped = recipe_model(name)

    def recipe(x):
        x = pre.apply(tf.convert_to_tensor(x), size, 3)
        with tf.GradientTape() as tape:
            tape.watch(x)
            out = rmodel(x, training=False)
            score = tf.reduce_sum(tf.reduce_max(out, axis=-1))
        return tf.reduce_max(tf.abs(tape.gradient(score, x)), axis=-1)

    recipe_graph = tf.function(recipe, input_signature=[tf.TensorSpec((batch, *size, 3), tf.uint8)])
    contenders = {
        "forward": lambda: forward(images).numpy(),
        "engine_fp32": lambda: fp32.explain(images),
        "engine_bf16": lambda: bf16.explain(images),
        "engine_fp32_framework_conv": lambda: framework_conv.explain(images),
        "recipe_eager": lambda: recipe(images).numpy(),
        "recipe_graph": lambda: recipe_graph(images).numpy(),
    }
    try:
        from xplique.attributions import GuidedBackprop as XpliqueGBP

        xmodel, _ = build(name)
        xp = XpliqueGBP(xmodel, batch_size=batch)
        xinputs = pre.apply(tf.constant(images), size, 3).numpy()
        xtargets = np.eye(model.output_shape[-1], dtype=np.float32)[forward(images).numpy().argmax(-1)]
        contenders["xplique"] = lambda: np.asarray(xp.explain(xinputs, xtargets))
    except ImportError:
        pass
    for fn in contenders.values():  # warm up / trace everything before timing
        fn()
    speeds = interleaved(contenders, rounds, batch, calls)
    ours = fp32.explain(images).as_float32()[:, 0]
    pairs = {"engine_fp32/forward": ("engine_fp32", "forward"),
             "engine_bf16/engine_fp32": ("engine_bf16", "engine_fp32"),
             "engine_fp32/recipe_eager": ("engine_fp32", "recipe_eager"),
             "engine_fp32/engine_fp32_framework_conv": ("engine_fp32", "engine_fp32_framework_conv"),
             "engine_fp32/recipe_graph": ("engine_fp32", "recipe_graph"),
             "engine_fp32/xplique": ("engine_fp32", "xplique")}
    # a ratio is taken within each round (the two contenders ran back to back), then summarised over the rounds
    per_round = {k: [a / b for a, b in zip(speeds[x]["all"], speeds[y]["all"])]
                 for k, (x, y) in pairs.items() if x in speeds and y in speeds}
    result = {
        "batch_size": batch,
        "rounds": rounds,
        "images_per_second": {k: v["per_second"] for k, v in speeds.items()},
        "images_per_second_spread": {k: spread(v["all"]) for k, v in speeds.items()},
        "samples": {k: v["all"] for k, v in speeds.items()},
        "ratios": {k: round(statistics.median(v), 3) for k, v in per_round.items()},
        "ratio_spread": {k: spread(v, 3) for k, v in per_round.items()},
        "time_to_first_map_s": round(first_map, 2),
        "relus_guided_by_engine": fp32.report["coverage"]["guided_total"],
        "relus_swapped_by_recipe": swapped,
        "bf16_min_cosine_to_fp32": round(cosine(bf16.explain(images).as_float32()[:, 0], ours), 5),
        "output_bytes_per_image_float16_maxabs": int(np.prod(size)) * 2,
    }
    # the recipe differentiates the model output as is (softmax included); on models with a final softmax its map
    # differs from ours by the softmax Jacobian, so compare against our probability-score map instead
    ours_prob = GuidedBackprop(model, batch_size=batch, preprocessing=preset, score="probability",
                               map_dtype="float32").explain(images).as_float32()[:, 0]
    result["recipe_min_cosine_to_engine_probability_map"] = round(cosine(recipe(images).numpy(), ours_prob), 5)
    return result


def markdown(results) -> str:
    lines = [f"# Engine benchmark ({results['date']})", "",
             f"Machine: {results['machine']['cpu']}, {results['machine']['cores']} cores. "
             f"TensorFlow {results['versions']['tensorflow']}. Revision {results['revision']}.", "",
             f"Command: `{results['command']}`", "",
             "Images/s, median (min–max) of interleaved rounds in one process (higher is better):", ""]
    names = ["forward", "engine_fp32", "engine_bf16", "engine_fp32_framework_conv", "recipe_eager", "recipe_graph",
             "xplique"]
    lines.append("| model | rounds | " + " | ".join(names) + " |")
    lines.append("|" + "---|" * (len(names) + 2))
    for model, r in results["models"].items():
        ips = r.get("images_per_second_spread", r["images_per_second"])
        lines.append(f"| {model} | {r.get('rounds', '–')} | " + " | ".join(str(ips.get(n, "–")) for n in names) + " |")
    ratios = [("engine/forward", "engine_fp32/forward"), ("engine/recipe eager", "engine_fp32/recipe_eager"),
              ("engine/recipe graph", "engine_fp32/recipe_graph"), ("engine/xplique", "engine_fp32/xplique"),
              ("forward-kernel conv grads gain", "engine_fp32/engine_fp32_framework_conv"),
              ("bf16/fp32", "engine_bf16/engine_fp32")]
    lines += ["", "Ratios taken within each round (the two ran back to back), median (min–max) over the rounds; "
              "maps compared on the same batch:", "",
              "| model | " + " | ".join(r[0] for r in ratios) +
              " | bf16 cosine | ReLUs guided (engine / recipe) | recipe cosine | first map (s) |",
              "|" + "---|" * (len(ratios) + 5)]
    for model, r in results["models"].items():
        spreads = r.get("ratio_spread", r["ratios"])
        lines.append(f"| {model} | " + " | ".join(str(spreads.get(key, "–")) for _, key in ratios) +
                     f" | {r['bf16_min_cosine_to_fp32']} | "
                     f"{r['relus_guided_by_engine']} / {r['relus_swapped_by_recipe']} | "
                     f"{r['recipe_min_cosine_to_engine_probability_map']} | {r['time_to_first_map_s']} |")
    lines += ["", f"Peak RSS of the benchmark process: {results['peak_rss_mb']} MB.", "",
              f"bf16 native on this CPU (avx512_bf16/amx_bf16): {results.get('native_bfloat16')}.", "",
              "*recipe cosine*: the lowest cosine similarity, over the batch, between the recipe's map and ours "
              "for the same (probability) score; below 1 means the recipe left ReLUs vanilla. *first map*: from "
              "the engine's constructor to its first map of one batch (load, trace, compile, run; the model built "
              "in memory: `benchmarks/results/first_map.md` has it from a fresh process).", ""]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["resnet50", "mobilenetv2", "small_cnn"])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--calls", type=int, default=2, help="batches per timed sample")
    args = p.parse_args(argv)
    results = {"date": datetime.date.today().isoformat(), "machine": machine(), "revision": git_revision(),
               "command": "python -m benchmarks.engine " + " ".join(sys.argv[1:] if argv is None else argv),
               "versions": {"tensorflow": tf.__version__}, "models": {}}
    for name in args.models:
        results["models"][name] = bench_model(name, args.batch_size, args.rounds, args.calls)
        print(name, results["models"][name]["images_per_second"], results["models"][name]["ratios"], flush=True)
    results["peak_rss_mb"] = peak_rss_mb()
    from worker.engine.runtime import native_bfloat16

    results["native_bfloat16"] = native_bfloat16()
    write(results, "engine", markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
