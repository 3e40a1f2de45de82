"""Parity of the method comparison's deletion and insertion areas with xplique 2.0's own metrics.

xplique is never a dependency: ``bash benchmarks/install_xplique.sh`` installs it. On a small case (a model's
engine, a few images, its guided-backprop maps), the areas :mod:`worker.audit.compare` computes are set beside
xplique's ``Deletion`` and ``Insertion`` given the same model (the engine's forward: the target's logit), the
same maps, baseline (``baseline_mode``: a function returning the same baseline images) and steps.

    python -m benchmarks.compare_parity [--model model.keras] [--images 8] [--steps 16]
"""

from __future__ import annotations

import argparse
import json

import numpy as np


def parity(model_path: str, images: int = 8, steps: int = 16, preprocessing: str = "scale01", seed: int = 0,
           method: str = "guided_backprop") -> dict[str, tuple[float, float]]:
    """{"<mode>:<baseline>": (ours, xplique's)}: the mean AUC over ``images`` random images."""
    from xplique.metrics import Deletion, Insertion

    from worker.audit import compare
    from worker.engine import methods
    from worker.engine.options import METHODS

    engine = getattr(methods, METHODS[method])(model_path, preprocessing=preprocessing, target="label",
                                               map_dtype="float32", batch_size=16)
    h, w = engine.source.input_size
    x = np.random.default_rng(seed).integers(0, 256, (images, h, w, 3), dtype=np.uint8)
    logits = engine.predict(x)
    targets = logits.argmax(1)
    maps = engine.explain(x, targets).as_float32()[:, 0]
    one_hot = np.eye(logits.shape[1], dtype=np.float32)[targets]

    def model(batch):  # xplique hands a plain callable float32 batches: the same integer pixels
        return engine.predict(np.rint(np.asarray(batch)).astype(np.uint8))

    out = {}
    for how in compare.BASELINES:
        base = compare.baseline(x, how)

        def baseline_mode(inputs, base=base):  # a function: xplique calls it with the inputs
            return base.astype(np.float32)

        ours = compare.curves(engine.predict, x, targets, compare.map_order(maps), base, steps)
        for mode, metric in (("deletion", Deletion), ("insertion", Insertion)):
            theirs = metric(model, x.astype(np.float32), one_hot, batch_size=64, baseline_mode=baseline_mode,
                            steps=steps).evaluate(maps)
            out[f"{mode}:{how}"] = (float(compare.auc(ours[mode]).mean()), float(theirs))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="a .keras model (default: the small CNN (tests.models.small_cnn) at 32 x 32, untrained, seed 3)")
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--steps", type=int, default=16)
    args = p.parse_args(argv)
    model = args.model
    if model is None:
        import tempfile

        from tests.models import small_cnn

        model = f"{tempfile.mkdtemp()}/small_cnn.keras"
        small_cnn(32, classes=10, seed=3).save(model)
    found = parity(model, args.images, args.steps)
    worst = max(abs(a - b) / max(abs(b), 1e-12) for a, b in found.values())
    from importlib.metadata import version

    print(json.dumps({"xplique": version("xplique"), "model": "small CNN, 32 x 32, seed 3" if args.model is None
                      else args.model, "images": args.images, "steps": args.steps, "areas (ours, xplique)": found,
                      "largest_relative_difference": worst}, indent=1))
    return 0 if worst <= 1e-6 else 1


if __name__ == "__main__":
    raise SystemExit(main())
