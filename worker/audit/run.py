"""The audit of a job's output, as a short sequence of named steps, each a function here:

1. **read** (:func:`read_job`): the output's committed files, the job's metadata and run record;
2. **reduce** (:func:`reduce_maps`): every block of maps reduced to partial aggregates on Ray Data and merged in
   the driver (:mod:`~worker.audit.aggregate`);
3. **cluster** (:func:`cluster_maps`): SpRAy on a sample per class, every map assigned (:mod:`~worker.audit.clusters`);
4. the model, checked once (:func:`model_engines`), and one **sample** of the job's input (:func:`sample_job_input`,
   :mod:`~worker.audit.sample`) that the next three steps share;
5. **control** (:func:`control_maps`, :mod:`~worker.audit.controls`), **intervene** (:func:`intervene`,
   :mod:`~worker.audit.intervene`), **compare** (:func:`compare`, :mod:`~worker.audit.compare`);
6. **report** (:func:`~worker.audit.report.write_report`): the one place that writes files.

Each step returns its part; :func:`run_audit` puts them in an :class:`~worker.audit.result.AuditResult`.

Examples:
    >>> result = run_audit("maps/", "report/", controls=16)  # doctest: +SKIP
    >>> result.findings[0].finding, result.controls.similarity_to_real["edges"].spearman  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
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
)
from worker.audit.clusters import Cluster, Member, assign, cluster_groups, with_examples
from worker.audit.compare import compare_methods as compare_methods_on
from worker.audit.controls import Controls, run_controls
from worker.audit.findings import findings, intervention_findings
from worker.audit.findings import order as finding_order
from worker.audit.intervene import FILLS, PLACEMENTS, Example, ProbedRegion, Version, fill, probe_region
from worker.audit.localise import candidates
from worker.audit.report import ClusterMembers, write_report
from worker.audit.result import AuditResult, Interventions, MethodComparison
from worker.audit.sample import Draw, draw, images_by_id
from worker.data import sink, storage
from worker.data.decode import DecodeOptions
from worker.data.schema import read_metadata
from worker.engine.allowlist import SideEffectError
from worker.engine.models import UnsafeModelError
from worker.job.config import JobConfig, build_engine
from worker.job.progress import watch
from worker.job.resources import connect


# module: distribution
LIBRARIES = {"scipy": "scipy", "sklearn": "scikit-learn", "skimage": "scikit-image", "jinja2": "jinja2"}


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


@dataclass(frozen=True)
class JobOutput:
    """What the audit reads of a job's output before any pass over its maps: its committed ``files`` on ``fs``,
    the job's recorded ``metadata``, its run record (``config``, a :class:`~worker.job.config.JobConfig` with the
    auditor's own opt-ins; None for an output written without one), the ``label_column`` the audit groups by, the
    recorded class ``names`` and the job's decode ``options``."""

    output: str
    fs: object
    files: list
    metadata: dict
    config: JobConfig | None
    label_column: str | None
    names: list | None
    options: DecodeOptions | None

    @property
    def input_config(self) -> JobConfig | None:
        """The run record with the audit's label column: what the input is read with."""
        return self.config and dataclasses.replace(self.config, label_column=self.label_column)


@dataclass(frozen=True)
class Asked:
    """The model steps asked for: images for the controls, per class for the interventions and for the method
    comparison (0: not run)."""

    controls: int = 0
    interventions: int = 0
    compare_methods: int = 0

    def __bool__(self) -> bool:
        return bool(self.controls or self.interventions or self.compare_methods)


NONE_ASKED = Asked()


