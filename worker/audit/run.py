"""The audit of a job's output on Ray Data: read the committed parts, reduce each block to partial
aggregates (:mod:`~worker.audit.aggregate`), merge them in the driver, cluster a sample per class and assign
every map (:mod:`~worker.audit.clusters`), flag findings (:mod:`~worker.audit.findings`), run the controls
with the job's own engine rebuilt from its run record (:mod:`~worker.audit.controls`) and write the report
(:mod:`~worker.audit.report`).

Example:
    >>> result = run_audit("maps/", "report/", controls=16)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from worker.audit.aggregate import (
    Group,
    Worst,
    assignment_partials,
    downsample,
    merge_assignments,
    merge_partials,
    partial_aggregates,
    resolve,
)
from worker.audit.clusters import add_cluster_examples, assign, cluster_groups
from worker.audit.compare import compare_methods as compare_methods_on
from worker.audit.controls import run_controls
from worker.audit.findings import findings, intervention_findings
from worker.audit.findings import order as finding_order
from worker.audit.intervene import FILLS, PLACEMENTS, fill, probe_region
from worker.audit.localise import candidates
from worker.audit.report import write_report
from worker.data import sink, storage
from worker.data.dataset import done_index, plan, read_unit, units_holding
from worker.data.decode import DecodeError, DecodeOptions, decode_mask, image_cells
from worker.data.schema import read_metadata
from worker.engine.allowlist import SideEffectError
from worker.engine.models import UnsafeModelError
from worker.job.config import JobConfig, build_engine
from worker.job.progress import watch
from worker.job.resources import connect


def decoded_rows(config, options, with_labels: bool = False, ids=None, with_masks: bool = False):
    """Yield (id, image, label or None, mask or None) for every decodable row of the job's input (``config``, its
    run record), decoded with the job's ``options`` (:class:`~worker.data.decode.DecodeOptions`) at the model's
    input size, masks by :func:`~worker.data.decode.decode_mask` (``with_masks``, where the job had a mask column);
    with ``ids``, only those rows (derived ids open only the row groups they name)."""
    label, mask = config.label_column if with_labels else None, config.mask_column if with_masks else None
    columns = [c for c in (config.image_column, label, mask) if c]
    fs, units, _ = plan(config.input, columns, input_format=config.input_format, image_feature=config.image_feature,
                        label_feature=config.label_feature)
    only = None if ids is None else done_index(list(ids))
    for unit in units if ids is None else units_holding(units, ids, config.id_column):
        table = read_unit(fs, unit, columns, config.id_column, only=only)
        empty = [None] * table.num_rows
        labels = table[label].to_pylist() if label else empty
        masks = image_cells(table[mask]) if mask else empty
        for row_id, cell, value, region in zip(table["id"].to_pylist(), image_cells(table[config.image_column]),
                                               labels, masks):
            try:
                yield (row_id, options.decode(cell), value,
                       None if region is None else decode_mask(region, options.size, options.max_pixels))
            except DecodeError:
                continue


@dataclass
class InputSample:
    """Rows of the job's input read and decoded as the job did (:func:`sample_input`): their ``ids``, ``images``
    (N, H, W, 3) uint8 at the model's input size, ``classes`` (each label resolved as the aggregates resolve it;
    None without a label column) and ``masks`` ((N, H, W) bool; None without a mask column)."""

    ids: list[str]
    images: np.ndarray
    classes: list | None
    masks: np.ndarray | None

    def by_class(self) -> dict:
        """{class: its images}, in the sample's order."""
        found: dict = {}
        for cls, image in zip(self.classes or [], self.images):
            found.setdefault(cls, []).append(image)
        return {cls: np.stack(images) for cls, images in found.items()}


