"""Audit aggregates: exact merges, findings on planted maps, and the report from a real job's output."""

import time

import numpy as np
import pyarrow as pa
import pytest

from tests import jobdata
from worker.audit import run_audit
from worker.audit.aggregate import GRID, Group, Moments, Worst, downsample, merge_partials, partial_aggregates
from worker.audit.findings import findings
from worker.data.schema import map_column
from worker.data.stats import map_statistics


def _true(group) -> bool:
    return isinstance(group, Group) and group.kind == "true"


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
        if isinstance(g, Worst):  # the worst cases merge to the same rows
            assert [w.id for w in whole[g].worst] == [w.id for w in merged[g].worst]
            continue
        assert whole[g].count == merged[g].count
        np.testing.assert_allclose(merged[g].mean_map, whole[g].mean_map, rtol=1e-10)
        np.testing.assert_allclose(merged[g].var_map, whole[g].var_map, rtol=1e-8, atol=1e-15)
        for name, s in whole[g].stats.items():
            assert merged[g].stats[name].mean == pytest.approx(s.mean)
    # and the merged mean map is the plain mean of the downsampled maps of that class
    rows = table["label"].to_numpy() == 1
    np.testing.assert_allclose(whole[Group("true", 1)].mean_map, downsample(maps[rows].astype(np.float16)).mean(0),
                               rtol=1e-6)
    assert Moments.of(np.arange(6.0).reshape(6, 1)).merge(Moments.of(np.zeros((0, 1)) + 1)).count == 6


def test_a_missing_library_is_one_line_naming_the_extra(monkeypatch, tmp_path):
    from worker.audit import run

    monkeypatch.setitem(run.LIBRARIES, "a_module_no_one_installed", "a-distribution")
    with pytest.raises(RuntimeError, match=r"^the audit needs a-distribution: pip install 'guided-saliency\[audit\]'$"):
        run_audit(str(tmp_path / "maps"))


def test_findings_flag_the_planted_class_only():
    rng = np.random.default_rng(1)
    maps = rng.random((40, 32, 32)) * 0.1
    labels = np.repeat([0, 1], 20)
    maps[labels == 1, :3, :3] += 5.0  # class 1 looks at a corner mark
    result = merge_partials(partial_aggregates(_output_table(maps, labels, labels), "label"))
    flagged = {(f.group, f.finding) for f in findings(result)}
    assert (Group("true", 1), "border-heavy") in flagged and (Group("true", 1), "off-centre") in flagged
    assert not any(group.cls == 0 for group, _ in flagged)