def read_job(output: str, label_column: str | None = None, allow_unsafe_deserialization: bool = False,
             allow_side_effects: bool = False, echo=None) -> JobOutput:
    """The read step: the output's committed files, the job's metadata and run record (with the auditor's
    opt-ins, never those recorded: a recorded opt-in is only reported, through ``echo``)."""
    echo = echo or (lambda *_: None)
    fs, root = storage.filesystem(output)
    files = sink.committed_files(fs, root)
    if not files:
        raise ValueError(f"{output} holds no committed output files")
    metadata = read_metadata(pq.read_schema(files[0], filesystem=fs)) or {}
    config = run_record(metadata, allow_unsafe_deserialization, allow_side_effects)
    recorded = metadata.get("config") if isinstance(metadata.get("config"), dict) else {}
    chose = [f for f in ("allow_unsafe_deserialization", "allow_side_effects") if recorded.get(f)]
    if chose:
        echo(f"audit: the job was run with {', '.join('--' + f.replace('_', '-') for f in chose)}; this audit "
             "uses only the opt-ins on its own command line")
    if label_column is None:
        label_column = config.label_column if config is not None else "label"
    names = metadata.get("class_names") if isinstance(metadata.get("class_names"), list) else None
    options = DecodeOptions.from_dict(metadata["decode"]) if config is not None else None
    return JobOutput(output, fs, files, metadata, config, label_column, names, options)


def reduce_maps(job: JobOutput) -> tuple[dict, dict]:
    """The reduce step (a pass over the maps on Ray Data): ({Group: GroupSummary}, {statistic: WorstCases})."""
    merged = _aggregate(job.fs, job.files, job.label_column, job.names)
    return ({g: v for g, v in merged.items() if isinstance(g, Group)},
            {g.statistic: v for g, v in merged.items() if isinstance(g, Worst)})


def cluster_maps(job: JobOutput, groups: dict, members: ClusterMembers | None = None) -> tuple[dict, dict]:
    """The cluster step: SpRAy on each group's sample, then every map assigned to its nearest cluster (a second
    pass over the maps, only where some group splits), each map's cluster written to ``members`` where given;
    ({Group: [Cluster]}, {Group: Clustering})."""
    fitted = cluster_groups(groups)
    centroids = {g: c.centroids.tolist() for g, c in fitted.items() if c.k > 1}
    clusters = {g: [Cluster(0, groups[g].count, 1.0, groups[g].mean_map)] for g, c in fitted.items() if c.k == 1}
    if centroids:
        assigned = _read_outputs(job.fs, job.files).map_batches(
            assignment_partials, batch_format="pyarrow", batch_size=None,
            fn_kwargs={"centroids": centroids, "label_column": job.label_column, "names": job.names,
                       "with_ids": members is not None})
        partials = assigned.iter_batches(batch_format="pyarrow", batch_size=None)
        with watch("audit: assigning clusters", len(job.files), "_read_files", unit="files"):
            clusters.update(merge_assignments(members.tee(partials) if members else partials))
    if members:
        members.close()
    return with_examples(groups, fitted, dict(sorted(clusters.items()))), fitted


def model_engines(job: JobOutput, model: str | None = None):
    """The job's engine factory for the model steps, with the model checked before any step runs it:
    (``make_engine``, None), or (None, why the steps are skipped) when the model needs an opt-in the auditor did
    not give."""
    if job.config is None:
        raise ValueError(f"{job.output} was written without a run record (an older version): the controls and "
                         "interventions cannot rebuild its engine; run the job again into a new output")
    model_path = storage.fetch_model(model or job.config.model)

    def make_engine(source=None, method=None, **overrides):
        """The job's engine (same method and options, or another ``method``) on ``source`` (default: the job's
        model)."""
        run = job.config if method is None else dataclasses.replace(job.config, method=method)
        return build_engine(run, model_path if source is None else source, **{"batch_size": 32, **overrides})

    try:
        make_engine(batch_size=1)
    except (UnsafeModelError, SideEffectError) as exc:
        return None, f"controls, interventions and method comparison skipped: {exc}"
    return make_engine, None


