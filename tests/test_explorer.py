"""The explorer over a real job's output: slices against a reference computed in the test over the whole table, and
the page in real headless Chromium, driven as a person drives it and checked on what the screen shows."""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
import urllib.error
import urllib.request

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests import jobdata, rotation
from tests.browser import Browser
from worker.audit.pictures import png
from worker.audit.report import PROBES, intervention_pictures
from worker.audit.result import AuditResult
from worker.data.schema import read_maps
from worker.explore.slices import Output, QueryError, Slice
from worker.job import JobConfig, run

BAD = (3, 17)  # input rows whose image is not an image: error rows


@pytest.fixture(scope="module")
def job(ray_local, job_model, tmp_path_factory):
    """A real job's output over two input files of digits, with error rows and labels, in parts of 16 rows."""
    root = tmp_path_factory.mktemp("explore")
    data = root / "data"
    data.mkdir()
    images, labels = jobdata.digits(60)
    for name, rows in (("a.parquet", slice(0, 36)), ("b.parquet", slice(36, 60))):
        cells = [jobdata.encode(img) for img in images[rows]]
        if name == "a.parquet":
            for i in BAD:
                cells[i] = b"not an image"
        pq.write_table(pa.table({"image": pa.array(cells, pa.binary()), "label": labels[rows]}), str(data / name),
                       row_group_size=12)
    out = root / "maps"
    summary = run(JobConfig(model=job_model, input=str(data), output=str(out), label_column="label",
                            preprocessing="scale01", batch_size=8, rows_per_file=16,
                            extra_metadata={"class_names": [f"digit {i}" for i in range(10)]}))
    assert summary["complete"] and summary["rows_out"] == 60
    return out, images, labels


def reference(table: pa.Table, s: Slice) -> tuple[int, list[str]]:
    """The slice over the whole table, in numpy: count, and the page's ids in order (ties in the output's order,
    which is the part files' order)."""
    n = table.num_rows
    keep = np.ones(n, bool)
    label = table["label"].to_numpy()
    predicted = table["predicted_class"].to_numpy()
    if s.true is not None:
        keep &= label == int(s.true)
    if s.predicted is not None:
        keep &= predicted == int(s.predicted)
    errors = table["error"].is_valid().to_numpy(zero_copy_only=False)
    if s.correct is not None:  # a row with no prediction is neither
        keep &= ((predicted == label) == s.correct) & ~errors
    if s.errors is not None:
        keep &= errors == s.errors
    if s.id is not None:
        keep &= np.array(table["id"].to_pylist()) == s.id
    for r in s.ranges:
        values = table[r.column].to_numpy(zero_copy_only=False).astype(float)
        keep &= (values >= r.low) & (values <= r.high)
    rows = np.flatnonzero(keep)
    if s.sort:
        values = table[s.sort].to_numpy(zero_copy_only=False).astype(float)[rows]
        key = np.where(np.isnan(values), -np.inf, values if s.descending else -values)
        rows = rows[np.lexsort((rows, -key))]
    ids = table["id"].to_pylist()
    return len(rows), [ids[i] for i in rows[s.offset:s.offset + s.limit]]


def _in_part_order(out) -> pa.Table:
    """The output's rows in the explorer's own order: part files sorted by name, rows as stored."""
    return pa.concat_tables([pq.read_table(p) for p in sorted(out.glob("part-*.parquet"))])


def _random_slice(rng, table) -> Slice:
    numeric = ["predicted_prob", "target_score", "gini", "entropy", "border_mass", "com_x", "mass"]
    query = {}
    if rng.random() < 0.4:
        query["true"] = str(rng.integers(0, 10))
    if rng.random() < 0.3:
        query["predicted"] = str(rng.integers(0, 10))
    if rng.random() < 0.3:
        query["correct"] = str(bool(rng.random() < 0.5)).lower()
    if rng.random() < 0.3:
        query["error"] = str(bool(rng.random() < 0.5)).lower()
    if rng.random() < 0.1:
        query["id"] = str(rng.choice(table["id"].to_pylist()))
    if rng.random() < 0.5:
        column = str(rng.choice(numeric))
        values = table[column].to_numpy(zero_copy_only=False).astype(float)
        lo, hi = sorted(rng.choice(values[np.isfinite(values)], 2))
        query["range"] = f"{column}:{float(lo)!r}:{float(hi)!r}"
    if rng.random() < 0.7:
        query["sort"] = str(rng.choice(["-", ""])) + str(rng.choice(numeric))
    query["offset"] = str(rng.integers(0, 30))
    query["limit"] = str(rng.integers(1, 25))
    return Slice.from_query(query)


