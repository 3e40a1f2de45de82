"""The stages of the batch job that run in Ray workers: read, decode (no TensorFlow), explain.

``read_stage`` and ``decode_stage`` are plain functions for Ray Data tasks;
:class:`ExplainBatch` is the callable class of the actor pool: it builds the
engine once in ``__init__`` and maps a pyarrow batch to output rows.  A row whose map the engine reports as a
problem (exactly zero, or not finite) is written with that problem as its ``error``.  Under a lower precision,
each actor also explains its first batch in float32 and writes the per-map cosines to
``_fidelity/<host>-<pid>.json``; :func:`read_fidelity` gathers them for the run's summary.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import time

import numpy as np
import pyarrow as pa

from worker.data import dataset, schema, sink, storage
from worker.data.decode import DecodeError, decode_mask, image_cells
from worker.data.storage import fetch_model
from worker.engine.errors import describe_error
from worker.engine.explanation import Explanation
from worker.engine.precision import Fidelity, map_cosines
from worker.engine.targets import label_problem
from worker.job.config import JobConfig, build_engine

log = logging.getLogger(__name__)

FIDELITY_DIR = "_fidelity"  # per actor: the cosines of its first batch's maps to float32's


def read_stage(batch: pa.Table, *, fs, columns, id_column, done) -> pa.Table:
    """Row groups -> rows; ``done`` is an ObjectRef of a :func:`worker.data.dataset.done_index` (resume)."""
    import ray

    if isinstance(done, ray.ObjectRef):  # Ray Data does not resolve refs inside fn_kwargs
        done = ray.get(done)
    tables = [dataset.read_unit(fs, dataset.Unit(**row), columns, id_column, done) for row in batch.to_pylist()]
    return pa.concat_tables(tables) if tables else pa.table({})


def decode_stage(table: pa.Table, *, image_column, label_column, needs_label, num_classes, options,
                 mask_column=None) -> pa.Table:
    """Decode every image (and mask); a row that cannot be explained keeps zeros and an ``error``."""
    n = table.num_rows
    pixels = np.zeros((n, *options.size, 3), np.uint8)
    errors: list[str | None] = [None] * n
    if schema.READ_ERROR_COLUMN in table.column_names:  # rows the read could not read (TFRecord inputs)
        errors = table[schema.READ_ERROR_COLUMN].to_pylist()
        table = table.drop_columns([schema.READ_ERROR_COLUMN])
    labels = table[label_column].to_pylist() if needs_label else None
    if mask_column:
        masks = np.zeros((n, *options.size), np.uint8)
        for i, cell in enumerate(image_cells(table[mask_column])):
            try:
                masks[i] = decode_mask(cell, options.size, options.max_pixels)
            except DecodeError as exc:
                errors[i] = f"mask: {exc}"
        table = table.append_column(schema.MASK_COLUMN, pa.FixedShapeTensorArray.from_numpy_ndarray(masks))
    for i, cell in enumerate(image_cells(table[image_column])):
        if errors[i]:
            continue
        try:
            pixels[i] = options.decode(cell)
        except DecodeError as exc:
            errors[i] = f"decode: {exc}"
            continue
        if needs_label:
            errors[i] = label_problem(labels[i], num_classes)
    table = table.drop_columns([image_column])
    tensor = pa.FixedShapeTensorArray.from_numpy_ndarray(pixels)
    return table.append_column(schema.IMAGE_COLUMN, tensor).append_column("error", pa.array(errors, pa.string()))


class ExplainBatch:
    """Ray Data callable class: builds the engine once, maps a pyarrow batch to output rows."""

    def __init__(self, config: JobConfig, threads: int, map_shape: tuple[int, ...]):
        from worker.engine.runtime import configure_tensorflow

        configure_tensorflow(threads, config.gpu_memory_limit_mb)
        self.config, self.map_shape = config, tuple(map_shape)
        self._record_worker(threads)  # first: every actor that starts is recorded, however short the run
        self.engine = build_engine(config, fetch_model(config.model))
        self.k = self.engine.target.maps_per_image
        self.metrics = JobMetrics()
        self._fidelity_due = config.precision != "float32"

    def _record_worker(self, threads):
        """Write ``_workers/<host>-<pid>.json``: which devices this actor was pinned to."""
        import socket

        import ray
        import tensorflow as tf

        from worker.engine.runtime import default_jit_compile

        info = {"pid": os.getpid(), "host": socket.gethostname(), "threads": threads,
                "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"),
                "ray_gpu_ids": [str(g) for g in ray.get_gpu_ids()],
                "tf_devices": [d.name for d in tf.config.list_logical_devices()],
                "jit_compile": default_jit_compile()}  # the engine's "auto"
        fs, root = storage.filesystem(self.config.output)
        fs.create_dir(posixpath.join(root, sink.WORKERS_DIR), recursive=True)
        with fs.open_output_stream(posixpath.join(root, sink.WORKERS_DIR, f"{info['host']}-{info['pid']}.json")) as f:
            f.write(json.dumps(info).encode())

    def __call__(self, table: pa.Table) -> pa.Table:
        started = time.perf_counter()
        out = self._explain_table(table)
        failed = out.num_rows - out[schema.ERROR_COLUMN].null_count
        self.metrics.record(out.num_rows, failed, time.perf_counter() - started)
        return out

    def _explain_table(self, table: pa.Table) -> pa.Table:
        errors = table["error"].to_pylist()
        valid = np.array([e is None for e in errors], bool)
        images = table[schema.IMAGE_COLUMN].combine_chunks().to_numpy_ndarray()[valid]
        labels = None
        if self.engine.target.kind == "label":
            # the rows still valid passed label_problem: whole numbers in range, whatever the column's type
            labels = np.asarray(table[self.config.label_column].fill_null(0).to_numpy(zero_copy_only=False))
            labels = labels[valid].astype(np.int64)
        explanation, errors = self._explain(images, labels, valid, errors)
        results = schema.result_columns(valid, explanation, errors, self.map_shape, self.config.map_dtype, self.k)
        results.update(self._statistics(table, valid, explanation))
        internal = [schema.IMAGE_COLUMN, schema.MASK_COLUMN, "error"]
        if self.config.mask_column and self.config.mask_column not in self.config.columns:
            internal.append(self.config.mask_column)
        out = table.drop_columns([c for c in internal if c in table.column_names])
        for name, column in results.items():
            out = out.append_column(name, column)
        return out

    def _statistics(self, table, valid, explanation) -> dict:
        if not self.config.statistics:
            return {}
        from worker.data import stats
        maps = explanation.as_float32()[:, 0]
        values = stats.map_statistics(maps)
        if self.config.mask_column:
            masks = table[schema.MASK_COLUMN].combine_chunks().to_numpy_ndarray()[valid]
            values.update(stats.mask_statistics(maps, masks))
        return schema.placed_columns(valid, values)

    def _explain(self, images, labels, valid, errors):
        if not len(images):  # every row of the batch already has its error
            return self._empty(), errors
        try:
            explanation = self.engine.explain(images, labels)
            if self._fidelity_due:
                self._fidelity_due = False
                self._record_fidelity(images, labels, explanation)
            return self._without_problems(explanation, valid, errors), errors
        except Exception as exc:  # noqa: BLE001 - isolate the row(s) that fail, keep the rest
            log.warning("batch failed (%s); explaining its %d rows one by one", exc, len(images))
        parts = []
        for j, row in enumerate(np.flatnonzero(valid)):
            try:
                parts.append(self.engine.explain(images[j:j + 1], None if labels is None else labels[j:j + 1]))
            except Exception as exc:  # noqa: BLE001
                errors[row] = f"explain: {describe_error(exc)}"
                valid[row] = False
        explanation = Explanation.concatenate(parts) if parts else self._empty()
        return self._without_problems(explanation, valid, errors), errors

    @staticmethod
    def _without_problems(explanation: Explanation, valid, errors) -> Explanation:
        """The rows whose maps the engine reports as a problem become error rows (``valid`` and ``errors`` are
        updated in place); the Explanation of the others."""
        bad = np.array([p is not None for p in explanation.problems], bool)
        if not bad.any():
            return explanation
        rows = np.flatnonzero(valid)
        for row, problem in zip(rows[bad], explanation.problems[bad]):
            errors[row] = f"explain: {problem}"
            valid[row] = False
        return explanation.take(~bad)

    def _record_fidelity(self, images, labels, explanation: Explanation) -> None:
        """Explain ``images`` again in float32 and write the per-map cosines of ``explanation`` to them (a failure
        to measure is written instead, and the job goes on)."""
        import gc
        import socket

        record = {"precision": self.config.precision, "host": socket.gethostname(), "pid": os.getpid()}
        try:
            reference = build_engine(self.config, fetch_model(self.config.model), precision="float32")
            expected = reference.explain(images, labels).as_float32()
            del reference
            gc.collect()
            found = explanation.as_float32()
            record["cosines"] = map_cosines(found.reshape(-1, *found.shape[2:]),
                                            expected.reshape(-1, *expected.shape[2:])).round(6).tolist()
        except Exception as exc:  # noqa: BLE001 - the figure is a check on the run, not part of its output
            log.warning("fidelity to float32 not measured: %s", describe_error(exc))
            record["error"] = describe_error(exc)
        fs, root = storage.filesystem(self.config.output)
        fs.create_dir(posixpath.join(root, FIDELITY_DIR), recursive=True)
        name = f"{record['host']}-{record['pid']}.json"
        with fs.open_output_stream(posixpath.join(root, FIDELITY_DIR, name)) as f:
            f.write(json.dumps(record).encode())

    def _empty(self) -> Explanation:
        return Explanation.empty(self.k, self.map_shape, self.config.map_dtype, self.engine.report)


def read_fidelity(fs, root: str, precision: str) -> tuple[Fidelity | None, list[str]]:
    """The fidelity of a lower-precision run's maps to float32's over every actor's first batch in ``root``
    (None for a float32 run, or where no actor measured one), and the errors of actors that failed to measure."""
    import pyarrow.fs as pafs

    if precision == "float32":
        return None, []
    selector = pafs.FileSelector(posixpath.join(root, FIDELITY_DIR), allow_not_found=True)
    cosines, failures = [], []
    for info in fs.get_file_info(selector):
        if info.type != pafs.FileType.File or not info.path.endswith(".json"):
            continue
        with fs.open_input_stream(info.path) as f:
            record = json.loads(f.read())
        cosines.extend(record.get("cosines", []))
        if "error" in record:
            failures.append(record["error"])
    return (Fidelity.of(precision, cosines) if cosines else None), failures


class JobMetrics:
    """Prometheus metrics through ray.util.metrics (scraped from each node's metrics export port)."""

    def __init__(self):
        from ray.util import metrics

        self.rows = metrics.Counter("saliency_rows_done", "rows explained (including rows with an error)")
        self.failed = metrics.Counter("saliency_rows_failed", "rows written with an error")
        self.latency = metrics.Histogram("saliency_batch_latency_seconds", "explain time per batch",
                                         boundaries=[0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30])
        self.rate = metrics.Gauge("saliency_rows_per_second", "rows/s of the last batch, per actor")

    def record(self, rows: int, failed: int, seconds: float) -> None:
        self.rows.inc(rows)
        if failed:
            self.failed.inc(failed)
        self.latency.observe(seconds)
        self.rate.set(rows / seconds if seconds > 0 else 0.0)
