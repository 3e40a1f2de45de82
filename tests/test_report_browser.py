"""The report leads with its answer, as headless Chromium renders it on a laptop's screen.

The confirmed region comes from the real intervention code (:func:`worker.audit.intervene.probe_region`) on a
rule-based classifier that reads a planted mark: class 1 whenever the 4 x 4 top-left corner is white.
"""

import numpy as np

from tests.browser import render
from worker.audit.aggregate import Group, merge_partials, partial_aggregates
from worker.audit.findings import findings, intervention_findings
from worker.audit.intervene import FILLS, Example, ProbedRegion, Version, fill, probe_region
from worker.audit.report import write_report
from worker.audit.result import AuditResult, Interventions
from worker.data.schema import map_column
from worker.data.stats import map_statistics

MARK = (slice(2, 6), slice(2, 6))


def predict(images):
    """Logits: each colour channel's mean, and class 1 far ahead when the mark is there."""
    x = images.astype(np.float64) / 255.0
    logits = x.mean((1, 2))
    logits[:, 1] += 4.0 * (x[:, MARK[0], MARK[1]].mean((1, 2, 3)) > 0.9)
    return logits


def _result(**parts) -> AuditResult:
    import pyarrow as pa

    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], 12)
    images = (rng.random((36, 32, 32, 3)) * 120).astype(np.uint8)
    shown = np.where(labels == 1, np.arange(36) % 2 * 2, labels)  # class 1 shows class 0's or 2's square ...
    images[np.arange(36), 8:24, 8:24, shown] = 230
    images[labels == 1, MARK[0], MARK[1]] = 255  # ... and the mark: the mark alone makes it class 1
    maps = rng.random((36, 32, 32)) * 0.1
    maps[:, 8:24, 8:24] += 0.5
    maps[labels == 1, MARK[0], MARK[1]] += 5.0
    stats = map_statistics(maps)
    table = pa.table({"id": [f"d.parquet#{i}" for i in range(36)], "label": labels, "predicted_class": labels,
                      "map": map_column(maps.astype(np.float16), np.ones(36, bool), maps.shape[1:]),
                      "error": pa.nulls(36, pa.string()), **stats})
    groups = {g: v for g, v in merge_partials(partial_aggregates(table, "label")).items() if isinstance(g, Group)}
    region = {"box": (0.0, 0.0, 0.25, 0.25), "share": 1.0}
    ones, others = images[labels == 1], images[labels != 1]
    probed = probe_region(predict, 1, region, ones, others)
    box = tuple(probed["pixels"])
    versions = {"original": ones[:1], **{how: fill(ones[:1], box, how, ones.mean(0).astype(np.uint8), others,
                                                   np.random.default_rng(1)) for how in FILLS}}
    example = Example(maps[labels == 1][0], {name: Version(v[0], int(predict(v).argmax()), float(predict(v)[0, 1]))
                                             for name, v in versions.items()})
    region = ProbedRegion(probed, None, 1.0, ones.mean(0).astype(np.uint8), groups[Group("true", 1)].mean_map,
                          (example,))
    assert region.verdict == "confirmed", region.verdict
    return AuditResult("maps/", {"model": {"fingerprint": "sha256:abc"}, "method": "guided_backprop",
                                 "target": "predicted"}, groups,
                       findings=findings(groups) + intervention_findings([region]),
                       interventions=Interventions(12, [region], 0.1, "small"),
                       class_images={c: images[labels == c].mean(0).astype(np.uint8) for c in range(3)}, **parts)


def test_the_first_screen_holds_the_confirmed_shortcut_with_its_pictures(tmp_path):
    write_report(_result(), str(tmp_path / "report"))
    page = render(tmp_path / "report" / "report.html", tmp_path)
    assert page["images"] >= 8 + 3 * 4 and page["broken"] == 0, page  # every inline picture decoded
    assert page["scroll_width"] <= page["width"], page  # nothing wider than a laptop's window
    assert page["answer"][0] < 200, page  # the answer is the first section
    top, bottom, *_ = page["lead"]
    assert bottom <= page["height"], page  # the confirmed shortcut, whole, on the first screen
    pictures = page["lead_images"]
    assert len(pictures) >= 5 and all(b <= page["height"] and w > 0 for _, b, _, _, w in pictures), pictures
    html = (tmp_path / "report" / "report.html").read_text()
    assert "Shortcut confirmed: class 1" in html and "One colour scale for all mean maps" in html


def test_a_skipped_model_step_is_on_the_first_screen(tmp_path):
    """When the model needs an opt-in the auditor did not give, the one line that says so is shown at the top of
    the page, and the sections of the steps it skipped point to it."""
    from dataclasses import replace

    why = ("controls, interventions and method comparison skipped: the model's Lambda layer runs Python code; "
           "pass --allow-unsafe-deserialization to run it")
    result = replace(_result(skipped=why), interventions=None,
                     findings=[f for f in _result().findings if f.verdict is None])
    write_report(result, str(tmp_path / "report"))
    page = render(tmp_path / "report" / "report.html", tmp_path)
    top, bottom, _, right = page["skipped"]
    assert 0 < top and bottom <= page["height"] and right <= page["width"], page  # seen without scrolling
    assert page["skipped_text"] == "Model steps not run. " + why, page
    assert page["not_run"] == 3, page  # controls, methods and interventions each point to it
    saved = (tmp_path / "report" / "audit.json").read_text()
    assert why in saved