def test_slices_match_the_reference_over_the_whole_table(job):
    out, _, _ = job
    output, table = Output(str(out)), _in_part_order(out)
    rng = np.random.default_rng(rotation.draw("explorer slices", range(10_000), 1)[0])
    for _ in range(40):
        s = _random_slice(rng, table)
        page = output.page(s)
        total, ids = reference(table, s)
        assert (page.total, [r["id"] for r in page.rows]) == (total, ids), s
    # the page's rows carry their maps at their true scale, and error rows none
    page = output.page(Slice(sort="gini", limit=60))
    maps = read_maps(table)
    by_id = {row_id: i for i, row_id in enumerate(table["id"].to_pylist())}
    for row in page.rows:
        if row["error"]:
            assert row["map"] is None
        else:
            np.testing.assert_array_equal(row["map"], maps[by_id[row["id"]]])
    assert output.page(Slice(errors=True)).total == len(BAD)
    assert output.page(Slice(file="b.parquet")).total == 24


def test_rows_are_read_from_their_row_groups_alone(job, tmp_path):
    """Part files of many row groups (a job's large --rows-per-file): a page's rows, read from the row groups that
    hold them, are the rows the whole files hold."""
    out, _, _ = job
    (tmp_path / "maps").mkdir()
    for part in sorted(out.glob("part-*.parquet")):
        pq.write_table(pq.read_table(str(part)), str(tmp_path / "maps" / part.name), row_group_size=3)
    whole, grouped = Output(str(out)), Output(str(tmp_path / "maps"))
    assert pq.ParquetFile(grouped.parts[0]).num_row_groups > 1
    for s in (Slice(sort="gini", limit=60), Slice(true="3", limit=7), Slice(sort="mass", descending=False, offset=9)):
        expected, found = whole.page(s).rows, grouped.page(s).rows
        assert [r["id"] for r in found] == [r["id"] for r in expected] and found
        plain = lambda row: json.dumps({k: v for k, v in row.items() if k != "map"}, sort_keys=True)  # noqa: E731
        for a, b in zip(found, expected):
            assert plain(a) == plain(b) and (a["map"] is None) == (b["map"] is None)
            if a["map"] is not None:
                np.testing.assert_array_equal(a["map"], b["map"])


@pytest.mark.parametrize("query, says", [
    ({"sort": "colour"}, "'colour' is not a column of this output; numeric columns: "),
    ({"range": "gini:0.9:0.1"}, "runs backwards"),
    ({"range": "id:1:2"}, "'id' is not numeric"),
    ({"true": "cat"}, "neither a class index nor a class name; the classes are"),
    ({"offset": "-4"}, "not a whole number"),
    ({"colour": "red"}, "unknown query key"),
    ({"id": "b.parquet#99"}, "no row of this output has the id 'b.parquet#99'"),
])
def test_bad_queries_get_one_line(job, query, says):
    out, _, _ = job
    with pytest.raises(QueryError, match=re.escape(says)) as err:
        Output(str(out)).page(Slice.from_query(query))
    assert "\n" not in str(err.value)


