"""The whole job from Python: numpy arrays, a ``tf.data.Dataset`` or a Hugging Face ``datasets.Dataset`` in, the
job's Parquet out, and a handle to read it back.

:func:`explain_dataset` writes the data once as Parquet (the *staged input*, ``<output>-input`` unless named), runs
:func:`worker.job.driver.run` on it (actors, resume, statistics, the run record the audit reads) and returns an
:class:`Output`.  Run it again with the same data and output and it resumes where it stopped; with other data for
the same output it refuses, unless ``overwrite=True``.

Accepted ``data``:

* a uint8 array (N, H, W, 3), (N, H, W, 1) or (N, H, W) (pixel values 0-255), with ``labels`` (N,) if wanted;
* a dict of equal-length arrays: ``image`` (as above), optionally ``label``, other columns passed through;
* a ``tf.data.Dataset`` of images, ``(image, label)`` pairs or dicts with ``image`` (and ``label``) keys, unbatched;
* a ``datasets.Dataset`` with an ``image`` column (an ``Image`` feature or arrays) and optionally ``label``.

Rows keep their order: the output has an ``index`` column (the row's position in ``data``), and
:meth:`Output.table` and :meth:`Output.maps` return rows in that order.

Example:
    >>> import numpy as np
    >>> faces = np.zeros((8, 25, 25), np.uint8)
    >>> out = explain_dataset(faces, "gray.keras", "maps/", preprocessing="scale01")  # doctest: +SKIP
    >>> out.maps().shape, out.summary["rows_out"]  # doctest: +SKIP
    ((8, 25, 25), 8)
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from worker.data import schema, sink, storage
from worker.data.decode import encode_png
from worker.job.config import JobConfig

ROWS_PER_STAGED_FILE = 1024
STAGED_RECORD = "_staged.json"


@dataclass
class Output:
    """A finished (or partial) job's output: where it is, the run's summary, and readers of its rows."""

    path: str
    summary: dict

    def table(self, columns: list[str] | None = None) -> pa.Table:
        """The output rows in the input's order (``columns``: only these, besides ``index``)."""
        fs, root = storage.filesystem(self.path)
        wanted = None if columns is None else list(dict.fromkeys(["index", *columns]))
        table = pq.read_table(root, filesystem=fs, columns=wanted)
        return table.sort_by("index")

    def maps(self) -> np.ndarray:
        """The maps at their true scale, float32, in the input's order; rows with an error are NaN."""
        return schema.read_maps(self.table(["map", "map_scale"]))

    def errors(self) -> dict[int, str]:
        """{index: error} of the rows that could not be explained."""
        table = self.table(["error"])
        return {i: e for i, e in zip(table["index"].to_pylist(), table["error"].to_pylist()) if e is not None}

    def metadata(self) -> dict:
        """The run record stored with the output (model, options, versions, input)."""
        fs, root = storage.filesystem(self.path)
        return schema.read_metadata(pq.read_schema(sink.committed_files(fs, root)[0], filesystem=fs))


def explain_dataset(data, model: str, output: str, *, labels=None, staging: str | None = None,
                    overwrite: bool = False, echo=print, **options) -> Output:
    """Explain every row of ``data`` with the job (see the module) and return its :class:`Output`.

    ``options`` are :class:`~worker.job.config.JobConfig`'s fields (``preprocessing``, ``target``, ``batch_size``,
    ``actors``, ...).  With labels, the label column is ``label`` (so ``target="label"`` works)."""
    for name in ("input", "input_format", "image_column", "id_column", "label_column"):
        if name in options:
            raise ValueError(f"explain_dataset sets {name} itself (the staged input); leave it out")
    staging = (staging or output.rstrip("/") + "-input").rstrip("/")
    staged = stage_input(data, staging, labels=labels, output=output, overwrite=overwrite)
    config = JobConfig(model=model, input=staging, output=output, input_format="parquet",
                       label_column="label" if "label" in staged.columns else None,
                       columns=tuple(c for c in staged.columns if c not in ("image", "label")),
                       overwrite=overwrite, **options)
    return Output(output, _run(config, echo))


