"""Inputs: find the files, check the columns, read one unit of work with ids.

``uri`` is a file, a directory (searched recursively) or a glob (``data/*.parquet``,
``s3://bucket/images/part-*.parquet``), local or on any filesystem pyarrow knows (``s3://``, ``gs://``; an
S3-compatible endpoint comes from ``AWS_ENDPOINT_URL`` or ``?endpoint_override=`` in the URI).  Three formats:

``parquet``   ``*.parquet`` files; the unit of work is one row group of one file.  Row ids are given by an id
              column or derived as ``<file path relative to the input>#<row index in file>``.
``images``    image files (JPEG, PNG, WebP, BMP, GIF, TIFF) in a folder tree; the unit is a run of files, the id
              is the file's path relative to the input, the columns are ``image`` (the file's bytes) and, where
              the input has class subfolders, ``label``: their sorted names give 0..K-1, as
              ``keras.utils.image_dataset_from_directory`` assigns them.  Every file but hidden ones is a row: one
              that is not an image becomes an error row when decoded.
``tfrecord``  TFRecord files of ``tf.train.Example`` (:mod:`worker.data.tfrecord`, no TensorFlow); the unit is a run
              of records, the id ``<file>#<record index>``, the columns ``image`` and ``label`` (from the
              configured feature keys) and the other features of the input's first record.

``auto`` picks Parquet where there is any, else TFRecord files (``*.tfrecord``, ``*.tfrecords``,
``*.tfrecord-00000-of-00010``), else image files.  Ids are stable across re-runs, so resume can skip what is done.

Example:
    >>> import os, tempfile
    >>> from PIL import Image
    >>> root = tempfile.mkdtemp()
    >>> for name in ("dogs/a.png", "cats/b.png", "cats/c.png"):
    ...     os.makedirs(os.path.dirname(os.path.join(root, name)), exist_ok=True)
    ...     Image.new("L", (4, 4)).save(os.path.join(root, name))
    >>> source = plan_input(root, ["image", "label"])
    >>> source.format, source.class_names, source.rows
    ('images', ['cats', 'dogs'], 3)
    >>> read_unit(source.fs, source.units[0], ["image", "label"], None).select(["id", "label"]).to_pylist()[0]
    {'id': 'cats/b.png', 'label': 0}
"""

from __future__ import annotations

import fnmatch
import json
import posixpath
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from worker.data import schema, tfrecord
from worker.data.storage import InputError, filesystem

FORMATS = ("auto", "parquet", "images", "tfrecord")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
FILES_PER_UNIT = 128  # image files per unit of work (at most; fewer where that gives MIN_UNITS units)
RECORDS_PER_UNIT = 256  # TFRecord records per unit of work (likewise)
MIN_UNITS = 64  # a small input still streams in pieces: parts commit (and a killed run resumes) as it goes
DEFAULT_IMAGE_FEATURE = "image/encoded"
DEFAULT_LABEL_FEATURE = "image/class/label"


@dataclass(frozen=True)
class Unit:
    """One unit of work: a Parquet row group, a run of image files or a run of TFRecord records."""

    path: str
    relpath: str
    row_group: int
    first_row: int
    rows: int
    format: str = "parquet"
    offset: int = 0  # tfrecord: byte offset of the first record
    members: tuple[str, ...] = ()  # images: the files, relative to the input
    labels: tuple[int, ...] = ()  # images with class subfolders: each file's class index, -1 for none
    features: str = ""  # tfrecord: JSON {"image": key, "label": key, "columns": {name: kind}}
    broken: str = ""  # tfrecord: why this unit's one row (where the file breaks off) cannot be read


@dataclass(frozen=True)
class Listing:
    """What :func:`list_input` found: the files of one format under ``root``."""

    fs: pafs.FileSystem
    root: str
    format: str
    files: list[str]
    class_names: list[str] = field(default_factory=list)  # images: the class subfolders, sorted


