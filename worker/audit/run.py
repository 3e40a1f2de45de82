"""The audit of a job's output on Ray Data: read the committed parts, reduce each block to partial
aggregates (:mod:`~worker.audit.aggregate`), merge them in the driver, cluster a sample per class and assign
every map (:mod:`~worker.audit.clusters`), flag findings (:mod:`~worker.audit.findings`), run the controls
with the job's own engine rebuilt from its run record (:mod:`~worker.audit.controls`) and write the report
(:mod:`~worker.audit.report`).

Example:
    >>> result = run_audit("maps/", "report/", controls=16)  # doctest: +SKIP
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from worker.audit.aggregate import (
    assignment_partials,
    merge_assignments,
    merge_partials,
    partial_aggregates,
)
from worker.audit.clusters import add_cluster_examples, cluster_groups
from worker.audit.controls import run_controls
from worker.audit.findings import findings
from worker.audit.report import write_report
from worker.data import sink, storage
from worker.data.dataset import plan, read_unit
from worker.data.decode import DecodeError, DecodeOptions, image_cells
from worker.data.schema import read_metadata
from worker.job.config import JobConfig, build_engine
from worker.job.resources import connect


def sample_images(config, options, n: int) -> np.ndarray:
    """The first ``n`` decodable images of the job's input (``config``, its run record), decoded with the job's
    ``options`` (:class:`~worker.data.decode.DecodeOptions`) at the model's input size."""
    fs, units, _ = plan(config.input, [config.image_column])
    images = []
    for unit in units:
        table = read_unit(fs, unit, [config.image_column], None)
        for cell in image_cells(table[config.image_column]):
            try:
                images.append(options.decode(cell))
            except DecodeError:
                continue
            if len(images) == n:
                return np.stack(images)
    return np.stack(images) if images else np.zeros((0, *options.size, 3), np.uint8)


def run_record(metadata: dict):
    """The job's :class:`~worker.job.config.JobConfig` from an output's metadata (None if it has none)."""
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

    fs, root = storage.filesystem(output)
    files = sink.committed_files(fs, root)
    if not files:
        raise ValueError(f"{output} holds no committed output files")
    metadata = read_metadata(pq.read_schema(files[0], filesystem=fs)) or {}
    config = run_record(metadata)
    if label_column is None:
        label_column = config.label_column if config is not None else "label"
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
        if config is None:
            raise ValueError(f"{output} was written without a run record (an older version): the controls "
                             "cannot rebuild its engine; run the job again into a new output")
        images = sample_images(config, DecodeOptions.from_dict(metadata["decode"]), controls)
        model_path = storage.fetch_model(model or config.model)

        def make_engine(source=None, **overrides):
            """The job's engine (same method and options) on ``source`` (default: the job's model)."""
            return build_engine(config, model_path if source is None else source,
                                **{"batch_size": min(32, max(1, len(images))), **overrides})

        result["controls"] = run_controls(make_engine, images, safe_mode=not config.allow_unsafe_deserialization)
    if report_dir:
        write_report(result, report_dir)
    return result
