"""Confirm a suspected shortcut by intervening on the model: does the class need (and follow) the region?

For a class c and a region R localised on its maps (:mod:`~worker.audit.localise`), on a sample of c's images:

* **necessity**: neutralise R with each fill -- ``mean`` (the sample's mean image there), ``blur`` (the mean
  colour of R and its surroundings), ``other`` (R taken from images of other classes) -- and measure the share of
  correctly classified images that stop being classified c, the drop in c's logit, and the accuracy after;
* **control**: the same fills on boxes of R's size at random places off R (``PLACEMENTS`` per image), so a drop
  is judged against what any occlusion of that size does;
* **sufficiency**: paste R from c's images into images of other classes and count predictions moving to c,
  against pasting a random same-size box from c's images.

* **stamp** (no forward pass): an artifact is (nearly) the same patch in every image that carries it, the
  object varies. A pixel is *stamped* when its spread over the class's images (the largest channel's standard
  deviation) is at most ``STAMP_SPREAD`` of the class's mean spread over the image, and its mean is at least that
  mean spread away from the class's background (each channel's most frequent value): constant, and not empty.

A region is *needed* when, for at least two of the three fills, the per-image difference between the region's
flip and the control's has a 95 % bootstrap interval whose lower end is at least ``MARGIN``; it is *sufficient*
when the transplant's interval against the random box starts at ``MARGIN`` or above; it is *stamped* when at
least ``STAMPED_SHARE`` of its pixels are, on at least ``STAMP_IMAGES`` images (on fewer, strokes can look
constant: on the tests' digits, the most stamped 6 x 6 box -- the smallest region's at 32 x 32 -- of a
class's 5 images is 39 % stamped, of 20 images 8 %).  The verdict: a **confirmed** shortcut is needed and sufficient and
small (at most ``SHORTCUT_AREA`` of the image: a mark that decides the class on its own); a large region that is
both is the class's *decisive region* (most often the object itself); a small region needed, not sufficient and
stamped is a **shortcut with the object** (an artifact the class needs, used together with the rest of the
image); a region only needed is *needed, not sufficient* (a part of the object: it varies as the object does);
otherwise the maps show *attention without effect*.  ``shortcut`` is true for the two shortcut verdicts.
Forward passes only, on bounded samples (``predict`` is the job's
engine's forward): images x (1 + PLACEMENTS) x fills forward passes per region, plus 2 x images for sufficiency.

Examples:
    >>> low, high = bootstrap_interval(np.ones(20))
    >>> float(low), float(high)
    (1.0, 1.0)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from worker.audit.localise import pixel_box

FILLS = ("mean", "blur", "other")
PLACEMENTS = 4
MARGIN = 0.15  # the flip rate must beat random placement by this much (lower end of the 95 % interval)
SHORTCUT_AREA = 0.12  # a confirmed shortcut covers at most this share of the image; larger is the object
BOOTSTRAP = 1000
STAMP_SPREAD = 0.2  # a stamped pixel varies at most this much of the class's mean spread over the image
STAMPED_SHARE = 0.1  # a stamped region has at least this share of its pixels stamped
STAMP_IMAGES = 20  # ... measured on at least this many images


@dataclass(frozen=True)
class Version:
    """An image as the model saw it (original, or after a fill): the ``image``, the model's ``predicted`` class and
    the probed class's ``logit``."""

    image: np.ndarray
    predicted: int
    logit: float


@dataclass(frozen=True)
class Example:
    """One of a class's images with its ``map``, and its :class:`Version` s: ``original`` and one per fill; ``id``:
    its row's id in the job's input and output."""

    map: np.ndarray
    versions: dict[str, Version]
    id: str | None = None

    def to_dict(self) -> dict:
        """The row's id and, per version, the model's class and the probed class's logit (audit.json)."""
        return {"id": self.id, "versions": {name: {"predicted": v.predicted, "logit": v.logit}
                                            for name, v in self.versions.items()}}


