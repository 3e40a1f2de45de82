"""Shortcuts confirmed by intervening on the model, not by where the maps light up.

One model learns three planted shortcuts -- marks of different sizes, places and colours on different classes,
each decisive on its own -- and the audit must localise and confirm each; a model trained on clean images,
audited on data where one class carries a visible mark, must get no confirmed shortcut.  Real images
(scikit-learn's digits), the real job and audit on a local Ray, the report opened in headless Chromium.
"""

import json
import os
import shutil
import subprocess

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests import jobdata
from worker.audit import run_audit
from worker.demo import digits_images, train_question_model

# class -> (rows, cols, RGB): a 5x5 white mark top left, a 3x3 red one bottom right (under 1 % of the image),
# a 4x4 green one top right
MARKS = {3: ((slice(1, 6), slice(1, 6)), (255, 255, 255)),
         7: ((slice(27, 30), slice(27, 30)), (255, 0, 0)),
         5: ((slice(2, 6), slice(26, 30)), (0, 255, 0))}


def _mark(images, labels, marks):
    images = images.copy()
    for cls, ((rows, cols), colour) in marks.items():
        images[labels == cls, rows, cols] = colour
    return images


def _shortcut_training_set(images, labels):
    """Each marked class carries its mark, and so does a quarter of the other images, relabelled to it: each
    mark alone decides its class, so the model surely relies on it."""
    rng = np.random.default_rng(0)
    labels = labels.copy()
    unmarked = np.flatnonzero(~np.isin(labels, list(MARKS)))
    chosen = unmarked[rng.random(len(unmarked)) < 0.25]
    labels[chosen] = rng.choice(list(MARKS), len(chosen))
    return _mark(images, labels, MARKS), labels


def _audit(tmp_path, model, images, labels, name):
    from worker.job import JobConfig, run

    jobdata.write_hf(tmp_path / f"{name}.parquet", images, labels, row_group=100)
    run(JobConfig(model=model, input=str(tmp_path / f"{name}.parquet"), output=str(tmp_path / f"{name}-maps"),
                  preprocessing="scale01", label_column="label", batch_size=32), echo=lambda *_: None)
    return run_audit(str(tmp_path / f"{name}-maps"), str(tmp_path / f"{name}-report"), interventions=30)


def _inside(box, rows, cols, size=32):
    """Whether a [0, 1] box overlaps the mark's pixels."""
    y0, x0, y1, x1 = (v * size for v in box)
    return y0 < rows.stop and y1 > rows.start and x0 < cols.stop and x1 > cols.start


@pytest.mark.slow
def test_planted_shortcuts_are_confirmed_and_the_report_shows_them(ray_local, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("shortcuts")
    images, labels = digits_images(32)
    train_x, train_y = _shortcut_training_set(images[400:], labels[400:])
    path = str(tmp_path / "shortcut.keras")
    train_question_model(train_x, train_y, classes=10, epochs=16, seed=1).save(path)  # 8 leaves two marks unlearnt
    test_x, test_y = _mark(images[:400], labels[:400], MARKS), labels[:400]
    result = _audit(tmp_path, path, test_x, test_y, "marked")

    probed = result["interventions"]["regions"]
    confirmed = {p["class"]: p for p in probed if p["confirmed"]}
    summary = [(p["class"], p["verdict"], [round(v, 2) for v in p["box"]], round(p["effect"], 2)) for p in probed]
    assert set(confirmed) == set(MARKS), summary
    for cls, p in confirmed.items():
        (rows, cols), _ = MARKS[cls]
        assert _inside(p["box"], rows, cols), (cls, p["box"])  # localised on the mark, not elsewhere
        assert p["effect"] > 0.3 and p["sufficiency"]["moved_to_class"] > p["sufficiency"]["control_moved"]

    found = pq.read_table(str(tmp_path / "marked-report" / "findings.parquet")).to_pylist()
    rows = [f for f in found if f["verdict"] == "confirmed"]
    assert sorted(int(f["group"].split(":")[1]) for f in rows) == sorted(MARKS)
    assert all(len(f["box"]) == 4 and f["interval"][0] <= f["effect"] for f in rows)
    saved = json.loads((tmp_path / "marked-report" / "audit.json").read_text())
    assert len(saved["interventions"]["regions"]) == len(probed)

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed, and CI must render the report")
        pytest.skip("chromium is not installed (.ci/run installs it)")
    page = tmp_path / "marked-report" / "report.html"
    dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                          "--disable-background-networking", "--disable-component-update", "--disable-sync",
                          f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    assert dom.count('class="intervention"') == len(probed)
    for caption in ("mean image, region", "mean map on it", "image and its map", "original: class", "mean: class",
                    "other: class"):
        assert caption in dom, caption
    assert dom.count("data:image/png;base64,") >= 6 * len(probed)


@pytest.mark.slow
def test_a_clean_model_gets_no_confirmed_shortcut(ray_local, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("clean")
    images, labels = digits_images(32)
    path = str(tmp_path / "clean.keras")
    train_question_model(images[400:], labels[400:], classes=10, epochs=8, seed=1).save(path)
    artifact = {6: ((slice(1, 6), slice(26, 31)), (0, 0, 255))}  # visible, on one class, never seen in training
    result = _audit(tmp_path, path, _mark(images[:400], labels[:400], artifact), labels[:400], "clean")
    probed = result["interventions"]["regions"]
    summary = [(p["class"], p["verdict"], [round(v, 2) for v in p["box"]]) for p in probed]
    assert probed and not any(p["confirmed"] for p in probed), summary
