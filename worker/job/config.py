"""What a run is: :class:`JobConfig`, the same fields as the CLI's flags, checked before any cluster time.

The run record: :meth:`JobConfig.to_dict` is stored in every output file's metadata
(key ``config``) and :meth:`JobConfig.from_dict` rebuilds it, so the audit and its
controls use exactly the engine the job used.  The opt-ins (``allow_unsafe_deserialization``,
``allow_side_effects``) are recorded as the job's owner chose them, but :meth:`JobConfig.from_dict` never
takes them from a record: they are off unless whoever rebuilds the run passes their own.

Example:
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
from worker.data.decode import DEFAULT_MAX_PIXELS, DecodeOptions
from worker.engine.options import METHODS, EngineOptions, MapOptions, check_choices


@dataclass(kw_only=True)
class JobConfig(MapOptions):
    """Everything a run needs; the same fields as the CLI's flags (the map options of
    :class:`~worker.engine.options.MapOptions`, then the job's own)."""

    model: str
    input: str
    output: str
    input_format: str = "auto"  # parquet, images (a folder of image files) or tfrecord; auto: from the files found
    image_feature: str = "image/encoded"  # TFRecord input: the tf.train.Example feature of the encoded image
    label_feature: str = "image/class/label"  # TFRecord input: the feature of the class index
    image_column: str = "image"
    id_column: str | None = None
    label_column: str | None = None
    columns: tuple[str, ...] = ()
    method: str = "guided_backprop"
    allow_unsafe_deserialization: bool = False  # an opt-in of whoever runs this job: never taken from a record
    allow_side_effects: bool = False  # likewise (worker.engine.allowlist)
    resize: str = "stretch"
    max_pixels: int = DEFAULT_MAX_PIXELS
    jpeg_draft: bool = False  # decode JPEGs at reduced scale where that still covers the model input
    actors: int | None = None
    gpus_per_actor: float | None = None
    cpus_per_actor: float | None = None
    decode_cpus: float | None = None
    gpu_memory_limit_mb: int | None = None
    actor_start_timeout_s: int = 600  # for nodes to join and free the actors' resources, then fail
    rows_per_file: int = 1024
    overwrite: bool = False
    files: list[str] | None = None  # only these files of the input (incremental runs)
    statistics: bool = True  # per-row map statistics (worker.data.stats) as output columns
    mask_column: str | None = None  # ground-truth mask (image/tensor) or box [y0, x0, y1, x1] in [0, 1]
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

    def engine_options(self) -> EngineOptions:
        """The engine this run explains with (its method aside)."""
        return EngineOptions(**self.map_options(), safe_mode=not self.allow_unsafe_deserialization,
                             allow_side_effects=self.allow_side_effects)

    def decode_options(self, size: tuple[int, int]) -> DecodeOptions:
        return DecodeOptions(size, self.resize, self.max_pixels, self.jpeg_draft)

    def validate(self) -> None:
        check_choices(method=self.method)
        if self.input_format not in dataset.FORMATS:
            raise ValueError(f"unknown input format {self.input_format!r}; choose one of {dataset.FORMATS}")
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