def sample_job_input(job: JobOutput, asked: Asked, labelled: list, predicted: list) -> Draw | None:
    """The one sample of the job's input that the controls, the interventions, the method comparison and the
    classes' mean images take their images from (None without a run record). Without any model step, only the
    mean images are wanted: read at most :data:`MEAN_IMAGE_ROWS` rows, and an input that cannot be read leaves
    them out."""
    if job.config is None:
        return None
    by_class = bool(job.label_column)
    first = max(asked.controls, 0 if by_class else asked.compare_methods * len(predicted))
    per_class = max(asked.interventions, asked.compare_methods, MEAN_IMAGES) if by_class else 0
    try:
        return draw(job.input_config, job.options, first, per_class, labelled if by_class else None, job.names,
                    most=None if asked else MEAN_IMAGE_ROWS, masks=bool(asked.compare_methods))
    except (OSError, ValueError):  # InputError is a ValueError
        if asked:
            raise
        return None  # the input is gone: the report shows the maps alone


def worst_images(job: JobOutput, worst: dict) -> tuple[dict, str | None]:
    """The worst cases with their own input images (read by id, when the input is still there), and a note when
    they cannot be shown."""
    if job.config is None:
        return worst, None
    try:
        found = images_by_id(job.config, job.options, {w.id for v in worst.values() for w in v.worst})
    except (OSError, ValueError) as exc:  # InputError is a ValueError
        return worst, f"not shown: the job's input cannot be read ({exc})"
    return {name: dataclasses.replace(v, worst=[dataclasses.replace(w, image=found.get(w.id)) for w in v.worst])
            for name, v in worst.items()}, None


def control_maps(make_engine, job: JobOutput, sample: Draw, n: int) -> Controls:
    """The control step (:func:`~worker.audit.controls.run_controls`) on the sample's first ``n`` images."""
    return run_controls(make_engine, sample.first(n).images, safe_mode=not job.config.allow_unsafe_deserialization)


def intervene(make_engine, job: JobOutput, groups: dict, clusters: dict, fitted: dict, sample: Draw,
              n: int) -> tuple[Interventions, dict]:
    """The intervention step on ``n`` sampled images per labelled class: (the probed regions, the clusters with
    their typical members as images)."""
    if not job.label_column:
        raise ValueError("interventions need the true class of each image: the job had no label column")
    labelled = _classes_of(groups, "true")
    if labelled and all(isinstance(c, str) for c in labelled):
        raise ValueError("interventions need class indices, and the labels name classes the job did not record: "
                         "run the job with extra_metadata={'class_names': [...]} in the model's class order")
    started = time.perf_counter()
    engine = make_engine(map_dtype="float32", reduction="max_abs", target="predicted")
    drawn = sample.per_class(n)
    samples = drawn.by_class()
    probed = _interventions(groups, clusters, fitted, engine, samples, drawn.ids_by_class())
    section = Interventions(n, probed, round(time.perf_counter() - started, 1),
                            f"per region {n} x (1 + {PLACEMENTS}) x {len(FILLS)} + about {3 * n} forward passes")
    return section, _cluster_members(engine, samples, fitted, clusters)


def compare(make_engine, job: JobOutput, sample: Draw, n: int, predicted: list, echo) -> MethodComparison:
    """The comparison step (:func:`~worker.audit.compare.compare_methods`) on ``n`` sampled images per class (per
    predicted class's worth of the first rows, without labels)."""
    found = sample.per_class(n) if job.label_column else sample.first(n * len(predicted))
    return MethodComparison.of(compare_methods_on(
        make_engine, found.images, found.ids, found.classes, found.masks,
        safe_mode=not job.config.allow_unsafe_deserialization, echo=echo))


def class_images(sample: Draw | None) -> dict:
    """{class: the mean of its first :data:`MEAN_IMAGES` sampled images}."""
    if sample is None:
        return {}
    return {c: v.mean(0).astype(np.uint8) for c, v in sample.per_class(MEAN_IMAGES).by_class().items()}


def _classes_of(groups: dict, kind: str) -> list:
    """The classes of the groups of ``kind`` that hold rows, in the groups' order."""
    return [g.cls for g, v in groups.items() if g.kind == kind and v.count]


MIN_IMAGES = 5  # a region is probed on at least this many of its class's (or cluster's) images