@dataclass
class InputPlan:
    """The input as the job reads it (:func:`plan_input`)."""

    fs: pafs.FileSystem
    units: list[Unit]
    columns: list[str]  # the columns every unit has
    format: str
    class_names: list[str] = field(default_factory=list)  # images with class subfolders: label i is class_names[i]

    @property
    def rows(self) -> int:
        return sum(u.rows for u in self.units)

    def read(self, columns: list[str], id_column: str | None, ids=None):
        """Yield each unit's rows (:func:`read_unit`): every unit's, or with ``ids`` only those rows, from the units
        that hold them."""
        only = None if ids is None else done_index(list(ids))
        for unit in self.units if ids is None else units_holding(self.units, ids, id_column):
            yield read_unit(self.fs, unit, columns, id_column, only=only)

    def describe(self) -> dict:
        """For the run record."""
        out = {"format": self.format, "rows": self.rows, "units": len(self.units)}
        if self.class_names:
            out["class_names"] = list(self.class_names)
        return out


def _kind(path: str) -> str | None:
    name = posixpath.basename(path).lower()
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(".tfrecords") or ".tfrecord" in name:
        return "tfrecord"
    if name.endswith(IMAGE_EXTENSIONS):
        return "images"
    return None


def _hidden(relpath: str) -> bool:
    return any(part.startswith(".") for part in relpath.split("/"))


def list_input(uri: str, input_format: str = "auto") -> Listing:
    """The input's files of its format (``auto``: see the module), sorted, with the class subfolders of an image
    folder; raises :class:`InputError` when there are none."""
    if input_format not in FORMATS:
        raise InputError(f"unknown input format {input_format!r}; choose one of {', '.join(FORMATS)}")
    wildcard = any(ch in uri for ch in "*?[")
    directories: list[str] = []
    single = False
    if wildcard:
        first = min(uri.index(ch) for ch in "*?[" if ch in uri)
        head = posixpath.dirname(uri[:first])
        fs, root = filesystem(head)
        pattern = root.rstrip("/") + uri[len(head):]
        files = [i.path for i in _walk(fs, root) if i.type == pafs.FileType.File and fnmatch.fnmatch(i.path, pattern)]
    else:
        fs, root = filesystem(uri)
        info = fs.get_file_info(root)
        if info.type == pafs.FileType.NotFound:
            raise InputError(f"input {uri} does not exist")
        if info.type == pafs.FileType.File:
            root, files, single = posixpath.dirname(root), [root], True
        else:
            files = []
            for i in _walk(fs, root):
                (files if i.type == pafs.FileType.File else directories).append(i.path)
    root = root.rstrip("/")
    cut = len(root) + 1 if root else 0
    kinds = {k for k in map(_kind, files) if k}
    chosen = input_format
    if single:  # the file named is the input, whatever its name (a file with no known suffix: Parquet)
        chosen = chosen if chosen != "auto" else _kind(files[0]) or "parquet"
        return Listing(fs, root, chosen, files)
    if chosen == "auto":
        chosen = next((k for k in ("parquet", "tfrecord", "images") if k in kinds), None)
        if chosen is None:
            raise InputError(f"no Parquet files found at {uri}, nor TFRecord or image files (image files end in "
                             f"{', '.join(IMAGE_EXTENSIONS)}; name the format with --input-format)")
    if chosen == "parquet":
        files = [f for f in files if f.endswith(".parquet") and not posixpath.basename(f).startswith(("_", "."))]
    elif chosen == "tfrecord":
        files = [f for f in files if _kind(f) == "tfrecord" and not _hidden(f[cut:])]
    else:  # every file: one that is not an image is an error row, not left out unseen
        files = [f for f in files if not _hidden(f[cut:])]
    files.sort()
    if not files:
        name = {"parquet": "Parquet", "tfrecord": "TFRecord", "images": "image"}[chosen]
        raise InputError(f"no {name} files found at {uri}")
    classes = []
    if chosen == "images":  # the class subfolders as keras.utils.image_dataset_from_directory finds them
        classes = sorted(d[cut:] for d in directories if "/" not in d[cut:] and not d[cut:].startswith("."))
    return Listing(fs, root, chosen, files, classes)


def _walk(fs, root):
    return fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))


