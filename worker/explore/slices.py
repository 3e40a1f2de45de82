"""Slices of a job's output: filter, sort and page through millions of rows where they lie, in bounded memory.

A :class:`Slice` is one question a person asks of a run (the misclassified images of class 3, the 50 maps with the
most border mass, the rows with errors, everything from one input file), parsed from a query string with one-line
errors (:class:`QueryError`). :class:`Output` answers it over the job's committed part files, local or on an object
store, in two passes:

1. a scan of only the columns the filter and the sort need, the filter pushed down to pyarrow (which skips row
   groups by their statistics), keeping the count and the best ``offset + limit`` rows (memory bounded by the page,
   not the run);
2. the page's rows read whole, maps included, from the row groups that hold them.

Examples:
    >>> s = Slice.from_query({"true": "3", "correct": "false", "sort": "-border_mass", "limit": "50"})
    >>> (s.true, s.correct, s.sort, s.descending, s.offset, s.limit)
    ('3', False, 'border_mass', True, 0, 50)
    >>> Slice.from_query({"range": "gini:0.9:0.2"})
    Traceback (most recent call last):
    ...
    worker.explore.slices.QueryError: range gini:0.9:0.2 runs backwards: give the low end first (gini:0.2:0.9)
"""

from __future__ import annotations

import dataclasses
import posixpath
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from worker.audit.aggregate import KINDS
from worker.data import schema, storage
from worker.data.sink import committed_files
from worker.job.config import JobConfig

PAGE_LIMIT = 200  # rows a page may ask for
DEEPEST = 100_000  # how far into a sorted slice a page may go (the scan keeps offset + limit rows)
SCAN_CHUNK = 65_536  # rows gathered before the kept rows are cut back to offset + limit


class QueryError(ValueError):
    """A slice that cannot be answered as asked; the message is one line that says how to ask."""


@dataclass(frozen=True)
class Range:
    """``column`` between ``low`` and ``high``, both included."""

    column: str
    low: float
    high: float


def _flag(name: str, value: str) -> bool:
    if value.lower() in ("true", "yes", "1"):
        return True
    if value.lower() in ("false", "no", "0"):
        return False
    raise QueryError(f"{name}={value} is not true or false")


def _whole(name: str, value: str, low: int, high: int) -> int:
    if not value.lstrip("-").isdigit() or not low <= int(value) <= high:
        raise QueryError(f"{name}={value} is not a whole number in [{low}, {high}]")
    return int(value)


def _range(text: str) -> Range:
    column, _, bounds = text.partition(":")
    low, _, high = bounds.partition(":")
    try:
        lo = float(low) if low else -np.inf
        hi = float(high) if high else np.inf
    except ValueError:
        raise QueryError(f"range {text} is not COLUMN:LOW:HIGH with numbers (either end may be empty)") from None
    if not column or np.isnan(lo) or np.isnan(hi):
        raise QueryError(f"range {text} is not COLUMN:LOW:HIGH with numbers (either end may be empty)")
    if lo > hi:
        raise QueryError(f"range {text} runs backwards: give the low end first ({column}:{high}:{low})")
    return Range(column, lo, hi)


@dataclass(frozen=True)
class Slice:
    """Which rows, in which order, which page. Classes are given as an index or a class name."""

    true: str | None = None  # the label column's class
    predicted: str | None = None
    target: str | None = None  # the (first) differentiated class
    correct: bool | None = None  # predicted == true
    errors: bool | None = None  # True: only rows with an error; False: only rows with a map
    file: str | None = None  # the input file a row came from (derived ids: ``<file>#<row>``)
    cluster: str | None = None  # an audit's SpRAy cluster, ``kind:class:number`` (``true:3:1``)
    id: str | None = None  # one row, by its id
    ranges: tuple[Range, ...] = ()
    sort: str | None = None  # a numeric column; None: the output's own order
    descending: bool = True
    offset: int = 0
    limit: int = 48

    @classmethod
    def from_query(cls, query: dict) -> "Slice":
        """From a query string's values (``true=3&correct=false&range=gini:0.2:0.9&sort=-gini&offset=48``): a
        value repeated (``range``) may come as a list."""
        known = {f.name for f in dataclasses.fields(cls)} - {"ranges", "descending", "errors"} | {"range", "error"}
        unknown = sorted(set(query) - known)
        if unknown:
            raise QueryError(f"unknown query key(s) {unknown}; known: {sorted(known)}")
        one = {k: (v[-1] if isinstance(v, list) else v) for k, v in query.items()}
        values: dict = {k: one[k] or None for k in ("true", "predicted", "target", "file", "cluster", "id") if k in one}
        if one.get("correct"):
            values["correct"] = _flag("correct", one["correct"])
        if one.get("error"):
            values["errors"] = _flag("error", one["error"])
        ranges = query.get("range") or []
        values["ranges"] = tuple(_range(r) for r in ([ranges] if isinstance(ranges, str) else ranges) if r)
        if one.get("sort"):
            values["descending"] = one["sort"].startswith("-")
            values["sort"] = one["sort"].lstrip("-+")
        if one.get("offset"):
            values["offset"] = _whole("offset", one["offset"], 0, DEEPEST)
        if one.get("limit"):
            values["limit"] = _whole("limit", one["limit"], 1, PAGE_LIMIT)
        return cls(**values)