@dataclass(frozen=True)
class ProbedRegion:
    """A region probed on a class (or one of its SpRAy clusters): ``probe``, the numbers of
    :func:`probe_region` (as audit.json holds them); the SpRAy ``cluster`` it came from (None: the class's own
    region) and its ``share`` of the contrast; what the report shows beside the numbers: the images' mean
    (``mean_image``), the class's or cluster's ``mean_map``, and :class:`Example` s."""

    probe: dict
    cluster: int | None
    share: float
    mean_image: np.ndarray = field(repr=False)
    mean_map: np.ndarray = field(repr=False)
    examples: tuple[Example, ...] = field(default=(), repr=False)

    @property
    def cls(self) -> int:
        return self.probe["class"]

    @property
    def verdict(self) -> str:
        return self.probe["verdict"]

    @property
    def box(self) -> list:
        """The region in [0, 1] image fractions (y0, x0, y1, x1)."""
        return self.probe["box"]

    @property
    def pixels(self) -> tuple:
        """The region in pixels of the model's input (y0, x0, y1, x1)."""
        return tuple(self.probe["pixels"])

    @property
    def shortcut(self) -> bool:
        return bool(self.probe["shortcut"])

    def to_dict(self) -> dict:
        return {**self.probe, "cluster": self.cluster, "share": self.share,
                "examples": [e.to_dict() for e in self.examples]}


