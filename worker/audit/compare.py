"""Which map to trust: every method's faithfulness and sanity, measured on the job's own model and data.

On a stratified sample (N images per class, read and decoded as the job did), with the job's model rebuilt from
its run record, each method (:data:`~worker.engine.options.METHODS`, and SmoothGrad over the guided ones) is
measured the same way:

* **faithfulness** (RISE, Petsiuk et al. 2018): the target's logit as the image's pixels are replaced by a
  baseline in the map's order, most relevant first (*deletion*: image to baseline; *insertion*: baseline to
  image), in ``steps`` equal steps (``np.linspace(0, pixels, steps + 1)`` pixels flipped, all channels of a pixel
  at once, as xplique's ``Deletion``/``Insertion``), for two baselines: ``blur`` (a Gaussian blur of the image,
  sigma ``BLUR_SIGMA`` of its side) and ``mean`` (the sample's mean image). The area under a curve is the
  trapezoid on [0, 1] (xplique's). The same curves along a random order per image are the floor; a method's
  *gain* is its paired difference to the floor (deletion: floor minus method; insertion: method minus floor),
  with a 95 % bootstrap interval of the mean over images (:func:`~worker.audit.intervene.bootstrap_interval`);
* **sanity** (Adebayo et al. 2018): *cascading randomisation*, the Spearman rank correlation (and SSIM) of the map to
  the map of the model with its weighted layers re-initialised from the top, cumulatively, at up to
  ``CASCADE_POINTS`` depths (a curve); *class sensitivity*, Spearman to the map of a random other class;
  *input sensitivity*, Spearman to the map of the image with Gaussian noise of ``NOISE_LEVELS`` pixel levels;
* **localisation**, where the job had masks: the energy pointing game and relevance mass accuracy
  (:func:`~worker.data.stats.mask_statistics`).

A method's maps are *trusted* when they beat the random order on both curves with both baselines by a margin that
counts next to the logits' own range (each of the four gains' intervals above 0, and its mean at least ``MIN_GAIN``
of the *logit range*: the mean over the sample of the spread of the model's logits over the classes, max minus min,
on the unmodified images; the tests' untrained CNN gains 1-5 % of its range, three of four under 2.5 %, the same
CNN trained 4-15 %) and they change with the class and with the weights (Spearman below ``SAME`` to a random
class's map, and to the map of the fully randomised model). Cost (:func:`cost_plan`): per
image and method ``2 x baselines x (steps + 1)`` forward passes and ``3 + cascade depths`` explain passes
(x ``1 + SMOOTH`` copies with SmoothGrad), plus ``2 x baselines x (steps + 1)`` forward passes per image for the
floor; one engine build per method.

Examples:
    >>> counts = flip_counts(4, 2)
    >>> counts.tolist(), float(auc(np.array([2.0, 1.0, 0.0])))
    ([0, 2, 4], 1.0)
"""

from __future__ import annotations

import time

import numpy as np

from worker.audit.controls import randomized_copy, spearman, ssim
from worker.audit.intervene import bootstrap_interval

STEPS = 16
BASELINES = ("blur", "mean")
BLUR_SIGMA = 0.05  # the blur baseline's Gaussian sigma, a share of the image's side (3.2 px at 64, 11 px at 224)
SMOOTH = 8  # SmoothGrad copies for the smoothed variants
SMOOTHED = ("guided_backprop", "guided_gradcam")
CASCADE_POINTS = 6  # cascading randomisation: at most this many depths, evenly spread over the weighted layers
NOISE_LEVELS = 4.0  # input sensitivity: Gaussian noise of this standard deviation, in pixel levels of 255
MIN_GAIN = 0.025  # a gain counts when its interval is above 0 and its mean at least this share of the logit range
SAME = 0.8  # Spearman at or above this to a random class's (or randomised model's) map: the map hardly depends on it
CHUNK = 8  # images whose curves go through the model together


# -- the curves, without TensorFlow ---------------------------------------------------------------
def flip_counts(pixels: int, steps: int) -> np.ndarray:
    """How many pixels are flipped at each of the ``steps + 1`` points of a curve (as xplique counts them)."""
    return np.linspace(0, pixels, steps + 1, dtype=np.int32)


