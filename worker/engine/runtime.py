"""Process-wide TensorFlow settings: threads, GPU memory growth, the XLA default."""

from __future__ import annotations

import logging

import tensorflow as tf

log = logging.getLogger(__name__)
_configured = False


def configure_tensorflow(threads: int | None = None, gpu_memory_limit_mb: int | None = None) -> None:
    """Set thread pools and GPU memory policy once, before TensorFlow starts its runtime.

    ``threads`` should equal the CPUs the scheduler gave this process (Ray sets
    OMP_NUM_THREADS to an actor's num_cpus; TensorFlow's own pools ignore it).
    GPUs get memory growth, or a hard limit when several processes share one.
    """
    global _configured
    if _configured:
        return
    _configured = True
    try:
        if threads:
            tf.config.threading.set_intra_op_parallelism_threads(int(threads))
            tf.config.threading.set_inter_op_parallelism_threads(max(1, min(2, int(threads))))
        for gpu in tf.config.list_physical_devices("GPU"):
            if gpu_memory_limit_mb:
                tf.config.set_logical_device_configuration(
                    gpu, [tf.config.LogicalDeviceConfiguration(memory_limit=int(gpu_memory_limit_mb))])
            else:
                tf.config.experimental.set_memory_growth(gpu, True)
    except RuntimeError as exc:  # the runtime was already initialised by the caller
        log.warning("TensorFlow already initialised; thread/GPU settings left as they are: %s", exc)


def has_gpu() -> bool:
    return bool(tf.config.list_physical_devices("GPU"))


def default_conv_gradients() -> str:
    """Forward-kernel convolution gradients on CPU, where they measured faster; the framework's on GPU
    (cuDNN's backward-data kernels are tuned, and the swap is unmeasured there: benchmarks/gpu.py compares)."""
    return "framework" if has_gpu() else "forward"


def native_bfloat16() -> bool | None:
    """Whether this machine computes bfloat16 natively: a GPU, or a CPU with avx512_bf16 / amx_bf16.

    None where the CPU's flags cannot be read (not Linux).  Without native kernels TensorFlow emulates
    bfloat16 and ``precision="bfloat16"`` is slower than float32 (measured 0.73x on ResNet50 on an AVX2 CPU).
    """
    if has_gpu():
        return True
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return None
    return bool({"avx512_bf16", "amx_bf16"} & set(flags))


def default_jit_compile() -> bool:
    """XLA on GPU; plain graph mode on CPU, where XLA measured 5-25 % slower for ResNet50."""
    return has_gpu()