@dataclass(frozen=True)
class StagedInput:
    """``data`` as Parquet under ``path`` (:func:`stage_input`)."""

    path: str
    columns: list[str]
    rows: int
    digest: str  # sha256 of the staged columns' buffers: the same data stages to the same digest


def stage_input(data, staging: str, *, labels=None, output: str | None = None, overwrite: bool = False
                ) -> StagedInput:
    """Write ``data`` (what :func:`explain_dataset` takes) as the job's Parquet input under ``staging``, once: where
    the same data is staged there already it is left as it is.  Other data is refused while ``output`` holds maps
    of the staged data, unless ``overwrite`` (then the output is emptied and the data staged anew)."""
    if output is not None and staging.rstrip("/") == output.rstrip("/"):
        raise ValueError("staging must be another directory than output")
    return _stage(lambda: _chunks(data, labels), staging.rstrip("/"), output, overwrite)


def _run(config: JobConfig, echo) -> dict:
    from worker.job.driver import run

    return run(config, echo=echo)


# --- the data, as Arrow tables of up to ROWS_PER_STAGED_FILE rows ---------------------------------------------------

def _chunks(data, labels) -> Iterator[pa.Table]:
    if hasattr(data, "features") and hasattr(data, "with_format"):  # datasets.Dataset
        if labels is not None:
            raise ValueError("a datasets.Dataset brings its own labels (its 'label' column); leave labels out")
        yield from _hf_chunks(data)
    elif hasattr(data, "element_spec") and hasattr(data, "as_numpy_iterator"):  # tf.data.Dataset
        if labels is not None:
            raise ValueError("a tf.data.Dataset brings its own labels ((image, label) elements); leave labels out")
        yield from _rows_to_chunks(_tf_rows(data))
    else:
        arrays = dict(data) if isinstance(data, dict) else {"image": data}
        if labels is not None:
            arrays["label"] = labels
        if "image" not in arrays:
            raise ValueError(f"a dict of arrays needs an 'image' entry; it has {sorted(arrays)}")
        n = len(arrays["image"])
        bad = {k: len(v) for k, v in arrays.items() if len(v) != n}
        if bad:
            raise ValueError(f"every array needs {n} rows (as many as the images); {bad}")
        for start in range(0, n, ROWS_PER_STAGED_FILE):
            part = {k: v[start:start + ROWS_PER_STAGED_FILE] for k, v in arrays.items()}
            yield _table(part, start)
        if n == 0:
            raise ValueError("no images to explain (0 rows)")


def _tf_rows(dataset) -> Iterator[dict]:
    for element in dataset.as_numpy_iterator():
        if isinstance(element, dict):
            if "image" not in element:
                raise ValueError(f"tf.data elements that are dicts need an 'image' key; they have {sorted(element)}")
            yield element
        elif isinstance(element, tuple):
            if len(element) != 2:
                raise ValueError(f"tf.data elements that are tuples must be (image, label); got {len(element)} items")
            yield {"image": element[0], "label": element[1]}
        else:
            yield {"image": element}


def _rows_to_chunks(rows: Iterator[dict]) -> Iterator[pa.Table]:
    batch: list[dict] = []
    start = 0
    for row in rows:
        batch.append(row)
        if len(batch) == ROWS_PER_STAGED_FILE:
            yield _table({k: [r.get(k) for r in batch] for k in batch[0]}, start)
            start += len(batch)
            batch = []
    if batch:
        yield _table({k: [r.get(k) for r in batch] for k in batch[0]}, start)
    elif not start:
        raise ValueError("no images to explain (the dataset is empty)")


def _image_column(images) -> pa.Array:
    """uint8 images as an Arrow tensor column where they share a shape (no encoding), else as PNG bytes."""
    arrays = [np.asarray(i) for i in images]
    for a in arrays:
        if a.dtype != np.uint8:
            raise TypeError(f"images must be uint8 pixels 0-255; got dtype {a.dtype} "
                            "(convert float images with np.clip(x, 0, 255).astype(np.uint8))")
        if not (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] in (1, 3, 4))):
            raise ValueError(f"an image must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4); got {a.shape}")
    arrays = [a[..., None] if a.ndim == 2 else a for a in arrays]
    if len({a.shape for a in arrays}) == 1:
        return pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(np.stack(arrays)))
    return pa.array([encode_png(a) for a in arrays], pa.binary())