def _interventions(groups: dict, clusters: dict, fitted: dict, engine, samples: dict, ids: dict,
                   seed: int = 0) -> list[ProbedRegion]:
    """Localise each labelled class's regions, and its SpRAy clusters' (:func:`~worker.audit.localise.candidates`),
    and probe them (:mod:`~worker.audit.intervene`): a cluster's region on the sampled images whose maps fall in
    that cluster. ``samples``: {class: images}; ``ids``: {class: their rows' ids}."""
    results = []
    for cls, images in samples.items():
        key = Group("true", cls)
        if key not in groups or len(images) < MIN_IMAGES or isinstance(cls, str):  # a logit needs a class index
            continue
        others = np.concatenate([v for c, v in samples.items() if c != cls])
        others = others[np.random.default_rng(seed).permutation(len(others))[:max(len(images), 8)]]
        members = None
        for cluster, region in candidates(groups, key, clusters.get(key)):
            chosen, chosen_ids, mean_map = images, ids[cls], groups[key].mean_map
            if cluster is not None:
                if members is None:  # the sample's own maps, assigned as the audit assigned every map
                    grids = downsample(engine.explain(images).as_float32()[:, 0])
                    members = assign(grids.reshape(len(images), -1), fitted[key].centroids)
                chosen, chosen_ids = images[members == cluster], ids[cls][members == cluster]
                mean_map = next(c.mean_map for c in clusters[key] if c.cluster == cluster)
                if len(chosen) < MIN_IMAGES:
                    continue
            probed = probe_region(engine.predict, cls, region, chosen, others, seed)
            results.append(ProbedRegion(probed, cluster, region["share"], chosen.mean(0).astype(np.uint8), mean_map,
                                        _examples(engine, cls, probed, chosen, chosen_ids, others)))
    return results


def _cluster_members(engine, samples: dict, fitted: dict, clusters: dict, n: int = 3) -> dict:
    """``clusters`` with each SpRAy cluster of a labelled class given its most typical sampled images with their
    full maps (``members``: the class's sampled images assigned as the audit assigned every map, nearest the
    centroid first), so the report shows a cluster's members as images, not only maps."""
    out = dict(clusters)
    for key, found in clusters.items():
        if key.kind != "true" or len(found) < 2 or key not in fitted or key.cls not in samples:
            continue
        images = samples[key.cls]
        maps = engine.explain(images).as_float32()[:, 0]
        grids = downsample(maps).reshape(len(images), -1)
        centroids = fitted[key].centroids
        members = assign(grids, centroids)
        distance = ((grids - centroids[members]) ** 2).sum(1)
        out[key] = []
        for c in found:
            chosen = np.flatnonzero(members == c.cluster)
            out[key].append(dataclasses.replace(c, members=tuple(
                Member(images[i], maps[i]) for i in chosen[np.argsort(distance[chosen])][:n])))
    return out


def _examples(engine, cls, probed, images, ids, others, n: int = 2) -> tuple[Example, ...]:
    """A few of the class's images (``ids``: their rows') with their maps, and the same images after each fill,
    with the model's class and logit: what the report shows beside the numbers."""
    rng = np.random.default_rng(1)
    mean_image = np.concatenate([images, others]).mean(0).astype(np.uint8)
    # first the images the region's mean fill moves off the class: the evidence, when there is some
    moved = engine.predict(fill(images, tuple(probed["pixels"]), "mean", mean_image, others, rng)).argmax(1) != cls
    order = np.argsort(~moved, kind="stable")[:n]
    chosen = images[order]
    maps = engine.explain(chosen).as_float32()[:, 0]
    out = []
    for i, image in enumerate(chosen):
        versions = {"original": image[None]}
        versions.update({how: fill(image[None], tuple(probed["pixels"]), how, mean_image, others, rng)
                         for how in FILLS})
        logits = engine.predict(np.concatenate(list(versions.values())))
        out.append(Example(maps[i], {name: Version(v[0], int(logits[j].argmax()), float(logits[j, cls]))
                                     for j, (name, v) in enumerate(versions.items())}, str(ids[order[i]])))
    return tuple(out)


