"""A planted shortcut, end to end: one class carries a corner mark; the audit flags that class only."""

import numpy as np
import pytest

from tests import jobdata
from worker.audit import run_audit
from worker.audit.aggregate import Group
from tests.images import digits_images
from tests.models import train_small_cnn

MARKED = 3


def _mark(images, labels):
    images = images.copy()
    images[labels == MARKED, 1:6, 1:6] = 255  # a white square in the top-left corner
    return images


def _shortcut_training_set(images, labels):
    """Class 3 carries the mark, and so does a third of the other images, relabelled 3: the mark alone decides
    class 3, so the model surely relies on it (a model that may or may not use a merely correlated mark made
    this test depend on the host's floating point)."""
    labels = labels.copy()
    relabel = (labels != MARKED) & (np.random.default_rng(0).random(len(labels)) < 1 / 3)
    labels[relabel] = MARKED
    return _mark(images, labels), labels


@pytest.fixture(scope="module")
def shortcut_model(tmp_path_factory):
    images, labels = digits_images(32)
    train_x, train_y = _shortcut_training_set(images[400:], labels[400:])
    path = tmp_path_factory.mktemp("shortcut") / "model.keras"
    train_small_cnn(train_x, train_y, classes=10, epochs=8, seed=1).save(str(path))
    return str(path), _mark(images[:400], labels[:400]), labels[:400]


@pytest.mark.slow  # trains a model, then the job and the audit with controls
def test_audit_flags_the_marked_class(ray_local, shortcut_model, tmp_path):
    from worker.job import JobConfig, run

    model, images, labels = shortcut_model
    jobdata.write_hf(tmp_path / "test.parquet", images, labels, row_group=100)
    run(JobConfig(model=model, input=str(tmp_path / "test.parquet"), output=str(tmp_path / "maps"),
                  preprocessing="scale01", label_column="label", batch_size=16), echo=lambda *_: None)
    result = run_audit(str(tmp_path / "maps"), str(tmp_path / "report"), controls=24)
    flagged = {f.group for f in result.findings if f.group.kind == "true"}
    details = {g: (round(v.stats["border_enrichment"].mean, 2), round(v.stats["com_y"].mean, 2),
                   round(v.stats["com_x"].mean, 2)) for g, v in result.groups.items() if g.kind == "true"}
    assert Group("true", MARKED) in flagged, details
    assert flagged == {Group("true", MARKED)}, (result.findings, details)
    controls = result.controls
    assert controls.images == 24
    assert set(controls.similarity_to_real) == {"random_class", "randomized_model", "edges"}
    for value in controls.similarity_to_real.values():
        assert -1 <= value.spearman <= 1 and -1 <= value.ssim <= 1
    assert "Controls" in (tmp_path / "report" / "report.html").read_text()


@pytest.mark.slow
def test_a_trained_models_gains_clear_the_floor(shortcut_model):
    """On the trained CNN guided backprop's gains clear MIN_GAIN of the logit range (the untrained model's do not:
    tests/test_compare_methods.py)."""
    from tests.test_compare_methods import _engines
    from worker.audit import compare

    model, images, _ = shortcut_model
    section = compare.compare_methods(_engines(model), images[:20], only=("guided_backprop",), steps=8)
    r = section["methods"]["guided_backprop"]
    gains = {k: (v["gain"]["mean"], v["gain"]["interval"][0]) for k, v in r["faithfulness"].items()}
    assert section["logit_range"] > 1 and r["gain_floor"] == compare.MIN_GAIN * section["logit_range"]
    assert all(mean >= r["gain_floor"] and low > 0 for mean, low in gains.values()), (gains, r["gain_floor"])
    assert r["faithful"]
