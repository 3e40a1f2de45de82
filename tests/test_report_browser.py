"""The report leads with its answer, as headless Chromium renders it on a laptop's screen.

The confirmed region comes from the real intervention code (:func:`worker.audit.intervene.probe_region`) on a
rule-based classifier that reads a planted mark: class 1 whenever the 4 x 4 top-left corner is white.
"""

import numpy as np

from tests.browser import render
from worker.audit.aggregate import Group, merge_partials, partial_aggregates
from worker.audit.findings import findings, intervention_findings
from worker.audit.intervene import FILLS, fill, probe_region
from worker.audit.report import write_report
from worker.data.schema import map_column
from worker.data.stats import map_statistics

MARK = (slice(2, 6), slice(2, 6))


def predict(images):
    """Logits: each colour channel's mean, and class 1 far ahead when the mark is there."""
    x = images.astype(np.float64) / 255.0
    logits = x.mean((1, 2))
    logits[:, 1] += 4.0 * (x[:, MARK[0], MARK[1]].mean((1, 2, 3)) > 0.9)
    return logits


def _result():
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
    merged = merge_partials(partial_aggregates(table, "label"))
    region = {"box": (0.0, 0.0, 0.25, 0.25), "share": 1.0}
    ones, others = images[labels == 1], images[labels != 1]
    probed = probe_region(predict, 1, region, ones, others)
    box = tuple(probed["pixels"])
    versions = {"original": ones[:1], **{how: fill(ones[:1], box, how, ones.mean(0).astype(np.uint8), others,
                                                   np.random.default_rng(1)) for how in FILLS}}
    probed.update(cluster=None, share=1.0, mean_image=ones.mean(0).astype(np.uint8),
                  mean_map=merged[Group("true", 1)]["mean_map"],
                  examples=[{"map": maps[labels == 1][0], "versions": {
                      name: {"image": v[0], "predicted": int(predict(v).argmax()), "logit": float(predict(v)[0, 1])}
                      for name, v in versions.items()}}])
    assert probed["verdict"] == "confirmed", probed["verdict"]
    return {"output": "maps/", "groups": merged, "clusters": {},
            "findings": findings(merged) + intervention_findings([probed]),
            "interventions": {"images_per_class": 12, "regions": [probed], "seconds": 0.1, "cost": "small"},
            "class_images": {c: images[labels == c].mean(0).astype(np.uint8) for c in range(3)},
            "metadata": {"model": {"fingerprint": "sha256:abc"}, "method": "guided_backprop", "target": "predicted"}}


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
