"""Sanity controls, so audit numbers mean something (Adebayo et al. 2018).

Guided backprop is known to reconstruct image edges and to change little when
the model's weights are randomised.  On a sample of images we compute, next to
the real map: the map of a *random other class*, the map of a *weight-randomised
copy* of the model, and a Sobel *edge map* of the model input; then the
similarity of the real map to each (Spearman rank correlation and SSIM, mean over
the sample) and their statistics.  High similarity to a control means the map
says little about that model or that class.  Extra cost: two guided backward
passes per sampled image and one model rebuild.

Example:
    >>> x = np.random.default_rng(0).random((1, 16, 16))
    >>> round(float(spearman(x, x)[0]), 6), round(float(ssim(x, x)[0]), 6)
    (1.0, 1.0)
"""

from __future__ import annotations

import numpy as np

from worker.data.stats import map_statistics


def spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-pair Spearman rank correlation of (N, H, W) maps (|values|)."""
    def ranks(x):
        flat = np.abs(x.reshape(len(x), -1))
        return np.argsort(np.argsort(flat, axis=1), axis=1).astype(np.float64)
    ra, rb = ranks(a), ranks(b)
    ra -= ra.mean(1, keepdims=True)
    rb -= rb.mean(1, keepdims=True)
    return (ra * rb).sum(1) / np.sqrt((ra ** 2).sum(1) * (rb ** 2).sum(1) + 1e-30)


def _box(x: np.ndarray, size: int) -> np.ndarray:
    """Mean over size x size windows (valid positions) of (N, H, W)."""
    c = np.cumsum(np.cumsum(np.pad(x, ((0, 0), (1, 0), (1, 0))), 1), 2)
    s = c[:, size:, size:] - c[:, :-size, size:] - c[:, size:, :-size] + c[:, :-size, :-size]
    return s / (size * size)


def ssim(a: np.ndarray, b: np.ndarray, window: int = 7) -> np.ndarray:
    """Per-pair SSIM of (N, H, W) maps, each |map| scaled to [0, 1] by its own max (uniform window)."""
    def scale(x):
        x = np.abs(np.asarray(x, np.float64))
        top = x.reshape(len(x), -1).max(1)[:, None, None]
        return np.divide(x, top, out=np.zeros_like(x), where=top > 0)
    a, b = scale(a), scale(b)
    window = min(window, a.shape[1], a.shape[2])
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    ma, mb = _box(a, window), _box(b, window)
    va, vb = _box(a * a, window) - ma ** 2, _box(b * b, window) - mb ** 2
    cov = _box(a * b, window) - ma * mb
    index = ((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2))
    return index.mean((1, 2))


def sobel_edges(images: np.ndarray) -> np.ndarray:
    """Sobel gradient magnitude of the grey-level (N, H, W, 3) images."""
    grey = np.asarray(images, np.float64) @ np.array([0.299, 0.587, 0.114])
    p = np.pad(grey, ((0, 0), (1, 1), (1, 1)), mode="edge")
    gx = (p[:, :-2, 2:] + 2 * p[:, 1:-1, 2:] + p[:, 2:, 2:]) - (p[:, :-2, :-2] + 2 * p[:, 1:-1, :-2] + p[:, 2:, :-2])
    gy = (p[:, 2:, :-2] + 2 * p[:, 2:, 1:-1] + p[:, 2:, 2:]) - (p[:, :-2, :-2] + 2 * p[:, :-2, 1:-1] + p[:, :-2, 2:])
    return np.hypot(gx, gy)


def randomized_copy(model, seed: int = 0, safe_mode: bool = True):
    """The same architecture with freshly initialised weights (the model-randomisation test).

    Cloning rebuilds the layers from their configs: a model with Lambda code needs ``safe_mode=False``,
    as it did to load."""
    import contextlib

    import keras

    keras.utils.set_random_seed(seed)
    scope = contextlib.nullcontext()
    if not safe_mode:
        from keras.src.saving.serialization_lib import SafeModeScope

        scope = SafeModeScope(False)
    with scope:
        return keras.models.clone_model(model)


def run_controls(make_engine, images: np.ndarray, seed: int = 0, safe_mode: bool = True) -> dict:
    """Real maps vs random-class, randomised-model and edge controls on ``images`` (uint8, N x H x W x 3).

    ``make_engine(source=None, **overrides)`` builds the engine the maps were made with (the job's method and
    options; see :func:`worker.audit.run.run_audit`), on another model when ``source`` is given; ``safe_mode`` is
    how the model was loaded (for the randomised copy)."""
    from PIL import Image

    fixed = {"map_dtype": "float32", "reduction": "max_abs"}
    real_engine = make_engine(**fixed, target="predicted")
    real = real_engine.explain(images)
    classes = real_engine.source.num_classes
    rng = np.random.default_rng(seed)
    other = (real.predicted_class + rng.integers(1, max(classes, 2), len(images))) % max(classes, 2)
    controls = {
        "random_class": make_engine(**fixed, target="label").explain(images, other).as_float32()[:, 0],
    }
    keras_model = getattr(real_engine.source, "model", None)
    if keras_model is not None:
        controls["randomized_model"] = make_engine(randomized_copy(keras_model, seed, safe_mode), **fixed, target="predicted",
                                                   relu_policy="warn").explain(images).as_float32()[:, 0]
    h, w = real_engine.source.input_size
    resized = np.stack([np.asarray(Image.fromarray(im).resize((w, h), Image.BILINEAR)) for im in images])
    controls["edges"] = sobel_edges(resized)
    maps = real.as_float32()[:, 0]
    stats = {name: {k: float(np.nanmean(v)) for k, v in map_statistics(m).items()}
             for name, m in {"real": maps, **controls}.items()}
    return {
        "images": int(len(images)),
        "extra_model_cost": f"{2 if 'randomized_model' in controls else 1} extra guided passes per sampled image "
                            "and one model rebuild",
        "similarity_to_real": {name: {"spearman": float(np.mean(spearman(maps, m))), "ssim": float(np.mean(ssim(maps, m)))}
                               for name, m in controls.items()},
        "statistics": stats,
    }