@dataclass
class Page:
    """A slice's answer: how many rows match, and this page of them in order (each a dict of its columns, the map
    as an array at its true scale)."""

    total: int
    offset: int
    rows: list[dict]
    seconds: float = 0.0


@dataclass
class _Kept:
    """Rows a scan keeps: their sort keys (larger first), scan order (ties), ids and part numbers."""

    keys: np.ndarray
    rank: np.ndarray
    ids: pa.Array
    parts: np.ndarray

    @staticmethod
    def best(chunks: list["_Kept"], keep: int) -> "_Kept":
        """The ``keep`` best rows of ``chunks``, in order: the largest keys first, ties in scan order."""
        keys = np.concatenate([c.keys for c in chunks])
        rank = np.concatenate([c.rank for c in chunks])
        order = np.lexsort((rank, -keys))[:keep]
        ids = pa.concat_arrays([c.ids.combine_chunks() if isinstance(c.ids, pa.ChunkedArray) else c.ids
                                for c in chunks]).take(pa.array(order))
        return _Kept(keys[order], rank[order], ids, np.concatenate([c.parts for c in chunks])[order])


def _is_number(kind: pa.DataType) -> bool:
    return pa.types.is_integer(kind) or pa.types.is_floating(kind)


class Output:
    """A job's output, opened for slicing: its part files, schema, run record and class names.

    Nothing of the rows is held: each :meth:`page` scans what it needs."""

    def __init__(self, uri: str, members: str | None = None):
        self.uri = uri
        self.members = members  # an audit's cluster_members.parquet: each map's cluster (the cluster= filter)
        self._clusters: OrderedDict[str, pa.Array] = OrderedDict()
        self._lock = threading.Lock()
        self.fs, self.root = storage.filesystem(uri)
        self.parts = committed_files(self.fs, self.root)
        self._number = {part: i for i, part in enumerate(self.parts)}
        if not self.parts:
            raise QueryError(f"{uri} holds no part files of a job's output: give the directory a job wrote "
                             "(--output of guided-saliency explain)")
        self.schema = pq.read_schema(self.parts[0], filesystem=self.fs)
        self.metadata = schema.read_metadata(self.schema) or {}
        if "config" not in self.metadata:
            raise QueryError(f"{self.parts[0]} has no run record: it was not written by guided-saliency explain")
        self.config = JobConfig.from_dict(self.metadata["config"])
        self.class_names = self.metadata.get("class_names") or None
        self.dataset = ds.dataset(self.parts, filesystem=self.fs, format="parquet", schema=self.schema)
        self.numeric = [f.name for f in self.schema if _is_number(f.type) and f.name != "map_scale"]
        label = self.config.label_column
        self.label = label if label and label in self.schema.names else None

    # -- classes ------------------------------------------------------------------------------------------------

    def class_name(self, value) -> str | None:
        """A class index or label as the page shows it: its name where the run recorded one."""
        if value is None:
            return None
        if isinstance(value, (int, np.integer)) and self.class_names and 0 <= value < len(self.class_names):
            return str(self.class_names[value])
        return str(value)

    def _index(self, key: str, value: str) -> int:
        """A predicted or target class, given as an index or a recorded class name."""
        if value.lstrip("-").isdigit():
            return int(value)
        if self.class_names and value in self.class_names:
            return self.class_names.index(value)
        names = f"; the classes are {self.class_names}" if self.class_names else " (the run recorded no class names)"
        raise QueryError(f"{key}={value} is neither a class index nor a class name{names}")

    def _label_value(self, value: str):
        """A true class as the label column holds it (an index, or a name)."""
        if self.label is None:
            raise QueryError("the run has no label column, so rows have no true class: filter by predicted= instead")
        if _is_number(self.schema.field(self.label).type):
            return self._index("true", value)
        if value.isdigit() and self.class_names and int(value) < len(self.class_names):
            return self.class_names[int(value)]
        return value

    def _column(self, name: str, why: str) -> pc.Expression:
        if name not in self.schema.names:
            raise QueryError(f"{why} {name!r} is not a column of this output; numeric columns: {self.numeric}")
        if name not in self.numeric:
            raise QueryError(f"{why} {name!r} is not numeric; numeric columns: {self.numeric}")
        return pc.field(name)

    def _first(self, name: str) -> pc.Expression:
        """A class column, or the first class of a list column (``top:K`` runs)."""
        field = pc.field(name)
        return pc.list_element(field, 0) if pa.types.is_list(self.schema.field(name).type) else field

    def _cluster_ids(self, cluster: str) -> pa.Array:
        """The ids of an audit's cluster ``kind:class:number`` (the class an index or a name), read once from its
        cluster_members.parquet and kept for the next few asks."""
        if self.members is None:
            raise QueryError("cluster= needs an audit's clusters: start the explorer with --audit REPORT_DIR")
        with self._lock:
            if cluster in self._clusters:
                return self._clusters[cluster]
        kind, _, rest = cluster.partition(":")
        cls, _, number = rest.rpartition(":")
        if kind not in KINDS or not cls or not number.isdigit():
            raise QueryError(f"cluster={cluster} is not kind:class:number (e.g. true:3:1), kind one of "
                             f"{', '.join(KINDS)}")
        by_class = ("class_index", "=", int(cls)) if cls.lstrip("-").isdigit() else ("class_name", "=", cls)
        fs, path = storage.filesystem(self.members)
        ids = pq.read_table(path, filesystem=fs, columns=["id"], filters=[
            ("kind", "=", kind), by_class, ("cluster", "=", int(number))])["id"].combine_chunks()
        if not len(ids):
            raise QueryError(f"the audit has no cluster {number} in {kind} class {cls} (the Audit tab lists "
                             "its clusters)")
        with self._lock:
            self._clusters[cluster] = ids
            while len(self._clusters) > 4:
                self._clusters.popitem(last=False)
        return ids

    def expression(self, s: Slice) -> pc.Expression | None:
        """The pyarrow filter of a slice, checked against this output's columns."""
        terms = []
        if s.true is not None:
            terms.append(pc.field(self.label) == self._label_value(s.true))
        if s.predicted is not None:
            terms.append(pc.field("predicted_class") == self._index("predicted", s.predicted))
        if s.target is not None:
            terms.append(self._first("target_class") == self._index("target", s.target))
        if s.correct is not None:
            if self.label is None or not _is_number(self.schema.field(self.label).type):
                raise QueryError("correct= needs labels that are class indices; this run's labels are "
                                 + ("missing" if self.label is None else "names"))
            same = pc.field("predicted_class") == pc.field(self.label)
            terms.append(same if s.correct else ~same)
        if s.errors is not None:
            terms.append(pc.field("error").is_valid() if s.errors else pc.field("error").is_null())
        if s.file is not None:
            if self.config.id_column:
                raise QueryError(f"file= needs ids made of the input file and row; this run's ids come from the "
                                 f"column {self.config.id_column!r}")
            terms.append(pc.starts_with(pc.field("id"), s.file.lstrip("/") + "#"))
        if s.cluster is not None:
            terms.append(pc.field("id").isin(self._cluster_ids(s.cluster)))
        if s.id is not None:
            terms.append(pc.field("id") == s.id)
        for r in s.ranges:
            column = self._column(r.column, "range:")
            terms.append((column >= r.low) & (column <= r.high))
        if not terms:
            return None
        out = terms[0]
        for term in terms[1:]:
            out = out & term
        return out

    # -- answering -----------------------------------------------------------------------------------------------

    def page(self, s: Slice) -> Page:
        """The rows of ``s`` on its page."""
        import time

        started = time.perf_counter()
        where = self.expression(s)
        if s.sort is not None:
            self._column(s.sort, "sort:")
        total, chosen = self._scan(where, s)
        if s.id is not None and not total and not self.dataset.count_rows(filter=pc.field("id") == s.id):
            raise QueryError(f"no row of this output has the id {s.id!r}")
        rows = self._rows(chosen[s.offset:s.offset + s.limit])
        return Page(total, s.offset, rows, time.perf_counter() - started)

    def _scan(self, where, s: Slice) -> tuple[int, list[tuple[str, str]]]:
        """The count of matching rows and the first ``offset + limit`` of them in the slice's order, as
        (part file, id). Sorted, the kept rows are cut back to ``offset + limit`` every :data:`SCAN_CHUNK` rows:
        ids stay Arrow arrays until the page's few are taken."""
        keep = s.offset + s.limit
        columns = ["id"] + ([s.sort] if s.sort else [])
        scanner = self.dataset.scanner(columns=columns, filter=where, batch_size=SCAN_CHUNK)
        total = 0
        kept = _Kept(np.empty(0), np.empty(0, np.int64), pa.array([], pa.string()), np.empty(0, np.int32))
        pending: list[_Kept] = []
        gathered = 0
        for tagged in scanner.scan_batches():
            batch = tagged.record_batch
            n = batch.num_rows
            if not n:
                continue
            part = self._number[tagged.fragment.path]
            if s.sort is None:
                if len(kept.ids) + sum(len(p.ids) for p in pending) < keep:
                    pending.append(_Kept(np.zeros(n), np.arange(total, total + n), batch.column(0),
                                         np.full(n, part, np.int32)))
                total += n
                continue
            values = batch.column(1).to_numpy(zero_copy_only=False).astype(np.float64)
            keys = np.where(np.isnan(values), -np.inf, values if s.descending else -values)
            pending.append(_Kept(keys, np.arange(total, total + n), batch.column(0), np.full(n, part, np.int32)))
            total += n
            gathered += n
            if gathered >= SCAN_CHUNK:
                kept, pending, gathered = _Kept.best([kept, *pending], keep), [], 0
        kept = _Kept.best([kept, *pending], keep)
        return total, [(self.parts[p], i) for p, i in zip(kept.parts.tolist(), kept.ids.to_pylist())]

    def _rows(self, chosen: list[tuple[str, str]]) -> list[dict]:
        """The chosen rows whole, in the chosen order; each part file read once, a few at a time."""
        from concurrent.futures import ThreadPoolExecutor

        by_part: dict[str, list[str]] = {}
        for part, row_id in chosen:
            by_part.setdefault(part, []).append(row_id)
        found = {}
        with ThreadPoolExecutor(8) as pool:
            for rows in pool.map(lambda item: self._read_part(*item), by_part.items()):
                found.update(rows)
        return [found[row_id] for _, row_id in chosen if row_id in found]

    def _read_part(self, part: str, ids: list[str]) -> dict[str, dict]:
        """The rows ``ids`` of one part file: its ids first, then only the row groups holding those rows."""
        wanted = pa.array(ids, pa.string())
        with self.fs.open_input_file(part) as handle:
            f = pq.ParquetFile(handle)
            if f.num_row_groups > 1:
                hits = np.flatnonzero(pc.is_in(f.read(columns=["id"])["id"], value_set=wanted).to_numpy(
                    zero_copy_only=False))
                starts = np.cumsum([f.metadata.row_group(g).num_rows for g in range(f.num_row_groups)])
                table = f.read_row_groups(sorted(set(np.searchsorted(starts, hits, side="right").tolist())))
            else:
                table = f.read()
        table = table.filter(pc.is_in(table["id"], value_set=wanted))
        maps = schema.read_maps(table) if "map" in table.column_names else None
        found = {}
        for i, row in enumerate(table.drop_columns(["map"] if maps is not None else []).to_pylist()):
            row["part"] = self._number[part]
            row["map"] = None if maps is None or row.get("error") else maps[i]
            found[row["id"]] = row
        return found

    def row(self, part: int, row_id: str) -> dict:
        """One row whole, by its part file's number and its id (what the page's pictures ask for)."""
        if not 0 <= part < len(self.parts):
            raise QueryError(f"part={part} is not a part file of this output (0..{len(self.parts) - 1})")
        rows = self._rows([(self.parts[part], row_id)])
        if not rows:
            raise QueryError(f"no row with id {row_id!r} in part {posixpath.basename(self.parts[part])}")
        return rows[0]

    def rows(self) -> int:
        """How many rows the output holds (from the part files' footers)."""
        return sum(f.metadata.num_rows for f in self.dataset.get_fragments())
