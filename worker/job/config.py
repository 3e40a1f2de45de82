"""What a run is: :class:`JobConfig`, the same fields as the CLI's flags, checked before any cluster time.

The run record: :meth:`JobConfig.to_dict` is stored in every output file's metadata
(key ``config``) and :meth:`JobConfig.from_dict` rebuilds it, so the audit and its
controls use exactly the engine the job used.  The opt-ins (``allow_unsafe_deserialization``,
``allow_side_effects``) are recorded as the job's owner chose them, but :meth:`JobConfig.from_dict` never
takes them from a record: they are off unless whoever rebuilds the run passes their own.

Examples:
    >>> cfg = JobConfig(model="model.keras", input="images/", output="maps/", target="label",
    ...                 label_column="label", relu_policy="warn")
    >>> cfg.needed_columns()
    ['image', 'label']
    >>> JobConfig.from_dict(cfg.to_dict()) == cfg
    True
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from worker.data import dataset, schema
from worker.data.decode import DEFAULT_MAX_PIXELS, RESIZE_POLICIES, DecodeOptions
from worker.engine.options import METHODS, EngineOptions, MapOptions, check_choices, choose, option


@dataclass(kw_only=True)
class JobConfig(MapOptions):
    """Everything a run needs; the same fields as the CLI's flags (the map options of
    :class:`~worker.engine.options.MapOptions`, then the job's own)."""

    model: str = option(help=".keras, .h5 or SavedModel directory; local, s3:// or gs://", group="data")
    input: str = option(help="Parquet file, directory or glob, a folder of image files or TFRecord files; local, "
                        "s3:// or gs://", group="data")
    output: str = option(help="output directory (Parquet parts + _job.json + _summary.json)", group="data")
    input_format: str = option("auto", "parquet, images (a folder tree of image files, one subfolder per class) "
                               "or tfrecord (tf.train.Example records); auto: from the files found",
                               choices=dataset.FORMATS, group="data")
    image_feature: str = option(dataset.DEFAULT_IMAGE_FEATURE, "TFRecord input: the feature holding the encoded image",
                                group="data")
    label_feature: str = option(dataset.DEFAULT_LABEL_FEATURE, "TFRecord input: the feature holding the class index",
                                group="data")
    image_column: str = option("image", "the input's image column (encoded bytes, HF image structs or "
                               "tensors)", group="data")
    id_column: str | None = option(None, "stable row id; default: the input's 'id' column if it has one, else "
                                   "<file>#<row>", group="data")
    label_column: str | None = option(None, "class labels (needed for --target label); passed through",
                                      group="data")
    mask_column: str | None = option(None, "ground-truth mask (image/tensor) or box [y0, x0, y1, x1] in [0, 1]",
                                     group="data")
    columns: tuple[str, ...] = option((), "other input columns to pass through", group="data")
    overwrite: bool = option(False, "replace an output that belongs to another job", group="data")
    rows_per_file: int = option(1024, "rows per output Parquet file", group="data")
    method: str = option("guided_backprop", "guided_backprop | deconvnet (positive gradients at every ReLU, no "
                         "forward gate) | gradient (plain) | gradcam | guided_gradcam (guided map x Grad-CAM)",
                         choices=METHODS)
    resize: str = option("stretch", "how images of another size meet the model's input", choices=RESIZE_POLICIES)
    max_pixels: int = option(DEFAULT_MAX_PIXELS, "decompression-bomb guard: larger images are error rows")
    jpeg_draft: bool = option(False, "decode large JPEGs at 1/2-1/8 scale (faster; pixels differ slightly from "
                              "a full decode)")
    statistics: bool = option(True, "skip the per-row map statistics columns", flag="--no-statistics")
    allow_unsafe_deserialization: bool = option(
        False, "load models carrying Python code (Lambda layers); only for models you trust", group="opt-in")
    allow_side_effects: bool = option(
        False, "run a model whose graph holds ops outside the allowlist of pure computation (file or network "
        "I/O, save/restore, print, Python callbacks, loops); only for models you trust", group="opt-in")
    actors: int | None = option(None, "explain actors (default: one per GPU, else 1)", group="resources")
    gpus_per_actor: float | None = option(None, "default 1 when the cluster has GPUs, else 0", group="resources")
    cpus_per_actor: float | None = option(None, "CPUs per explain actor (default: 1 with GPUs; without, as "
                                          "many as the largest node leaves after decoding)", group="resources")
    decode_cpus: float | None = option(None, "CPUs kept for reading and decoding (default: a quarter of the "
                                       "cluster's, at least 0.5)", group="resources")
    gpu_memory_limit_mb: int | None = option(None, "hard TensorFlow memory limit (needed for fractional GPUs)",
                                             group="resources")
    actor_start_timeout_s: int = option(600, "seconds for nodes to join and free the actors' resources before "
                                        "the job fails saying why", group="resources", flag="--actor-start-timeout")
    files: list[str] | None = None  # only these files of the input (incremental runs)
    extra_metadata: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-ready fields (the run record stored with the output)."""
        out = dataclasses.asdict(self)
        out["columns"] = list(self.columns)
        return out

    @classmethod
    def from_dict(cls, values: dict, *, allow_unsafe_deserialization: bool = False,
                  allow_side_effects: bool = False) -> "JobConfig":
        """The inverse of :meth:`to_dict`, except the opt-ins: those recorded in ``values`` are ignored, and the
        run gets the ones passed here (the choice of whoever runs it now; off by default).  Keys this version
        does not know are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        known = {k: v for k, v in values.items() if k in names}
        known["columns"] = tuple(known.get("columns") or ())
        return cls(**{**known, "allow_unsafe_deserialization": allow_unsafe_deserialization,
                      "allow_side_effects": allow_side_effects})

    def needed_columns(self) -> list[str]:
        cols = [self.image_column, self.id_column, self.label_column, self.mask_column, *self.columns]
        return list(dict.fromkeys(c for c in cols if c))

    def plan_input(self, columns: list[str] | None = None, files: list[str] | None = None) -> dataset.InputPlan:
        """The input listed and checked in this run's format (:func:`~worker.data.dataset.plan_input`) for its
        ``columns`` (default: the run's :meth:`needed_columns`), only ``files`` of it where given."""
        return dataset.plan_input(self.input, self.needed_columns() if columns is None else columns, files=files,
                                  input_format=self.input_format, image_feature=self.image_feature,
                                  label_feature=self.label_feature)

    def engine_options(self) -> EngineOptions:
        """The engine this run explains with (its method aside)."""
        return EngineOptions(**self.map_options(), safe_mode=not self.allow_unsafe_deserialization,
                             allow_side_effects=self.allow_side_effects)

    def decode_options(self, size: tuple[int, int]) -> DecodeOptions:
        return DecodeOptions(size, self.resize, self.max_pixels, self.jpeg_draft)

    def validate(self) -> None:
        check_choices(method=self.method)
        choose("input_format", self.input_format, dataset.FORMATS)
        self.engine_options().check()
        if self.target == "label" and not self.label_column:
            raise ValueError("target 'label' needs label_column (CLI: --label-column)")
        if self.batch_size < 1 or self.rows_per_file < 1 or self.actor_start_timeout_s < 1:
            raise ValueError("batch_size, rows_per_file and actor_start_timeout_s must be >= 1")
        if "id" in self.columns:
            raise ValueError("'id' is the output's id column; pass it as id_column instead")
        clash = set(self.columns) & set(schema.RESULT_COLUMNS)
        if clash:
            raise ValueError(f"passed-through columns {sorted(clash)} clash with result columns")
        self.decode_options((1, 1))
        if self.mask_column and self.resize != "stretch":
            raise ValueError("mask metrics need resize='stretch' (masks and boxes are stretched like the images)")