def map_order(maps: np.ndarray) -> np.ndarray:
    """(N, H*W) pixel indices of each (N, H, W) map, most relevant first (xplique's ``argsort(...)[:, ::-1]``,
    so ties fall in the same order)."""
    return np.argsort(maps.reshape(len(maps), -1), axis=-1)[:, ::-1]


def random_order(n: int, pixels: int, seed: int = 0) -> np.ndarray:
    """(n, pixels): a random order of the pixels per image (the floor)."""
    rng = np.random.default_rng(seed)
    return np.stack([rng.permutation(pixels) for _ in range(n)]) if n else np.zeros((0, pixels), np.int64)


def path(start: np.ndarray, end: np.ndarray, order: np.ndarray, steps: int) -> np.ndarray:
    """(steps + 1, H, W, C): ``start`` (H, W, C) with its first ``flip_counts`` pixels of ``order`` from ``end``."""
    h, w = start.shape[:2]
    rank = np.empty(h * w, np.int64)
    rank[order] = np.arange(h * w)
    flipped = (rank[None] < flip_counts(h * w, steps)[:, None]).reshape(-1, h, w, 1)
    return np.where(flipped, end[None], start[None])


def auc(curves: np.ndarray) -> np.ndarray:
    """Area under curves of ``steps + 1`` equally spaced points on [0, 1] (the trapezoid rule; last axis)."""
    return (curves[..., :-1] + curves[..., 1:]).mean(-1) / 2


def curves(predict, images: np.ndarray, targets: np.ndarray, orders: np.ndarray, baseline: np.ndarray,
           steps: int = STEPS) -> dict[str, np.ndarray]:
    """Deletion and insertion curves, {mode: (N, steps + 1)}, of the ``targets``' logits (``predict(uint8 images)
    -> (N, classes)``) as ``images`` turn into ``baseline`` (and back) along ``orders``."""
    out: dict[str, list] = {"deletion": [], "insertion": []}
    for start in range(0, len(images), CHUNK):
        rows = range(start, min(start + CHUNK, len(images)))
        batch = np.concatenate([path(images[i], baseline[i], orders[i], steps) for i in rows]
                               + [path(baseline[i], images[i], orders[i], steps) for i in rows])
        logits = predict(batch).reshape(2, len(rows), steps + 1, -1)
        for mode, block in zip(("deletion", "insertion"), logits):
            out[mode].extend(block[j, :, targets[i]] for j, i in enumerate(rows))
    return {mode: np.array(v, np.float64).reshape(len(images), steps + 1) for mode, v in out.items()}


def blurred(images: np.ndarray, sigma: float = BLUR_SIGMA) -> np.ndarray:
    """The blur baseline: each uint8 (H, W, 3) image under a Gaussian of ``sigma`` x its side, rounded."""
    from scipy.ndimage import gaussian_filter

    s = sigma * max(images.shape[1:3])
    return np.stack([np.rint(gaussian_filter(im.astype(np.float64), (s, s, 0), mode="nearest"))
                     for im in images]).astype(np.uint8)


def baseline(images: np.ndarray, how: str) -> np.ndarray:
    """The baseline images: ``blur`` (:func:`blurred`) or ``mean`` (the sample's mean image, for every image)."""
    if how == "blur":
        return blurred(images)
    if how == "mean":
        return np.broadcast_to(np.rint(images.mean(0)).astype(np.uint8), images.shape).copy()
    raise ValueError(f"unknown baseline {how!r}; choose one of {BASELINES}")


def summary(values: np.ndarray, seed: int = 0) -> dict:
    """Mean of per-image ``values`` with its 95 % bootstrap interval (NaNs left out)."""
    values = np.asarray(values, np.float64)
    values = values[np.isfinite(values)]
    low, high = bootstrap_interval(values, seed)
    return {"mean": float(values.mean()) if len(values) else float("nan"), "interval": [low, high],
            "images": int(len(values))}