@pytest.fixture(scope="module")
def audited(job, tmp_path_factory):
    """A report directory over the job's output as the audit writes its clusters: each true class split in two
    (each map to the nearer of two of its class's maps), every map's cluster streamed by ``ClusterMembers``."""
    from worker.audit.aggregate import Group, _explained_grids, assignment_partials, merge_assignments
    from worker.audit.report import ClusterMembers

    out, _, _ = job
    table = _in_part_order(out)
    explained, grids = _explained_grids(table)
    labels = explained["label"].to_numpy()
    centroids = {Group("true", int(k)): grids[np.flatnonzero(labels == k)[:2]].reshape(2, -1).tolist()
                 for k in np.unique(labels) if (labels == k).sum() >= 2}
    report = tmp_path_factory.mktemp("report")
    members = ClusterMembers(str(report))
    blocks = [table.slice(i, 16) for i in range(0, table.num_rows, 16)]
    partials = list(members.tee(assignment_partials(b, centroids, "label", with_ids=True) for b in blocks))
    members.close()
    names = [f"digit {i}" for i in range(10)]
    clusters = [{**g.columns(names), "clusters": [c.to_dict() for c in cs]}
                for g, cs in merge_assignments(partials).items()]
    interventions = _probed(table)
    (report / PROBES).mkdir()
    for name, picture in intervention_pictures(AuditResult(str(out), {}, {}, interventions=interventions)).items():
        (report / PROBES / name).write_bytes(png(picture))
    (report / "audit.json").write_text(json.dumps({"groups": [], "findings": [], "clusters": clusters,
                                                   "interventions": interventions.to_dict()}))
    return report


def _probed(table: pa.Table):
    """An intervention section as the audit makes it, with one example: the first row with a map, as the original
    (class 3 kept) and after a fill that moves it to class 5."""
    from worker.audit.intervene import Example, ProbedRegion, Version
    from worker.audit.result import Interventions

    row_id = table.filter(table["error"].is_null())["id"][0].as_py()
    image = np.full((32, 32, 3), 90, np.uint8)
    filled = image.copy()
    filled[:8, :8] = 0
    versions = {"original": Version(image, 3, 2.5), "mean": Version(filled, 5, -1.25)}
    probe = {"class": 3, "box": [0, 0, 0.25, 0.25], "pixels": [0, 0, 8, 8], "verdict": "needed", "shortcut": False}
    region = ProbedRegion(probe, None, 0.4, image, np.zeros((16, 16)), (Example(np.zeros((32, 32)), versions, row_id),))
    return Interventions(8, [region], 1.0, "a few forward passes")


def test_cluster_slices_are_the_audits_members(job, audited):
    from worker.explore.findings import Audit

    out, _, _ = job
    audit = Audit(str(audited))
    output, table = Output(str(out), members=audit.members), _in_part_order(out)
    members = pq.read_table(str(audited / "cluster_members.parquet"))
    chosen = audit.clusters()
    assert len({c["value"] for c in chosen}) == len(chosen) >= 2
    rng = np.random.default_rng(rotation.draw("explorer cluster slices", range(10_000), 1)[0])
    for c in chosen:
        kind, cls, number = c["value"].split(":")
        mask = ((np.array(members["kind"].to_pylist()) == kind) & (members["class_index"].to_numpy() == int(cls))
                & (members["cluster"].to_numpy() == int(number)))
        own = members.filter(pa.array(mask))["id"]
        assert output.page(Slice(cluster=c["value"])).total == c["count"] == len(own)
        s = _random_slice(rng, table)
        s = Slice(**{**s.__dict__, "cluster": c["value"]})
        inside = table.filter(pa.compute.is_in(table["id"], value_set=own.combine_chunks()))
        assert [r["id"] for r in output.page(s).rows] == reference(inside, s)[1], s
    for value, says in (("true:3", "is not kind:class:number"), ("colour:3:1", "kind one of predicted, true"),
                        ("true:3:9", "has no cluster 9 in true class 3")):
        with pytest.raises(QueryError, match=re.escape(says)) as err:
            output.page(Slice(cluster=value))
        assert "\n" not in str(err.value)
    with pytest.raises(QueryError, match="--audit REPORT_DIR"):
        Output(str(out)).page(Slice(cluster=chosen[0]["value"]))


def test_an_output_that_is_not_one_is_refused_in_one_line(tmp_path):
    with pytest.raises(QueryError, match="holds no part files of a job's output"):
        Output(str(tmp_path))