def sample_input(config, options, n: int, classes=None, most: int | None = None, names=None,
                 masks: bool = False) -> InputSample:
    """The audit's one sampler of the job's input (controls, interventions, the classes' mean images, the method
    comparison): up to ``n`` decodable rows of each class in ``classes``, by the job's label column with each label
    resolved by :func:`~worker.audit.aggregate.resolve` with the job's class ``names``, in the order of ``classes``;
    or, with ``classes`` None, the first ``n`` rows. Read until each class has them or ``most`` rows were read;
    ``masks`` decodes the job's mask column too."""
    labelled = classes is not None and bool(config.label_column)
    found: dict = {c: [] for c in classes} if labelled else {None: []}
    with_masks = masks and bool(config.mask_column)
    for row_id, image, label, mask in itertools.islice(
            decoded_rows(config, options, with_labels=labelled, with_masks=with_masks), most):
        cls = resolve(label, names) if labelled else None
        if cls in found and len(found[cls]) < n:
            found[cls].append((row_id, image, cls, mask))
            if all(len(v) == n for v in found.values()):
                break
    rows = [row for v in found.values() for row in v]
    return InputSample(ids=[r[0] for r in rows],
                       images=np.stack([r[1] for r in rows]) if rows else np.zeros((0, *options.size, 3), np.uint8),
                       classes=[r[2] for r in rows] if labelled else None,
                       masks=np.stack([r[3] for r in rows]) if with_masks and rows else None)


def images_by_id(config, options, ids) -> dict[str, np.ndarray]:
    """The decoded input images of a few rows (the worst cases), read as the job read them."""
    return {row_id: image for row_id, image, _, _ in decoded_rows(config, options, ids=ids)}


LIBRARIES = {"scipy": "scipy", "sklearn": "scikit-learn", "skimage": "scikit-image"}  # module: distribution