def cascade_depths(layers: int, points: int = CASCADE_POINTS) -> list[int]:
    """How many of the top weighted layers are randomised at each point of the cascade (1 .. all)."""
    return sorted({int(round(k)) for k in np.linspace(1, layers, min(layers, points))}) if layers else []


def cost_plan(images: int, methods: int, smoothed: int, steps: int = STEPS, baselines: int = len(BASELINES),
              depths: int = CASCADE_POINTS) -> dict:
    """The comparison's planned model passes (bounded by the sample: ``images`` = N x classes)."""
    forward = 2 * baselines * (steps + 1)
    explain = 3 + depths
    copies = explain * (methods - smoothed + smoothed * (1 + SMOOTH))
    return {"images": images, "methods": methods, "forward_per_image_per_method": forward,
            "explain_per_image_per_method": explain, "smoothgrad_copies": SMOOTH,
            "floor_forward_per_image": forward, "forward_total": images * forward * (methods + 1),
            "explain_images_total": images * copies}


# -- the comparison, with the job's engines -------------------------------------------------------
def variants(only=None) -> list[tuple[str, str, int]]:
    """(name, method, smooth) of every method and SmoothGrad over the guided ones (``only``: those names)."""
    from worker.engine.options import METHODS

    found = [(m, m, 0) for m in METHODS] + [(f"{m}+smoothgrad", m, SMOOTH) for m in SMOOTHED]
    return [v for v in found if only is None or v[0] in only]


def weighted_layers(model) -> list:
    """The model's layers that hold weights, nested models flattened, input to output."""
    out = []
    for layer in model.layers:
        if hasattr(layer, "layers") and getattr(layer, "layers"):
            out.extend(weighted_layers(layer))
        elif layer.weights:
            out.append(layer)
    return out


def _cascade(engine, images, targets, maps, random_model) -> list[dict]:
    """The map's Spearman to the maps of the model re-initialised from the top, at each depth; the engine's
    model gets its weights back after."""
    layers = weighted_layers(engine.source.model)
    fresh = weighted_layers(random_model)
    saved = [layer.get_weights() for layer in layers]
    points, done = [], 0
    try:
        for depth in cascade_depths(len(layers)):
            for layer, new in zip(layers[::-1][done:depth], fresh[::-1][done:depth]):
                layer.set_weights(new.get_weights())
            done = depth
            randomised = engine.explain(images, targets).as_float32()[:, 0]
            points.append({"layers": depth, "of": len(layers), "down_to": layers[-depth].name,
                           "values": spearman(maps, randomised), "ssim_values": ssim(maps, randomised)})
    finally:
        for layer, weights in zip(layers, saved):
            layer.set_weights(weights)
    return points


