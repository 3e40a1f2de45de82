"""Every keras.applications family x every method: what the engine does on it (weights=None, small inputs).

For each family (its smallest member) and method: built and explained, or refused, with the refusal's line;
the activation units it found and the rule each got; the time to build and explain one batch.  The values of
the maps are checked by the tests (``tests/test_applications_reference.py`` for the ReLU families,
``tests/test_activation_rules.py`` for each activation's rule); this table says what happens on each family.

    python -m benchmarks.applications [--families ResNet50 ConvNeXtTiny]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

FAMILIES = {  # family: (smallest member, input size it accepts)
    "ConvNeXt": ("ConvNeXtTiny", 32), "DenseNet": ("DenseNet121", 32), "EfficientNet": ("EfficientNetB0", 32),
    "EfficientNetV2": ("EfficientNetV2B0", 32), "InceptionResNetV2": ("InceptionResNetV2", 75),
    "InceptionV3": ("InceptionV3", 75), "MobileNet": ("MobileNet", 32), "MobileNetV2": ("MobileNetV2", 32),
    "MobileNetV3": ("MobileNetV3Small", 32), "NASNet": ("NASNetMobile", 32), "ResNet": ("ResNet50", 32),
    "ResNetV2": ("ResNet50V2", 32), "VGG": ("VGG16", 32), "Xception": ("Xception", 71),
}
RUNS = [("guided_backprop", "relu"), ("guided_backprop", "all"), ("deconvnet", "all"), ("guided_gradcam", "all"),
        ("gradcam", "relu"), ("gradient", "relu")]


def one(model, method: str, activations: str) -> dict:
    from worker.engine import methods
    from worker.engine.options import METHODS

    started = time.perf_counter()
    try:
        engine = getattr(methods, METHODS[method])(model, batch_size=2, activations=activations,
                                                   map_dtype="float32")
        h, w = engine.source.input_size
        maps = engine.explain(np.random.default_rng(0).integers(0, 256, (2, h, w, 3), dtype=np.uint8)).maps
    except Exception as exc:  # noqa: BLE001 - a refusal is a row of the table
        return {"result": f"refused: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}",
                "seconds": round(time.perf_counter() - started, 1)}
    coverage = engine.report["coverage"] or {}
    return {"result": "finite maps" if np.isfinite(maps).all() else "NON-FINITE maps",
            "guided": coverage.get("guided"), "vanilla": coverage.get("vanilla"),
            "seconds": round(time.perf_counter() - started, 1)}


def main(argv=None) -> None:
    import keras

    import datetime
    import sys

    from benchmarks.common import git_revision, machine, provenance, write

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="*", default=list(FAMILIES))
    args = parser.parse_args(argv)
    rows = []
    for family in args.families:
        name, size = FAMILIES[family]
        keras.utils.set_random_seed(0)
        model = getattr(keras.applications, name)(weights=None, input_shape=(size, size, 3), classes=10)
        for method, activations in RUNS:
            row = {"family": family, "model": name, "size": size, "method": method, "activations": activations,
                   **one(model, method, activations)}
            print(row, flush=True)
            rows.append(row)
        keras.backend.clear_session()
    lines = ["| family (model, input) | method, activations | what happens | units guided / kept plain | s |",
             "|---|---|---|---|---|"]
    for r in rows:
        units = f"{r.get('guided') or {}} / {r.get('vanilla') or {}}" if "guided" in r else ""
        lines.append(f"| {r['family']} ({r['model']}, {r['size']}) | {r['method']}, {r['activations']} | "
                     f"{r['result']} | {units} | {r['seconds']} |")
    results = {"date": datetime.date.today().isoformat(), "machine": machine(), "revision": git_revision(),
               "command": "python -m benchmarks.applications " + " ".join(sys.argv[1:]), "rows": rows}
    title = [f"## keras.applications families x methods ({results['date']})", ""]
    write(results, "applications", "\n".join(title + provenance(results) + lines) + "\n")


if __name__ == "__main__":
    main()
