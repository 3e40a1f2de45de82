"""The method comparison (worker.audit.compare): its curves, areas and intervals against computations written
here; parity with xplique's Deletion and Insertion; the comparison from run_audit on a job's output with masks
and on a keras.applications model."""

import importlib.util

import numpy as np
import pytest
from markupsafe import escape

from worker.audit import compare


def _linear_model(weights):
    """A model whose logits are a fixed linear function of the uint8 pixels: (N, H, W, 3) -> (N, classes)."""
    return lambda images: images.reshape(len(images), -1).astype(np.float64) @ weights


def _reference_curves(model, images, targets, maps, baselines, steps):
    """Deletion and insertion curves written out pixel by pixel: sort each map's pixels (distinct values), flip
    floor(k * pixels / steps) of them at step k."""
    out = {"deletion": [], "insertion": []}
    for image, target, m, base in zip(images, targets, maps, baselines):
        h, w = m.shape
        ranked = sorted(range(h * w), key=lambda p: -m.reshape(-1)[p])
        for mode, start, end in (("deletion", image, base), ("insertion", base, image)):
            curve = []
            for k in range(steps + 1):
                x = start.copy()
                for p in ranked[:int(k * h * w / steps)]:
                    x[p // w, p % w] = end[p // w, p % w]
                curve.append(model(x[None])[0, target])
            out[mode].append(curve)
    return {mode: np.array(v) for mode, v in out.items()}


@pytest.mark.parametrize("steps", [16, 7])
def test_curves_and_areas_match_a_pixel_by_pixel_reference(steps):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 12, 12, 3), dtype=np.uint8)
    model = _linear_model(rng.normal(size=(12 * 12 * 3, 4)))
    maps = rng.random((3, 12, 12))  # distinct values: one order
    targets = np.array([0, 2, 3])
    bases = compare.baseline(images, "mean")
    found = compare.curves(model, images, targets, compare.map_order(maps), bases, steps)
    expected = _reference_curves(model, images, targets, maps, bases, steps)
    for mode in ("deletion", "insertion"):
        np.testing.assert_allclose(found[mode], expected[mode], rtol=1e-12)
        np.testing.assert_allclose(compare.auc(found[mode]), np.trapezoid(expected[mode], dx=1 / steps, axis=1),
                                   rtol=1e-12)
    # deletion starts at the image and ends at the baseline; insertion the other way round
    np.testing.assert_allclose(found["deletion"][:, 0], found["insertion"][:, -1])
    np.testing.assert_allclose(found["deletion"][:, -1], model(bases)[np.arange(3), targets])


def test_a_faithful_order_beats_the_random_floor_and_an_inverted_one_does_not():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (20, 10, 10, 3), dtype=np.uint8)
    weights = rng.normal(size=(10 * 10 * 3, 1))
    model = _linear_model(weights)
    bases = compare.baseline(images, "mean")
    # each pixel's exact contribution to the logit relative to the baseline: the ideal map for deletion
    contribution = ((images.astype(np.float64) - bases) * weights[:, 0].reshape(10, 10, 3)).sum(-1)
    targets = np.zeros(20, int)
    floor = compare.curves(model, images, targets, compare.random_order(20, 100, 0), bases, 10)
    for maps, better in ((contribution, True), (-contribution, False)):
        found = compare.curves(model, images, targets, compare.map_order(maps), bases, 10)
        gain = compare.summary(compare.auc(floor["deletion"]) - compare.auc(found["deletion"]))
        assert (gain["interval"][0] > 0) is better and (gain["interval"][1] < 0) is not better


def test_bootstrap_interval_is_the_normal_interval_of_the_mean():
    values = np.random.default_rng(2).normal(3.0, 2.0, 400)
    found = compare.summary(np.concatenate([values, [np.nan]]))
    half = 1.96 * values.std(ddof=1) / np.sqrt(len(values))  # the textbook interval, which a bootstrap approaches
    assert found["images"] == 400 and found["mean"] == pytest.approx(values.mean())
    assert found["interval"][0] == pytest.approx(values.mean() - half, abs=0.1 * half)
    assert found["interval"][1] == pytest.approx(values.mean() + half, abs=0.1 * half)


