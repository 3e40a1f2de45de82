"""Partial aggregates of a job's output, merged exactly: what the audit computes per block, out of core.

Each block of the output is reduced to one row per group (true class, predicted class, correct or wrong):
the count, mean and M2 of the L1-normalised maps downsampled to 16 x 16, and of every statistic column (its
finite values), and a uniform sample of the maps for clustering; plus, per statistic, the worst
rows.  Rows are Arrow (:data:`PARTIAL_SCHEMA`, list columns, no JSON) and merge exactly (Chan et al.'s
parallel variance), so any number of rows fits in memory: the driver's state is bounded by the groups (moments,
statistics' moments, :data:`SAMPLE_SIZE` sampled maps and :data:`WORST_K` worst cases each), and the samples' caps
(:func:`sample_caps`), handed to the tasks as they tighten, keep what each block sends small too.  numpy and
pyarrow only: testable without Ray.

Examples:
    >>> a = Moments.of(np.ones((2, 2, 2))); b = Moments.of(np.zeros((2, 2, 2)))
    >>> m = a.merge(b); (m.count, float(m.mean[0, 0]), float(m.variance[0, 0]))
    (4, 0.5, 0.25)
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from worker.audit.clusters import Cluster
from worker.data.schema import maps_to_numpy
from worker.data.stats import MASK_COLUMNS, STAT_COLUMNS, magnitude

GRID = 16
CELLS = GRID * GRID
SAMPLE_SIZE = 1000  # maps per class kept (uniformly, out of core) for clustering
WORST = {"border_enrichment": "high", "energy_in_mask": "low", "entropy_norm": "low"}  # worst cases shown
WORST_K = 6

_F64, _F32 = pa.list_(pa.float64()), pa.list_(pa.float32())
#: a group's columns: its kind, and its class as an index or, for a label that names no class, as that name
GROUP_FIELDS = [("kind", pa.string()), ("class_index", pa.int64()), ("class_name", pa.string())]
#: one row per (block, group); a ``worst`` row (kind "worst") carries only its statistic, the worst_* columns and
#: direction
PARTIAL_SCHEMA = pa.schema([
    *GROUP_FIELDS, ("statistic", pa.string()), ("count", pa.int64()), ("mean", _F64), ("m2", _F64),
    ("stat_name", pa.list_(pa.string())), ("stat_n", pa.list_(pa.int64())), ("stat_mean", _F64),
    ("stat_m2", _F64),
    ("sample_key", _F64), ("sample_grid", _F32),  # grids flattened, GRID * GRID values each
    ("worst_value", _F64), ("worst_id", pa.list_(pa.string())), ("worst_grid", _F32), ("direction", pa.string()),
])
ASSIGNMENT_SCHEMA = pa.schema([*GROUP_FIELDS, ("cluster", pa.int64()), ("count", pa.int64()), ("grid_sum", _F64),
                               ("ids", pa.list_(pa.string()))])
#: cluster_members.parquet: every explained map's cluster in each group split into clusters
MEMBER_SCHEMA = pa.schema([("id", pa.string()), *GROUP_FIELDS, ("cluster", pa.int64())])
KINDS = ("predicted", "true", "correct", "wrong")


@dataclass(frozen=True)
class Group:
    """A group of rows: its ``kind`` (one of :data:`KINDS`: by predicted class, true class, and the true class of
    the rows predicted right or wrong) and its class: a class index, or the label itself where the label names no
    class the model has (a string label and no recorded class names)."""

    kind: str
    cls: int | str

    def __lt__(self, other: "Group") -> bool:
        return self._order() < other._order()

    def _order(self) -> tuple:
        return KINDS.index(self.kind), isinstance(self.cls, str), str(self.cls).zfill(12)

    def name(self, names=None) -> str:
        """The class as the report names it: the index with its recorded name (``names``, the job's class names)
        when there is one, ``2 (triangle)``; else the index or the label."""
        if isinstance(self.cls, str):
            return self.cls
        return f"{self.cls} ({names[self.cls]})" if names and 0 <= self.cls < len(names) else str(self.cls)

    def title(self, names=None) -> str:
        """Kind and class, for a heading or a table cell: ``true: 2 (triangle)``."""
        return f"{self.kind}: {self.name(names)}"

    @classmethod
    def of(cls, columns: dict) -> "Group":
        """The group whose :meth:`columns` are in ``columns`` (a finding, a row of a table)."""
        index = columns["class_index"]
        return cls(columns["kind"], int(index) if index is not None else columns["class_name"])

    def columns(self, names=None) -> dict:
        """The :data:`GROUP_FIELDS` of this group, plain values (a finding or a table row carries them): the class
        index, and the class's name (the label itself, or the index's recorded name in ``names``; else None)."""
        if isinstance(self.cls, str):
            return {"kind": self.kind, "class_index": None, "class_name": self.cls}
        index = int(self.cls)
        return {"kind": self.kind, "class_index": index,
                "class_name": names[index] if names and 0 <= index < len(names) else None}


@dataclass(frozen=True)
class Worst:
    """The rows worst on one statistic (its merged worst cases are keyed by this)."""

    statistic: str


@dataclass(frozen=True)
class Statistic:
    """A statistic column's merged ``mean`` and (population) ``std`` over its ``n`` finite values (NaN without
    any)."""

    mean: float
    std: float
    n: int

    def to_dict(self) -> dict:
        return {"mean": self.mean, "std": self.std, "n": self.n}


@dataclass(frozen=True)
class GroupSummary:
    """A group's merged aggregates: its ``count`` of maps, their 16 x 16 ``mean_map`` and ``var_map`` (each map
    L1-normalised), every statistic column's :class:`Statistic`, and the uniform ``sample`` of its maps kept for
    clustering ((n, 16, 16) float32; None for the groups not clustered)."""

    count: int
    mean_map: np.ndarray = field(repr=False)
    var_map: np.ndarray = field(repr=False)
    stats: dict[str, Statistic] = field(repr=False)
    sample: np.ndarray | None = field(default=None, repr=False)


@dataclass(frozen=True)
class WorstCase:
    """One of the rows worst on a statistic: its ``value``, row ``id``, downsampled map ``grid`` and, once the
    audit has read it back, the input ``image`` (None when the input cannot be read)."""

    value: float
    id: str
    grid: np.ndarray = field(repr=False)
    image: np.ndarray | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        return {"value": self.value, "id": self.id}


@dataclass(frozen=True)
class WorstCases:
    """The :data:`WORST_K` rows worst on one statistic, worst first; ``direction`` "high" or "low"."""

    direction: str
    worst: list[WorstCase]

    def to_dict(self) -> dict:
        return {"direction": self.direction, "worst": [w.to_dict() for w in self.worst]}


def _group_of(kind: str, index, name):
    return Worst(name) if kind == "worst" else Group(kind, int(index) if index is not None else name)


def _order(key) -> tuple:
    return key._order() if isinstance(key, Group) else (key.statistic,)


def resolve(label, names=None):
    """A label as a class: a whole number as its index, a string as its index in ``names`` (the job's recorded
    class names) when it is one of them, else the string itself; None when missing (an empty string too).

        >>> resolve(3), resolve(3.0), resolve("cat", ["dog", "cat"]), resolve("cow", ["dog", "cat"]), resolve("")
        (3, 3, 1, 'cow', None)
    """
    if label is None or isinstance(label, bool):
        return None if label is None else int(label)
    if isinstance(label, str):
        if not label.strip():
            return None
        return names.index(label) if names and label in names else label
    if isinstance(label, float):  # 3.0 is class 3 (a column with gaps read as floats); NaN is missing
        if not np.isfinite(label):
            return None
        return int(label) if label == int(label) else str(label)
    return int(label)


@dataclass
class Moments:
    """Count, mean and M2 (the sum of squared deviations from the mean) of arrays, per element; ``merge``
    combines two partial results exactly and stably (Chan, Golub and LeVeque's pairwise update).  ``count`` is an
    int, or an array of per-element counts where values may be missing (:meth:`of_finite`).  The audit's one
    variance merge: the maps' moments and the statistics' both merge here."""

    count: int | np.ndarray
    mean: np.ndarray
    m2: np.ndarray

    @classmethod
    def of(cls, values: np.ndarray) -> "Moments":
        """Of ``values`` (n, ...) along the first axis, two-pass."""
        values = np.asarray(values, np.float64)
        if not len(values):
            return cls(0, np.zeros(values.shape[1:]), np.zeros(values.shape[1:]))
        mean = values.mean(0)
        return cls(len(values), mean, ((values - mean) ** 2).sum(0))

    @classmethod
    def of_finite(cls, values: np.ndarray) -> "Moments":
        """Of the finite ``values`` (n, ...) of each element along the first axis (NaN and inf left out)."""
        values = np.asarray(values, np.float64)
        finite = np.isfinite(values)
        count = finite.sum(0)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(count > 0, np.where(finite, values, 0.0).sum(0) / np.maximum(count, 1), 0.0)
        m2 = np.where(finite, (np.where(finite, values, 0.0) - mean) ** 2, 0.0).sum(0)
        return cls(count, mean, m2)

    def merge(self, other: "Moments") -> "Moments":
        if np.ndim(self.count) == 0 and np.ndim(other.count) == 0:
            if not other.count:
                return self
            if not self.count:
                return other
        n = np.add(self.count, other.count)
        n = int(n) if np.ndim(n) == 0 else n
        share = np.divide(other.count, n, out=np.zeros(np.shape(n)), where=np.asarray(n) > 0)
        delta = other.mean - self.mean
        return Moments(n, self.mean + delta * share, self.m2 + other.m2 + delta ** 2 * self.count * share)

    @property
    def variance(self) -> np.ndarray:
        """Population variance (M2 / count); NaN where the count is 0."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(np.asarray(self.count) > 0, self.m2 / np.maximum(self.count, 1), np.nan)


CHUNK_VALUES = 1 << 22  # pixels downsampled at a time (32 MB of float64), whatever the block's size


def _magnitude(maps: np.ndarray) -> np.ndarray:
    """:func:`~worker.data.stats.magnitude` in fewer passes: |maps| as float64, NaN as 0 (and inf as the
    largest float, as ``nan_to_num`` does), channels reduced by max-abs."""
    s = np.asarray(maps, np.float64)
    if not np.isfinite(s).all():
        return magnitude(maps)
    s = np.abs(s, out=s if s is not maps else None)
    return s.max(axis=-1) if s.ndim == 4 else s


def downsample(maps: np.ndarray, grid: int = GRID) -> np.ndarray:
    """(N, H, W) -> (N, grid, grid) by area averaging, each map L1-normalised (sums to 1).

    Pixel (y, x) goes to cell (y * grid // H, x * grid // W); the cells are contiguous runs of pixels, so the
    sums are reshapes (H and W multiples of ``grid``) or ``reduceat`` over the runs, in chunks of
    :data:`CHUNK_VALUES` pixels (a cell no pixel falls in, when H or W < grid, leaves the map all zero)."""
    n, h, w = maps.shape[:3]
    ys = np.minimum((np.arange(h) * grid) // h, grid - 1)
    xs = np.minimum((np.arange(w) * grid) // w, grid - 1)
    sums = np.zeros((n, grid, grid))
    y_runs, x_runs = np.flatnonzero(np.diff(ys, prepend=-1)), np.flatnonzero(np.diff(xs, prepend=-1))
    step = max(1, CHUNK_VALUES // max(1, int(np.prod(maps.shape[1:]))))
    for a in range(0, n, step):
        s = _magnitude(maps[a:a + step])
        if h % grid == 0 and w % grid == 0:
            sums[a:a + step] = s.reshape(len(s), grid, h // grid, grid, w // grid).sum((2, 4))
        else:
            cells = np.add.reduceat(np.add.reduceat(s, y_runs, axis=1), x_runs, axis=2)
            sums[a:a + step, ys[y_runs][:, None], xs[x_runs][None, :]] = cells
    with np.errstate(invalid="ignore", divide="ignore"):
        sums /= np.bincount(ys, minlength=grid)[:, None] * np.bincount(xs, minlength=grid)[None, :]
    total = sums.sum((1, 2), keepdims=True)
    return np.divide(sums, total, out=np.zeros_like(sums), where=total > 0)


def _explained_grids(table: pa.Table) -> tuple[pa.Table, np.ndarray]:
    """The rows without an error, and their maps downsampled (the first map of each ``top:K`` row)."""
    table = table.filter(pa.compute.is_null(table["error"]))
    maps = maps_to_numpy(table["map"])
    if maps.ndim == 4 and maps.shape[-1] not in (1, 3):  # (K, H, W) maps of top:K
        maps = maps[:, 0]
    return table, downsample(maps)


def _classes(column: pa.ChunkedArray, names) -> tuple[np.ndarray, list]:
    """(codes, classes): each row's code (-1 where null) into the column's distinct values resolved as classes
    (:func:`resolve`), by Arrow's dictionary encoding (no loop over the rows)."""
    encoded = pa.compute.dictionary_encode(column.combine_chunks())
    codes = encoded.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    return codes, [resolve(v, names) for v in encoded.dictionary.to_pylist()]


def group_members(table: pa.Table, label_column: str | None, names=None) -> dict[Group, np.ndarray]:
    """{group: its rows, ascending}: every row in ``Group("predicted", its class)``, and with a label ``Group("true",
    the label as a class)`` (:func:`resolve` with the job's class ``names``) and, when the label is a class index,
    ``Group("correct" | "wrong", it)``. Rows with a missing class are in no group of that kind."""
    members: dict[Group, np.ndarray] = {}

    def split(kind, codes, classes, rows):
        order = np.argsort(codes, kind="stable")
        found, starts = np.unique(codes[order], return_index=True)
        for code, part in zip(found, np.split(order, starts[1:])):
            if code >= 0 and classes[code] is not None:
                group = Group(kind, classes[code])
                members[group] = np.sort(np.concatenate([members[group], rows[part]])) if group in members \
                    else rows[part]

    everything = np.arange(table.num_rows)
    predicted, predicted_classes = _classes(table["predicted_class"], None)
    split("predicted", predicted, predicted_classes, everything)
    if label_column and label_column in table.column_names:
        codes, classes = _classes(table[label_column], names)
        split("true", codes, classes, everything)
        label_index = np.array([c if isinstance(c, int) else -1 for c in classes] + [-1], np.int64)[codes]
        predicted_index = np.array([c if isinstance(c, int) else -2 for c in predicted_classes] + [-2],
                                   np.int64)[predicted]
        indexed = label_index >= 0
        right = indexed & (label_index == predicted_index)
        wrong = indexed & ~right
        split("correct", np.where(right, codes, -1), classes, everything)
        split("wrong", np.where(wrong, codes, -1), classes, everything)
    return members


def _sample_key(row_id: str) -> float:
    """A uniform pseudo-random key per row id: the same row is sampled the same way in every block split."""
    return int.from_bytes(hashlib.sha1(row_id.encode()).digest()[:8], "big") / 2 ** 64


def sample_keys(ids) -> np.ndarray:
    """:func:`_sample_key` of many ids at once: the first 8 bytes of each SHA-1 read as big-endian uint64 by
    numpy (the same float: both round the 64-bit integer to nearest, and dividing by 2**64 is exact)."""
    digests = b"".join(hashlib.sha1(i.encode()).digest()[:8] for i in ids)
    return np.frombuffer(digests, ">u8").astype(np.float64) / 2 ** 64


def _table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    """Rows of numpy arrays and scalars as an Arrow table of ``schema`` (missing keys are null)."""
    columns = {}
    for field in schema:
        values = [row.get(field.name) for row in rows]
        if pa.types.is_list(field.type):
            values = [None if v is None else np.asarray(v).reshape(-1) for v in values]
        columns[field.name] = pa.array(values, field.type)
    return pa.table(columns, schema=schema)


def _lists(table: pa.Table, name: str, shape: tuple = (-1,)) -> list:
    """The cells of a list column as numpy arrays of ``shape``, None where null."""
    column = table[name].combine_chunks()
    values, offsets = column.values.to_numpy(zero_copy_only=False), column.offsets.to_numpy()
    valid = column.is_valid().to_numpy(zero_copy_only=False)
    return [values[offsets[i]:offsets[i + 1]].reshape(shape) if valid[i] else None for i in range(len(column))]


def partial_aggregates(table: pa.Table, label_column: str | None = None, caps: dict | None = None,
                       names=None) -> pa.Table:
    """One output block -> one row of :data:`PARTIAL_SCHEMA` per group (:func:`group_members`, labels resolved with
    the job's class ``names``; a Ray Data map_batches function).

    ``caps`` ({group: key}, from :func:`sample_caps` of what is merged so far) leaves out of a group's sample the
    rows whose key is above its cap: they cannot be among the group's :data:`SAMPLE_SIZE` smallest keys, so the
    merged sample is the same, and a block sends a few sampled maps instead of all of a small group's."""
    table, grids = _explained_grids(table)
    if not table.num_rows:
        return PARTIAL_SCHEMA.empty_table()
    stat_names = [c for c in (*STAT_COLUMNS, *MASK_COLUMNS) if c in table.column_names]
    stats = np.stack([table[c].to_numpy(zero_copy_only=False).astype(np.float64) for c in stat_names], 1) \
        if stat_names else np.zeros((table.num_rows, 0))
    finite = np.isfinite(stats)
    members = group_members(table, label_column, names)
    ids = table["id"].to_pylist()
    keys = sample_keys(ids)
    cluster_kind = "true" if any(group.kind == "true" for group in members) else "predicted"
    rows = []
    for group, chosen in members.items():
        moments = Moments.of(grids[chosen])
        stat_moments = Moments.of_finite(stats[chosen])
        row = {**group.columns(), "count": moments.count, "mean": moments.mean, "m2": moments.m2,
               "stat_name": np.array(stat_names, object), "stat_n": stat_moments.count,
               "stat_mean": stat_moments.mean, "stat_m2": stat_moments.m2}
        if group.kind == cluster_kind:
            if caps and group in caps:
                chosen = chosen[keys[chosen] <= caps[group]]
            keep = chosen[np.argsort(keys[chosen])[:SAMPLE_SIZE]]
            row.update(sample_key=keys[keep], sample_grid=grids[keep].astype(np.float32))
        rows.append(row)
    for j, name in enumerate(stat_names):
        if name in WORST:
            direction, values = WORST[name], stats[:, j]
            order = np.flatnonzero(finite[:, j])
            order = order[np.argsort(-values[order] if direction == "high" else values[order], kind="stable")]
            order = order[:WORST_K]
            rows.append({"kind": "worst", "statistic": name, "worst_value": values[order],
                         "worst_id": np.array([ids[i] for i in order], object), "worst_grid": grids[order].astype(np.float32),
                         "direction": direction})
    return _table(rows, PARTIAL_SCHEMA)


def sample_caps(merged: dict) -> dict[Group, float]:
    """{group: the largest key of its sample} for the groups whose merged sample (``merge_partials``'s state,
    ``state=True``) is full: a later row with a larger key cannot enter it."""
    return {g: float(e["sample"][0][-1]) for g, e in merged.items()
            if "sample" in e and len(e["sample"][0]) >= SAMPLE_SIZE}


def merge_partials(partials, on_caps=None) -> dict:
    """Partial rows (a table, or an iterable of tables streamed one at a time, so the driver holds only the
    merged state) -> {:class:`Group`: :class:`GroupSummary`} and {:class:`Worst`: :class:`WorstCases`}; groups in
    order, then the worst cases.

    What is kept is copied out of each table (no view pins a block's buffers) and is bounded by the groups:
    moments, :data:`SAMPLE_SIZE` sampled maps and :data:`WORST_K` worst cases each. ``on_caps``, if
    given, is called with :func:`sample_caps` whenever a group's cap changes (the audit hands them to the tasks
    still to run, so that they send fewer sampled maps)."""
    merged: dict = {}
    caps: dict[Group, float] = {}
    for table in ([partials] if isinstance(partials, pa.Table) else partials):
        if not table.num_rows:
            continue
        groups = [_group_of(kind, index, name or statistic) for kind, index, name, statistic in zip(
            *(table[c].to_pylist() for c in ("kind", "class_index", "class_name", "statistic")))]
        counts, directions = table["count"].to_pylist(), table["direction"].to_pylist()
        means, m2s = _lists(table, "mean", (GRID, GRID)), _lists(table, "m2", (GRID, GRID))
        names, ns = table["stat_name"].to_pylist(), table["stat_n"].to_pylist()
        stat_means, stat_m2s = table["stat_mean"].to_pylist(), table["stat_m2"].to_pylist()
        keys, samples = _lists(table, "sample_key"), _lists(table, "sample_grid", (-1, GRID, GRID))
        worst_values, worst_ids = table["worst_value"].to_pylist(), table["worst_id"].to_pylist()
        worst_grids = _lists(table, "worst_grid", (-1, GRID, GRID))
        for i, group in enumerate(groups):
            if isinstance(group, Worst):
                entry = merged.setdefault(group, {"worst": [], "direction": directions[i]})
                entry["worst"] += [{"value": v, "id": r, "grid": np.array(g)}
                                   for v, r, g in zip(worst_values[i], worst_ids[i], worst_grids[i])]
                entry["worst"].sort(key=lambda w: -w["value"] if directions[i] == "high" else w["value"])
                del entry["worst"][WORST_K:]
                continue
            entry = merged.setdefault(group, {"moments": Moments(0, np.zeros((GRID, GRID)), np.zeros((GRID, GRID))),
                                              "stats": {}})
            entry["moments"] = entry["moments"].merge(Moments(counts[i], np.array(means[i]), np.array(m2s[i])))
            if keys[i] is not None:
                old_keys, old_grids = entry.get("sample", (np.zeros(0), np.zeros((0, GRID, GRID), np.float32)))
                all_keys, all_grids = np.concatenate([old_keys, keys[i]]), np.concatenate([old_grids, samples[i]])
                order = np.argsort(all_keys)[:SAMPLE_SIZE]
                entry["sample"] = (all_keys[order], all_grids[order])
            for name, n, mean, m2 in zip(names[i], ns[i], stat_means[i], stat_m2s[i]):
                part = Moments(n, np.float64(mean), np.float64(m2))
                entry["stats"][name] = entry["stats"][name].merge(part) if name in entry["stats"] else part
        del table, means, m2s, keys, samples, worst_grids
        if on_caps is not None and sample_caps(merged) != caps:
            caps = sample_caps(merged)
            on_caps(caps)
    result = {}
    for group, entry in sorted(merged.items(), key=lambda kv: (isinstance(kv[0], Worst), _order(kv[0]))):
        if "worst" in entry:
            result[group] = WorstCases(entry["direction"], [WorstCase(**w) for w in entry["worst"]])
            continue
        m = entry["moments"]
        stats = {}
        for name, moments in entry["stats"].items():
            n = int(moments.count)
            stats[name] = Statistic(float(moments.mean) if n else float("nan"), float(np.sqrt(moments.variance)), n)
        result[group] = GroupSummary(int(m.count), m.mean, m.variance, stats,
                                     entry["sample"][1] if "sample" in entry else None)
    return result


def assignment_partials(table: pa.Table, centroids: dict, label_column: str | None = None, names=None,
                        with_ids: bool = False) -> pa.Table:
    """Assign every map of a block to its group's nearest cluster (``centroids``: {group: (k, cells)}); per (group,
    cluster) counts and sums, and with ``with_ids`` the members' ids (for :func:`cluster_members`)."""
    from worker.audit.clusters import assign

    table, grids = _explained_grids(table)
    rows_out = []
    if table.num_rows:
        ids = table["id"].to_numpy(zero_copy_only=False) if with_ids else None
        for group, rows in group_members(table, label_column, names).items():
            if group not in centroids:
                continue
            labels = assign(grids[rows].reshape(len(rows), -1), np.asarray(centroids[group]))
            for c in np.unique(labels):
                chosen = rows[labels == c]
                rows_out.append({**group.columns(), "cluster": int(c), "count": len(chosen),
                                 "grid_sum": grids[chosen].sum(0), "ids": None if ids is None else ids[chosen]})
    return _table(rows_out, ASSIGNMENT_SCHEMA)


def cluster_members(partials: pa.Table) -> pa.Table:
    """The rows of :data:`MEMBER_SCHEMA` in partials of :func:`assignment_partials`: one per (map, group)."""
    parents = pa.compute.list_parent_indices(partials["ids"])
    return pa.table({"id": pa.compute.list_flatten(partials["ids"]),
                     **{name: partials[name].take(parents) for name in MEMBER_SCHEMA.names[1:]}},
                    schema=MEMBER_SCHEMA)


def merge_assignments(partials) -> dict:
    """{:class:`Group`: [:class:`~worker.audit.clusters.Cluster`]} over all rows (a table or an iterable of
    tables)."""
    totals: dict[tuple, list] = {}
    for table in ([partials] if isinstance(partials, pa.Table) else partials):
        if not table.num_rows:
            continue
        grids = _lists(table, "grid_sum")
        columns = (table[k].to_pylist() for k in ("kind", "class_index", "class_name", "cluster", "count"))
        for kind, index, name, c, n, grid in zip(*columns, grids):
            acc = totals.setdefault((_group_of(kind, index, name), c), [0, np.zeros(CELLS)])
            acc[0] += n
            acc[1] += grid
    found: dict[Group, list] = {}
    for (g, c), (n, grid) in sorted(totals.items(), key=lambda kv: (kv[0][0]._order(), kv[0][1])):
        found.setdefault(g, []).append((c, n, (grid / n).reshape(GRID, GRID)))
    return {g: [Cluster(c, n, n / sum(n for _, n, _ in parts), mean_map) for c, n, mean_map in parts]
            for g, parts in found.items()}