def compare_methods(make_engine, images: np.ndarray, ids=None, classes=None, masks=None, steps: int = STEPS,
                    seed: int = 0, safe_mode: bool = True, only=None, echo=None) -> dict:
    """Faithfulness, sanity and localisation of every method's maps on ``images`` (uint8, N x H x W x 3 at the
    model's input size; ``classes`` their true classes, ``masks`` (N, H, W) where the job had masks).

    ``make_engine(method=..., source=None, **overrides)`` builds the job's engine with another method (see
    :func:`worker.audit.run.run_audit`). Returns {"methods": {name: summary}, "rows": per (method, image, metric),
    "cost", "sentence", ...}; a method whose engine cannot be built on this model gets its ``error``."""
    from worker.data.stats import mask_statistics

    echo = echo or (lambda *_: None)
    ids = list(ids) if ids is not None else [str(i) for i in range(len(images))]
    chosen = variants(only)
    rows: list[dict] = []
    methods: dict[str, dict] = {}
    fixed = {"map_dtype": "float32", "reduction": "max_abs", "target": "label"}
    shared = floor = predicted = None
    logit_range = float("nan")
    random_model = None
    depths = CASCADE_POINTS
    began = time.perf_counter()
    for name, method, smooth in chosen:
        tick = time.perf_counter()
        try:
            engine = make_engine(method=method, source=shared, smooth=smooth, **fixed)
        except Exception as exc:  # noqa: BLE001 - a method this model cannot take (e.g. no CAM layer) is reported
            methods[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
            continue
        if predicted is None:  # the first engine: the model, its predictions, the baselines and the floor
            shared = getattr(engine.source, "model", None)
            logits = engine.predict(images)
            predicted = logits.argmax(1)
            logit_range = float(np.mean(logits.max(1) - logits.min(1))) if logits.size else float("nan")
            n_classes = logits.shape[1]
            rng = np.random.default_rng(seed)
            other = (predicted + rng.integers(1, max(n_classes, 2), len(images))) % max(n_classes, 2)
            noisy = np.clip(np.rint(images + rng.normal(0, NOISE_LEVELS, images.shape)), 0, 255).astype(np.uint8)
            bases = {how: baseline(images, how) for how in BASELINES}
            pixels = images.shape[1] * images.shape[2]
            floor_order = random_order(len(images), pixels, seed)
            floor = {how: curves(engine.predict, images, predicted, floor_order, b, steps) for how, b in bases.items()}
            for how, found in floor.items():
                for mode, c in found.items():
                    rows += _rows("random", ids, classes, f"{mode}_auc:{how}", auc(c), c)
            if shared is not None:
                try:
                    random_model = randomized_copy(shared, seed, safe_mode)
                    depths = len(cascade_depths(len(weighted_layers(shared))))
                except Exception as exc:  # noqa: BLE001
                    random_model = f"{type(exc).__name__}: {exc}"
            planned = cost_plan(len(images), len(chosen), sum(1 for _, _, s in chosen if s), steps, len(BASELINES),
                                depths)
            echo(f"audit: comparing {len(chosen)} methods on {len(images)} images: {planned['forward_total']} forward "
                 f"passes and {planned['explain_images_total']} explained images planned "
                 f"({planned['forward_per_image_per_method']} forward and {planned['explain_per_image_per_method']} "
                 "explain passes per image per method)")
        maps = engine.explain(images, predicted).as_float32()[:, 0]
        order = map_order(maps)
        result: dict = {"method": method, "smooth": smooth, "faithfulness": {}}
        gains = []
        for how, b in bases.items():
            found = curves(engine.predict, images, predicted, order, b, steps)
            for mode, c in found.items():
                area, floor_area = auc(c), auc(floor[how][mode])
                gain = floor_area - area if mode == "deletion" else area - floor_area
                gains.append(summary(gain, seed))
                result["faithfulness"][f"{mode}:{how}"] = {
                    "auc": summary(area, seed), "floor": summary(floor_area, seed), "gain": gains[-1],
                    "curve": c.mean(0).tolist(), "floor_curve": floor[how][mode].mean(0).tolist()}
                rows += _rows(name, ids, classes, f"{mode}_auc:{how}", area, c)
        class_rho = spearman(maps, engine.explain(images, other).as_float32()[:, 0])
        input_rho = spearman(maps, engine.explain(noisy, predicted).as_float32()[:, 0])
        result["class_spearman"], result["input_spearman"] = summary(class_rho, seed), summary(input_rho, seed)
        rows += _rows(name, ids, classes, "class_spearman", class_rho) + _rows(name, ids, classes, "input_spearman",
                                                                                input_rho)
        if isinstance(random_model, str) or random_model is None:
            result["cascade"] = []
            result["cascade_error"] = random_model or "needs a Keras model (a SavedModel has no layers to reset)"
        else:
            points = _cascade(engine, images, predicted, maps, random_model)
            result["cascade"] = [{"layers": p["layers"], "of": p["of"], "down_to": p["down_to"],
                                  **summary(p["values"], seed), "ssim": summary(p["ssim_values"], seed)}
                                 for p in points]
            for p in points:
                rows += _rows(name, ids, classes, f"cascade_spearman@{p['layers']}", p["values"])
                rows += _rows(name, ids, classes, f"cascade_ssim@{p['layers']}", p["ssim_values"])
        if masks is not None:
            found = mask_statistics(maps, masks)
            result["localisation"] = {k: summary(found[k], seed) for k in ("energy_in_mask", "mass_accuracy")}
            for k in ("energy_in_mask", "mass_accuracy"):
                rows += _rows(name, ids, classes, k, found[k])
        result["gain_floor"] = MIN_GAIN * logit_range
        result["faithful"] = bool(gains) and all(_counts(g, result["gain_floor"]) for g in gains)
        result["class_sensitive"] = result["class_spearman"]["mean"] < SAME
        result["model_sensitive"] = bool(result["cascade"]) and result["cascade"][-1]["mean"] < SAME
        result["trusted"] = result["faithful"] and result["class_sensitive"] and result["model_sensitive"]
        result["seconds"] = round(time.perf_counter() - tick, 1)
        methods[name] = result
        echo(f"audit: compared {name} in {result['seconds']} s")
    section = {"images": int(len(images)), "steps": steps, "baselines": list(BASELINES), "blur_sigma": BLUR_SIGMA,
               "noise_levels": NOISE_LEVELS, "logit_range": logit_range, "min_gain": MIN_GAIN, "methods": methods,
               "rows": rows,
               "cost": cost_plan(len(images), len(chosen), sum(1 for _, _, s in chosen if s), steps, len(BASELINES),
                                 depths),
               "seconds": round(time.perf_counter() - began, 1)}
    section["sentence"] = trust_sentence(section)
    return section


def _rows(method, ids, classes, metric, values, curves_=None) -> list[dict]:
    return [{"method": method, "image": str(ids[i]), "class": None if classes is None else _class(classes[i]),
             "metric": metric, "value": float(values[i]),
             "curve": None if curves_ is None else [float(v) for v in curves_[i]]} for i in range(len(values))]


def _class(cls) -> str:
    """A row's class as method_comparison.parquet holds it: the class index or the label, as text (one type)."""
    return str(cls.item() if hasattr(cls, "item") else cls)


def _counts(gain: dict, floor: float) -> bool:
    """Whether a gain (a :func:`summary`) counts: its interval above 0 and its mean at least ``floor``."""
    return gain["interval"][0] > 0 and gain["mean"] >= floor


def _why_not(r: dict) -> str:
    reasons = []
    if not r["faithful"]:
        weak = [k for k, v in r["faithfulness"].items() if not _counts(v["gain"], r["gain_floor"])]
        reasons.append(f"does not beat a random order by {MIN_GAIN:.1%} of the logit range ({r['gain_floor']:.2g}) "
                       "on " + ", ".join(weak))
    if not r["class_sensitive"]:
        reasons.append(f"hardly changes with the class (Spearman {r['class_spearman']['mean']:.2f} to a random "
                       "class's map)")
    if not r["model_sensitive"]:
        reasons.append(f"survives randomising the weights (Spearman {r['cascade'][-1]['mean']:.2f} with every layer "
                       "re-initialised)" if r["cascade"] else "the randomisation test could not run")
    return "; ".join(reasons)


def trust_sentence(section: dict) -> str:
    """Which methods' maps this model's comparison says can be trusted, and why (or why not)."""
    done = {n: r for n, r in section["methods"].items() if "error" not in r}
    if not done:
        return "No method could be compared on this model."
    trusted = [n for n, r in done.items() if r["trusted"]]

    def gain(r):
        return sum(v["gain"]["mean"] for v in r["faithfulness"].values())

    if trusted:
        best = max(trusted, key=lambda n: gain(done[n]))
        r = done[best]
        each = "each beats" if len(trusted) > 1 else "it beats"
        out = (f"Trust {', '.join(trusted)} on this model: {each} a random pixel order on deletion and insertion "
               f"with both baselines by {MIN_GAIN:.1%} of the logit range or more and changes with the class and the weights (best: {best}, Spearman "
               f"{r['class_spearman']['mean']:.2f} to a random class's map, {r['cascade'][-1]['mean']:.2f} with every "
               "layer re-initialised).")
    else:
        out = "No method's maps pass every test on this model."
    rest = [f"{n} {_why_not(r)}" for n, r in done.items() if not r["trusted"]]
    return out + (" Not: " + "; ".join(rest) + "." if rest else "")