def test_audit_of_a_job_output(ray_local, job_model, tmp_path):
    from worker.job import JobConfig, run

    images, labels = jobdata.digits(40)
    jobdata.write_hf(tmp_path / "d.parquet", images, labels, row_group=10)
    run(JobConfig(model=job_model, input=str(tmp_path / "d.parquet"), output=str(tmp_path / "out"),
                  preprocessing="scale01", label_column="label", batch_size=8), echo=lambda *_: None)
    result = run_audit(str(tmp_path / "out"), str(tmp_path / "report"))
    assert sum(v.count for g, v in result.groups.items() if _true(g)) == 40 == result.rows
    page = (tmp_path / "report" / "report.html").read_text()
    classes = [g for g in result.groups if _true(g)]
    worst = result.worst["border_enrichment"].worst
    assert len(worst) == 6 and [w.value for w in worst] == sorted((w.value for w in worst), reverse=True)
    # per class its mean image, mean map, contrast and mean map on the image; 6 worst cases of 2 statistics, each
    # as its image and its map on it
    assert page.count("data:image/png;base64,") == 4 * len(classes) + 2 * 6 * 2
    assert worst[0].id in page
    for w in worst:  # each worst case beside its own input image, found by its row id
        np.testing.assert_array_equal(w.image, images[int(w.id.split("#")[1])])
    (tmp_path / "d.parquet").unlink()  # an output outlives its input: the audit still runs, without the images
    again = run_audit(str(tmp_path / "out"), str(tmp_path / "report-2"))
    assert "cannot be read" in again.notes["worst_images"] and "cannot be read" in \
        (tmp_path / "report-2" / "report.html").read_text()
    assert all(w.image is None for w in again.worst["border_enrichment"].worst)
    assert result.metadata["model"]["fingerprint"] in page
    import json

    import pyarrow.parquet as pq

    saved = json.loads((tmp_path / "report" / "audit.json").read_text())  # audit.json is the result's to_dict
    assert saved == json.loads(result.to_json()) and saved["skipped"] is None
    assert [f.to_dict(result.names) for f in result.findings] == saved["findings"] and result.controls is None
    assert result.summary("r") == {"report": "r", "groups": len(result.groups), "findings": saved["findings"]}
    assert [w["id"] for w in saved["worst"]["border_enrichment"]["worst"]] == [w.id for w in worst]
    assert sum(g["count"] for g in saved["groups"] if g["kind"] == "true") == 40

    classes = pq.read_table(str(tmp_path / "report" / "classes.parquet"))
    true_rows = classes.filter(pa.compute.equal(classes["kind"], "true"))
    assert sum(true_rows["count"].to_pylist()) == 40
    grids = true_rows["mean_map"].combine_chunks().to_numpy_ndarray()
    assert grids.shape == (true_rows.num_rows, 16, 16) and np.allclose(grids.sum((1, 2)), 1.0, atol=1e-4)
    assert "border_enrichment_mean" in classes.column_names

    # each map's cluster in every group the audit split: as many as each cluster counts, each map once per group
    members = pq.read_table(str(tmp_path / "report" / "cluster_members.parquet")).to_pylist()
    split = {g: cs for g, cs in result.clusters.items() if len(cs) > 1}
    counted = {}
    for m in members:
        counted.setdefault((m["kind"], m["class_index"], m["cluster"]), set()).add(m["id"])
    assert {k: len(v) for k, v in counted.items()} == {(g.kind, g.cls, c.cluster): c.count
                                                       for g, cs in split.items() for c in cs}
    assert len(members) == len({(m["id"], m["kind"]) for m in members}) == sum(c.count for cs in split.values()
                                                                                for c in cs)