def bootstrap_interval(values: np.ndarray, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (:func:`scipy.stats.bootstrap`, ``BOOTSTRAP``
    resamples); NaN with fewer than two values (one value has no spread to resample)."""
    from scipy.stats import bootstrap

    values = np.asarray(values, np.float64)
    if len(values) < 2:
        return float("nan"), float("nan")
    found = bootstrap((values,), np.mean, n_resamples=BOOTSTRAP, confidence_level=level, method="percentile",
                      vectorized=True, rng=np.random.default_rng(seed)).confidence_interval
    return float(found.low), float(found.high)


def fill(images: np.ndarray, box: tuple, how: str, mean_image: np.ndarray, donors: np.ndarray,
         rng: np.random.Generator) -> np.ndarray:
    """``images`` with the pixel ``box`` neutralised ``how`` (one of :data:`FILLS`)."""
    y0, x0, y1, x1 = box
    out = images.copy()
    if how == "mean":
        out[:, y0:y1, x0:x1] = mean_image[y0:y1, x0:x1]
    elif how == "blur":
        h, w = images.shape[1:3]
        dy, dx = max(1, y1 - y0), max(1, x1 - x0)
        around = images[:, max(0, y0 - dy):min(h, y1 + dy), max(0, x0 - dx):min(w, x1 + dx)]
        out[:, y0:y1, x0:x1] = around.reshape(len(images), -1, images.shape[-1]).mean(1)[:, None, None].astype(np.uint8)
    elif how == "other":
        out[:, y0:y1, x0:x1] = donors[rng.integers(0, len(donors), len(images)), y0:y1, x0:x1]
    else:
        raise ValueError(f"unknown fill {how!r}; choose one of {FILLS}")
    return out


def random_boxes(box: tuple, size: tuple[int, int], n: int, rng: np.random.Generator) -> list[tuple]:
    """``n`` boxes of ``box``'s size at random places that do not overlap it (fewer if none fit)."""
    y0, x0, y1, x1 = box
    bh, bw = y1 - y0, x1 - x0
    h, w = size
    out = []
    for _ in range(50 * n):
        if len(out) == n:
            break
        ry, rx = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
        if ry >= y1 or ry + bh <= y0 or rx >= x1 or rx + bw <= x0:
            out.append((ry, rx, ry + bh, rx + bw))
    return out


def stamped_pixels(images: np.ndarray) -> tuple[np.ndarray, float]:
    """The (H, W) mask of pixels that are the same non-background value in every one of ``images`` (uint8), and
    the images' mean pixel spread it is judged against."""
    x = images.astype(np.float64)
    spread = x.std(0).max(-1)
    typical = float(spread.mean())
    background = [np.bincount(images[..., c].ravel(), minlength=256).argmax() for c in range(images.shape[-1])]
    away = np.abs(x.mean(0) - np.array(background, np.float64)).max(-1)
    return (spread <= STAMP_SPREAD * typical) & (away >= typical) & (typical > 0), typical


def stamp(images: np.ndarray, box: tuple) -> dict:
    """How much of the pixel ``box`` is stamped on ``images`` (the class's sample, :func:`stamped_pixels`):
    {"stamped_pixels", "stamped_share" of the box, "spread" (the images' mean pixel spread), "images"}."""
    stamped, typical = stamped_pixels(images)
    y0, x0, y1, x1 = box
    count = int(stamped[y0:y1, x0:x1].sum())
    return {"stamped_pixels": count, "stamped_share": count / ((y1 - y0) * (x1 - x0)), "spread": typical,
            "images": int(len(images))}


def probe_region(predict, cls: int, region: dict, images: np.ndarray, others: np.ndarray, seed: int = 0) -> dict:
    """Necessity (per fill, against random placement) and sufficiency of ``region`` for class ``cls``.

    ``predict(images) -> (N, classes) logits``; ``images`` are the class's sample (uint8, model input size),
    ``others`` a sample of other classes' images (donors and transplant targets)."""
    rng = np.random.default_rng(seed)
    size = images.shape[1:3]
    box = pixel_box(region["box"], size)
    mean_image = np.concatenate([images, others]).mean(0).astype(np.uint8)
    before = predict(images)
    correct = before.argmax(1) == cls
    controls = random_boxes(box, size, PLACEMENTS, rng)
    result = {"class": cls, "box": list(region["box"]), "pixels": list(box), "images": int(len(images)),
              "accuracy_before": float(correct.mean()), "control_placements": len(controls), "fills": {}}
    for how in FILLS:
        after = predict(fill(images, box, how, mean_image, others, rng))
        flip = (correct & (after.argmax(1) != cls)).astype(np.float64)
        control_flip = np.mean([correct & (predict(fill(images, b, how, mean_image, others, rng)).argmax(1) != cls)
                                for b in controls], axis=0) if controls else np.zeros(len(images))
        difference = (flip - control_flip)[correct]
        low, high = bootstrap_interval(difference, seed)
        result["fills"][how] = {
            "flip_rate": float(flip[correct].mean()) if correct.any() else float("nan"),
            "control_flip_rate": float(control_flip[correct].mean()) if correct.any() else float("nan"),
            "effect": float(difference.mean()) if len(difference) else float("nan"), "interval": [low, high],
            "accuracy_after": float((after.argmax(1) == cls).mean()),
            "logit_drop": float((before[:, cls] - after[:, cls]).mean()),
        }
    lows = sorted((f["interval"][0] for f in result["fills"].values()), reverse=True)
    result["needed"] = bool(len(lows) >= 2 and lows[1] >= MARGIN)
    result["effect"] = float(np.median([f["effect"] for f in result["fills"].values()]))
    # sufficiency: the region pasted into other classes' images, against a random box of c's images
    targets = others
    donors = images[rng.integers(0, len(images), len(targets))]
    pasted = targets.copy()
    y0, x0, y1, x1 = box
    pasted[:, y0:y1, x0:x1] = donors[:, y0:y1, x0:x1]
    moved = predict(pasted).argmax(1) == cls
    if controls:
        ry0, rx0, ry1, rx1 = controls[0]
        random_paste = targets.copy()
        random_paste[:, ry0:ry1, rx0:rx1] = donors[:, ry0:ry1, rx0:rx1]
        control_moved = predict(random_paste).argmax(1) == cls
    else:
        control_moved = np.zeros(len(targets), bool)
    already = predict(targets).argmax(1) == cls
    keep = ~already
    low, high = bootstrap_interval((moved.astype(float) - control_moved)[keep], seed)
    result["sufficiency"] = {"moved_to_class": float(moved[keep].mean()) if keep.any() else float("nan"),
                             "control_moved": float(control_moved[keep].mean()) if keep.any() else float("nan"),
                             "interval": [low, high], "images": int(keep.sum())}
    result["sufficient"] = bool(low >= MARGIN)
    result["area"] = (y1 - y0) * (x1 - x0) / (size[0] * size[1])
    result["stamp"] = stamp(images, box)
    result["stamped"] = result["stamp"]["stamped_share"] >= STAMPED_SHARE and len(images) >= STAMP_IMAGES
    decisive = result["needed"] and result["sufficient"]
    small = result["area"] <= SHORTCUT_AREA
    result["confirmed"] = decisive and small
    with_object = result["needed"] and not result["sufficient"] and small and result["stamped"]
    result["shortcut"] = result["confirmed"] or with_object
    result["verdict"] = ("confirmed" if result["confirmed"] else "decisive region (large)" if decisive
                         else "shortcut with the object" if with_object
                         else "needed, not sufficient" if result["needed"] else "attention without effect")
    return result