def build_engine(config: JobConfig, model_path: str, **overrides):
    """The run's engine on ``model_path``; ``overrides`` replace options or add constructor arguments."""
    from worker.engine import methods

    cls = getattr(methods, METHODS[config.method])
    return cls(model_path, **{**config.engine_options().to_dict(), **overrides})


#: the sections options are grouped in (``--help``, the docs), and their titles
OPTION_GROUPS = {"data": "data", "method": "method", "resources": "resources",
                 "opt-in": "opt-ins (yours: the ones a run record, a job file or a dataset carries are never used)"}


@dataclass(frozen=True)
class Option:
    """One of :class:`JobConfig`'s options as the command line and the job file see it (from its field)."""

    name: str
    flag: str
    kind: type  # str, int, float or bool; for ``many``, the items' type
    default: object
    help: str
    group: str
    choices: tuple | None = None
    optional: bool = False  # None is allowed (and means "decide for me")
    many: bool = False  # a list of values
    required: bool = False


def options() -> list[Option]:
    """Every option of :class:`JobConfig` that a person sets, in field order: the source of the CLI's flags
    (:mod:`worker.cli`) and of the keys a scheduled run's job file accepts (:mod:`worker.job.schedule`).

    Examples:
        >>> by_name = {o.name: o for o in options()}
        >>> by_name["batch_size"].flag, by_name["batch_size"].kind, by_name["batch_size"].default
        ('--batch-size', <class 'int'>, 16)
        >>> by_name["statistics"].flag, by_name["cam_layer"].optional, by_name["model"].required
        ('--no-statistics', True, True)
    """
    import types
    import typing

    hints = typing.get_type_hints(JobConfig)
    out = []
    for f in dataclasses.fields(JobConfig):
        meta = f.metadata
        if not meta.get("help"):
            continue
        kind, optional, many = hints[f.name], False, False
        if isinstance(kind, types.UnionType) and type(None) in kind.__args__:
            optional, kind = True, next(a for a in kind.__args__ if a is not type(None))
        if typing.get_origin(kind) in (tuple, list):
            many, kind = True, typing.get_args(kind)[0]
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        out.append(Option(f.name, meta["flag"] or "--" + f.name.replace("_", "-"), kind,
                          None if required else f.default, meta["help"], meta["group"], meta["choices"],
                          optional, many, required))
    return out
