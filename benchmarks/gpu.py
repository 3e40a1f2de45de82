"""GPU benchmark, ready for one H200 within ~10 minutes: ``python -m benchmarks.gpu``.

ResNet50 and MobileNetV2 at 224x224 (random weights): forward-only vs the engine (XLA on, as on any GPU)
in fp32 (TF32 tensor cores), bf16 and fp16, at batch sizes 64, 128 and 256; fp32 with the forward-kernel
convolution gradients (``conv_gradients="forward"``, the CPU default; on GPU the default is the framework's
until this column says otherwise); time to first map; bf16/fp16 map fidelity (cosine to fp32). Writes benchmarks/results/gpu.{json,md}. Needs TensorFlow with CUDA.
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

from benchmarks.common import git_revision, interleaved, machine, write  # noqa: E402
from benchmarks.engine import build, cosine  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["resnet50", "mobilenetv2"])
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[64, 128, 256])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--calls", type=int, default=5)
    args = p.parse_args(argv)
    from worker import GuidedBackprop
    from worker.engine.preprocessing import Preprocessing

    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        sys.exit("no GPU visible to TensorFlow: this benchmark is for GPU machines (CPU: python -m benchmarks.engine)")
    results = {"date": datetime.date.today().isoformat(), "machine": machine(), "revision": git_revision(),
               "gpu": [tf.config.experimental.get_device_details(g).get("device_name", g.name) for g in gpus],
               "tensorflow": tf.__version__, "command": "python -m benchmarks.gpu " + " ".join(argv or sys.argv[1:]),
               "runs": []}
    for name in args.models:
        model, preset = build(name)
        size = model.input_shape[1:3]
        pre = Preprocessing(preset)
        for batch in args.batch_sizes:
            images = np.random.default_rng(0).integers(0, 256, (batch, *size, 3), dtype=np.uint8)
            forward = tf.function(lambda x: model(pre.apply(x, size, 3), training=False), jit_compile=True)
            t0 = time.perf_counter()
            engines = {"fp32": GuidedBackprop(model, batch_size=batch, preprocessing=preset)}
            first_map = time.perf_counter() - t0
            for precision in ("bfloat16", "float16"):
                engines[precision] = GuidedBackprop(model, batch_size=batch, preprocessing=preset, precision=precision)
            engines["fp32_forward_conv"] = GuidedBackprop(model, batch_size=batch, preprocessing=preset,
                                                          conv_gradients="forward")
            contenders = {"forward": lambda: forward(images).numpy()}
            contenders.update({f"engine_{k}": (lambda e=e: e.explain(images)) for k, e in engines.items()})
            for fn in contenders.values():
                fn()
            speeds = interleaved(contenders, args.rounds, batch, args.calls)
            ref = engines["fp32"].explain(images).as_float32()[:, 0]
            run = {"model": name, "batch_size": batch, "time_to_first_map_s": round(first_map, 2),
                   "images_per_second": {k: v["per_second"] for k, v in speeds.items()},
                   "cosine_to_fp32": {k: round(cosine(e.explain(images).as_float32()[:, 0], ref), 5)
                                      for k, e in engines.items() if k != "fp32"},
                   "peak_gpu_mb": round(tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2 ** 20)}
            print(run, flush=True)
            results["runs"].append(run)
            del engines
    lines = [f"# GPU benchmark ({results['date']})", "", f"GPU: {results['gpu']}; TF {results['tensorflow']}; "
             f"revision {results['revision']}", "", "| model | batch | forward | fp32 | fp32, forward-kernel conv grads | bf16 | fp16 | "
             "bf16 cos | fp16 cos | first map (s) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["runs"]:
        ips = r["images_per_second"]
        lines.append(f"| {r['model']} | {r['batch_size']} | {ips['forward']} | {ips['engine_fp32']} | "
                     f"{ips['engine_fp32_forward_conv']} | {ips['engine_bfloat16']} | {ips['engine_float16']} | "
                     f"{r['cosine_to_fp32']['bfloat16']} | "
                     f"{r['cosine_to_fp32']['float16']} | {r['time_to_first_map_s']} |")
    write(results, "gpu", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
