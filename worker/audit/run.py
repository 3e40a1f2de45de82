"""Dataset-level audit of a job's output: where the model looks, per class, out of core on Ray Data.

Each block of the output is reduced to small *partial aggregates* per group
(true class, predicted class, correct or wrong): the count, mean and M2 of the
L1-normalised maps downsampled to 16 x 16, and count / sum / sum of squares of
every statistic column.  Partials merge exactly (Chan et al.'s parallel
variance), so any number of rows fits in memory.  Findings flag classes whose
mean map is border-heavy or off-centre, or whose mass sits outside the masks.

Example:
    >>> a = Moments.of(np.ones((2, 2, 2))); b = Moments.of(np.zeros((2, 2, 2)))
    >>> m = a.merge(b); (m.count, float(m.mean[0, 0]), float(m.variance[0, 0]))
    (4, 0.5, 0.25)
"""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from worker.data.schema import maps_to_numpy, read_metadata
from worker.data.stats import MASK_COLUMNS, STAT_COLUMNS, frame

GRID = 16
SAMPLE_SIZE = 1000  # maps per class kept (uniformly, out of core) for clustering
SMALL_CLUSTER = 0.15  # a cluster with at most this share of its class is "small"
BORDER_ENRICHMENT_FLAG = 1.5  # the 16x16 frame covers 44 % of the area: at most 2.3x
OFF_CENTRE_FLAG = 0.2
MASK_ENERGY_FLAG = 0.5
WORST = {"border_enrichment": "high", "energy_in_mask": "low", "entropy_norm": "low"}  # worst cases shown
WORST_K = 6
OUTLIER_Z = 4.0
MIN_EFFECT = {"border-heavy": 0.1, "off-centre": 0.05}  # and at least this far from the classes' median  # a class this many robust standard deviations from the other classes is flagged


@dataclass
class Moments:
    """Count, mean and M2 of arrays; ``merge`` combines two partial results exactly."""

    count: int
    mean: np.ndarray
    m2: np.ndarray

    @classmethod
    def of(cls, values: np.ndarray) -> "Moments":
        values = np.asarray(values, np.float64)
        if not len(values):
            return cls(0, np.zeros(values.shape[1:]), np.zeros(values.shape[1:]))
        mean = values.mean(0)
        return cls(len(values), mean, ((values - mean) ** 2).sum(0))

    def merge(self, other: "Moments") -> "Moments":
        if not other.count:
            return self
        if not self.count:
            return other
        n = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * other.count / n
        return Moments(n, mean, self.m2 + other.m2 + delta ** 2 * self.count * other.count / n)

    @property
    def variance(self) -> np.ndarray:
        return self.m2 / self.count if self.count else self.m2 * np.nan