def _table(columns: dict, start: int) -> pa.Table:
    out = {"index": pa.array(np.arange(start, start + len(columns["image"]), dtype=np.int64)),
           "image": _image_column(columns["image"])}
    for name, values in columns.items():
        if name == "image":
            continue
        values = np.asarray(values)
        out[_own(name)] = pa.array(values.tolist() if values.dtype.kind in "SUO" else values)
    return pa.table(out)


def _own(name: str) -> str:
    """``name``, a column of the data to pass through; refused where the output has a column of that name."""
    if name in ("index", "id") or name in schema.RESULT_COLUMNS:
        raise ValueError(f"column {name!r} is the output's own; rename it")
    return name


def _hf_chunks(dataset) -> Iterator[pa.Table]:
    if "image" not in dataset.column_names:
        raise ValueError(f"the datasets.Dataset needs an 'image' column; it has {dataset.column_names}")
    arrow = dataset.with_format("arrow")
    start = 0
    for batch in arrow.iter(batch_size=ROWS_PER_STAGED_FILE):
        image = batch["image"]
        if not pa.types.is_struct(image.type):  # arrays, not an Image feature
            image = _image_column([np.asarray(v, np.uint8) for v in image.to_pylist()])
        table = pa.table({"index": pa.array(np.arange(start, start + batch.num_rows, dtype=np.int64)),
                          "image": image})
        for name in batch.column_names:
            if name != "image":
                table = table.append_column(_own(name), batch[name])
        start += batch.num_rows
        yield table
    if not start:
        raise ValueError("no images to explain (the dataset is empty)")


# --- staging: written once, found again on a re-run ------------------------------------------------------------------

def _digest(table: pa.Table, running) -> None:
    for column in table.columns:
        for chunk in column.chunks:
            for buffer in chunk.buffers():
                if buffer is not None:
                    running.update(memoryview(buffer))
        running.update(str(column.type).encode())


def _stage(make_chunks, staging: str, output: str | None, overwrite: bool) -> StagedInput:
    """Write the chunks of ``make_chunks()`` under ``staging`` (or, where the same data is staged already, check
    that it is); the columns.  Other data than ``staging`` holds is refused while ``output`` has maps of it, unless
    ``overwrite``: then the staging and the output are both replaced."""
    fs, root = storage.filesystem(staging)
    record_path = posixpath.join(root, STAGED_RECORD)
    existing = None
    if fs.get_file_info(record_path).type == pafs.FileType.File:
        with fs.open_input_stream(record_path) as handle:
            existing = json.loads(handle.read())
    elif fs.get_file_info(root).type != pafs.FileType.NotFound:
        fs.delete_dir_contents(root)  # a staging cut short: written again
    running = hashlib.sha256()
    columns: list[str] = []
    rows = 0
    for n, table in enumerate(make_chunks()):
        _digest(table, running)
        columns = table.column_names
        rows += table.num_rows
        if existing is None:
            fs.create_dir(root, recursive=True)
            with fs.open_output_stream(posixpath.join(root, f"part-{n:06d}.parquet")) as handle:
                pq.write_table(table, handle, row_group_size=256)
    digest = running.hexdigest()
    if existing is not None and existing["digest"] != digest:
        out_fs, out_root = storage.filesystem(output) if output else (None, None)
        if out_fs is not None and out_fs.get_file_info(out_root).type != pafs.FileType.NotFound:
            if not overwrite:
                raise ValueError(f"{output} holds maps of other data than this (staged in {staging}); choose "
                                 "another output, or pass overwrite=True to replace both")
            out_fs.delete_dir_contents(out_root)
        fs.delete_dir_contents(root)
        return _stage(make_chunks, staging, output, overwrite)
    if existing is None:
        with fs.open_output_stream(record_path) as handle:
            handle.write(json.dumps({"digest": digest, "rows": rows, "columns": columns}).encode())
    return StagedInput(staging, columns, rows, digest)