def _get(url: str) -> tuple[int, bytes, str]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, response.read(), response.headers["Content-Type"]
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), exc.headers["Content-Type"]


@contextlib.contextmanager
def serving(*args):
    """``python -m jobs.view ARGS --port 0`` as a person starts it; the address it prints."""
    process = subprocess.Popen([sys.executable, "-m", "jobs.view", *map(str, args), "--port", "0"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        found = re.search(r"http://[\d.]+:\d+/", line)
        assert found, line + process.stderr.read()
        yield found.group(0)
    finally:
        process.terminate()
        process.wait(timeout=20)


@pytest.fixture
def explorer(job):
    with serving(job[0]) as url:
        yield url


def test_the_server_reads_nothing_outside_what_it_was_given(explorer):
    for path in ("../../../etc/passwd", "api/../../etc/passwd", "api/picture?part=0&id=../../etc/passwd",
                 "api/picture?part=999&id=x", "api/row?part=-1&id=x", "%2e%2e/%2e%2e/etc/passwd"):
        status, body, kind = _get(explorer + path)
        assert status in (400, 404) and kind == "application/json", path
        assert b"root:" not in body and b"Traceback" not in body
        assert list(__import__("json").loads(body)) == ["error"]


def _screen(browser: Browser) -> dict:
    """What the rows view shows: the status line, the pager, each card's id and whether its pictures decoded."""
    return browser.evaluate("""(() => ({
        status: document.getElementById('status').innerText, error: document.getElementById('status').className,
        where: document.getElementById('where').innerText,
        cards: [...document.querySelectorAll('.card')].map(c => ({id: c.dataset.id,
            text: c.querySelector('.caption').innerText,
            images: [...c.querySelectorAll('img')].map(i => i.complete && i.naturalWidth > 0)}))}))()""")


def _settled(browser: Browser) -> dict:
    browser.wait("document.getElementById('status').innerText && !document.getElementById('status').innerText"
                 ".startsWith('asking') && [...document.images].every(i => i.complete)")
    return _screen(browser)


def test_a_person_filters_sorts_pages_and_opens_a_row(job, explorer, tmp_path):
    out, _, _ = job
    table = _in_part_order(out)
    with Browser(tmp_path / "profile") as browser:
        browser.goto(explorer)
        first = _settled(browser)
        assert first["status"].startswith("60 rows match") and len(first["cards"]) == 24
        assert [c["id"] for c in first["cards"]] == reference(table, Slice(limit=24))[1]
        failed = set(table.filter(table["error"].is_valid())["id"].to_pylist())
        assert {c["id"] for c in first["cards"] if "error:" in c["text"]} == failed & {c["id"] for c in first["cards"]}
        good = [c for c in first["cards"] if c["id"] not in failed]
        assert good and all(len(c["images"]) == 3 and all(c["images"]) for c in good)

        # a filter and a sort, chosen in the form as a person does
        browser.evaluate("""(() => { document.getElementById('correct').value = 'false';
            document.getElementById('sort').value = 'gini'; document.getElementById('order').value = '-';
            document.getElementById('apply').click(); })()""")
        browser.wait("location.hash.includes('sort=-gini')")
        shown = _settled(browser)
        total, ids = reference(table, Slice(correct=False, sort="gini", limit=24))
        assert shown["status"].startswith(f"{total} rows match")
        assert [c["id"] for c in shown["cards"]] == ids

        # a page turn on the unfiltered run
        browser.evaluate("location.hash = ''")
        _settled(browser)
        browser.evaluate("document.getElementById('next').click()")
        browser.wait("document.getElementById('where').innerText.startsWith('rows 25')")
        turned = _settled(browser)
        assert turned["where"] == "rows 25–48 of 60"
        assert [c["id"] for c in turned["cards"]] == reference(table, Slice(offset=24, limit=24))[1]

        # a click into a row: its pictures at full size, its columns, its map's colour scale
        row_id = next(c["id"] for c in turned["cards"] if "error" not in c["text"])
        browser.evaluate(f"document.querySelector('.card[data-id=\"{row_id}\"]').click()")
        browser.wait("document.getElementById('detail').open && document.querySelectorAll('#detail img').length"
                     " === 3 && [...document.querySelectorAll('#detail img')].every(i => i.complete)")
        detail = browser.evaluate("""(() => ({id: document.getElementById('detail-id').innerText,
            images: [...document.querySelectorAll('#detail img')].map(i => [i.naturalWidth, i.width]),
            scale: document.getElementById('scale').innerText,
            text: document.getElementById('detail').innerText}))()""")
        assert detail["id"] == row_id
        assert all(natural >= 256 and width == 384 for natural, width in detail["images"])
        high = np.abs(read_maps(table)[table["id"].to_pylist().index(row_id)]).max()
        found = re.search(r"map colours:\s+0\s+([\d.e+-]+)", detail["scale"])
        assert found, detail["scale"]
        shown_high = float(found.group(1))
        assert shown_high == pytest.approx(high, rel=1e-3)
        assert "gini" in detail["text"] and "border_mass" in detail["text"]
        browser.screenshot(tmp_path / "detail.png")
        browser.evaluate("document.getElementById('close').click()")

        # bad queries: one line on the page, never a stack trace
        for hash_, says in (("range=gini:0.9:0.1", "runs backwards"), ("sort=-colour", "'colour' is not a column"),
                            ("true=cat", "neither a class index nor a class name")):
            browser.evaluate(f"location.hash = '{hash_}'")
            browser.wait(f"document.getElementById('status').innerText.includes({says!r})")
            bad = _screen(browser)
            assert bad["error"] == "error" and "\n" not in bad["status"].strip() and not bad["cards"]
            assert "Traceback" not in browser.evaluate("document.body.innerText")


def test_a_person_shows_a_cluster_from_the_form_and_from_the_audit(job, audited, tmp_path):
    from worker.explore.findings import Audit

    out, _, _ = job
    clusters = Audit(str(audited)).clusters()
    with serving(out, "--audit", audited) as url, Browser(tmp_path / "profile") as browser:
        browser.goto(url)
        _settled(browser)
        offered = browser.evaluate("[...document.getElementById('cluster').options].map(o => o.value)")
        assert offered == [""] + [c["value"] for c in clusters]
        chosen = clusters[-1]
        browser.evaluate(f"""(() => {{ document.getElementById('cluster').value = {chosen['value']!r};
            document.getElementById('apply').click(); }})()""")
        browser.wait("location.hash.includes('cluster=')")
        shown = _settled(browser)
        assert shown["status"].startswith(f"{chosen['count']} rows match")
        assert all(f"true {chosen['class_name']}" in c["text"] for c in shown["cards"])

        browser.evaluate("location.hash = ''")
        _settled(browser)
        browser.evaluate("document.getElementById('tab-audit').click()")
        browser.wait("document.querySelectorAll('#audit a[data-slice^=\"cluster=\"]').length > 0")
        first = clusters[0]
        browser.evaluate("document.querySelector('#audit a[data-slice^=\"cluster=\"]').click()")
        browser.wait("location.hash.includes('cluster=')")
        shown = _settled(browser)
        assert shown["status"].startswith(f"{first['count']} rows match")
        assert browser.evaluate("document.getElementById('cluster').value") == first["value"]

        # the row the audit probed: its image as the original and after the fill, with the model's classes
        probed = _probed(_in_part_order(out)).regions[0].examples[0].id
        browser.evaluate("location.hash = ''")
        assert probed in [c["id"] for c in _settled(browser)["cards"]]
        browser.evaluate(f"document.querySelector('.card[data-id=\"{probed}\"]').click()")
        browser.wait("document.getElementById('detail').open && document.querySelectorAll('#detail .probe img')"
                     ".length === 2 && [...document.querySelectorAll('#detail .probe img')].every(i => i.complete)")
        fills = browser.evaluate("[...document.querySelectorAll('#detail .probe figure')].map(f => "
                                 "[f.innerText, f.querySelector('img').naturalWidth])")
        assert [text for text, _ in fills] == ["original: predicted digit 3, logit 2.50",
                                               "mean: predicted digit 5, logit -1.25"]
        assert all(width > 0 for _, width in fills)
        assert "intervention on this image: digit 3 (needed)" in browser.evaluate(
            "document.getElementById('detail').innerText")


def test_an_output_and_its_audit_on_an_object_store(job, audited):
    """The output and the audit's report on a real S3-compatible server: the same slices, cluster filter, probed
    row and pictures as from the local disk."""
    import pyarrow.fs as pafs

    from tests.conftest import moto_server, s3_environment
    from worker.explore.server import Explorer

    out, _, _ = job
    with moto_server() as port, s3_environment(f"http://127.0.0.1:{port}"):
        s3 = pafs.S3FileSystem(endpoint_override=f"http://127.0.0.1:{port}", access_key="test", secret_key="test",
                               region="us-east-1", allow_bucket_creation=True)
        s3.create_dir("runs")
        pafs.copy_files(str(out), "runs/maps", destination_filesystem=s3)
        pafs.copy_files(str(audited), "runs/audit", destination_filesystem=s3)
        local, remote = Explorer(str(out), str(audited)), Explorer("s3://runs/maps", "s3://runs/audit")
        value = local.audit.clusters()[0]["value"]
        for query in ({"sort": "-gini", "limit": "10"}, {"cluster": value}, {"true": "3", "correct": "false"}):
            assert remote.slice(query)["rows"] == local.slice(query)["rows"], query
        probed = _probed(_in_part_order(out)).regions[0].examples[0].id
        row = next(r for r in local.slice({"limit": "60"})["rows"] if r["id"] == probed)
        address = {"part": str(row["part"]), "id": probed}
        assert remote.row(address)["probes"] == local.row(address)["probes"] and local.row(address)["probes"]
        for kind in ("image", "map", "overlay"):
            assert remote.picture({**address, "kind": kind}) == local.picture({**address, "kind": kind})


@pytest.mark.slow
def test_the_demos_audit_in_the_explorer_leads_to_its_shortcut(tmp_path):
    """The demo's output and audit as a person opens them: the confirmed shortcut is shown with its picture, and
    its link shows the class's rows."""
    from tests.test_demo import _demo
    from worker.demo import CLASSES, MARKED_CLASS

    _, _, output = _demo(tmp_path)
    process = subprocess.Popen([sys.executable, "-m", "jobs.view", str(output / "maps"), "--audit",
                                str(output / "audit"), "--port", "0"], stdout=subprocess.PIPE, text=True)
    try:
        url = re.search(r"http://[\d.]+:\d+/", process.stdout.readline()).group(0)
        labels = pq.read_table(str(output / "maps"), columns=["label"])["label"].to_numpy()
        with Browser(tmp_path / "profile") as browser:
            browser.goto(url)
            _settled(browser)
            browser.evaluate("document.getElementById('tab-audit').click()")
            browser.wait("document.querySelectorAll('#audit figure.class img').length === 6")
            browser.wait("[...document.querySelectorAll('#audit img')].every(i => i.complete && i.naturalWidth > 0)")
            shortcuts = browser.evaluate("[...document.querySelectorAll('#audit figure.shortcut')].map(f => "
                                         "[f.innerText, f.querySelector('img').naturalWidth])")
            assert [s[0].split(":")[0] for s in shortcuts] == [CLASSES[MARKED_CLASS]] and shortcuts[0][1] > 0
            browser.screenshot(tmp_path / "audit.png")
            browser.evaluate("document.querySelector('#audit figure.shortcut a').click()")
            browser.wait(f"location.hash.includes('true={MARKED_CLASS}')")
            shown = _settled(browser)
            assert shown["status"].startswith(f"{int((labels == MARKED_CLASS).sum())} rows match")
            assert all(f"true {CLASSES[MARKED_CLASS]}" in c["text"] for c in shown["cards"])
    finally:
        process.terminate()
        process.wait(timeout=20)