def downsample(maps: np.ndarray, grid: int = GRID) -> np.ndarray:
    """(N, H, W) -> (N, grid, grid) by area averaging, each map L1-normalised (sums to 1)."""
    s = np.abs(np.nan_to_num(np.asarray(maps, np.float64)))
    if s.ndim == 4:
        s = s.max(-1)
    n, h, w = s.shape
    ys = np.minimum((np.arange(h) * grid) // h, grid - 1)
    xs = np.minimum((np.arange(w) * grid) // w, grid - 1)
    out = np.zeros((n, grid, grid))
    np.add.at(out, (slice(None), ys[:, None], xs[None, :]), s)
    out /= np.bincount(ys, minlength=grid)[:, None] * np.bincount(xs, minlength=grid)[None, :]
    total = out.sum((1, 2), keepdims=True)
    return np.divide(out, total, out=np.zeros_like(out), where=total > 0)


def _explained_grids(table: pa.Table) -> tuple[pa.Table, np.ndarray]:
    """The rows without an error, and their maps downsampled (the first map of each ``top:K`` row)."""
    table = table.filter(pa.compute.is_null(table["error"]))
    maps = maps_to_numpy(table["map"])
    if maps.ndim == 4 and maps.shape[-1] not in (1, 3):  # (K, H, W) maps of top:K
        maps = maps[:, 0]
    return table, downsample(maps)


def group_keys(table: pa.Table, label_column: str | None) -> list[tuple[str, int]]:
    """Which groups each row belongs to: ('predicted', c), and with labels ('true', c), ('correct'|'wrong', c)."""
    predicted = table["predicted_class"].to_pylist()
    labels = table[label_column].to_pylist() if label_column and label_column in table.column_names else None
    keys = []
    for i, p in enumerate(predicted):
        row = [("predicted", p)]
        if labels is not None and labels[i] is not None:
            row += [("true", labels[i]), ("correct" if labels[i] == p else "wrong", labels[i])]
        keys.append(row)
    return keys


def partial_aggregates(table: pa.Table, label_column: str | None = None) -> pa.Table:
    """One output block -> one row of partial aggregates per group (Ray Data map_batches function)."""
    table, grids = _explained_grids(table)
    if not table.num_rows:
        return pa.table({"group": pa.array([], pa.string()), "payload": pa.array([], pa.string())})
    stat_names = [c for c in (*STAT_COLUMNS, *MASK_COLUMNS) if c in table.column_names]
    stats = {c: table[c].to_numpy(zero_copy_only=False).astype(np.float64) for c in stat_names}
    members: dict[tuple, list[int]] = {}
    for i, keys in enumerate(group_keys(table, label_column)):
        for key in keys:
            members.setdefault(key, []).append(i)
    ids = table["id"].to_pylist()
    sample_keys = np.array([_sample_key(i) for i in ids])
    cluster_kind = "true" if any(kind == "true" for kind, _ in members) else "predicted"
    groups, payloads = [], []
    for (kind, cls), rows in members.items():
        moments = Moments.of(grids[rows])
        summary = {}
        for name, values in stats.items():
            v = values[rows]
            v = v[np.isfinite(v)]
            summary[name] = [int(len(v)), float(v.sum()), float((v ** 2).sum())]
        payload = {"count": moments.count, "mean": moments.mean.tolist(), "m2": moments.m2.tolist(),
                   "stats": summary}
        if kind == cluster_kind:
            keep = np.asarray(rows)[np.argsort(sample_keys[rows])[:SAMPLE_SIZE]]
            payload["sample"] = _pack_sample(sample_keys[keep], grids[keep])
        groups.append(f"{kind}:{cls}")
        payloads.append(json.dumps(payload))
    for name, direction in WORST.items():
        if name not in stats:
            continue
        values = stats[name]
        finite = np.flatnonzero(np.isfinite(values))
        order = finite[np.argsort(-values[finite] if direction == "high" else values[finite], kind="stable")][:WORST_K]
        groups.append(f"worst:{name}")
        payloads.append(json.dumps({"worst": [[float(values[i]), ids[i], _pack_grid(grids[i])] for i in order],
                                    "direction": direction}))
    return pa.table({"group": groups, "payload": payloads})


def _pack_grid(grid: np.ndarray) -> str:
    return base64.b64encode(grid.astype(np.float32).tobytes()).decode()


def _unpack_grid(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), np.float32).reshape(GRID, GRID)


def _sample_key(row_id: str) -> float:
    """A uniform pseudo-random key per row id: the same row is sampled the same way in every block split."""
    import hashlib

    return int.from_bytes(hashlib.sha1(row_id.encode()).digest()[:8], "big") / 2 ** 64


def _pack_sample(keys: np.ndarray, grids: np.ndarray) -> dict:
    return {"keys": keys.tolist(), "grids": base64.b64encode(grids.astype(np.float32).tobytes()).decode()}


def _unpack_sample(sample: dict) -> tuple[np.ndarray, np.ndarray]:
    keys = np.asarray(sample["keys"], np.float64)
    grids = np.frombuffer(base64.b64decode(sample["grids"]), np.float32).reshape(len(keys), GRID, GRID)
    return keys, grids


def _merge_one(merged: dict, group: str, p: dict) -> None:
    if "worst" in p:
        entry = merged.setdefault(group, {"worst": [], "direction": p["direction"]})
        entry["worst"] = sorted(entry["worst"] + p["worst"], key=lambda w: -w[0] if p["direction"] == "high" else w[0])
        entry["worst"] = entry["worst"][:WORST_K]
        return
    entry = merged.setdefault(group, {"moments": Moments(0, np.zeros((GRID, GRID)), np.zeros((GRID, GRID))),
                                      "stats": {}})
    entry["moments"] = entry["moments"].merge(Moments(p["count"], np.array(p["mean"]), np.array(p["m2"])))
    if "sample" in p:
        keys, grids = _unpack_sample(p["sample"])
        old_keys, old_grids = entry.get("sample", (np.zeros(0), np.zeros((0, GRID, GRID))))
        keys, grids = np.concatenate([old_keys, keys]), np.concatenate([old_grids, grids])
        order = np.argsort(keys)[:SAMPLE_SIZE]
        entry["sample"] = (keys[order], grids[order])
    for name, (n, total, squares) in p["stats"].items():
        acc = entry["stats"].setdefault(name, [0, 0.0, 0.0])
        acc[0] += n
        acc[1] += total
        acc[2] += squares


def merge_partials(partials) -> dict:
    """Partial rows (a table, or an iterable of tables streamed one at a time, so the driver holds only the
    merged state) -> {group: {"count", "mean_map", "var_map", "stats": {name: {mean, std, n}}, "sample"}}."""
    merged: dict[str, dict] = {}
    for table in ([partials] if isinstance(partials, pa.Table) else partials):
        for group, raw in zip(table["group"].to_pylist(), table["payload"].to_pylist()):
            _merge_one(merged, group, json.loads(raw))
    result = {}
    for group, entry in sorted(merged.items()):
        if "worst" in entry:
            result[group] = {"worst": [{"value": v, "id": i, "grid": _unpack_grid(g)} for v, i, g in entry["worst"]],
                             "direction": entry["direction"]}
            continue
        m = entry["moments"]
        stats = {}
        for name, (n, total, squares) in entry["stats"].items():
            mean = total / n if n else float("nan")
            stats[name] = {"mean": mean, "std": float(np.sqrt(max(squares / n - mean ** 2, 0))) if n else float("nan"),
                           "n": n}
        result[group] = {"count": m.count, "mean_map": m.mean, "var_map": m.variance, "stats": stats}
        if "sample" in entry:
            result[group]["sample"] = entry["sample"][1]
    return result


def cluster_groups(groups: dict, seed: int = 0) -> dict:
    """SpRAy on each group's sample: {group: Clustering} for groups with enough sampled maps."""
    from worker.audit.clusters import spectral_clusters

    return {g: spectral_clusters(v["sample"].reshape(len(v["sample"]), -1), seed=seed)
            for g, v in groups.items() if "sample" in v and len(v["sample"]) >= 20}


def assignment_partials(table: pa.Table, centroids: dict, label_column: str | None = None) -> pa.Table:
    """Assign every map of a block to its class's nearest cluster; per (group, cluster) counts and sums."""
    from worker.audit.clusters import assign

    table, grids = _explained_grids(table)
    rows_out = {"group": [], "cluster": [], "count": [], "grid_sum": []}
    if table.num_rows:
        members: dict[str, list[int]] = {}
        for i, keys in enumerate(group_keys(table, label_column)):
            for kind, cls in keys:
                if f"{kind}:{cls}" in centroids:
                    members.setdefault(f"{kind}:{cls}", []).append(i)
        for group, rows in members.items():
            labels = assign(grids[rows].reshape(len(rows), -1), np.asarray(centroids[group]))
            for c in np.unique(labels):
                chosen = np.asarray(rows)[labels == c]
                rows_out["group"].append(group)
                rows_out["cluster"].append(int(c))
                rows_out["count"].append(len(chosen))
                rows_out["grid_sum"].append(grids[chosen].sum(0).reshape(-1).tolist())
    return pa.table({"group": pa.array(rows_out["group"], pa.string()), "cluster": pa.array(rows_out["cluster"], pa.int64()),
                     "count": pa.array(rows_out["count"], pa.int64()),
                     "grid_sum": pa.array(rows_out["grid_sum"], pa.list_(pa.float64()))})


def merge_assignments(partials) -> dict:
    """{group: [{"cluster", "count", "share", "mean_map"}]} over all rows (a table or an iterable of tables)."""
    totals: dict[tuple, list] = {}
    for table in ([partials] if isinstance(partials, pa.Table) else partials):
        for g, c, n, grid in zip(*(table[k].to_pylist() for k in ("group", "cluster", "count", "grid_sum"))):
            acc = totals.setdefault((g, c), [0, np.zeros(GRID * GRID)])
            acc[0] += n
            acc[1] += np.asarray(grid)
    out: dict[str, list] = {}
    for (g, c), (n, grid) in sorted(totals.items()):
        out.setdefault(g, []).append({"cluster": c, "count": n, "mean_map": (grid / n).reshape(GRID, GRID)})
    for clusters in out.values():
        total = sum(c["count"] for c in clusters)
        for c in clusters:
            c["share"] = c["count"] / total
    return out


def add_cluster_examples(groups: dict, fitted: dict, clusters: dict, per_cluster: int = 3) -> None:
    """Attach to each cluster the sampled maps nearest its centroid (its most typical members)."""
    for group, found in clusters.items():
        if group not in fitted or fitted[group].k < 2:
            continue
        sample = groups[group]["sample"].reshape(len(groups[group]["sample"]), -1)
        centroids = fitted[group].centroids
        for c in found:
            members = np.flatnonzero(fitted[group].labels == c["cluster"])
            distance = ((sample[members] - centroids[c["cluster"]]) ** 2).sum(1)
            c["examples"] = [sample[i].reshape(GRID, GRID) for i in members[np.argsort(distance)[:per_cluster]]]


def _shape_of(mean: np.ndarray) -> tuple[float, float, float]:
    """(border enrichment, centre-of-mass y, x) of a 16 x 16 mean map."""
    edge = frame(GRID, GRID)
    enrichment = float(mean[edge].sum() / (edge.sum() / edge.size)) if mean.sum() > 0 else 0.0
    ys = (np.arange(GRID) + 0.5) / GRID
    total = mean.sum() or 1.0
    return enrichment, float(mean.sum(1) @ ys / total), float(mean.sum(0) @ ys / total)


def _robust_z(values: dict) -> dict:
    """(x - median) / (1.4826 MAD) over the classes; empty with fewer than 5 classes."""
    if len(values) < 5:
        return {}
    x = np.array(list(values.values()))
    median = np.median(x)
    mad = 1.4826 * np.median(np.abs(x - median))
    scale = max(mad, 0.05 * abs(median), 1e-6)
    return {g: (v - median) / scale for g, v in values.items()}


def findings(groups: dict, clusters: dict | None = None) -> list[dict]:
    """Severity-ranked observations on the per-class mean maps and statistics."""
    out = []
    for group, found in (clusters or {}).items():
        if len(found) < 2:
            continue
        for c in found:
            enrichment, cy, cx = _shape_of(c["mean_map"])
            odd = enrichment >= BORDER_ENRICHMENT_FLAG or np.hypot(cy - 0.5, cx - 0.5) >= OFF_CENTRE_FLAG
            if c["share"] <= SMALL_CLUSTER and c["count"] >= 3 and odd:
                out.append({"group": group, "severity": "high", "finding": "small cluster looks elsewhere",
                            "detail": f"cluster {c['cluster']} ({c['count']} maps, {c['share']:.0%} of the class): "
                                      f"border enrichment {enrichment:.1f}, centre (y={cy:.2f}, x={cx:.2f})"})
    for kind in ("true", "predicted"):
        members = {g: v for g, v in groups.items() if g.startswith(kind + ":") and v["count"]}
        if not members:
            continue
        shape = {g: _shape_of(v["mean_map"]) for g, v in members.items()}
        measures = {
            "border-heavy": {g: s[0] for g, s in shape.items()},
            "off-centre": {g: float(np.hypot(s[1] - 0.5, s[2] - 0.5)) for g, s in shape.items()},
        }
        absolute = {"border-heavy": BORDER_ENRICHMENT_FLAG, "off-centre": OFF_CENTRE_FLAG}
        for name, values in measures.items():
            median = float(np.median(list(values.values())))
            z = {g: v for g, v in _robust_z(values).items() if values[g] - median >= MIN_EFFECT[name]}
            for g, value in values.items():
                enrichment, cy, cx = shape[g]
                where = f"border enrichment {enrichment:.2f}, centre of mass (y={cy:.2f}, x={cx:.2f})"
                if value >= absolute[name]:
                    out.append({"group": g, "severity": "high", "finding": name, "detail": where})
                elif z.get(g, 0) >= OUTLIER_Z:
                    out.append({"group": g, "severity": "medium", "finding": f"{name} compared with other classes",
                                "detail": f"{where}; robust z = {z[g]:.1f} over {len(values)} classes"})
        for g, v in members.items():
            mask = v["stats"].get("energy_in_mask")
            if mask and mask["n"] and mask["mean"] < MASK_ENERGY_FLAG:
                out.append({"group": g, "severity": "high", "finding": "mass outside masks",
                            "detail": f"mean energy inside the ground-truth masks is {mask['mean']:.2f}"})
    return sorted(out, key=lambda f: (f["severity"] != "high", f["group"]))


def sample_images(metadata: dict, n: int) -> np.ndarray:
    """The first ``n`` decodable images of the job's input, at the model's input size."""
    from worker.data.dataset import plan, read_unit
    from worker.data.decode import DecodeError, DecodeOptions
    from worker.job.stages import image_cells

    job, options = metadata["job"], DecodeOptions.from_dict(metadata["decode"])
    fs, units, _ = plan(job["input"], [job["image_column"]])
    images = []
    for unit in units:
        table = read_unit(fs, unit, [job["image_column"]], None)
        for cell in image_cells(table[job["image_column"]]):
            try:
                images.append(options.decode(cell))
            except DecodeError:
                continue
            if len(images) == n:
                return np.stack(images)
    return np.stack(images) if images else np.zeros((0, *options.size, 3), np.uint8)


def run_record(metadata: dict):
    """The job's :class:`~worker.job.config.JobConfig` from an output's metadata (None if it has none)."""
    from worker.job.config import JobConfig

    return JobConfig.from_dict(metadata["config"]) if "config" in metadata else None


def _read_files(batch: pa.Table, *, fs) -> pa.Table:
    return pa.concat_tables([pq.read_table(p, filesystem=fs) for p in batch["path"].to_pylist()],
                            promote_options="permissive")


def _read_outputs(fs, files):
    """A Ray Dataset of committed output files, one block per file, read with pyarrow in the tasks (Ray's
    ``read_parquet(filesystem=...)`` probes fsspec's HTTP module, which fails without aiohttp)."""
    import ray

    return ray.data.from_items([{"path": f} for f in files], override_num_blocks=len(files)).map_batches(
        _read_files, batch_size=1, batch_format="pyarrow", fn_kwargs={"fs": fs})


def run_audit(output: str, report_dir: str | None = None, label_column: str | None = None,
              controls: int = 0, model: str | None = None) -> dict:
    """Aggregate a job's output with Ray Data; write audit.json and report.html to ``report_dir``.

    ``label_column`` defaults to the job's. ``controls=N`` adds the sanity controls of :mod:`worker.audit.controls`
    on the first N input images, with the engine the job used, rebuilt from its run record (``model``
    defaults to the job's model; a remote one is fetched)."""

    from worker.data import sink, storage
    fs, root = storage.filesystem(output)
    files = sink.committed_files(fs, root)
    if not files:
        raise ValueError(f"{output} holds no committed output files")
    metadata = read_metadata(pq.read_schema(files[0], filesystem=fs)) or {}
    config = run_record(metadata)
    if label_column is None:
        label_column = config.label_column if config is not None else "label"
    from worker.job.resources import connect

    connect(logging_level="ERROR")
    partials = _read_outputs(fs, files).map_batches(partial_aggregates, batch_format="pyarrow", batch_size=1024,
                                                    fn_kwargs={"label_column": label_column})
    merged = merge_partials(partials.iter_batches(batch_format="pyarrow", batch_size=None))
    fitted = cluster_groups(merged)
    centroids = {g: c.centroids.tolist() for g, c in fitted.items() if c.k > 1}
    clusters = {g: [{"cluster": 0, "count": merged[g]["count"], "share": 1.0, "mean_map": merged[g]["mean_map"]}]
                for g, c in fitted.items() if c.k == 1}
    if centroids:
        assigned = _read_outputs(fs, files).map_batches(
            assignment_partials, batch_format="pyarrow", batch_size=1024,
            fn_kwargs={"centroids": centroids, "label_column": label_column})
        clusters.update(merge_assignments(assigned.iter_batches(batch_format="pyarrow", batch_size=None)))
    add_cluster_examples(merged, fitted, clusters)
    result = {"output": output, "groups": merged, "clusters": clusters, "findings": findings(merged, clusters),
              "metadata": metadata}
    if controls:
        from worker.audit.controls import run_controls

        if config is None:
            raise ValueError(f"{output} was written without a run record (an older version): the controls "
                             "cannot rebuild its engine; run the job again into a new output")
        from worker.data.storage import fetch_model
        from worker.job.config import build_engine

        images = sample_images(metadata, controls)
        model_path = fetch_model(model or config.model)

        def make_engine(source=None, **overrides):
            """The job's engine (same method and options) on ``source`` (default: the job's model)."""
            return build_engine(config, model_path if source is None else source,
                                **{"batch_size": min(32, max(1, len(images))), **overrides})

        result["controls"] = run_controls(make_engine, images, safe_mode=not config.allow_unsafe_deserialization)
    if report_dir:
        write_report(result, report_dir)
    return result


def _png(grid: np.ndarray, vmax: float) -> str:
    from PIL import Image

    from worker.audit.colormap import hot

    image = Image.fromarray(hot(grid, vmax)).resize((128, 128), Image.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def aggregate_tables(result: dict) -> dict[str, pa.Table]:
    """The audit's numbers as Arrow tables: ``classes`` (one row per group: count, 16x16 mean and variance
    maps, mean/std of every statistic), ``clusters`` and ``findings``."""
    rows = []
    for group, v in result["groups"].items():
        if "count" not in v:
            continue
        kind, cls = group.split(":", 1)
        row = {"group": group, "kind": kind, "class": int(cls), "count": v["count"],
               "mean_map": v["mean_map"].astype(np.float32).reshape(-1).tolist(),
               "var_map": v["var_map"].astype(np.float32).reshape(-1).tolist()}
        for name, stat in v["stats"].items():
            row[f"{name}_mean"], row[f"{name}_std"] = stat["mean"], stat["std"]
        rows.append(row)
    classes = pa.Table.from_pylist(rows)
    grid_type = pa.fixed_shape_tensor(pa.float32(), [GRID, GRID])
    for name in ("mean_map", "var_map"):
        if classes.num_rows:
            storage = pa.array(classes[name].to_pylist(), pa.list_(pa.float32(), GRID * GRID))
            classes = classes.set_column(classes.schema.get_field_index(name), name,
                                         pa.ExtensionArray.from_storage(grid_type, storage))
    clusters = pa.Table.from_pylist([{"group": g, "cluster": c["cluster"], "count": c["count"], "share": c["share"]}
                                     for g, cs in result.get("clusters", {}).items() for c in cs])
    return {"classes": classes, "clusters": clusters, "findings": pa.Table.from_pylist(result["findings"])}


def _controls_html(controls: dict | None) -> str:
    if not controls:
        return "<h2>Controls</h2><p>not run (audit --controls N)</p>"
    rows = "".join(f"<tr><td>{html.escape(name)}</td><td>{v['spearman']:.3f}</td><td>{v['ssim']:.3f}</td></tr>"
                   for name, v in controls["similarity_to_real"].items())
    return (f"<h2>Controls</h2><p>{controls['images']} images; extra cost: {html.escape(controls['extra_model_cost'])}. "
            "High similarity of the real maps to a control means the maps say little about the model or the class "
            "(guided backprop is known to reconstruct edges and to pass the model-randomisation test poorly).</p>"
            f"<table><tr><th>control</th><th>Spearman</th><th>SSIM</th></tr>{rows}</table>")


def write_report(result: dict, report_dir: str) -> None:
    """audit.json and classes/clusters/findings.parquet (numbers) and report.html (one self-contained page)."""
    import os

    os.makedirs(report_dir, exist_ok=True)
    groups = result["groups"]
    serial = {g: ({"count": v["count"], "mean_map": v["mean_map"].tolist(), "stats": v["stats"]} if "count" in v else
                  {"direction": v["direction"], "worst": [{"value": w["value"], "id": w["id"]} for w in v["worst"]]})
              for g, v in groups.items()}
    clusters = result.get("clusters", {})
    serial_clusters = {g: [{"cluster": c["cluster"], "count": c["count"], "share": c["share"],
                            "mean_map": c["mean_map"].tolist()} for c in cs] for g, cs in clusters.items()}
    import pyarrow.parquet as pq

    for name, table in aggregate_tables(result).items():
        if table.num_columns:
            pq.write_table(table, os.path.join(report_dir, f"{name}.parquet"))
    with open(os.path.join(report_dir, "audit.json"), "w") as f:
        json.dump({"output": result["output"], "groups": serial, "clusters": serial_clusters,
                   "findings": result["findings"], "controls": result.get("controls")}, f, indent=1)
    kind = "true:" if any(g.startswith("true:") for g in groups) else "predicted:"
    shown = {g: v for g, v in groups.items() if g.startswith(kind)}
    vmax = max((float(v["mean_map"].max()) for v in shown.values()), default=1.0)
    meta = result["metadata"]
    card = {"model fingerprint": meta.get("model", {}).get("fingerprint"), "method": meta.get("method"),
            "target": meta.get("target"), "score": meta.get("score"), "output": result["output"],
            "rows": sum(v["count"] for g, v in groups.items() if g.startswith("predicted:"))}
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in card.items())
    tiles = "".join(
        f'<figure><img alt="{html.escape(g)}" src="data:image/png;base64,{_png(v["mean_map"], vmax)}">'
        f"<figcaption>{html.escape(g)} (n={v['count']})</figcaption></figure>" for g, v in shown.items())
    def figure(grid, caption, top=None):
        return (f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,'
                f'{_png(grid, top if top is not None else float(grid.max()))}"><figcaption>{html.escape(caption)}'
                "</figcaption></figure>")

    cluster_rows = "".join(
        f"<div><h3>{html.escape(g)}: {len(cs)} cluster(s)</h3>" + "".join(
            figure(c["mean_map"], f"cluster {c['cluster']}: {c['count']} maps ({c['share']:.0%}), mean", vmax)
            + "".join(figure(e, f"cluster {c['cluster']}: typical member") for e in c.get("examples", []))
            + "<br>" for c in cs) + "</div>"
        for g, cs in clusters.items() if len(cs) > 1)
    worst = "".join(
        f"<h3>{html.escape(g.split(':', 1)[1])} ({v['direction']}est)</h3>" + "".join(
            figure(w["grid"], f"{w['id']}: {w['value']:.3g}") for w in v["worst"])
        for g, v in groups.items() if g.startswith("worst:"))
    found = "".join(f"<tr><td>{f['severity']}</td><td>{html.escape(f['group'])}</td><td>{f['finding']}</td>"
                    f"<td>{html.escape(f['detail'])}</td></tr>" for f in result["findings"]) or \
        "<tr><td colspan=4>no findings</td></tr>"
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>Saliency audit</title>
<style>body{{font-family:sans-serif;margin:2em}}figure{{display:inline-block;margin:.5em;text-align:center}}
img{{image-rendering:pixelated;border:1px solid #ccc}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:.3em .6em;text-align:left}}</style></head><body>
<h1>Saliency audit</h1><h2>Run card</h2><table>{rows}</table>
<h2>Findings</h2><table><tr><th>severity</th><th>group</th><th>finding</th><th>detail</th></tr>{found}</table>
<h2>Mean maps per class</h2><p>L1-normalised maps averaged on a 16 x 16 grid, one colour scale for all
(max {vmax:.4f}).</p>{tiles}
<h2>Worst cases per statistic</h2><p>Each map on its own colour scale; the row id names it in the output.</p>
{worst or "<p>no statistics columns in this output</p>"}
{_controls_html(result.get("controls"))}
<h2>Clusters (spectral relevance analysis)</h2><p>Per class: a uniform sample of at most {SAMPLE_SIZE} maps is
clustered (kNN graph, normalised Laplacian, eigengap for k, k-means); every map is then assigned to its nearest
cluster. Classes with one cluster are not shown.</p>{cluster_rows or "<p>no class splits into clusters</p>"}
</body></html>"""
    with open(os.path.join(report_dir, "report.html"), "w") as f:
        f.write(page)
