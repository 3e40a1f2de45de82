"""The batch job: Parquet -> Ray Data (read, decode, explain on actors) -> Parquet.

Ray Data does the scheduling, streaming, backpressure and retries:
``from_items(row groups) -> read -> decode (CPU tasks, no TensorFlow) ->
ExplainBatch actors (engine built once in __init__) -> atomic Parquet sink``.

Before any cluster time is spent the driver checks the input files and
columns, builds the engine once without running it (bad model, unguided ReLU,
bad target), and claims the output directory (refusing another job's output,
resuming its own).

Example:
    >>> cfg = JobConfig(model="model.keras", input="images/", output="maps/", target="label",
    ...                 label_column="label")
    >>> cfg.needed_columns()
    ['image', 'label']
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import posixpath
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from worker import dataset, schema, sink
from worker.decode import DEFAULT_MAX_PIXELS, DecodeError, DecodeOptions, decode_image, decode_mask
from worker.targets import Target

log = logging.getLogger(__name__)


@dataclass
class JobConfig:
    """Everything a run needs; the same fields as the CLI's flags."""

    model: str
    input: str
    output: str
    image_column: str = "image"
    id_column: str | None = None
    label_column: str | None = None
    columns: tuple[str, ...] = ()
    target: str = "predicted"
    method: str = "guided_backprop"
    batch_size: int = 16
    preprocessing: str = "none"
    reduction: str = "max_abs"
    map_dtype: str = "float16"
    score: str = "logits"
    precision: str = "float32"
    relu_policy: str = "error"
    allow_unsafe_deserialization: bool = False
    resize: str = "stretch"
    max_pixels: int = DEFAULT_MAX_PIXELS
    actors: int | None = None
    gpus_per_actor: float | None = None
    cpus_per_actor: float | None = None
    decode_cpus: float | None = None
    gpu_memory_limit_mb: int | None = None
    rows_per_file: int = 1024
    overwrite: bool = False
    files: list[str] | None = None  # only these files of the input (incremental runs)
    statistics: bool = True  # per-row map statistics (worker.stats) as output columns
    mask_column: str | None = None  # ground-truth mask (image/tensor) or box [y0, x0, y1, x1] in [0, 1]
    extra_metadata: dict = field(default_factory=dict)

    def needed_columns(self) -> list[str]:
        cols = [self.image_column, self.id_column, self.label_column, self.mask_column, *self.columns]
        return list(dict.fromkeys(c for c in cols if c))

    def engine_options(self) -> dict:
        return {
            "target": self.target, "batch_size": self.batch_size, "preprocessing": self.preprocessing,
            "reduction": self.reduction, "map_dtype": self.map_dtype, "score": self.score,
            "precision": self.precision, "relu_policy": self.relu_policy,
            "safe_mode": not self.allow_unsafe_deserialization,
        }

    def validate(self) -> None:
        target = Target.parse(self.target)
        if target.kind == "label" and not self.label_column:
            raise ValueError("target 'label' needs label_column (CLI: --label-column)")
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {sorted(METHODS)}")
        if self.batch_size < 1 or self.rows_per_file < 1:
            raise ValueError("batch_size and rows_per_file must be >= 1")
        if "id" in self.columns:
            raise ValueError("'id' is the output's id column; pass it as id_column instead")
        clash = set(self.columns) & set(schema.RESULT_COLUMNS)
        if clash:
            raise ValueError(f"passed-through columns {sorted(clash)} clash with result columns")
        DecodeOptions((1, 1), self.resize, self.max_pixels)
        if self.mask_column and self.resize != "stretch":
            raise ValueError("mask metrics need resize='stretch' (masks and boxes are stretched like the images)")


METHODS = {"guided_backprop": "GuidedBackprop", "gradient": "Gradient"}


def build_engine(config: JobConfig, model_path: str, **overrides):
    from worker import attribution

    cls = getattr(attribution, METHODS[config.method])
    return cls(model_path, **{**config.engine_options(), **overrides})


