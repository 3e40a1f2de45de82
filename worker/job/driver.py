"""The batch job: Parquet -> Ray Data (read, decode, explain on actors) -> Parquet.

Ray Data does the scheduling, streaming, backpressure and retries:
``from_items(row groups) -> read -> decode (CPU tasks, no TensorFlow) ->
ExplainBatch actors (engine built once in __init__) -> atomic Parquet sink``.

Before any cluster time is spent the driver checks the input files and
columns, builds the engine once without running it (bad model, unguided ReLU,
bad target), and claims the output directory (refusing another job's output,
resuming its own).

Examples:
    >>> from worker.job.config import JobConfig
    >>> summary = run(JobConfig(model="model.keras", input="images/", output="maps/"))  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import hashlib
import json
import logging
import os
import sys
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from worker.data import dataset, retry, sink, storage
from worker.data.lease import Lease
from worker.job.config import JobConfig, build_engine
from worker.job.progress import watch
from worker.job.resources import connect, connect_beside, place_actors, starts_embedded
from worker.job.stages import ExplainBatch, decode_stage, read_fidelity, read_stage

log = logging.getLogger(__name__)


def job_identity(config: JobConfig, report: dict) -> dict:
    """What makes two runs the same job (resume) or different ones (refuse to mix)."""
    keys = ("input", "image_column", "id_column", "label_column", "columns", "target", "method", "preprocessing",
            "reduction", "map_dtype", "score", "precision", "resize", "jpeg_draft", "mask_column", "statistics")
    ident = {k: getattr(config, k) for k in keys}
    if config.smooth or config.cam_layer:  # added later: absent when unused, so older outputs still resume
        ident.update(smooth=config.smooth, noise=config.noise, cam_layer=config.cam_layer)
    if config.activations != "relu":
        ident["activations"] = config.activations
    if config.input_format != "auto" or (config.image_feature, config.label_feature) != (
            dataset.DEFAULT_IMAGE_FEATURE, dataset.DEFAULT_LABEL_FEATURE):
        ident.update(input_format=config.input_format, image_feature=config.image_feature,
                     label_feature=config.label_feature)
    ident["columns"] = list(ident["columns"])
    ident["model_fingerprint"] = report["model"]["fingerprint"]
    ident["fingerprint"] = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()
    return ident


def _probe_and_start(config: JobConfig, out_fs, out_root: str):
    """The driver's probe engine (built, not run: it refuses a bad model, target or unguided ReLU before any
    cluster time). For a new output on an embedded Ray, the Ray starts while the probe is built (~6 s of
    ``ray.init`` on a 2-core machine overlap TensorFlow's import and the build); an existing output may need
    no run at all (a no-op re-run), so there Ray starts later, only if rows remain. A model the probe refuses is
    then reported once the Ray start is over (seconds later than alone) and that Ray is shut down again."""
    model = storage.fetch_model(config.model)

    def probe():
        return build_engine(config, model, batch_size=1, warmup=False)

    new_output = retry.call(lambda: out_fs.get_file_info(out_root).type,
                            f"looking up {config.output}") == pafs.FileType.NotFound
    # a missing model is the probe's error at once, with no Ray to start and stop
    if (new_output and os.path.exists(model) and starts_embedded()
            and threading.current_thread() is threading.main_thread()):
        return connect_beside(probe)
    return probe()


#: the most blocks the input's units become: Ray Data puts every block in the object store as the dataset is made
#: (about 2 ms a block on a 2-core host), and a read task takes its block's units one by one
MAX_UNIT_BLOCKS = 1024


def read_with_retry(batch: pa.Table, **kwargs) -> pa.Table:
    """:func:`~worker.job.stages.read_stage` under the storage retry policy (:mod:`worker.data.retry`); an input
    file that vanished or is no longer whole mid-run is a one-line error naming it."""
    paths = sorted(set(batch["path"].to_pylist()))
    return retry.call(lambda: read_stage(batch, **kwargs), f"reading {', '.join(paths)} of the input")


def _errors_since(fs, root: str, before: set[str]):
    """A callable: the rows with an error in the part files committed since ``before`` (progress only)."""
    import pyarrow.parquet as pq

    counted: dict[str, int] = {}

    def count() -> int:
        for path in sink.committed_files(fs, root):
            if path not in counted and path not in before:
                errors = pq.read_table(path, columns=["error"], filesystem=fs)["error"]
                counted[path] = len(errors) - errors.null_count
        return sum(counted.values())

    return count


def _task_error(exc: BaseException) -> BaseException:
    """What a Ray task raised, out of Ray's wrappers (RayTaskError, UserCodeException): a storage step's one
    line, not the remote traceback."""
    seen = [exc]
    while True:
        inner = getattr(seen[-1], "cause", None) or seen[-1].__cause__
        if inner is None or inner in seen:
            break
        seen.append(inner)
    ours = [e for e in seen if isinstance(e, (retry.StorageError, storage.InputError))]
    if not ours:
        return exc
    # the deepest (Ray's wrapper of it is one too, with the remote traceback), less what Ray Data appended to it
    return type(ours[-1])(retry.first_line(ours[-1]))


class _StorageFailureFilter(logging.Filter):
    """Keeps Ray Data's console from printing a storage step's failure as a remote traceback (and as a Ray bug,
    ~200 lines): the driver reports it in one line, and Ray Data's log file still has it all."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = (record.exc_info or sys.exc_info())[1]  # Ray Data logs while it handles the exception
        return exc is None or _task_error(exc) is exc


@contextlib.contextmanager
def _storage_failures_in_one_line():
    handlers = [h for h in logging.getLogger("ray.data").handlers if not type(h).__name__.startswith("SessionFile")]
    quiet = _StorageFailureFilter()
    for handler in handlers:
        handler.addFilter(quiet)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(quiet)


@dataclasses.dataclass
class _Plan:
    """What the driver knows before any cluster time: the input's units, the output, the engine's shape."""

    config: JobConfig
    in_fs: object
    units: list
    out_fs: object
    out_root: str
    num_classes: int
    target_kind: str
    map_shape: tuple
    decode_options: object
    identity: dict
    metadata: dict

    @property
    def rows_in(self) -> int:
        return sum(u.rows for u in self.units)


def _plan(config: JobConfig, echo) -> _Plan:
    """Check the configuration, list the input, build the probe engine, and write down the run record."""
    # all but a missing label column first (cheap); an image folder's or TFRecord's labels are known once listed
    dataclasses.replace(config, label_column=config.label_column or "label").validate()
    source = config.plan_input(files=config.files)
    in_fs, units, in_columns = source.fs, source.units, source.columns
    if source.format != "parquet" and config.label_column is None:
        if "label" not in in_columns and config.target == "label":
            raise storage.InputError(f"target 'label' needs labels: the image folder {config.input} has no class "
                                     "subfolders (put each class's images in a folder named after it)")
        if "label" in in_columns:
            config = dataclasses.replace(config, label_column="label")
    config.validate()
    if config.id_column is None and "id" in in_columns and source.format == "parquet":
        config = dataclasses.replace(config, id_column="id")
        echo("the input has an 'id' column: it is used as the row id (choose another with --id-column)")
    out_fs, out_root = storage.filesystem(config.output)
    probe = _probe_and_start(config, out_fs, out_root)
    report = probe.report
    k = probe.target.maps_per_image
    h, w = probe.source.input_size
    map_shape = (k, *probe.map_shape) if k > 1 else probe.map_shape
    num_classes, target_kind = probe.source.num_classes, probe.target.kind
    del probe

    import ray

    versions = {"ray": ray.__version__, "pyarrow": pa.__version__, **report["versions"]}
    identity = job_identity(config, report)
    decode_options = config.decode_options((h, w))
    # the run record: the audit and its controls rebuild the job's engine from it (the file list of an
    # incremental run is left out: it can be long, and it is in the schedule's manifest)
    record = {**config.to_dict(), "files": None}
    metadata = {**report, "versions": versions, "job": identity, "config": record,
                "decode": dataclasses.asdict(decode_options), "input": source.describe(),
                **({"class_names": list(source.class_names)} if source.class_names else {}), **config.extra_metadata}
    return _Plan(config, in_fs, units, out_fs, out_root, num_classes, target_kind, map_shape, decode_options,
                 identity, metadata)


def _explain_remaining(plan: _Plan, datasink, done: np.ndarray, files_before: list[str], echo) -> float:
    """Start the actors and stream the rows not yet done through read -> decode -> explain -> the sink; the
    seconds spent starting Ray and placing the actors."""
    import ray

    config = plan.config
    started = time.time()
    connect()
    placed = place_actors(config.actor_start_timeout_s, echo, actors=config.actors,
                          gpus_per_actor=config.gpus_per_actor, cpus_per_actor=config.cpus_per_actor,
                          decode_cpus=config.decode_cpus, gpu_memory_limit_mb=config.gpu_memory_limit_mb)
    plan.metadata["actors"] = placed.describe()
    starting = time.time() - started
    done_ref = ray.put(dataset.done_index(done))
    units = [dataclasses.asdict(u) for u in plan.units]
    ds = ray.data.from_items(units, override_num_blocks=max(1, min(len(units), MAX_UNIT_BLOCKS)))
    ds.context.raise_original_map_exception = True  # a read's StorageError, not Ray's UserCodeException
    ds = ds.map_batches(read_with_retry, batch_size=1, batch_format="pyarrow", num_cpus=placed.decode_cpus_per_task,
                        fn_kwargs={"fs": plan.in_fs, "columns": config.needed_columns(),
                                   "id_column": config.id_column, "done": done_ref})
    ds = ds.map_batches(decode_stage, batch_size=None, batch_format="pyarrow", num_cpus=placed.decode_cpus_per_task,
                        fn_kwargs={"image_column": config.image_column, "label_column": config.label_column,
                                   "needs_label": plan.target_kind == "label",
                                   "num_classes": plan.num_classes,
                                   "options": plan.decode_options,
                                   "mask_column": config.mask_column})
    ds = ds.map_batches(ExplainBatch, batch_size=config.batch_size, batch_format="pyarrow",
                        compute=ray.data.ActorPoolStrategy(size=placed.actors), num_cpus=placed.num_cpus,
                        num_gpus=placed.num_gpus or None,
                        fn_constructor_kwargs={"config": config, "threads": placed.threads,
                                               "map_shape": plan.map_shape})
    # writes ask for no CPU, a few at a time: a write that asks for CPUs waits for Ray Data's budget, which the
    # read/decode tasks take whenever reading is the slower side (the actors hold the rest), so every map queued
    # in the object store until the last read was done and a run killed half-way had committed nothing
    # (10 million rows: 303 blocks, 2.5 GiB, queued at 7 minutes, no part written). A part is tens of ms of CPU.
    failure = None
    try:
        with _storage_failures_in_one_line(), watch("explain", plan.rows_in - len(done), "ExplainBatch",
                                                   errors=_errors_since(plan.out_fs, plan.out_root,
                                                                        set(files_before))):
            ds.write_datasink(datasink, ray_remote_args={"num_cpus": 0}, concurrency=max(2, 2 * placed.actors))
    except Exception as exc:
        failure = _task_error(exc)
        if failure is exc:
            raise
    if failure is not None:
        # raised here, not in the except clause: Ray's exception (and through its traceback the executor
        # and its actor handles) is then let go, so the failed run's actors end now and a re-run in this
        # process does not wait for their CPUs. Ray's exception and its traceback's frames form reference cycles
        # that refcounting alone never frees: collected now, not at the collector's next whim (a re-run after a
        # full disk once waited the whole actor_start_timeout_s for the CPUs of a failed run's idle actor)
        del ds
        gc.collect()
        raise failure
    return starting


def run(config: JobConfig, *, echo=print) -> dict:
    """Run the job to completion and return its summary (also written to ``_summary.json``).

    The summary's ``timings`` split the run's seconds: ``planning`` (input listed, probe engine built, output
    claimed and its done ids read: what a resume or a no-op re-run costs before any row), ``starting`` (Ray
    connected, room for the actors found), ``explaining`` (the actors' start-up and the rows streamed through)
    and ``checking`` (every id read back for the duplicate check)."""
    started = time.time()
    plan = _plan(config, echo)
    config, out_fs, out_root = plan.config, plan.out_fs, plan.out_root
    owner = {"fingerprint": plan.identity["fingerprint"], "job": plan.identity, "metadata": plan.metadata}
    # one run at a time per output (OutputBusyError)
    lease = retry.call(Lease(out_fs, out_root).acquire, f"taking the lease on {config.output}")
    try:
        datasink = sink.AtomicParquetDatasink(out_fs, out_root, owner, plan.metadata, config.rows_per_file,
                                              overwrite=config.overwrite)
        done, files_before = datasink.claim()
        rows_in = plan.rows_in
        if len(done):
            echo(f"resuming: {len(done)} of {rows_in} rows are already in {config.output}")
        timings = {"planning": time.time() - started, "starting": 0.0}
        if rows_in > len(done):
            timings["starting"] = _explain_remaining(plan, datasink, done, files_before, echo)
        checking = time.time()
        timings["explaining"] = checking - started - timings["planning"] - timings["starting"]
        # the files committed before this run were read by claim(); read only the ones new since (any a retried
        # write task committed included, so a duplicate across files is still seen)
        before = set(files_before)
        new_files = retry.call(lambda: [f for f in sink.committed_files(out_fs, out_root) if f not in before],
                               f"listing {config.output}")
        ids = np.concatenate([done, sink.read_ids(out_fs, new_files)])
        duplicate_ids = dataset.duplicates(ids)
        timings["checking"] = time.time() - checking
        elapsed = time.time() - started
        summary = {
            "output": config.output,
            "rows_in": rows_in,
            "rows_out": int(len(ids)),
            "rows_resumed": int(len(done)),
            "rows_this_run": datasink.result["rows"],
            "errors_this_run": datasink.result["errors"],
            "duplicate_ids": duplicate_ids,
            "files_this_run": len(datasink.result["files"]),
            "seconds": round(elapsed, 2),
            "timings": {k: round(v, 2) for k, v in timings.items()},
            "rows_per_second": round(datasink.result["rows"] / elapsed, 2) if elapsed else None,
            "complete": int(len(ids)) == rows_in,
            "model_fingerprint": plan.identity["model_fingerprint"],
        }
        fidelity, unmeasured = retry.call(lambda: read_fidelity(out_fs, out_root, config.precision),
                                          f"reading the fidelity records in {config.output}")
        if config.precision != "float32":
            summary["fidelity"] = {**dataclasses.asdict(fidelity), "below_bar": fidelity.below_bar} if fidelity \
                else {"precision": config.precision, "maps": 0, "unmeasured": unmeasured}
        datasink.finish(summary)
        echo(f"done: {summary['rows_this_run']} rows ({summary['errors_this_run']} with errors) in "
             f"{summary['seconds']} s, {summary['rows_per_second']} rows/s; {summary['rows_out']}/{rows_in} rows in "
             f"{config.output}" + (f"; {fidelity.line()}" if fidelity else ""))
        if fidelity and fidelity.below_bar:
            echo(fidelity.warning())
        return summary
    finally:
        lease.release()