def require_libraries() -> None:
    """Raise one line naming the install when a library the audit's statistics come from is missing."""
    import importlib.util

    missing = [name for module, name in LIBRARIES.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise RuntimeError(f"the audit needs {', '.join(missing)}: pip install 'guided-saliency[audit]'")


def run_record(metadata: dict, allow_unsafe_deserialization: bool = False, allow_side_effects: bool = False):
    """The job's :class:`~worker.job.config.JobConfig` from an output's metadata (None if it has none), with the
    opt-ins passed here, never those recorded."""
    if "config" not in metadata:
        return None
    return JobConfig.from_dict(metadata["config"], allow_unsafe_deserialization=allow_unsafe_deserialization,
                               allow_side_effects=allow_side_effects)


def _read_files(batch: pa.Table, *, fs) -> pa.Table:
    return pa.concat_tables([pq.read_table(p, filesystem=fs) for p in batch["path"].to_pylist()],
                            promote_options="permissive")


def _read_outputs(fs, files):
    """A Ray Dataset of committed output files, one block per file, read with pyarrow in the tasks (Ray's
    ``read_parquet(filesystem=...)`` probes fsspec's HTTP module, which fails without aiohttp)."""
    import ray

    return ray.data.from_items([{"path": f} for f in files], override_num_blocks=len(files)).map_batches(
        _read_files, batch_size=1, batch_format="pyarrow", fn_kwargs={"fs": fs})


class SampleCaps:
    """A Ray actor holding :func:`~worker.audit.aggregate.sample_caps` of what the driver has merged so far,
    for the aggregation tasks still to run."""

    def __init__(self):
        self.caps: dict = {}

    def set(self, caps: dict) -> None:
        self.caps = caps

    def get(self) -> dict:
        return self.caps


def _capped_partials(table: pa.Table, *, label_column, caps, names) -> pa.Table:
    import ray

    return partial_aggregates(table, label_column, caps=ray.get(caps.get.remote()), names=names)


def _aggregate(fs, files, label_column, names=None) -> dict:
    """The first pass: every output file reduced to partial aggregates in a task (a whole file at a time) and
    merged in the driver as they arrive.  The driver holds only the merged state, and tells the tasks the
    samples' caps as they tighten, so each block sends about ``SAMPLE_SIZE x its rows / rows merged`` sampled
    maps per group rather than all of them (the merged sample is the same: a row above a cap cannot enter)."""
    import ray

    caps = ray.remote(num_cpus=0)(SampleCaps).remote()
    partials = _read_outputs(fs, files).map_batches(_capped_partials, batch_format="pyarrow", batch_size=None,
                                                    fn_kwargs={"label_column": label_column, "caps": caps,
                                                               "names": names})
    try:
        with watch("audit: aggregating", len(files), "_read_files", unit="files"):
            return merge_partials(partials.iter_batches(batch_format="pyarrow", batch_size=None),
                                  on_caps=caps.set.remote)
    finally:
        ray.kill(caps)


def _classes_of(merged: dict, kind: str) -> list:
    """The classes of the groups of ``kind`` that hold rows, in the groups' order."""
    return [g.cls for g, v in merged.items() if isinstance(g, Group) and g.kind == kind and v["count"]]


MIN_IMAGES = 5  # a region is probed on at least this many of its class's (or cluster's) images


def _interventions(merged: dict, clusters: dict, fitted: dict, engine, samples: dict,
                   seed: int = 0) -> list[dict]:
    """Localise each labelled class's regions, and its SpRAy clusters' (:func:`~worker.audit.localise.candidates`),
    and probe them (:mod:`~worker.audit.intervene`): a cluster's region on the sampled images whose maps fall in
    that cluster."""
    results = []
    for cls, images in samples.items():
        key = Group("true", cls)
        if key not in merged or len(images) < MIN_IMAGES or isinstance(cls, str):  # a logit needs a class index
            continue
        others = np.concatenate([v for c, v in samples.items() if c != cls])
        others = others[np.random.default_rng(seed).permutation(len(others))[:max(len(images), 8)]]
        members = None
        for cluster, region in candidates(merged, key, clusters.get(key)):
            chosen, mean_map = images, merged[key]["mean_map"]
            if cluster is not None:
                if members is None:  # the sample's own maps, assigned as the audit assigned every map
                    grids = downsample(engine.explain(images).as_float32()[:, 0])
                    members = assign(grids.reshape(len(images), -1), fitted[key].centroids)
                chosen = images[members == cluster]
                mean_map = next(c["mean_map"] for c in clusters[key] if c["cluster"] == cluster)
                if len(chosen) < MIN_IMAGES:
                    continue
            probed = probe_region(engine.predict, cls, region, chosen, others, seed)
            probed["examples"] = _examples(engine, cls, probed, chosen, others)
            results.append({**probed, "cluster": cluster, "share": region["share"],
                            "mean_image": chosen.mean(0).astype(np.uint8), "mean_map": mean_map})
    return results


def _cluster_members(engine, samples: dict, fitted: dict, clusters: dict, n: int = 3) -> None:
    """Attach to each SpRAy cluster of a labelled class its most typical sampled images with their full maps
    (``members``: the class's sampled images assigned as the audit assigned every map, nearest the centroid
    first), so the report shows a cluster's members as images, not only maps."""
    for key, found in clusters.items():
        if key.kind != "true" or len(found) < 2 or key not in fitted or key.cls not in samples:
            continue
        images = samples[key.cls]
        maps = engine.explain(images).as_float32()[:, 0]
        grids = downsample(maps).reshape(len(images), -1)
        centroids = fitted[key].centroids
        members = assign(grids, centroids)
        distance = ((grids - centroids[members]) ** 2).sum(1)
        for c in found:
            chosen = np.flatnonzero(members == c["cluster"])
            c["members"] = [{"image": images[i], "map": maps[i]} for i in chosen[np.argsort(distance[chosen])][:n]]


def _examples(engine, cls, probed, images, others, n: int = 2) -> list[dict]:
    """A few of the class's images with their maps, and the same images after each fill, with the model's
    class and logit: what the report shows beside the numbers."""
    rng = np.random.default_rng(1)
    mean_image = np.concatenate([images, others]).mean(0).astype(np.uint8)
    # first the images the region's mean fill moves off the class: the evidence, when there is some
    moved = engine.predict(fill(images, tuple(probed["pixels"]), "mean", mean_image, others, rng)).argmax(1) != cls
    chosen = images[np.argsort(~moved, kind="stable")[:n]]
    maps = engine.explain(chosen).as_float32()[:, 0]
    out = []
    for i, image in enumerate(chosen):
        versions = {"original": image[None]}
        versions.update({how: fill(image[None], tuple(probed["pixels"]), how, mean_image, others, rng)
                         for how in FILLS})
        logits = engine.predict(np.concatenate(list(versions.values())))
        out.append({"map": maps[i], "versions": {name: {"image": v[0], "predicted": int(logits[j].argmax()),
                                                        "logit": float(logits[j, cls])}
                                                 for j, (name, v) in enumerate(versions.items())}})
    return out


MEAN_IMAGES = 16  # the report's mean image of a class: of its first this many images
MEAN_IMAGE_ROWS = 20_000  # read at most this many rows to find them


def run_audit(output: str, report_dir: str | None = None, label_column: str | None = None,
              controls: int = 0, model: str | None = None, interventions: int = 0, echo=None,
              compare_methods: int = 0, allow_unsafe_deserialization: bool = False,
              allow_side_effects: bool = False) -> dict:
    """Aggregate a job's output with Ray Data; write audit.json and report.html to ``report_dir``.

    ``label_column`` defaults to the job's. ``controls=N`` adds the sanity controls of :mod:`worker.audit.controls`
    on the first N input images, with the engine the job used, rebuilt from its run record (``model``
    defaults to the job's model; a remote one is fetched). ``interventions=N`` localises each labelled class's
    regions and confirms or refutes each by intervening on N images of the class
    (:mod:`worker.audit.intervene`). ``compare_methods=N`` measures every method's faithfulness and sanity on N
    images per class with the job's model (:mod:`worker.audit.compare`). The model is loaded and run with the
    opt-ins passed here (``allow_unsafe_deserialization``, ``allow_side_effects``: the auditor's own), never
    with those in the job's run record; a model that needs one not passed is not run: the steps that need it
    are skipped, saying so in one line (``result["skipped"]``). ``echo`` (e.g. ``print``) gets a line
    per step and a summary; the passes over the maps show one progress line on stderr (:mod:`worker.job.progress`)."""
    require_libraries()
    echo = echo or (lambda *_: None)
    began = time.perf_counter()

    fs, root = storage.filesystem(output)
    files = sink.committed_files(fs, root)
    if not files:
        raise ValueError(f"{output} holds no committed output files")
    metadata = read_metadata(pq.read_schema(files[0], filesystem=fs)) or {}
    config = run_record(metadata, allow_unsafe_deserialization, allow_side_effects)
    # the job owner's opt-ins are reported, never used: the auditor's own are
    recorded = metadata.get("config") if isinstance(metadata.get("config"), dict) else {}
    chose = [f for f in ("allow_unsafe_deserialization", "allow_side_effects") if recorded.get(f)]
    if chose:
        echo(f"audit: the job was run with {', '.join('--' + f.replace('_', '-') for f in chose)}; this audit "
             "uses only the opt-ins on its own command line")
    if label_column is None:
        label_column = config.label_column if config is not None else "label"
    names = metadata.get("class_names") if isinstance(metadata.get("class_names"), list) else None
    connect(logging_level="ERROR")
    merged = _aggregate(fs, files, label_column, names)
    fitted = cluster_groups(merged)
    centroids = {g: c.centroids.tolist() for g, c in fitted.items() if c.k > 1}
    clusters = {g: [{"cluster": 0, "count": merged[g]["count"], "share": 1.0, "mean_map": merged[g]["mean_map"]}]
                for g, c in fitted.items() if c.k == 1}
    if centroids:
        assigned = _read_outputs(fs, files).map_batches(
            assignment_partials, batch_format="pyarrow", batch_size=None,
            fn_kwargs={"centroids": centroids, "label_column": label_column, "names": names})
        with watch("audit: assigning clusters", len(files), "_read_files", unit="files"):
            clusters.update(merge_assignments(assigned.iter_batches(batch_format="pyarrow", batch_size=None)))
    add_cluster_examples(merged, fitted, clusters)
    result = {"output": output, "groups": merged, "clusters": clusters, "findings": findings(merged, clusters, names),
              "metadata": metadata}
    if (controls or interventions or compare_methods) and config is None:
        raise ValueError(f"{output} was written without a run record (an older version): the controls and "
                         "interventions cannot rebuild its engine; run the job again into a new output")
    options = DecodeOptions.from_dict(metadata["decode"]) if config is not None else None
    labelled_config = config and dataclasses.replace(config, label_column=label_column)
    if controls or interventions or compare_methods:
        model_path = storage.fetch_model(model or config.model)

        def make_engine(source=None, method=None, **overrides):
            """The job's engine (same method and options, or another ``method``) on ``source`` (default: the job's
            model)."""
            run = config if method is None else dataclasses.replace(config, method=method)
            return build_engine(run, model_path if source is None else source, **{"batch_size": 32, **overrides})

        try:  # the model is checked before any step runs it
            make_engine(batch_size=1)
        except (UnsafeModelError, SideEffectError) as exc:
            result["skipped"] = f"controls, interventions and method comparison skipped: {exc}"
            echo(f"audit: {result['skipped']}")
            controls = interventions = compare_methods = 0

    if config is not None:  # the worst cases' own images, beside their maps (when the input is still there)
        worst = [w for g, v in merged.items() if isinstance(g, Worst) for w in v["worst"]]
        try:
            found = images_by_id(config, options, {w["id"] for w in worst})
        except (OSError, ValueError) as exc:  # InputError is a ValueError
            found, result["worst_images"] = {}, f"not shown: the job's input cannot be read ({exc})"
        for w in worst:
            if w["id"] in found:
                w["image"] = found[w["id"]]
    rows = sum(v["count"] for g, v in merged.items() if isinstance(g, Group) and g.kind == "predicted")
    labelled = _classes_of(merged, "true")
    echo(f"audit: {rows} maps in {len(files)} files aggregated and clustered in {time.perf_counter() - began:.1f} s")
    if controls:
        tick = time.perf_counter()
        images = sample_input(config, options, controls).images
        result["controls"] = run_controls(make_engine, images, safe_mode=not config.allow_unsafe_deserialization)
        echo(f"audit: controls on {len(images)} images in {time.perf_counter() - tick:.1f} s")
    if interventions:
        if not label_column:
            raise ValueError("interventions need the true class of each image: the job had no label column")
        if labelled and all(isinstance(c, str) for c in labelled):
            raise ValueError("interventions need class indices, and the labels name classes the job did not record: "
                             "run the job with extra_metadata={'class_names': [...]} in the model's class order")
        started = time.perf_counter()
        engine = make_engine(map_dtype="float32", reduction="max_abs", target="predicted")
        samples = sample_input(labelled_config, options, interventions, labelled, names=names).by_class()
        probed = _interventions(merged, clusters, fitted, engine, samples)
        _cluster_members(engine, samples, fitted, clusters)
        result["interventions"] = {"images_per_class": interventions, "regions": probed,
                                   "seconds": round(time.perf_counter() - started, 1),
                                   "cost": f"per region {interventions} x (1 + {PLACEMENTS}) x {len(FILLS)} + "
                                           f"about {3 * interventions} forward passes"}
        result["findings"] = sorted(result["findings"] + intervention_findings(probed, names), key=finding_order)
        result["class_images"] = {c: v[:MEAN_IMAGES].mean(0).astype(np.uint8) for c, v in samples.items()}
        verdicts = [p["verdict"] for p in probed]
        echo(f"audit: interventions on {len(probed)} regions in {result['interventions']['seconds']} s: "
             + (", ".join(f"{verdicts.count(v)} {v}" for v in dict.fromkeys(verdicts)) or "no region to probe"))
    elif config is not None and label_column:  # the report's mean image of each class, beside its maps
        try:
            samples = sample_input(labelled_config, options, MEAN_IMAGES, labelled, most=MEAN_IMAGE_ROWS,
                                   names=names).by_class()
            result["class_images"] = {c: v.mean(0).astype(np.uint8) for c, v in samples.items()}
        except (OSError, ValueError):  # the input is gone: the report shows the maps alone
            pass
    if compare_methods:
        per_class = compare_methods if label_column else compare_methods * len(_classes_of(merged, "predicted"))
        sample = sample_input(labelled_config, options, per_class, labelled if label_column else None, names=names,
                              masks=True)
        result["method_comparison"] = compare_methods_on(
            make_engine, sample.images, sample.ids, sample.classes, sample.masks,
            safe_mode=not config.allow_unsafe_deserialization, echo=echo)
        echo(f"audit: methods compared on {len(sample.ids)} images in "
             f"{result['method_comparison']['seconds']} s: {result['method_comparison']['sentence']}")
    if report_dir:
        write_report(result, report_dir)
    high = [f for f in result["findings"] if f["severity"] == "high"]
    echo(f"audit: done in {time.perf_counter() - began:.1f} s: {len(result['findings'])} findings ({len(high)} high)"
         + "".join(f"; {Group.of(f).title(names)}: {f['finding']}" for f in high[:5])
         + (f"; report in {report_dir}/report.html" if report_dir else ""))
    return result
