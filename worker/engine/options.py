"""The engine's options as one record, and every choice they allow.  No TensorFlow: the CLI takes its
choices from here, and the job checks a run's options before any cluster time.

:class:`EngineOptions` is what a map depends on (besides the model); it travels inside the job's run
record and rebuilds the same engine downstream (the audit's controls).

Examples:
    >>> options = EngineOptions(target="top:3", reduction="l2")
    >>> EngineOptions.from_dict(options.to_dict()) == options
    True
    >>> EngineOptions(score="softmax").check()
    Traceback (most recent call last):
    ...
    ValueError: unknown score 'softmax'; choose one of ('logits', 'probability')
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from worker.engine.targets import Target

#: method name -> class name in :mod:`worker.engine.methods`
METHODS = {"guided_backprop": "GuidedBackprop", "deconvnet": "Deconvnet", "gradient": "Gradient",
           "gradcam": "GradCAM", "guided_gradcam": "GuidedGradCAM"}
PRESETS = ("none", "scale01", "tf", "caffe", "torch", "custom")
RESIZE_METHODS = ("bilinear", "nearest", "bicubic", "area")
REDUCTIONS = ("max_abs", "sum_abs", "l2", "none")
MAP_DTYPES = ("float16", "float32")
SCORES = ("logits", "probability")
PRECISIONS = ("float32", "bfloat16", "float16")
RELU_POLICIES = ("error", "warn")
CONV_GRADIENTS = ("auto", "forward", "framework")
#: which activations get the method's rule (worker.engine.activations): ReLUs (capped, thresholded, PReLU) or all
ACTIVATIONS = ("relu", "all")


def choose(name: str, value, choices) -> None:
    """Raise the one error message every option uses when ``value`` is not one of ``choices``."""
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {tuple(choices)}")


def option(default=dataclasses.MISSING, help: str | None = None, *, choices=None, group: str = "method",
           flag: str | None = None, factory=dataclasses.MISSING):
    """A field of an options record that is also a command-line flag and a job-file key.

    Its default, choices and help are written here once: the CLI's flags and the scheduled runs' keys are made
    from them (:func:`worker.job.config.options`).  ``help=None`` keeps a field off the command line; ``flag``
    names a flag other than the field's own (``--no-statistics``); ``group`` is the ``--help`` section.

    Examples:
        >>> [f.metadata["choices"] for f in dataclasses.fields(MapOptions) if f.name == "score"]
        [('logits', 'probability')]
    """
    metadata = {"help": help, "choices": tuple(choices) if choices is not None else None, "group": group,
                "flag": flag}
    return dataclasses.field(default=default, default_factory=factory, metadata=metadata)


@dataclass
class MapOptions:
    """What a map depends on besides the model and the method: shared by :class:`EngineOptions` and the
    job's run record (:class:`worker.job.config.JobConfig`)."""

    target: str = option("predicted", "predicted | label | class:K | top:K | layer:NAME[:CHANNEL]: the score "
                         "differentiated (layer: the sum of a layer's activation, or one channel)")
    batch_size: int = option(16, "images per compiled pass", group="resources")
    preprocessing: str = option("none", "what the model expects of its input pixels (the engine applies it)",
                                choices=[x for x in PRESETS if x != "custom"])
    reduction: str = option("max_abs", "how a map's channels become one (none: keep them)", choices=REDUCTIONS)
    map_dtype: str = option("float16", "the stored maps' dtype", choices=MAP_DTYPES)
    score: str = option("logits", "differentiate the logit, or the probability", choices=SCORES)
    precision: str = option("float32", "the engine's compute dtype (lower: faster, approximate)",
                            choices=PRECISIONS)
    relu_policy: str = option("error", "a ReLU the method cannot guide: fail (error) or explain with a warning",
                              choices=RELU_POLICIES)
    smooth: int = option(0, "SmoothGrad: average over N noisy copies per image (0: off)")
    noise: float = option(0.15, "SmoothGrad's noise, a fraction of each image's input span")
    pass_images: int = option(0, "most model inputs one compiled pass differentiates, SmoothGrad copies and top-k "
                              "targets counted (0: the batch size)", group="resources")
    cam_layer: str | None = option(None, "gradcam / guided_gradcam: layer or scope name (default: the last "
                                   "convolutional activation)")
    activations: str = option("relu", "relu: the method's rule at ReLUs (capped, thresholded, leaky, PReLU); "
                              "all: at every activation (swish, GELU, hard-swish, ELU, SELU, sigmoid, ...): "
                              "f'(x) * max(g, 0) for guided backprop", choices=ACTIVATIONS)

    def map_options(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(MapOptions)}


@dataclass
class EngineOptions(MapOptions):
    """The keyword arguments of every method's constructor: the map options and how the model is loaded."""

    safe_mode: bool = True
    allow_side_effects: bool = False  # run op types outside worker.engine.allowlist (a model you trust)

    def check(self) -> "EngineOptions":
        """Every value is one the engine accepts (the model-dependent checks come when it is loaded)."""
        Target.parse(self.target)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.pass_images < 0:
            raise ValueError(f"pass_images must be >= 0 (0: the batch size), got {self.pass_images}")
        choose("preprocessing preset", self.preprocessing, PRESETS)
        check_choices(reduction=self.reduction, map_dtype=self.map_dtype, score=self.score,
                      precision=self.precision, relu_policy=self.relu_policy, activations=self.activations)
        check_smoothing(self.smooth, self.noise)
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "EngineOptions":
        """The inverse of :meth:`to_dict`; keys this version does not know are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


def check_choices(**values) -> None:
    """Check named options against their choices: ``check_choices(score="logits", precision="float16")``."""
    choices = {"reduction": REDUCTIONS, "map_dtype": MAP_DTYPES, "score": SCORES, "precision": PRECISIONS,
               "relu_policy": RELU_POLICIES, "conv_gradients": CONV_GRADIENTS, "method": METHODS,
               "activations": ACTIVATIONS}
    for name, value in values.items():
        choose(name, value, choices[name])


def check_smoothing(smooth: int, noise: float) -> None:
    if int(smooth) != smooth or not 0 <= smooth <= 256:
        raise ValueError(f"smooth must be a whole number of noisy copies in [0, 256], got {smooth!r}")
    if not 0 < noise <= 10:
        raise ValueError(f"noise must be in (0, 10] (a fraction of each image's input span), got {noise!r}")