def test_baselines_depths_and_cost():
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (4, 20, 20, 3), dtype=np.uint8)
    np.testing.assert_array_equal(compare.baseline(images, "mean")[2], np.rint(images.mean(0)).astype(np.uint8))
    flat = np.full((1, 20, 20, 3), 77, np.uint8)
    np.testing.assert_array_equal(compare.blurred(flat), flat)  # a blur leaves a flat image as it is
    assert compare.blurred(images).astype(float).std() < 0.5 * images.astype(float).std()
    assert compare.cascade_depths(11, 6) == [1, 3, 5, 7, 9, 11] and compare.cascade_depths(3, 6) == [1, 2, 3]
    cost = compare.cost_plan(images=12, methods=7, smoothed=2, steps=16, baselines=2, depths=6)
    assert cost["forward_per_image_per_method"] == 2 * 2 * 17 and cost["explain_per_image_per_method"] == 9
    assert cost["forward_total"] == 12 * 68 * 8 and cost["explain_images_total"] == 12 * 9 * (5 + 2 * 9)


@pytest.mark.slow
def test_parity_with_xplique_deletion_and_insertion(job_model):
    if importlib.util.find_spec("xplique") is None:
        pytest.skip("xplique is not installed (benchmarks/install_xplique.sh installs it; it is never a dependency)")
    from benchmarks.compare_parity import parity

    found = parity(job_model, images=6, steps=16)
    for key, (ours, theirs) in found.items():
        assert ours == pytest.approx(theirs, rel=1e-6, abs=1e-6), key


@pytest.mark.slow
def test_comparison_from_the_audit_of_a_job_with_masks(ray_local, job_model, tmp_path):
    import pyarrow.parquet as pq

    from tests import jobdata
    from worker.audit import run_audit
    from worker.job import JobConfig, run

    images, labels = jobdata.digits(30)
    keep = np.isin(labels, [0, 1, 2])
    boxes = [[0.1, 0.1, 0.9, 0.9]] * int(keep.sum())
    jobdata.write_hf(tmp_path / "d.parquet", images[keep], labels[keep], row_group=8, box=boxes)
    run(JobConfig(model=job_model, input=str(tmp_path / "d.parquet"), output=str(tmp_path / "out"),
                  preprocessing="scale01", label_column="label", mask_column="box", batch_size=8), echo=lambda *_: None)
    result = run_audit(str(tmp_path / "out"), str(tmp_path / "report"), compare_methods=1)
    import keras

    depths = compare.cascade_depths(len(compare.weighted_layers(keras.saving.load_model(job_model))))
    section = result.method_comparison.summary
    assert section["images"] == 3 and set(section["methods"]) == {name for name, _, _ in compare.variants()}
    for name, r in section["methods"].items():
        assert "error" not in r, name
        assert [p["layers"] for p in r["cascade"]] == depths and r["localisation"]["energy_in_mask"]["images"] == 3
    table = pq.read_table(str(tmp_path / "report" / "method_comparison.parquet")).to_pylist()
    metrics = {(row["method"], row["metric"]) for row in table}
    assert len(table) == len({(row["method"], row["image"], row["metric"]) for row in table})
    assert ("random", "deletion_auc:blur") in metrics and ("gradcam", "energy_in_mask") in metrics
    # every method's deletion starts from the same clean image: its first point is the same logit as the floor's
    start = {}
    for row in table:
        if row["metric"] == "deletion_auc:mean":
            start.setdefault(row["image"], set()).add(round(row["curve"][0], 4))
            assert row["value"] == pytest.approx(np.trapezoid(row["curve"], dx=1 / 16))
    assert len(start) == 3 and all(len(v) == 1 for v in start.values())
    page = (tmp_path / "report" / "report.html").read_text()
    assert "Which map to trust" in page and escape(section["sentence"]) in page and page.count("<svg") == 5
    from tests.browser import render

    shown = render(tmp_path / "report" / "report.html", tmp_path)  # the table and curves fit a laptop's window
    assert shown["broken"] == 0 and shown["scroll_width"] <= shown["width"]