def _planted(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Maps of one class on its object in the centre, but for a tenth of them on a corner mark; and which."""
    rng = np.random.default_rng(2)
    maps = rng.random((n, 32, 32)) * 0.05
    yy, xx = np.mgrid[:32, :32]
    maps += np.exp(-((yy - 16) ** 2 + (xx - 16) ** 2) / 40.0)  # the object, in the centre
    shortcut = rng.random(n) < 0.1  # 10 % of the class: the model looks at a corner mark instead
    maps[shortcut] = rng.random((shortcut.sum(), 32, 32)) * 0.05
    maps[shortcut, :4, -4:] += 3.0
    return maps, shortcut


def test_the_audit_writes_each_maps_cluster(ray_local, tmp_path):
    """Through the audit's two passes over output files: the report's cluster_members.parquet puts the planted
    maps in one cluster and the others in another, in each group the audit split (the true class among them)."""
    import pyarrow.parquet as pq

    n = 300
    maps, shortcut = _planted(n)
    table = _output_table(maps, np.zeros(n, int), np.zeros(n, int))
    (tmp_path / "out").mkdir()
    for start in range(0, n, 64):
        pq.write_table(table.slice(start, 64), str(tmp_path / "out" / f"part-{start:04d}.parquet"))
    result = run_audit(str(tmp_path / "out"), str(tmp_path / "report"))
    members = pq.read_table(str(tmp_path / "report" / "cluster_members.parquet")).to_pylist()
    found: dict = {}
    for m in members:
        found.setdefault((m["kind"], m["class_index"]), {}).setdefault(m["cluster"], set()).add(m["id"])
    ids = np.array(table["id"].to_pylist())
    assert set(found) == {(g.kind, g.cls) for g, cs in result.clusters.items() if len(cs) > 1} >= {("true", 0)}
    for group, clusters in found.items():
        assert sorted(clusters.values(), key=len) == [set(ids[shortcut]), set(ids[~shortcut])], group
        counts = {c.cluster: c.count for c in result.clusters[Group(*group)]}
        assert counts == {c: len(v) for c, v in clusters.items()}
    assert not (tmp_path / "report" / "cluster_members.parquet.partial").exists()


def test_clusters_find_the_planted_subgroup_out_of_core():
    from worker.audit.aggregate import assignment_partials, cluster_members, merge_assignments
    from worker.audit.clusters import cluster_groups, with_examples

    n = 300
    maps, shortcut = _planted(n)
    labels = np.zeros(n, int)
    table = _output_table(maps, labels, labels)
    blocks = [table.slice(i, 64) for i in range(0, n, 64)]
    merged = merge_partials(pa.concat_tables([partial_aggregates(b, "label") for b in blocks]))
    assert len(merged[Group("true", 0)].sample) == n  # below the sample size: everything sampled
    fitted = cluster_groups(merged)[Group("true", 0)]
    assert fitted.k == 2
    centroids = {Group("true", 0): fitted.centroids.tolist()}
    partials = pa.concat_tables([assignment_partials(b, centroids, "label", with_ids=True) for b in blocks])
    assigned = merge_assignments(partials)
    sizes = sorted(c.count for c in assigned[Group("true", 0)])
    assert sizes == sorted([int(shortcut.sum()), int(n - shortcut.sum())])
    members = cluster_members(partials)  # each map's cluster: the planted maps are one cluster, the rest the other
    ids = np.array(table["id"].to_pylist())
    found: dict = {}
    for row_id, kind, cluster in zip(*(members[k].to_pylist() for k in ("id", "kind", "cluster"))):
        found.setdefault((kind, cluster), set()).add(row_id)
    assert sorted(found.values(), key=len) == [set(ids[shortcut]), set(ids[~shortcut])]
    assert {kind for kind, _ in found} == {"true"}
    shown = with_examples(merged, {Group("true", 0): fitted}, assigned)
    small = min(shown[Group("true", 0)], key=lambda c: c.count)
    assert len(small.examples) == 3 and all(e[:3, -3:].sum() > 0.5 for e in small.examples)
    assert all(not c.examples for c in assigned[Group("true", 0)])  # a new value: what was assigned is unchanged
    flagged = [f for f in findings(merged, assigned) if f.finding == "small cluster looks elsewhere"]
    assert len(flagged) == 1 and flagged[0].group == Group("true", 0)


def test_report_renders_in_headless_chromium(tmp_path):
    import os
    import shutil
    import subprocess

    from PIL import Image

    from worker.audit.report import write_report
    from worker.audit.result import AuditResult

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        if os.environ.get("CI"):  # CI installs it: a report test that cannot run must not pass unseen
            pytest.fail("chromium is not installed, and CI must render the report")
        pytest.skip("chromium is not installed (.ci/run installs it)")
    rng = np.random.default_rng(3)
    maps = rng.random((30, 32, 32))
    maps[:, 12:20, 12:20] += 2.0
    labels = np.repeat([0, 1, 2], 10)
    merged = merge_partials(partial_aggregates(_output_table(maps, labels, labels), "label"))
    groups = {g: v for g, v in merged.items() if isinstance(g, Group)}
    write_report(AuditResult("maps/", {"model": {"fingerprint": "sha256:abc"}, "method": "guided_backprop"}, groups,
                             findings=findings(groups)), str(tmp_path / "report"))
    shot = tmp_path / "shot.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1000,900",
                    f"--screenshot={shot}", (tmp_path / "report" / "report.html").as_uri()],
                   check=True, capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert pixels.std() > 10  # not blank
    # the inline heat maps rendered: red pixels (R well above B) exist only if the images loaded
    assert (pixels[..., 0] - pixels[..., 2] > 80).sum() > 3 * 100 * 100  # three 128 px tiles, mostly red


def _reference_grids(maps, grid=GRID):
    """The audit's downsampling written independently: |map| (NaN as 0), cell sums as one-hot matrix products,
    divided by the cell's pixel count, each map then L1-normalised (all zero when a cell holds no pixel)."""
    s = np.abs(np.nan_to_num(np.asarray(maps, np.float64)))
    h, w = s.shape[1:]
    ry = (np.arange(grid)[:, None] == np.minimum(np.arange(h) * grid // h, grid - 1)[None]).astype(float)
    rx = (np.arange(grid)[:, None] == np.minimum(np.arange(w) * grid // w, grid - 1)[None]).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        cells = ry @ s @ rx.T / (ry.sum(1)[:, None] * rx.sum(1)[None])
    total = cells.sum((1, 2))
    return np.array([c / t if t > 0 else np.zeros_like(c) for c, t in zip(cells, total)])


@pytest.mark.parametrize("shape", [(32, 32), (24, 20), (8, 8)])
def test_merged_results_equal_numpy_on_the_raw_maps(shape, monkeypatch):
    """What the streamed, capped, vectorised aggregation merges to is what numpy computes on all the raw maps at
    once: counts, mean and variance maps, statistics, each class's sample (the rows of smallest SHA-1 key, in
    that order) and the worst cases; whatever the block split and however stale the tasks' caps are."""
    import hashlib

    from worker.audit import aggregate

    monkeypatch.setattr(aggregate, "SAMPLE_SIZE", 40)  # small, so that the caps bite
    rng = np.random.default_rng(5)
    n = 600
    maps = rng.random((n, *shape)) ** 3
    maps[rng.random(n) < 0.05, 0, 0] = np.nan
    labels, predicted = rng.integers(0, 4, n), rng.integers(0, 4, n)
    table = _output_table(maps, labels, predicted)
    label_column = pa.array(labels, mask=rng.random(n) < 0.1)  # some rows unlabelled
    error = pa.array([("bad" if i % 50 == 7 else None) for i in range(n)], pa.string())
    table = table.set_column(table.schema.get_field_index("label"), "label", label_column)
    table = table.set_column(table.schema.get_field_index("error"), "error", error)
    blocks, start = [], 0
    for size in rng.integers(1, 120, 40):
        blocks.append(table.slice(start, int(size)))
        start += int(size)
    blocks.append(table.slice(start))
    caps_seen: list[dict] = [{}]

    def streamed():  # each block sees the caps of two blocks ago, as a task started before the merge would
        for block in blocks:
            yield aggregate.partial_aggregates(block, "label", caps=caps_seen[max(0, len(caps_seen) - 3)])

    merged = merge_partials(streamed(), on_caps=caps_seen.append)
    assert len(caps_seen) > 2  # the caps tightened as blocks merged

    ok = np.array([i % 50 != 7 for i in range(n)])
    grids = _reference_grids(maps.astype(np.float16)[ok])
    ids = [str(i) for i in np.flatnonzero(ok)]
    label_list, pred = label_column.to_pylist(), predicted[ok]
    lab = [label_list[i] for i in np.flatnonzero(ok)]
    groups: dict[Group, list[int]] = {}
    for i, (p, c) in enumerate(zip(pred, lab)):
        groups.setdefault(Group("predicted", int(p)), []).append(i)
        if c is not None:
            groups.setdefault(Group("true", c), []).append(i)
            groups.setdefault(Group("correct" if c == p else "wrong", c), []).append(i)
    keys = np.array([int.from_bytes(hashlib.sha1(i.encode()).digest()[:8], "big") / 2 ** 64 for i in ids])
    stats = {name: table[name].to_numpy(zero_copy_only=False)[ok] for name in map_statistics(maps[:1])}  # as written
    assert set(merged) == set(groups) | {Worst(name) for name in aggregate.WORST if name in stats}
    for g, rows in groups.items():
        rows = np.asarray(rows)
        assert merged[g].count == len(rows)
        np.testing.assert_allclose(merged[g].mean_map, grids[rows].mean(0), rtol=1e-10, atol=1e-18)
        np.testing.assert_allclose(merged[g].var_map, grids[rows].var(0), rtol=1e-8, atol=1e-18)
        for name, s in merged[g].stats.items():
            values = np.asarray(stats[name], np.float64)[rows]
            values = values[np.isfinite(values)]
            assert s.n == len(values)
            assert s.mean == pytest.approx(values.mean(), rel=1e-12)
            assert s.std == pytest.approx(values.std(), rel=1e-9)
        if g.kind == "true":
            chosen = rows[np.argsort(keys[rows])[:40]]
            np.testing.assert_allclose(merged[g].sample, grids[chosen].astype(np.float32), rtol=1e-6)
        else:
            assert merged[g].sample is None
    for name, direction in ((k, v) for k, v in aggregate.WORST.items() if k in stats):
        values = np.asarray(stats[name], np.float64)
        finite = np.flatnonzero(np.isfinite(values))
        order = finite[np.argsort(-values[finite] if direction == "high" else values[finite], kind="stable")][:6]
        assert [w.id for w in merged[Worst(name)].worst] == [ids[i] for i in order]


def test_vectorised_keys_and_members_equal_the_per_row_ones():
    """Sample keys, and each row's groups read row by row: integer labels, labels with gaps, names of the job's
    classes (resolved to their index) and names of no recorded class (kept as names: no correct / wrong)."""
    from worker.audit.aggregate import _sample_key, group_members, sample_keys

    ids = [f"part-{i % 7}#{i}" for i in range(3000)] + ["", "é", "x" * 300]
    np.testing.assert_array_equal(sample_keys(ids), [_sample_key(i) for i in ids])
    rng = np.random.default_rng(0)
    names = ["zero", "one", "two", "three", "four"]
    for labels, known in ((pa.array(rng.integers(0, 5, 200), mask=rng.random(200) < 0.2), None),
                          (pa.array([names[v] for v in rng.integers(0, 5, 200)]), names),
                          (pa.array([names[v] for v in rng.integers(0, 5, 200)], mask=rng.random(200) < 0.1), None)):
        predicted = rng.integers(0, 5, 200)
        table = pa.table({"predicted_class": pa.array(predicted), "label": labels})
        expected: dict = {}
        for i, (p, label) in enumerate(zip(predicted, labels.to_pylist())):
            expected.setdefault(Group("predicted", int(p)), []).append(i)
            if label is None:
                continue
            cls = names.index(label) if known and label in known else label
            expected.setdefault(Group("true", cls), []).append(i)
            if isinstance(cls, int):
                expected.setdefault(Group("correct" if cls == p else "wrong", cls), []).append(i)
        found = group_members(table, "label", known)
        assert set(found) == set(expected)
        for key, rows in expected.items():
            np.testing.assert_array_equal(found[key], rows)


def test_aggregation_leaves_no_consumed_block_in_the_store(ray_local, tmp_path):
    """The audit's first pass over 16 and then 64 output files: the object store's peak while the partial
    aggregates stream grows less than the files (4x the files, < 3x the peak; measured 2.25x: Ray Data's output
    budget, not the blocks consumed) and stays under half of what passes through; nothing of them is left once
    merged (no reference to a consumed block stays alive in the driver); every row is counted."""
    import gc
    import threading

    import pyarrow.fs as pafs
    import pyarrow.parquet as pq
    from ray._private.internal_api import get_memory_info_reply, get_state_from_address

    from worker.audit.run import _aggregate

    rng, rows = np.random.default_rng(2), 400
    files = []
    for f in range(64):
        table = _output_table(rng.random((rows, 32, 32)) ** 3, rng.integers(0, 4, rows), rng.integers(0, 4, rows))
        files.append(str(tmp_path / f"part-{f:03d}.parquet"))
        pq.write_table(table.set_column(0, "id", pa.array([f"{f}#{i}" for i in range(rows)])), files[-1])

    address = ray_local.get_runtime_context().gcs_address

    def used() -> int:
        # this test's cluster by its address: another Ray on the host must not make the probe ambiguous
        return get_memory_info_reply(get_state_from_address(address)).store_stats.object_store_bytes_used

    def peak_over(some: list[str]) -> int:
        baseline, peak, stop = used(), [0], threading.Event()

        def sample():
            while not stop.is_set():
                peak[0] = max(peak[0], used() - baseline)
                stop.wait(0.02)

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            merged = _aggregate(pafs.LocalFileSystem(), some, "label")
        finally:
            stop.set()
            sampler.join()
        assert sum(v.count for g, v in merged.items() if _true(g)) == len(some) * rows
        del merged
        gc.collect()
        deadline = time.time() + 10  # the store frees an object once its last reference is gone: a moment later
        while used() - baseline > 64 * 1024 and time.time() < deadline:
            time.sleep(0.1)
        assert used() - baseline <= 64 * 1024, (used(), baseline)
        return peak[0]

    few, many = peak_over(files[:16]), peak_over(files)
    passed = sum(partial_aggregates(pq.read_table(f), "label").nbytes for f in files)  # uncapped: more than sent
    assert 0 < many < 3 * few and many < passed / 2, (few, many, passed)


@pytest.mark.slow
def test_audit_of_a_job_with_string_labels(ray_local, job_model, tmp_path):
    """A label column of class names, through the real job and the audit: names the job recorded as class names
    become their class index (with correct / wrong groups), a name it did not record stays a name; the report
    and the tables name the classes."""
    import json

    import pyarrow.parquet as pq

    from tests.jobdata import encode
    from worker.job import JobConfig, run

    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    images, digits = jobdata.digits(30)
    labels = [names[d] if d != 7 else "unsure" for d in digits]  # "unsure" is no class of the model
    cells = [{"bytes": encode(image), "path": f"{i}.png"} for i, image in enumerate(images)]
    pq.write_table(pa.table({"image": pa.array(cells, jobdata.HF_IMAGE), "label": labels}),
                   str(tmp_path / "d.parquet"), row_group_size=10)
    run(JobConfig(model=job_model, input=str(tmp_path / "d.parquet"), output=str(tmp_path / "out"),
                  preprocessing="scale01", label_column="label", batch_size=8,
                  extra_metadata={"class_names": names}), echo=lambda *_: None)
    result = run_audit(str(tmp_path / "out"), str(tmp_path / "report"))
    true = {g.cls: v.count for g, v in result.groups.items() if _true(g)}
    expected = {names.index(n) if n in names else n: labels.count(n) for n in set(labels)}
    assert true == expected and "unsure" in true
    kinds = {g.kind for g in result.groups if g.cls == "unsure"}
    assert kinds == {"true"}  # a name of no class: neither correct nor wrong
    correct = sum(v.count for g, v in result.groups.items() if g.kind == "correct")
    wrong = sum(v.count for g, v in result.groups.items() if g.kind == "wrong")
    assert correct + wrong == 30 - labels.count("unsure")
    page = (tmp_path / "report" / "report.html").read_text()
    assert "true: 3 (three)" in page and "true: unsure" in page
    classes = pq.read_table(str(tmp_path / "report" / "classes.parquet")).to_pylist()
    assert {(r["class_index"], r["class_name"]) for r in classes if r["kind"] == "true"} == \
        {(names.index(n), n) if n in names else (None, n) for n in set(labels)}
    saved = json.loads((tmp_path / "report" / "audit.json").read_text())
    assert {g["class_name"] for g in saved["groups"] if g["kind"] == "true"} == set(labels)


def test_one_sample_of_the_input_serves_every_step():
    """The audit reads the job's input once for the controls (the first rows), the interventions and the method
    comparison (the first rows of each class): it stops as soon as every part is there, and each step's part is
    what it would have read alone (the beginning of a larger part)."""
    from worker.audit.sample import Draw

    labels = [0, 1, 0, 2, 1, 0, 1, 2, 0, 3, 1, 2, 0, 1]
    read = []

    def rows():
        for i, label in enumerate(labels):
            read.append(i)
            yield f"r{i}", np.full((2, 2, 3), i, np.uint8), label, None

    sample = Draw(rows(), first=3, per_class=3, classes=[0, 1, 2], size=(2, 2))
    by_class = {c: [i for i, label in enumerate(labels) if label == c][:3] for c in (0, 1, 2)}
    assert read == list(range(max(max(v) for v in by_class.values()) + 1))  # no row past the last one needed
    assert sample.first(3).ids == ["r0", "r1", "r2"] and sample.first(3).classes is None
    for n in (1, 2, 3):
        part = sample.per_class(n)
        assert part.ids == [f"r{i}" for c in (0, 1, 2) for i in by_class[c][:n]]
        assert part.classes == [c for c in (0, 1, 2) for _ in by_class[c][:n]]
        assert [int(im[0, 0, 0]) for im in part.images] == [int(i[1:]) for i in part.ids]
    assert sample.per_class(3).by_class().keys() == {0, 1, 2} and sample.per_class(3).masks is None
