"""Audit aggregates: exact merges, findings on planted maps, and the report from a real job's output."""

import numpy as np
import pyarrow as pa
import pytest

from tests import jobdata
from worker.audit import GRID, Moments, downsample, findings, merge_partials, partial_aggregates, run_audit
from worker.schema import map_column
from worker.stats import map_statistics


def _output_table(maps, labels, predicted):
    n = len(maps)
    stats = map_statistics(maps)
    return pa.table({"id": [str(i) for i in range(n)], "label": labels, "predicted_class": predicted,
                     "map": map_column(maps.astype(np.float16), np.ones(n, bool), maps.shape[1:]),
                     "error": pa.nulls(n, pa.string()), **{k: v for k, v in stats.items()}})


def test_downsample_normalises_and_averages():
    m = np.zeros((1, 32, 32))
    m[0, :2, :2] = 1.0
    g = downsample(m)
    assert g.shape == (1, GRID, GRID) and g.sum() == pytest.approx(1.0) and g[0, 0, 0] == pytest.approx(1.0)


def test_merged_partials_equal_one_pass():
    rng = np.random.default_rng(0)
    maps = rng.random((60, 32, 32))
    table = _output_table(maps, rng.integers(0, 3, 60), rng.integers(0, 3, 60))
    whole = merge_partials(partial_aggregates(table, "label"))
    pieces = pa.concat_tables([partial_aggregates(table.slice(a, b), "label") for a, b in ((0, 7), (7, 30), (37, 23))])
    merged = merge_partials(pieces)
    assert whole.keys() == merged.keys()
    for g in whole:
        assert whole[g]["count"] == merged[g]["count"]
        np.testing.assert_allclose(merged[g]["mean_map"], whole[g]["mean_map"], rtol=1e-10)
        np.testing.assert_allclose(merged[g]["var_map"], whole[g]["var_map"], rtol=1e-8, atol=1e-15)
        for name, s in whole[g]["stats"].items():
            assert merged[g]["stats"][name]["mean"] == pytest.approx(s["mean"])
    # and the merged mean map is the plain mean of the downsampled maps of that class
    rows = table["label"].to_numpy() == 1
    np.testing.assert_allclose(whole["true:1"]["mean_map"], downsample(maps[rows].astype(np.float16)).mean(0),
                               rtol=1e-6)
    assert Moments.of(np.arange(6.0).reshape(6, 1)).merge(Moments.of(np.zeros((0, 1)) + 1)).count == 6


def test_findings_flag_the_planted_class_only():
    rng = np.random.default_rng(1)
    maps = rng.random((40, 32, 32)) * 0.1
    labels = np.repeat([0, 1], 20)
    maps[labels == 1, :3, :3] += 5.0  # class 1 looks at a corner mark
    result = merge_partials(partial_aggregates(_output_table(maps, labels, labels), "label"))
    flagged = {(f["group"], f["finding"]) for f in findings(result)}
    assert ("true:1", "border-heavy") in flagged and ("true:1", "off-centre") in flagged
    assert not any(group.endswith(":0") for group, _ in flagged)


def test_audit_of_a_job_output(ray_local, job_model, tmp_path):
    from worker.job import JobConfig, run

    images, labels = jobdata.digits(40)
    jobdata.write_hf(tmp_path / "d.parquet", images, labels, row_group=10)
    run(JobConfig(model=job_model, input=str(tmp_path / "d.parquet"), output=str(tmp_path / "out"),
                  preprocessing="scale01", label_column="label", batch_size=8), echo=lambda *_: None)
    result = run_audit(str(tmp_path / "out"), str(tmp_path / "report"))
    assert sum(v["count"] for g, v in result["groups"].items() if g.startswith("true:")) == 40
    page = (tmp_path / "report" / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len([g for g in result["groups"] if g.startswith("true:")])
    assert result["metadata"]["model"]["fingerprint"] in page
    assert (tmp_path / "report" / "audit.json").exists()