@pytest.mark.slow
def test_comparison_on_a_keras_applications_model(tmp_path):
    import keras

    from worker.job.config import JobConfig, build_engine

    path = str(tmp_path / "mobilenet.keras")
    model = keras.applications.MobileNetV2(input_shape=(32, 32, 3), alpha=0.35, weights=None, classes=3)
    model.save(path)
    config = JobConfig(model=path, input="unused", output="unused", preprocessing="tf")

    def make_engine(source=None, method=None, **overrides):
        import dataclasses

        return build_engine(dataclasses.replace(config, method=method), path if source is None else source,
                            **{"batch_size": 8, **overrides})

    images = np.random.default_rng(4).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    section = compare.compare_methods(make_engine, images, only=("guided_backprop", "gradcam"), steps=8)
    layers = len(compare.weighted_layers(model))
    for r in section["methods"].values():
        assert len(r["cascade"]) == compare.CASCADE_POINTS and r["cascade"][-1]["of"] == layers
        assert all(np.isfinite(v["gain"]["mean"]) for v in r["faithfulness"].values())
    assert section["cost"]["forward_per_image_per_method"] == 2 * 2 * 9 and section["sentence"]


def _engines(path, preprocessing="scale01"):
    """``make_engine`` for :func:`compare.compare_methods` on the model at ``path``, as run_audit builds it."""
    import dataclasses

    from worker.job.config import JobConfig, build_engine

    config = JobConfig(model=path, input="unused", output="unused", preprocessing=preprocessing)

    def make_engine(source=None, method=None, **overrides):
        return build_engine(dataclasses.replace(config, method=method or config.method),
                            path if source is None else source, **{"batch_size": 32, **overrides})

    return make_engine


def test_an_untrained_models_tiny_gains_are_not_trusted(job_model):
    """On the untrained CNN guided backprop beats the random order with every interval above 0, by a few 1e-4 of
    logit: gains under MIN_GAIN of the logit range, so not faithful."""
    import keras

    from tests import jobdata

    images = jobdata.digits(20)[0]
    section = compare.compare_methods(_engines(job_model), images, only=("guided_backprop",), steps=8)
    model = keras.saving.load_model(job_model)  # the logits: the last Dense layer without its softmax
    weights, bias = model.layers[-1].get_weights()
    logits = np.asarray(keras.Model(model.input, model.layers[-2].output)(images.astype(np.float32) / 255.0)) @ weights
    logits += bias
    assert section["logit_range"] == pytest.approx(np.mean(logits.max(1) - logits.min(1)), rel=1e-4)
    r = section["methods"]["guided_backprop"]
    gains = [v["gain"] for v in r["faithfulness"].values()]
    assert min(g["interval"][0] for g in gains) > 0 and r["gain_floor"] == compare.MIN_GAIN * section["logit_range"]
    assert sum(g["mean"] < r["gain_floor"] for g in gains) >= 2 and max(g["mean"] for g in gains) < 1e-2
    assert not r["faithful"] and not r["trusted"]
    assert f"by {compare.MIN_GAIN:.1%} of the logit range" in section["sentence"]
    # the report's section of a job without masks: the sentence, no localisation columns, the five charts
    from worker.audit.report import render_html
    from worker.audit.result import AuditResult, MethodComparison

    page = render_html(AuditResult("maps/", {}, {}, method_comparison=MethodComparison.of(section)))
    assert escape(section["sentence"]) in page and "energy in mask" not in page and page.count("<svg") == 5