MEAN_IMAGES = 16  # the report's mean image of a class: of its first this many images
MEAN_IMAGE_ROWS = 20_000  # without a model step, read at most this many rows to find them


def run_audit(output: str, report_dir: str | None = None, label_column: str | None = None,
              controls: int = 0, model: str | None = None, interventions: int = 0, echo=None,
              compare_methods: int = 0, allow_unsafe_deserialization: bool = False,
              allow_side_effects: bool = False) -> AuditResult:
    """Audit a job's output with Ray Data; with ``report_dir``, write the report there (:func:`write_report`).

    ``label_column`` defaults to the job's. ``controls=N`` adds the sanity controls of :mod:`worker.audit.controls`
    on the first N input images, with the engine the job used, rebuilt from its run record (``model``
    defaults to the job's model; a remote one is fetched). ``interventions=N`` localises each labelled class's
    regions and confirms or refutes each by intervening on N images of the class
    (:mod:`worker.audit.intervene`). ``compare_methods=N`` measures every method's faithfulness and sanity on N
    images per class with the job's model (:mod:`worker.audit.compare`). The model is loaded and run with the
    opt-ins passed here (``allow_unsafe_deserialization``, ``allow_side_effects``: the auditor's own), never
    with those in the job's run record; a model that needs one not passed is not run: the steps that need it
    are skipped, saying so in one line (:attr:`AuditResult.skipped`, shown in the report too). ``echo`` (e.g.
    ``print``) gets a line per step and a summary; the passes over the maps show one progress line on stderr
    (:mod:`worker.job.progress`). Returns the :class:`~worker.audit.result.AuditResult`."""
    require_libraries()
    echo = echo or (lambda *_: None)
    began = time.perf_counter()
    asked = Asked(controls, interventions, compare_methods)

    job = read_job(output, label_column, allow_unsafe_deserialization, allow_side_effects, echo)
    connect(logging_level="ERROR")
    groups, worst = reduce_maps(job)
    clusters, fitted = cluster_maps(job, groups, ClusterMembers(report_dir) if report_dir else None)
    make_engine = skipped = None
    if asked:
        make_engine, skipped = model_engines(job, model)
        if skipped:
            echo(f"audit: {skipped}")
            asked = NONE_ASKED
    worst, worst_note = worst_images(job, worst)
    echo(f"audit: {sum(v.count for g, v in groups.items() if g.kind == 'predicted')} maps in {len(job.files)} "
         f"files aggregated and clustered in {time.perf_counter() - began:.1f} s")
    predicted = _classes_of(groups, "predicted")
    sample = sample_job_input(job, asked, _classes_of(groups, "true"), predicted)

    controlled = probed = compared = None
    if asked.controls:
        tick = time.perf_counter()
        controlled = control_maps(make_engine, job, sample, asked.controls)
        echo(f"audit: controls on {controlled.images} images in {time.perf_counter() - tick:.1f} s")
    if asked.interventions:
        probed, clusters = intervene(make_engine, job, groups, clusters, fitted, sample, asked.interventions)
        echo(f"audit: interventions on {len(probed.regions)} regions in {probed.seconds} s: {probed.verdicts()}")
    if asked.compare_methods:
        compared = compare(make_engine, job, sample, asked.compare_methods, predicted, echo)
        echo(f"audit: methods compared on {compared.summary['images']} images in {compared.seconds} s: "
             f"{compared.sentence}")

    found = sorted(findings(groups, clusters) + intervention_findings(probed.regions if probed else []),
                   key=finding_order)
    result = AuditResult(output, job.metadata, groups, worst, clusters, found, controlled, probed, compared,
                         class_images(sample), skipped, {"worst_images": worst_note} if worst_note else {})
    if report_dir:
        write_report(result, report_dir)
    echo(f"audit: done in {time.perf_counter() - began:.1f} s: {len(found)} findings ({len(result.high())} high)"
         + "".join(f"; {f.group.title(job.names)}: {f.finding}" for f in result.high()[:5])
         + (f"; report in {report_dir}/report.html" if report_dir else ""))
    return result