def fetch_model(uri: str) -> str:
    """A local path for ``uri``; a model on s3:// or gs:// is copied to a temporary directory once."""
    if "://" not in uri:
        return uri
    import pyarrow.fs as pafs

    local = os.path.join(tempfile.gettempdir(), "guided-saliency-models",
                         hashlib.sha1(uri.encode()).hexdigest()[:16], posixpath.basename(uri.rstrip("/")))
    if not os.path.exists(local):
        fs, path = dataset.filesystem(uri)
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"model {uri} does not exist")
        staging = local + f".{os.getpid()}.part"
        os.makedirs(os.path.dirname(staging), exist_ok=True)
        pafs.copy_files(path, staging, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        os.replace(staging, local)
    return local


# -- stages (each runs in Ray workers) --------------------------------------------------------

def read_stage(batch: pa.Table, *, fs, columns, id_column, done_ids) -> pa.Table:
    import ray

    if isinstance(done_ids, ray.ObjectRef):
        done_ids = ray.get(done_ids)
    tables = [dataset.read_unit(fs, dataset.Unit(**row), columns, id_column, done_ids) for row in batch.to_pylist()]
    return pa.concat_tables(tables) if tables else pa.table({})


def image_cells(column) -> list:
    """Python cells of an image column: bytes, HF structs, or ndarrays for tensor columns."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if isinstance(column.type, pa.FixedShapeTensorType):
        valid = column.is_valid().to_numpy(zero_copy_only=False)
        arrays = column.fill_null(0).to_numpy_ndarray() if column.null_count else column.to_numpy_ndarray()
        return [a if ok else None for a, ok in zip(arrays, valid)]
    if isinstance(column, pa.ExtensionArray) and hasattr(column, "to_numpy"):  # Ray's tensor types
        return list(column.to_numpy(zero_copy_only=False))
    return column.to_pylist()


def decode_stage(table: pa.Table, *, image_column, label_column, needs_label, num_classes, options,
                 mask_column=None) -> pa.Table:
    """Decode every image (and mask); a row that cannot be explained keeps zeros and an ``error``."""
    n = table.num_rows
    pixels = np.zeros((n, *options.size, 3), np.uint8)
    errors: list[str | None] = [None] * n
    labels = table[label_column].to_pylist() if label_column else [None] * n
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
            pixels[i] = decode_image(cell, options.size, options.resize, options.max_pixels)
        except DecodeError as exc:
            errors[i] = f"decode: {exc}"
            continue
        if needs_label:
            label = labels[i]
            if label is None:
                errors[i] = "label is missing"
            elif not isinstance(label, (int, np.integer)) or not 0 <= int(label) < num_classes:
                errors[i] = f"label {label!r} out of range [0, {num_classes})"
    table = table.drop_columns([image_column])
    tensor = pa.FixedShapeTensorArray.from_numpy_ndarray(pixels)
    return table.append_column(schema.IMAGE_COLUMN, tensor).append_column("error", pa.array(errors, pa.string()))


class ExplainBatch:
    """Ray Data callable class: builds the engine once, maps a pyarrow batch to output rows."""

    def __init__(self, config: JobConfig, threads: int, map_shape: tuple[int, ...]):
        from worker.runtime import configure_tensorflow

        configure_tensorflow(threads, config.gpu_memory_limit_mb)
        self.config, self.map_shape = config, tuple(map_shape)
        self.engine = build_engine(config, fetch_model(config.model))
        self.k = self.engine.target.maps_per_image
        self._record_worker(threads)
        self.metrics = JobMetrics()

    def _record_worker(self, threads):
        """Write ``_workers/<host>-<pid>.json``: which devices this actor was pinned to."""
        import socket

        import ray
        import tensorflow as tf

        info = {"pid": os.getpid(), "host": socket.gethostname(), "threads": threads,
                "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"),
                "ray_gpu_ids": [str(g) for g in ray.get_gpu_ids()],
                "tf_devices": [d.name for d in tf.config.list_logical_devices()],
                "jit_compile": self.engine.jit_compile}
        fs, root = dataset.filesystem(self.config.output)
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
        images = schema_images(table)[valid]
        labels = None
        if self.engine.target.kind == "label":
            labels = np.asarray(table[self.config.label_column].fill_null(0).to_numpy(zero_copy_only=False))[valid]
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
        from worker import stats

        maps = explanation.as_float32()[:, 0] if explanation is not None else np.zeros((0, *self.map_shape[-2:]))
        values = stats.map_statistics(maps) if len(maps) else {k: np.zeros(0) for k in stats.STAT_COLUMNS}
        if self.config.mask_column:
            masks = table[schema.MASK_COLUMN].combine_chunks().to_numpy_ndarray()[valid]
            values.update(stats.mask_statistics(maps, masks) if len(maps)
                          else {k: np.zeros(0) for k in stats.MASK_COLUMNS})
        return schema.placed_columns(valid, values)

    def _explain(self, images, labels, valid, errors):
        if not len(images):
            return None, errors
        try:
            return self.engine.explain(images, labels), errors
        except Exception as exc:  # noqa: BLE001 - isolate the row(s) that fail, keep the rest
            log.warning("batch failed (%s); explaining its %d rows one by one", exc, len(images))
        rows = np.flatnonzero(valid)
        parts, keep = [], np.zeros(len(images), bool)
        for j, row in enumerate(rows):
            try:
                parts.append(self.engine.explain(images[j:j + 1], None if labels is None else labels[j:j + 1]))
                keep[j] = True
            except Exception as exc:  # noqa: BLE001
                errors[row] = f"explain: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                valid[row] = False
        if not parts:
            return None, errors
        merged = {f.name: np.concatenate([getattr(p, f.name) for p in parts])
                  for f in dataclasses.fields(parts[0]) if f.name != "report"}
        return type(parts[0])(**merged), errors


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


def schema_images(table: pa.Table) -> np.ndarray:
    column = table[schema.IMAGE_COLUMN].combine_chunks()
    return column.to_numpy_ndarray()


# -- the driver ---------------------------------------------------------------------------------

def job_identity(config: JobConfig, report: dict) -> dict:
    """What makes two runs the same job (resume) or different ones (refuse to mix)."""
    keys = ("input", "image_column", "id_column", "label_column", "columns", "target", "method", "preprocessing",
            "reduction", "map_dtype", "score", "precision", "resize", "mask_column", "statistics")
    ident = {k: getattr(config, k) for k in keys}
    ident["columns"] = list(ident["columns"])
    ident["model_fingerprint"] = report["model"]["fingerprint"]
    ident["fingerprint"] = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()
    return ident


def run(config: JobConfig, *, echo=print) -> dict:
    """Run the job to completion and return its summary (also written to ``_summary.json``)."""
    started = time.time()
    config.validate()
    in_fs, units, _ = dataset.plan(config.input, config.needed_columns(), files=config.files)
    probe = build_engine(config, fetch_model(config.model), batch_size=1, warmup=False)
    report = probe.report
    num_classes = probe.source.num_classes
    k = probe.target.maps_per_image
    h, w = probe.source.input_size
    map_shape = (k, h, w) if k > 1 else (h, w)
    if config.reduction == "none":
        map_shape = (*map_shape, probe.source.channels)
    del probe

    import ray

    versions = {"ray": ray.__version__, "pyarrow": pa.__version__, **report["versions"]}
    identity = job_identity(config, report)
    metadata = {**report, "versions": versions, "job": identity, "model_path": config.model,
                "decode": {"resize": config.resize, "max_pixels": config.max_pixels, "size": [h, w]},
                **config.extra_metadata}
    out_fs, out_root = dataset.filesystem(config.output)
    done = sink.prepare(out_fs, out_root, {"fingerprint": identity["fingerprint"], "job": identity,
                                           "metadata": metadata}, overwrite=config.overwrite)
    rows_in = sum(u.rows for u in units)
    if len(done):
        echo(f"resuming: {len(done)} of {rows_in} rows are already in {config.output}")

    result = {"rows": 0, "errors": 0, "files": []}
    if rows_in > len(done):
        if not ray.is_initialized():
            ray.init(logging_level=logging.WARNING,
                     runtime_env={"env_vars": {"TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")}})
        from worker.resources import plan_actors

        plan = plan_actors(ray.cluster_resources(), actors=config.actors, gpus_per_actor=config.gpus_per_actor,
                           cpus_per_actor=config.cpus_per_actor, decode_cpus=config.decode_cpus,
                           gpu_memory_limit_mb=config.gpu_memory_limit_mb)
        metadata["actors"] = plan.describe()
        done_ref = ray.put(np.asarray(done, dtype=object))
        ds = ray.data.from_items([dataclasses.asdict(u) for u in units], override_num_blocks=max(1, len(units)))
        read_columns = config.needed_columns()
        ds = ds.map_batches(read_stage, batch_size=1, batch_format="pyarrow", num_cpus=plan.decode_cpus_per_task,
                            fn_kwargs={"fs": in_fs, "columns": read_columns, "id_column": config.id_column,
                                       "done_ids": done_ref})
        ds = ds.map_batches(decode_stage, batch_size=None, batch_format="pyarrow", num_cpus=plan.decode_cpus_per_task,
                            fn_kwargs={"image_column": config.image_column, "label_column": config.label_column,
                                       "needs_label": Target.parse(config.target).kind == "label",
                                       "num_classes": num_classes,
                                       "options": DecodeOptions((h, w), config.resize, config.max_pixels),
                                       "mask_column": config.mask_column})
        ds = ds.map_batches(ExplainBatch, batch_size=config.batch_size, batch_format="pyarrow",
                            compute=ray.data.ActorPoolStrategy(size=plan.actors), num_cpus=plan.num_cpus, num_gpus=plan.num_gpus or None,
                            fn_constructor_kwargs={"config": config, "threads": plan.threads, "map_shape": map_shape})
        datasink = sink.AtomicParquetDatasink(out_fs, out_root, metadata, config.rows_per_file)
        # writes share the CPUs kept for read/decode: a default 1-CPU write task could wait forever
        # behind actors holding the rest of a small node
        ds.write_datasink(datasink, ray_remote_args={"num_cpus": plan.decode_cpus_per_task})
        result = datasink.result

    ids = sink.read_ids(out_fs, out_root)
    elapsed = time.time() - started
    summary = {
        "output": config.output,
        "rows_in": rows_in,
        "rows_out": int(len(ids)),
        "rows_resumed": int(len(done)),
        "rows_this_run": result["rows"],
        "errors_this_run": result["errors"],
        "duplicate_ids": int(len(ids) - len(set(ids.tolist()))),
        "files_this_run": len(result["files"]),
        "seconds": round(elapsed, 2),
        "rows_per_second": round(result["rows"] / elapsed, 2) if elapsed else None,
        "complete": int(len(ids)) == rows_in,
        "model_fingerprint": identity["model_fingerprint"],
    }
    sink.finish(out_fs, out_root, summary)
    echo(f"done: {summary['rows_this_run']} rows ({summary['errors_this_run']} with errors) in "
         f"{summary['seconds']} s, {summary['rows_per_second']} rows/s; {summary['rows_out']}/{rows_in} rows in "
         f"{config.output}")
    return summary
