"""Sanity controls, so audit numbers mean something (Adebayo et al. 2018).

Guided backprop is known to reconstruct image edges and to change little when
the model's weights are randomised.  On a sample of images we compute, next to
the real map: the map of a *random other class*, the map of a *weight-randomised
copy* of the model, and a Sobel *edge map* of the model input; then the
similarity of the real map to each (Spearman rank correlation, ties at their average
rank as scipy ranks them, and SSIM as scikit-image computes it; means over the sample)
and their statistics.  High similarity to a control means the map
says little about that model or that class.  Extra cost: two guided backward
passes per sampled image and one model rebuild.

Examples:
    >>> x = np.random.default_rng(0).random((1, 16, 16))
    >>> round(float(spearman(x, x)[0]), 6), round(float(ssim(x, x)[0]), 6)
    (1.0, 1.0)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from worker.data.stats import map_statistics


def spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-pair Spearman rank correlation of (N, H, W) maps (|values|), ties at their average rank
    (:func:`scipy.stats.rankdata`, as :func:`scipy.stats.spearmanr`); NaN for a pair where either map is
    constant (an all-zero map has no order)."""
    from scipy.stats import rankdata

    ra = rankdata(np.abs(np.asarray(a, np.float64)).reshape(len(a), -1), axis=1)
    rb = rankdata(np.abs(np.asarray(b, np.float64)).reshape(len(b), -1), axis=1)
    ra -= ra.mean(1, keepdims=True)
    rb -= rb.mean(1, keepdims=True)
    denominator = np.sqrt((ra ** 2).sum(1) * (rb ** 2).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, (ra * rb).sum(1) / denominator, np.nan)


def ssim(a: np.ndarray, b: np.ndarray, window: int = 7) -> np.ndarray:
    """Per-pair SSIM (:func:`skimage.metrics.structural_similarity`, a uniform ``window`` x ``window`` window, at
    most the map's side and odd) of (N, H, W) maps, each |map| scaled to [0, 1] by its own max (data range 1)."""
    from skimage.metrics import structural_similarity

    def scale(x):
        x = np.abs(np.asarray(x, np.float64))
        top = x.reshape(len(x), -1).max(1)[:, None, None]
        return np.divide(x, top, out=np.zeros_like(x), where=top > 0)

    a, b = scale(a), scale(b)
    window = min(window, a.shape[1], a.shape[2])
    window -= 1 - window % 2
    return np.array([structural_similarity(x, y, win_size=window, data_range=1.0) for x, y in zip(a, b)],
                    np.float64).reshape(len(a))


def sobel_edges(images: np.ndarray) -> np.ndarray:
    """Sobel gradient magnitude (:func:`scipy.ndimage.sobel`, edges extended) of the grey-level (N, H, W, 3)
    images."""
    from scipy import ndimage

    grey = np.asarray(images, np.float64) @ np.array([0.299, 0.587, 0.114])
    return np.stack([np.hypot(ndimage.sobel(g, 0, mode="nearest"), ndimage.sobel(g, 1, mode="nearest"))
                     for g in grey]) if len(grey) else grey


@dataclass(frozen=True)
class Similarity:
    """How alike the real maps and a control's are: the mean ``spearman`` over the ``ranked`` pairs that have a rank
    order (NaN with none), and the mean ``ssim``."""

    spearman: float
    ssim: float
    ranked: int

    def to_dict(self) -> dict:
        return {"spearman": self.spearman, "ssim": self.ssim, "ranked": self.ranked}


@dataclass(frozen=True)
class Controls:
    """The sanity controls on ``images`` sampled images: the ``extra_model_cost`` in words, each control's
    :class:`Similarity` to the real maps (``similarity_to_real``: ``random_class``, ``randomized_model`` where the
    model is a Keras model, ``edges``), and the mean map ``statistics`` of the real maps and of each control."""

    images: int
    extra_model_cost: str
    similarity_to_real: dict[str, Similarity]
    statistics: dict[str, dict[str, float]]

    def to_dict(self) -> dict:
        return {"images": self.images, "extra_model_cost": self.extra_model_cost,
                "similarity_to_real": {k: v.to_dict() for k, v in self.similarity_to_real.items()},
                "statistics": self.statistics}


def _similarity(maps: np.ndarray, control: np.ndarray) -> Similarity:
    """Mean Spearman (over the pairs that have a rank order: ``ranked`` of them) and mean SSIM of maps to a
    control."""
    rho = spearman(maps, control)
    ranked = np.isfinite(rho)
    return Similarity(float(rho[ranked].mean()) if ranked.any() else float("nan"), float(np.mean(ssim(maps, control))),
                      int(ranked.sum()))


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


def run_controls(make_engine, images: np.ndarray, seed: int = 0, safe_mode: bool = True) -> Controls:
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
    return Controls(int(len(images)), f"{2 if 'randomized_model' in controls else 1} extra guided passes per sampled "
                    "image and one model rebuild", {name: _similarity(maps, m) for name, m in controls.items()}, stats)
