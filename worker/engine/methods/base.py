"""The small base every attribution method shares: build once, compile once, explain batches.

A method says which gradient overrides its forward pass is traced with
(:attr:`Attribution.gradient_overrides`, see :mod:`worker.engine.ops`) and, if it is not an input gradient,
how a map is made from the traced pass (:meth:`Attribution._maps`, e.g. Grad-CAM).  The base does the rest
inside one ``tf.function`` with a fixed batch shape, a *pass*: uint8 images in, preprocessing on the device
(and a slice of SmoothGrad's noisy copies), forward pass, target selection (a slice of top-k's targets), the
float32 maps.  A batch takes as many passes as :mod:`worker.engine.passes` plans to keep each pass within its
bound; their maps are summed on the device, reduced over channels there, and only the reduced maps come back to
the host, each checked (:mod:`worker.engine.precision`): a map that is zero or not finite becomes its row's
problem rather than a map.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import warnings

import numpy as np
import tensorflow as tf

from worker.engine import reduction as reduction_ops
from worker.engine.activations import apply_rule, find_units
from worker.engine.allowlist import check_graph, merge_opted_in
from worker.engine.coverage import CoverageReport, inspect_ops
from worker.engine.explanation import Explanation
from worker.engine.models import load_model
from worker.engine.ops import FORWARD_CONV_GRADIENTS, PLAIN_UNIT, gradient_scope
from worker.engine.options import EngineOptions, check_choices, check_smoothing
from worker.engine.passes import plan_passes
from worker.engine.precision import LossScale, non_finite_problem, zero_map_problem
from worker.engine.preprocessing import Preprocessing
from worker.engine.runtime import configure_tensorflow, default_conv_gradients, default_jit_compile, native_bfloat16
from worker.engine.scores import class_scores
from worker.engine.smoothing import noisy_copies
from worker.engine.targets import Target, label_problem

log = logging.getLogger(__name__)


class UnguidedReluError(RuntimeError):
    """A model has a ReLU the method could not guide, or no ReLU at all."""


class Attribution:
    """Build a model's attribution function once; call :meth:`explain` on uint8 batches.

    Args:
        model: a ``keras.Model``, a ``.keras``/``.h5`` path or a SavedModel directory.
        options: an :class:`~worker.engine.options.EngineOptions`; each of its fields may also be given as a
            keyword, over ``options`` (``GuidedBackprop(model, target="top:3")``). Its fields and their defaults
            are written there once; they are:
        target: what to differentiate, see :mod:`worker.engine.targets` (default ``predicted``).
        batch_size: the fixed compiled batch; a short batch is padded, the padding dropped.
        preprocessing: a preset name or :class:`~worker.engine.preprocessing.Preprocessing`.
        reduction: ``max_abs`` (default), ``sum_abs``, ``l2`` or ``none`` (full H x W x C).
        map_dtype: ``float16`` (default) or ``float32``.
        score: ``logits`` (default; a final softmax is stripped) or ``probability``.
        relu_policy: ``error`` (default) refuses a model with an unguided or no ReLU; ``warn`` warns.
        precision: ``float32`` (default), ``bfloat16`` or ``float16`` compute; maps are float32 before
            the final cast.  float16 scales the score against underflow (:mod:`worker.engine.precision`).
        jit_compile: ``auto`` (XLA on GPU, plain graph on CPU, where XLA measured slower), True or False.
        conv_gradients: how convolutions' input gradients are computed: ``forward`` (forward kernels with the
            flipped kernel, :data:`worker.engine.ops.FORWARD_CONV_GRADIENTS`), ``framework`` (TensorFlow's own
            backprop kernels) or ``auto`` (forward on CPU, where it measured faster; framework on GPU).
            Both give the same maps up to float rounding.
        smooth, noise: SmoothGrad: average over ``smooth`` noisy copies per image (0: off), noise ``noise`` x the
            image's input span (see :mod:`worker.engine.smoothing`).
        pass_images: the most model inputs one compiled pass differentiates, SmoothGrad's copies and top-k's
            targets counted (:mod:`worker.engine.passes`); 0 (default): ``batch_size``.  Maps do not depend on it.
        cam_layer: Grad-CAM's layer or scope (default: the last convolutional activation, see
            :mod:`worker.engine.cam`); other methods ignore it.
        activations: which activations get the method's rule (:mod:`worker.engine.activations`): ``relu``
            (default: ReLUs, capped, thresholded, leaky or PReLU; any other activation keeps its plain gradient
            and is reported) or ``all`` (swish, GELU, hard-swish, ELU, SELU, sigmoid, ... too).
        safe_mode: Keras safe mode when loading (default on).
        allow_side_effects: run a model whose graph holds op types outside the allowlist of pure computation
            (file or network I/O, save/restore, print, Python callbacks) or a loop
            (:mod:`worker.engine.allowlist`); only for a model you trust.  Off: such a model is refused when
            built, before any image.
        output, signature, input_size: pick an output / SavedModel signature / size of a resizable model.
        threads: TensorFlow intra-op threads (match the CPUs the scheduler gave this process).
        warmup: run the compiled function once on a batch of zeros when built, so that the first ``explain``
            pays no compile (a server that wants even latency). Off by default: the first ``explain`` pays the
            compile instead, and a one-shot caller does not also pay for a batch of zeros (3.6 s of ResNet50's
            first map on a 2-core CPU: ``benchmarks/results/first_map.md``).
    """

    method = "base"
    requires_relu = False

    def __init__(self, model, *, options: EngineOptions | None = None, jit_compile="auto",
                 conv_gradients: str = "auto", output: int | None = None, signature: str | None = None,
                 input_size=None, threads: int | None = None, warmup: bool = False, **values):
        configure_tensorflow(threads)
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(EngineOptions)})
        if unknown:
            raise TypeError(f"unknown option(s) {unknown}; the options are EngineOptions' fields "
                            f"{[f.name for f in dataclasses.fields(EngineOptions)]}")
        o = dataclasses.replace(options or EngineOptions(), **values)  # each default written once, there
        if o.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {o.batch_size}")
        check_choices(score=o.score, relu_policy=o.relu_policy, reduction=o.reduction, map_dtype=o.map_dtype,
                      conv_gradients=conv_gradients, activations=o.activations, precision=o.precision)
        self.activations = o.activations
        check_smoothing(o.smooth, o.noise)
        self.smooth, self.noise, self.cam_layer = int(o.smooth), float(o.noise), o.cam_layer
        self.target = Target.parse(o.target)
        self.passes = plan_passes(int(o.batch_size), self.smooth, self.target.maps_per_image,
                                  int(o.pass_images) or int(o.batch_size))
        self.loss_scale = LossScale(o.precision)
        self.preprocessing = (o.preprocessing if isinstance(o.preprocessing, Preprocessing)
                              else Preprocessing(o.preprocessing))
        self.batch_size = int(o.batch_size)
        self.reduction, self.map_dtype, self.score, self.relu_policy = o.reduction, o.map_dtype, o.score, o.relu_policy
        self.precision = precision = o.precision
        self.allow_side_effects = bool(o.allow_side_effects)
        if precision == "bfloat16" and native_bfloat16() is False:
            warnings.warn("precision='bfloat16' on a CPU without avx512_bf16/amx_bf16: TensorFlow emulates it, "
                          "so it is slower than float32 here (measured 0.73x on ResNet50)", stacklevel=2)
        self.jit_compile = default_jit_compile() if jit_compile == "auto" else bool(jit_compile)
        self.conv_gradients = default_conv_gradients() if conv_gradients == "auto" else conv_gradients
        self.source = load_model(model, safe_mode=o.safe_mode, output=output, signature=signature,
                                 input_size=input_size, precision=precision, allow_side_effects=o.allow_side_effects)
        self.target.check_classes(self.source.num_classes)
        self.coverage: CoverageReport | None = None  # what the first trace found
        self._score_note = ""
        self._cam_tensor: str | None = None
        self._concrete: dict[tuple[int, int], object] = {}
        self._concrete_for(self.source.input_size)
        self._reduce = tf.function(self._reduce_maps, jit_compile=self.jit_compile, autograph=False)
        if warmup:
            h, w = self.source.input_size
            self._explain_pass_batch(np.zeros((self.passes.images, h, w, 3), np.uint8),
                                     np.zeros(self.passes.images, np.int32))

    # -- what a method decides -------------------------------------------------------------
    #: op type -> registered gradient name, installed while the forward pass is traced
    gradient_overrides: dict[str, str] = {}
    #: the registered gradient an activation unit gets (worker.engine.ops), or None: units keep their gradient
    unit_rule: str | None = None
    #: channels of a map before reduction: the model input's (None), or 1 for a class activation map
    map_channels: int | None = None

    def _maps(self, x, scores, forward_ops, found: dict) -> list:
        """Per target k, the (rows, H, W, C) float32 map of ``scores[:, k]`` (one score per row of ``x``).
        Gradient methods: the input gradient, through the overrides the forward pass was traced with; the score
        is multiplied by the loss scale ``found["loss_scale"]`` and the float32 gradient divided by it."""
        scale = found["loss_scale"]
        return [tf.cast(tf.gradients(tf.reduce_sum(scores[:, k]) * scale, x)[0], tf.float32) / scale
                for k in range(scores.shape[1])]

    # -- the compiled function ---------------------------------------------------------------
    def _compute(self, images, labels, copy_start, target_start, loss_scale, found: dict):
        """The traced pass (``copy_start``/``target_start``: its first noisy copy and target); what the trace
        finds (coverage, which score) goes into ``found``."""
        plan = self.passes
        x = self.preprocessing.apply(images, self.source.input_size, self.source.channels)
        copies = plan.copies + 1
        if self.smooth:  # clean copy first, then this pass's noisy ones, per image
            x = noisy_copies(x, images, plan.copies, self.noise, first=copy_start)
        graph = tf.compat.v1.get_default_graph()
        first_op = len(graph.get_operations())
        overrides = {**self.gradient_overrides,
                     **(FORWARD_CONV_GRADIENTS if self.conv_gradients == "forward" else {})}
        with gradient_scope(overrides):
            output, activation = self.source.forward(x, self.target.layer)
        forward_ops = graph.get_operations()[first_op:]
        found["forward_ops"] = forward_ops
        output, activation, ruled = self._rule_activations(forward_ops, x, output, activation, found)
        found["coverage"] = inspect_ops(forward_ops, graph, self.gradient_overrides, ruled, self.activations)
        found["loss_scale"] = loss_scale

        logits, differentiated, found["score"] = class_scores(output, self.score)
        clean = logits[::copies]  # the images themselves decide the prediction and the target
        predicted = tf.argmax(clean, axis=-1, output_type=tf.int32)
        predicted_prob = tf.gather(tf.nn.softmax(clean), predicted, batch_dims=1)
        if self.target.kind == "layer":
            scores, classes = self.target.select(logits, differentiated, labels, activation)
            classes = classes[::copies]
        else:
            _, classes = self.target.select(clean, differentiated[::copies], labels)
            # this pass's targets; the last pass repeats the last target where it has fewer left
            pick = tf.minimum(target_start + tf.range(plan.targets), self.target.maps_per_image - 1)
            classes = tf.gather(classes, pick, axis=1)
            scores = tf.gather(differentiated, tf.repeat(classes, copies, axis=0), batch_dims=1)

        per_target = self._maps(x, scores, forward_ops, found)
        grads = tf.stack(per_target, axis=1)  # (rows, targets, H, W, C)
        if self.smooth:  # the sum over each image's noisy copies; copies past the last one count 0
            grads = tf.reshape(grads, tf.concat([[-1, copies], tf.shape(grads)[1:]], 0))[:, 1:]
            kept = tf.cast(copy_start + tf.range(plan.copies) < self.smooth, tf.float32)
            grads = tf.reduce_sum(grads * tf.reshape(kept, [1, -1, 1, 1, 1, 1]), axis=1)
        return {
            "grads": grads,
            "finite": tf.reduce_all(tf.math.is_finite(grads)),
            "predicted_class": predicted,
            "predicted_prob": predicted_prob,
            "target_class": classes,
            "target_score": scores[::copies],
        }

    def _reduce_maps(self, grads):
        """(images, targets, H, W, C) float32 maps -> reduced maps, their scale, and per map whether it is
        exactly zero and whether it is finite."""
        maps, scale = reduction_ops.reduce_map(grads, self.reduction, self.map_dtype)
        axes = list(range(2, grads.shape.rank))
        return (maps, scale, tf.reduce_all(tf.equal(grads, 0.0), axis=axes),
                tf.reduce_all(tf.math.is_finite(grads), axis=axes))

    def _rule_activations(self, forward_ops, x, output, activation, found):
        """Give each activation unit of the traced pass its rule (:mod:`worker.engine.activations`); returns the
        output and layer activation as re-routed, and ``{unit: rule}`` for the coverage report."""
        ruled: dict = {"units": [], "unplaced": []}
        if self.unit_rule is None:
            return output, activation, ruled
        units, ruled["unplaced"] = find_units(forward_ops, x)
        rerouted = found.setdefault("rerouted", {})
        for unit in units:
            if unit.is_single_relu or unit.output is output:  # an op override guides it; the head is the score
                continue
            rule = self.unit_rule if unit.is_relu or self.activations == "all" else PLAIN_UNIT
            rerouted[unit.output.ref()] = apply_rule(unit, rule)
            ruled["units"].append((unit, rule))
        return output, rerouted.get(activation.ref(), activation) if activation is not None else None, ruled

    def _concrete_for(self, size):
        size = tuple(int(s) for s in size)
        if size not in self._concrete:
            if self._concrete:
                log.warning("tracing %s again for image size %s (model input %s)", self.method, size,
                            self.source.input_size)
            b = self.passes.images
            spec = (tf.TensorSpec((b, *size, 3), tf.uint8), tf.TensorSpec((b,), tf.int32),
                    tf.TensorSpec((), tf.int32), tf.TensorSpec((), tf.int32), tf.TensorSpec((), tf.float32))
            found: dict = {}
            function = tf.function(lambda *args: self._compute(*args, found),
                                   jit_compile=self.jit_compile, autograph=False)
            concrete = function.get_concrete_function(*spec)
            inventory = check_graph(concrete.graph, found.pop("forward_ops"),
                                    allow_side_effects=self.allow_side_effects, what=self._what())
            loading = getattr(self.source, "load_ops", None)  # what loading a SavedModel ran
            found["coverage"].ops = inventory.seen
            found["coverage"].opted_in = merge_opted_in(loading.opted_in if loading else {}, inventory.opted_in)
            if not self._concrete:
                self.coverage, self._score_note = found["coverage"], found["score"]
                self._cam_tensor = found.get("cam")
                self._check_coverage()
            self._concrete[size] = concrete
        return self._concrete[size]

    def _what(self) -> str:
        return f"model {getattr(self.source, 'path', None) or self.source.kind} ({self.method})"

    def _check_coverage(self):
        if not self.requires_relu:
            return
        problems = self.coverage.problems()
        if problems:
            message = f"{self.method}: " + "; ".join(problems)
            if self.relu_policy == "error":
                raise UnguidedReluError(message + " (pass relu_policy='warn' to explain it anyway)")
            warnings.warn(message, stacklevel=3)

    def _pass(self, function, images, labels, copy_start: int, target_start: int) -> dict:
        """One pass; under a loss scale, again at a lower scale while its gradient is not finite."""
        while True:
            out = function(images, labels, tf.constant(copy_start, tf.int32), tf.constant(target_start, tf.int32),
                           tf.constant(self.loss_scale.value, tf.float32))
            if bool(out["finite"]):
                self.loss_scale.passed()
                return out
            if not self.loss_scale.overflowed():
                return out

    def _explain_pass_batch(self, images, labels) -> dict:
        """numpy results of ``passes.images`` images: their passes, each image's copies summed on the device."""
        plan, function = self.passes, self._concrete_for(images.shape[1:3])
        images, labels = tf.constant(images), tf.constant(labels)
        parts = []
        for target_pass in range(plan.target_passes):
            total = None
            for copy_pass in range(plan.copy_passes):
                out = self._pass(function, images, labels, copy_pass * plan.copies, target_pass * plan.targets)
                total = out["grads"] if total is None else total + out["grads"]
            if self.smooth:
                total = total / self.smooth
            maps, scale, zero, finite = self._reduce(total)
            parts.append({"maps": maps, "map_scale": scale, "zero": zero, "finite": finite,
                          "target_class": out["target_class"], "target_score": out["target_score"],
                          "predicted_class": out["predicted_class"], "predicted_prob": out["predicted_prob"]})
        k = self.target.maps_per_image
        result = {name: np.concatenate([p[name].numpy() for p in parts], axis=1)[:, :k]
                  for name in ("maps", "map_scale", "zero", "finite", "target_class", "target_score")}
        result.update(predicted_class=parts[0]["predicted_class"].numpy(),
                      predicted_prob=parts[0]["predicted_prob"].numpy())
        return result

    def _problems(self, images, labels, zero, finite, target_class) -> np.ndarray:
        """(N,) object: why a row's maps are not maps (None where they are)."""
        problems = np.full(len(images), None, object)
        broken = ~finite.all(axis=1)
        problems[broken] = non_finite_problem(self.precision)
        rows = np.flatnonzero(zero.any(axis=1) & ~broken)
        if len(rows):
            depends = self._score_depends_on_input(images[rows], target_class[rows])
            problems[rows[depends]] = zero_map_problem(self.precision, self.method)
        return problems

    def _score_depends_on_input(self, images, target_class) -> np.ndarray:
        """(N,) bool: whether any target score of each image changes when the image does (inverted, or halved).
        A layer target is taken to depend on its input, and so is any score in a lower precision: there the
        forward pass itself may have underflowed to a constant."""
        if self.target.kind == "layer" or self.precision != "float32":
            return np.ones(len(images), bool)
        scores = [np.take_along_axis(self.predict(probe), target_class, axis=1)
                  for probe in (images, 255 - images, images // 2)]
        moved = [other != scores[0] for other in scores[1:]]  # a constant score is exactly the same
        return np.logical_or(*moved).any(axis=1)

    # -- public --------------------------------------------------------------------------------
    @property
    def map_shape(self) -> tuple[int, ...]:
        """One map's shape: (H, W) of the model input, or (H, W, C) with ``reduction='none'``."""
        h, w = self.source.input_size
        return (h, w, self.map_channels or self.source.channels) if self.reduction == "none" else (h, w)

    @functools.cached_property
    def report(self) -> dict:
        """What was computed and how: recorded next to every output (fixed once the function is traced)."""
        return {
            "method": self.method,
            "model": self.source.describe(),
            "target": str(self.target),
            "score": self._score_note,
            "preprocessing": self.preprocessing.describe(),
            "reduction": self.reduction,
            "map_dtype": self.map_dtype,
            "precision": self.precision,
            "batch_size": self.batch_size,
            "jit_compile": self.jit_compile,
            "conv_gradients": self.conv_gradients,
            "smoothing": {"copies": self.smooth, "noise": self.noise} if self.smooth else None,
            "passes": dataclasses.asdict(self.passes),
            "loss_scale_start": self.loss_scale.top,
            "cam_tensor": self._cam_tensor,
            "activations": self.activations,
            "map_is_gradient_wrt": "model input (after resize and normalisation)",
            "coverage": self.coverage.to_dict() if self.coverage else None,
            "versions": {"tensorflow": tf.__version__, "numpy": np.__version__},
        }

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Forward only: (N, classes) float32 logits (a final softmax stripped) of uint8 (N, H, W, 3) images,
        compiled once at the engine's batch size (interventions in the audit need nothing else)."""
        images = self._check_images(images)
        if not hasattr(self, "_predict"):
            def forward(batch):
                x = self.preprocessing.apply(batch, self.source.input_size, self.source.channels)
                return class_scores(self.source.forward(x)[0], "logits")[0]
            self._predict = tf.function(forward, jit_compile=self.jit_compile, autograph=False)
            self._predict_checked: set = set()
        size = tuple(images.shape[1:3])
        if size not in self._predict_checked:  # each trace is checked before it runs
            spec = tf.TensorSpec((self.batch_size, *size, 3), tf.uint8)
            check_graph(self._predict.get_concrete_function(spec).graph,
                        allow_side_effects=self.allow_side_effects, what=self._what())
            self._predict_checked.add(size)
        out = [self._predict(tf.constant(chunk)).numpy()[:n] for n, chunk in self._padded(images)]
        return np.concatenate(out) if out else np.zeros((0, self.source.num_classes), np.float32)

    def _padded(self, *arrays, size: int | None = None):
        """(rows, chunks): each ``size`` (default ``batch_size``) slice of ``arrays``, the last one padded with
        zeros to the compiled batch (one array: the chunk itself rather than a tuple)."""
        b = size or self.batch_size
        for start in range(0, len(arrays[0]), b):
            chunks = [a[start:start + b] for a in arrays]
            n = len(chunks[0])
            chunks = [np.concatenate([c, np.zeros((b - n, *c.shape[1:]), c.dtype)]) if n < b else c for c in chunks]
            yield n, (chunks[0] if len(chunks) == 1 else chunks)

    def explain(self, images: np.ndarray, labels=None) -> Explanation:
        """Explain ``images``: uint8 (N, H, W, 3), or grayscale (N, H, W, 1) or (N, H, W); ``labels`` (N,) ints for
        ``target='label'``.  An image whose map is exactly zero or not finite has its reason in ``problems``
        (:mod:`worker.engine.precision`)."""
        images = self._check_images(images)
        if not len(images):  # nothing to explain: no labels are needed for it either
            return Explanation.empty(self.target.maps_per_image, self.map_shape, self.map_dtype, self.report)
        labels = self._check_labels(labels, len(images))
        parts = []
        for n, (chunk, chunk_labels) in self._padded(images, labels, size=self.passes.images):
            parts.append({k: v[:n] for k, v in self._explain_pass_batch(chunk, chunk_labels).items()})
        out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        zero, finite = out.pop("zero"), out.pop("finite")
        problems = self._problems(images, labels, zero, finite, out["target_class"])
        return Explanation(**out, problems=problems, report=self.report)

    def _check_images(self, images) -> np.ndarray:
        images = np.asarray(images)
        if images.dtype != np.uint8:
            raise TypeError(f"images must be uint8 (N, H, W, 3); got dtype {images.dtype} "
                            "(convert float images with np.clip(x, 0, 255).astype(np.uint8))")
        if images.ndim == 3 and images.shape[-1] not in (3, 4):  # (N, H, W) grayscale, not one (H, W, 3) image
            images = images[..., None]
        if images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise ValueError(f"images must have shape (N, H, W, 3), (N, H, W, 1) or (N, H, W); got {images.shape}")
        if images.shape[-1] == 1:  # gray as RGB, as the job decodes it (a 1-channel model's luminance is the gray)
            images = np.repeat(images, 3, axis=-1)
        return images

    def _check_labels(self, labels, n) -> np.ndarray:
        if self.target.kind != "label":
            return np.zeros(n, np.int32)
        if labels is None:
            raise ValueError("target='label' needs labels: one class index per image")
        labels = np.asarray(labels)
        if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels must be {n} integers; got shape {labels.shape}, dtype {labels.dtype}")
        bad = [i for i, v in enumerate(labels.tolist()) if label_problem(v, self.source.num_classes)]
        if bad:
            raise ValueError(f"labels out of range [0, {self.source.num_classes}) at positions {bad[:10]}: "
                             f"{labels[bad[:10]].tolist()}")
        return labels.astype(np.int32)