def plan_input(uri: str, needed: list[str], files: list[str] | None = None, input_format: str = "auto",
               image_feature: str = DEFAULT_IMAGE_FEATURE, label_feature: str = DEFAULT_LABEL_FEATURE) -> InputPlan:
    """List the input and check it (every Parquet footer, every TFRecord's framing); return its units of work.

    ``files`` restricts the input to those of its files (as :func:`list_input` names them); an image folder's
    classes still come from the whole tree.  ``image_feature``/``label_feature`` name the TFRecord features that
    become the ``image`` and ``label`` columns.
    """
    listing = list_input(uri, input_format)
    listed = listing.files
    if files is not None:
        unknown = sorted(set(files) - set(listed))
        if unknown:
            raise InputError(f"files not in the input {uri}: {unknown[:5]}")
        wanted = set(files)
        listed = [f for f in listed if f in wanted]
    if listing.format == "images":
        return _plan_images(listing, listed, needed)
    if listing.format == "tfrecord":
        return _plan_tfrecord(listing, listed, needed, image_feature, label_feature)
    return _plan_parquet(listing, listed, needed)


def _plan_parquet(listing: Listing, files: list[str], needed: list[str]) -> InputPlan:
    fs, root = listing.fs, listing.root
    units: list[Unit] = []
    common: list[str] | None = None
    for path in files:
        try:
            with fs.open_input_file(path) as handle:
                meta = pq.ParquetFile(handle).metadata
                file_schema = meta.schema.to_arrow_schema()
        except Exception as exc:  # noqa: BLE001
            raise InputError(f"{path} is not a readable Parquet file: {exc}") from exc
        missing = [c for c in needed if c not in file_schema.names]
        if missing:
            raise InputError(f"{path} has no column(s) {missing}; its columns are {file_schema.names}")
        common = file_schema.names if common is None else [c for c in common if c in file_schema.names]
        first = 0
        rel = posixpath.relpath(path, root) if root else path
        for rg in range(meta.num_row_groups):
            rows = meta.row_group(rg).num_rows
            if rows:
                units.append(Unit(path, rel, rg, first, rows))
            first += rows
    return InputPlan(fs, units, common or [], "parquet")


def _check_columns(what: str, needed: list[str], columns: list[str], fix: str) -> None:
    missing = [c for c in needed if c not in columns]
    if missing:
        raise InputError(f"{what} have no column(s) {missing}; their columns are {columns}{fix}")


def _unit_size(rows: int, most: int) -> int:
    """Rows per unit: ``most``, or fewer (down to 8) where that makes :data:`MIN_UNITS` units.

    >>> _unit_size(240, 128), _unit_size(10**6, 128), _unit_size(5, 128)
    (8, 128, 8)
    """
    return max(8, min(most, -(-rows // MIN_UNITS)))


def _plan_images(listing: Listing, files: list[str], needed: list[str]) -> InputPlan:
    classes = listing.class_names
    columns = ["image", "label"] if classes else ["image"]
    _check_columns("image folders", needed, columns,
                   "" if classes else " (labels come from class subfolders, which this folder has none of)")
    index = {name: i for i, name in enumerate(classes)}
    cut = len(listing.root) + 1 if listing.root else 0
    rel = [f[cut:] for f in files]
    labels = [index.get(r.split("/", 1)[0], -1) if "/" in r else -1 for r in rel]
    units = []
    step = _unit_size(len(rel), FILES_PER_UNIT)
    for start in range(0, len(rel), step):
        members = tuple(rel[start:start + step])
        units.append(Unit(files[start], members[0], start // step, start, len(members), "images",
                          members=members, labels=tuple(labels[start:start + step]) if classes else ()))
    return InputPlan(listing.fs, units, columns, "images", list(classes))


def _scan_tfrecord(fs, path: str) -> tuple[list[int], str | None, dict]:
    """The file's record offsets, why it breaks off (else None) and its first record's features ({} if none)."""
    try:
        size = fs.get_file_info(path).size
        if isinstance(fs, pafs.LocalFileSystem):
            with fs.open_input_file(path) as handle:
                offsets, broken = tfrecord.scan(handle, size, seekable=True)
        else:
            with fs.open_input_stream(path) as handle:
                offsets, broken = tfrecord.scan(handle, size, seekable=False)
        first = {}
        if offsets:
            with fs.open_input_file(path) as handle:
                record = next(tfrecord.read_records(handle, 1))
            try:
                first = tfrecord.parse_example(record) if isinstance(record, bytes) else {}
            except tfrecord.RecordError:
                pass
        return offsets, broken, first
    except OSError as exc:
        raise InputError(f"{path} cannot be read: {exc}") from exc


def _column_kind(kind: str, values: list) -> str:
    return kind if len(values) == 1 else kind + "[]"


def _plan_tfrecord(listing: Listing, files: list[str], needed: list[str], image_feature: str,
                   label_feature: str) -> InputPlan:
    """Every file's framing, and the passed-through features with their types from each file's first record (a
    feature with other than one value in any of them is a list)."""
    fs, root = listing.fs, listing.root
    with ThreadPoolExecutor(8) as pool:  # object stores: the files are read in parallel
        scans = list(pool.map(lambda f: _scan_tfrecord(fs, f), files))
    firsts = [first for _, _, first in scans if first]
    if firsts and not any(image_feature in first for first in firsts):
        found = sorted({k for first in firsts for k in first})
        raise InputError(f"{listing.root}: no file's first tf.train.Example has the feature {image_feature!r} (name "
                         f"the image feature with --image-feature); their features are {found}")
    others: dict[str, str] = {}
    for first in firsts:
        for key, (kind, values) in sorted(first.items()):
            if key in (image_feature, label_feature):
                continue
            seen = others.setdefault(key, _column_kind(kind, values))
            if seen == kind and len(values) != 1:
                others[key] = kind + "[]"
    requested = [c for c in needed if c not in ("image", "label")]
    if requested:  # only the named features pass through
        _check_columns("the TFRecord files' first tf.train.Examples", requested, list(others), "")
        others = {k: v for k, v in others.items() if k in requested}
    spec = json.dumps({"image": image_feature, "label": label_feature, "columns": others}, sort_keys=True)
    units: list[Unit] = []
    step = _unit_size(sum(len(offsets) for offsets, _, _ in scans), RECORDS_PER_UNIT)
    for path, (offsets, broken, _) in zip(files, scans):
        rel = posixpath.relpath(path, root) if root else path
        for start in range(0, len(offsets), step):
            rows = min(step, len(offsets) - start)
            units.append(Unit(path, rel, len(units), start, rows, "tfrecord", offset=offsets[start], features=spec))
        if broken:
            units.append(Unit(path, rel, len(units), len(offsets), 1, "tfrecord", features=spec, broken=broken))
    return InputPlan(fs, units, ["image", "label", *others], "tfrecord")


def id_bytes(ids) -> np.ndarray:
    """Row ids as a fixed-width bytes array (``S<longest>``), built from the Arrow buffers without a Python
    object per id: ten million ids of ~30 characters take ~300 MB instead of ~1 GB of Python strings.

    >>> id_bytes(pa.array(["a.parquet#0", "b#12"])).tolist()
    [b'a.parquet#0', b'b#12']
    """
    if not isinstance(ids, (pa.Array, pa.ChunkedArray)):
        ids = pa.array([str(i) for i in ids], pa.string())
    if isinstance(ids, pa.ChunkedArray):
        ids = ids.combine_chunks() if ids.num_chunks else pa.array([], pa.string())
    if not (pa.types.is_string(ids.type) or pa.types.is_large_string(ids.type) or pa.types.is_binary(ids.type)
            or pa.types.is_large_binary(ids.type)):
        ids = pc.cast(ids, pa.string())
    ids = pc.cast(ids, pa.large_binary())
    if ids.null_count:
        raise InputError("row ids must not be null")
    n = len(ids)
    if not n:
        return np.array([], np.bytes_)
    _, offsets_buf, data_buf = ids.buffers()
    offsets = np.frombuffer(offsets_buf, np.int64, n + 1, ids.offset * 8)
    data = np.frombuffer(data_buf, np.uint8) if data_buf is not None else np.zeros(0, np.uint8)
    lengths = np.diff(offsets)
    width = max(1, int(lengths.max()))
    out = np.zeros((n, width), np.uint8)
    for chunk in range(0, n, 1 << 18):  # bounded temporaries
        rows = slice(chunk, min(n, chunk + (1 << 18)))
        cols = np.arange(width)
        take = cols[None, :] < lengths[rows, None]
        index = np.minimum(offsets[rows][:, None] + cols[None, :], max(0, len(data) - 1))
        out[rows] = np.where(take, data[index] if len(data) else 0, 0)
    return out.view(f"S{width}").reshape(n)


def done_index(ids) -> np.ndarray:
    """Ids already done, as a sorted bytes array: compact, zero-copy through Ray's object store, and
    searched in O(log n) per row (``np.isin`` on 1M object ids took 9.6 s per row group)."""
    return np.sort(ids if isinstance(ids, np.ndarray) and ids.dtype.kind == "S" else id_bytes(ids))


def duplicates(ids: np.ndarray) -> int:
    """How many entries of the bytes array ``ids`` repeat an earlier one (sorted, no Python set)."""
    if len(ids) < 2:
        return 0
    ordered = np.sort(ids)
    return int((ordered[1:] == ordered[:-1]).sum())


def is_done(index: np.ndarray, ids) -> np.ndarray:
    """Boolean mask: which ``ids`` are in ``index`` (from :func:`done_index`)."""
    wanted = id_bytes(ids)
    if not len(index) or not len(wanted):
        return np.zeros(len(wanted), bool)
    at = np.minimum(np.searchsorted(index, wanted), len(index) - 1)
    return index[at] == wanted


def read_unit(fs: pafs.FileSystem, unit: Unit, columns: list[str], id_column: str | None,
              done: np.ndarray | None = None, only: np.ndarray | None = None) -> pa.Table:
    """One row group with an ``id`` column first; rows whose id is in ``done`` (a :func:`done_index`), or not
    in ``only`` (another), are dropped before the other columns are read, so a resumed run does not fetch the
    images it skips and a lookup fetches only the rows it wants."""
    if unit.format != "parquet":
        if id_column:
            raise InputError(f"{unit.format} inputs have derived ids (the file's path); there is no id column")
        ids = pa.array(_unit_ids(unit), pa.string())
        keep = ~is_done(done, ids) if done is not None and len(done) else np.ones(len(ids), bool)
        if only is not None:
            keep &= is_done(only, ids)
        read = _read_images if unit.format == "images" else _read_tfrecord
        return read(fs, unit, ids, keep)
    rest = [c for c in columns if c != id_column]
    with fs.open_input_file(unit.path) as handle:
        parquet = pq.ParquetFile(handle)
        if id_column:
            ids = pc.cast(parquet.read_row_group(unit.row_group, columns=[id_column])[id_column], pa.string())
            if ids.null_count:
                raise InputError(f"{unit.path}: id column {id_column!r} has null values")
        else:
            ids = pa.array([f"{unit.relpath}#{unit.first_row + i}" for i in range(unit.rows)])
        keep = ~is_done(done, ids) if done is not None and len(done) else None
        if only is not None:
            keep = is_done(only, ids) & (True if keep is None else keep)
        if keep is not None and not keep.any():
            return parquet.schema_arrow.empty_table().select(rest).add_column(0, "id", ids.slice(0, 0))
        table = parquet.read_row_group(unit.row_group, columns=rest).add_column(0, "id", ids)
    return table.filter(pa.array(keep)) if keep is not None else table


def units_holding(units: list[Unit], ids, id_column: str | None) -> list[Unit]:
    """The units that may hold ``ids``: with derived ids (``<file>#<row>``) only the row groups named by them,
    with an id column all of them (the ids are in the data)."""
    if id_column:
        return list(units)
    if any(u.format == "images" for u in units):
        names = {str(i) for i in ids}
        return [u for u in units if not names.isdisjoint(u.members)]
    wanted: dict[str, list[int]] = {}
    for row_id in ids:
        relpath, _, row = str(row_id).rpartition("#")
        if row.isdigit():
            wanted.setdefault(relpath, []).append(int(row))
    return [u for u in units if any(u.first_row <= r < u.first_row + u.rows for r in wanted.get(u.relpath, ()))]


def _unit_ids(unit: Unit) -> list[str]:
    if unit.format == "images":
        return list(unit.members)
    return [f"{unit.relpath}#{unit.first_row + i}" for i in range(unit.rows)]


def _read_images(fs, unit: Unit, ids: pa.Array, keep: np.ndarray) -> pa.Table:
    """The unit's files not yet done: ``id``, ``image`` (the file's bytes) and ``label`` (null outside the class
    subfolders); a file that is not an image is found by the decode."""
    root = unit.path[:len(unit.path) - len(unit.relpath)]
    cells = []
    for rel, wanted in zip(unit.members, keep):
        if wanted:
            with fs.open_input_stream(root + rel) as handle:
                cells.append(handle.read())
    columns = {"id": ids.filter(pa.array(keep)), "image": pa.array(cells, pa.binary())}
    if unit.labels:  # the input has class subfolders
        columns["label"] = pa.array([v if v >= 0 else None for v, wanted in zip(unit.labels, keep) if wanted],
                                    pa.int64())
    return pa.table(columns)


_ARROW_KINDS = {"bytes": pa.binary(), "float": pa.float32(), "int64": pa.int64()}


def _read_tfrecord(fs, unit: Unit, ids: pa.Array, keep: np.ndarray) -> pa.Table:
    """The unit's records not yet done: ``id``, ``image``, ``label`` and the passed-through features; a record
    that cannot be read or parsed keeps nulls and says why in :data:`schema.READ_ERROR_COLUMN`."""
    spec = json.loads(unit.features)
    kinds: dict[str, str] = spec["columns"]
    n = int(keep.sum())
    images: list = [None] * n
    labels: list = [None] * n
    values: dict[str, list] = {name: [None] * n for name in kinds}
    errors: list = [None] * n
    if unit.broken:
        errors = [f"read: {unit.broken}"] * n
    elif n:
        with fs.open_input_file(unit.path) as handle:
            handle.seek(unit.offset)
            row = -1
            for i, record in enumerate(tfrecord.read_records(handle, unit.rows)):
                if not keep[i]:
                    continue
                row += 1
                if isinstance(record, tfrecord.RecordError):
                    errors[row:] = [f"read: record {unit.first_row + i}: {record}"] * (n - row)
                    break
                try:
                    features = tfrecord.parse_example(record)
                except tfrecord.RecordError as exc:
                    errors[row] = f"read: {exc}"
                    continue
                errors[row] = _fill(features, spec, kinds, row, images, labels, values)
    columns = {"id": ids.filter(pa.array(keep)), "image": pa.array(images, pa.binary()),
               "label": pa.array(labels, pa.int64())}
    for name, kind in kinds.items():
        arrow = _ARROW_KINDS[kind.rstrip("[]")]
        columns[name] = pa.array(values[name], pa.list_(arrow) if kind.endswith("[]") else arrow)
    columns[schema.READ_ERROR_COLUMN] = pa.array(errors, pa.string())
    return pa.table(columns)


def _fill(features: dict, spec: dict, kinds: dict, row: int, images: list, labels: list, values: dict):
    """One Example's features into the columns at ``row``; why it does not fit them, else None."""
    kind, image = features.get(spec["image"], ("bytes", []))
    if kind != "bytes" or len(image) != 1:
        return f"read: feature {spec['image']!r} holds {len(image)} {kind} value(s); one encoded image expected"
    images[row] = image[0]
    kind, label = features.get(spec["label"], ("int64", []))
    if kind == "int64" and len(label) == 1:
        labels[row] = label[0]
    for name, expected in kinds.items():
        kind, found = features.get(name, (expected.rstrip("[]"), []))
        if kind != expected.rstrip("[]"):
            return f"read: feature {name!r} holds {kind} values; the input's first record has {expected.rstrip('[]')}"
        if expected.endswith("[]"):
            values[name][row] = found
        elif len(found) == 1:
            values[name][row] = found[0]
        elif found:
            return f"read: feature {name!r} holds {len(found)} values; the input's first record has one"
    return None
