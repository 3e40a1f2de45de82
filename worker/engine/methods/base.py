"""The small base every attribution method shares: build once, compile once, explain batches.

A method says which gradient overrides its forward pass is traced with
(:attr:`Attribution.gradient_overrides`, see :mod:`worker.engine.ops`) and, if it is not an input gradient,
how a map is made from the traced pass (:meth:`Attribution._maps`, e.g. Grad-CAM).  The base does the rest
inside one ``tf.function`` with a fixed batch shape: uint8 images in, preprocessing on the device (and
SmoothGrad's noisy copies), forward pass, target selection, the maps, channel reduction on the device, and
only the reduced maps back to the host.
"""

from __future__ import annotations

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
from worker.engine.options import check_choices, check_smoothing
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
        target: what to differentiate, see :mod:`worker.engine.targets` (default ``predicted``).
        batch_size: the fixed compiled batch; a short batch is padded, the padding dropped.
        preprocessing: a preset name or :class:`~worker.engine.preprocessing.Preprocessing`.
        reduction: ``max_abs`` (default), ``sum_abs``, ``l2`` or ``none`` (full H x W x C).
        map_dtype: ``float16`` (default) or ``float32``.
        score: ``logits`` (default; a final softmax is stripped) or ``probability``.
        relu_policy: ``error`` (default) refuses a model with an unguided or no ReLU; ``warn`` warns.
        precision: ``float32`` (default), ``bfloat16`` or ``float16`` compute; maps are float32 before
            the final cast.
        jit_compile: ``auto`` (XLA on GPU, plain graph on CPU, where XLA measured slower), True or False.
        conv_gradients: how convolutions' input gradients are computed: ``forward`` (forward kernels with the
            flipped kernel, :data:`worker.engine.ops.FORWARD_CONV_GRADIENTS`), ``framework`` (TensorFlow's own
            backprop kernels) or ``auto`` (forward on CPU, where it measured faster; framework on GPU).
            Both give the same maps up to float rounding.
        smooth, noise: SmoothGrad: average over ``smooth`` noisy copies per image (0: off), noise ``noise`` x the
            image's input span (see :mod:`worker.engine.smoothing`).
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

    def __init__(self, model, *, target="predicted", batch_size: int = 16, preprocessing="none",
                 reduction: str = "max_abs", map_dtype: str = "float16", score: str = "logits",
                 relu_policy: str = "error", precision: str = "float32", jit_compile="auto",
                 conv_gradients: str = "auto", smooth: int = 0, noise: float = 0.15, cam_layer: str | None = None,
                 activations: str = "relu", safe_mode: bool = True, allow_side_effects: bool = False,
                 output: int | None = None, signature: str | None = None, input_size=None,
                 threads: int | None = None, warmup: bool = False):
        configure_tensorflow(threads)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        check_choices(score=score, relu_policy=relu_policy, reduction=reduction, map_dtype=map_dtype,
                      conv_gradients=conv_gradients, activations=activations)
        self.activations = activations
        check_smoothing(smooth, noise)
        self.smooth, self.noise, self.cam_layer = int(smooth), float(noise), cam_layer
        self.target = Target.parse(target)
        self.preprocessing = preprocessing if isinstance(preprocessing, Preprocessing) else Preprocessing(preprocessing)
        self.batch_size = int(batch_size)
        self.reduction, self.map_dtype, self.score, self.relu_policy = reduction, map_dtype, score, relu_policy
        self.precision = precision
        self.allow_side_effects = bool(allow_side_effects)
        if precision == "bfloat16" and native_bfloat16() is False:
            warnings.warn("precision='bfloat16' on a CPU without avx512_bf16/amx_bf16: TensorFlow emulates it, "
                          "so it is slower than float32 here (measured 0.73x on ResNet50)", stacklevel=2)
        self.jit_compile = default_jit_compile() if jit_compile == "auto" else bool(jit_compile)
        self.conv_gradients = default_conv_gradients() if conv_gradients == "auto" else conv_gradients
        self.source = load_model(model, safe_mode=safe_mode, output=output, signature=signature,
                                 input_size=input_size, precision=precision, allow_side_effects=allow_side_effects)
        self.target.check_classes(self.source.num_classes)
        self.coverage: CoverageReport | None = None  # what the first trace found
        self._score_note = ""
        self._cam_tensor: str | None = None
        self._concrete: dict[tuple[int, int], object] = {}
        self._concrete_for(self.source.input_size)
        if warmup:
            h, w = self.source.input_size
            self._run(np.zeros((self.batch_size, h, w, 3), np.uint8), np.zeros(self.batch_size, np.int32))

    # -- what a method decides -------------------------------------------------------------
    #: op type -> registered gradient name, installed while the forward pass is traced
    gradient_overrides: dict[str, str] = {}
    #: the registered gradient an activation unit gets (worker.engine.ops), or None: units keep their gradient
    unit_rule: str | None = None
    #: channels of a map before reduction: the model input's (None), or 1 for a class activation map
    map_channels: int | None = None

    def _maps(self, x, scores, forward_ops, found: dict) -> list:
        """Per target k, the (rows, H, W, C) float32 map of ``scores[:, k]`` (one score per row of ``x``).
        Gradient methods: the input gradient, through the overrides the forward pass was traced with."""
        return [tf.cast(tf.gradients(tf.reduce_sum(scores[:, k]), x)[0], tf.float32) for k in range(scores.shape[1])]

    # -- the compiled function ---------------------------------------------------------------
    def _compute(self, images, labels, found: dict):
        """The traced function; what the trace finds (coverage, which score) goes into ``found``."""
        x = self.preprocessing.apply(images, self.source.input_size, self.source.channels)
        copies = self.smooth + 1
        if self.smooth:  # clean copy first, then the noisy ones, per image
            x = noisy_copies(x, images, self.smooth, self.noise)
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

        logits, differentiated, found["score"] = class_scores(output, self.score)
        clean = logits[::copies]  # the images themselves decide the prediction and the target
        predicted = tf.argmax(clean, axis=-1, output_type=tf.int32)
        predicted_prob = tf.gather(tf.nn.softmax(clean), predicted, batch_dims=1)
        if self.target.kind == "layer":
            scores, classes = self.target.select(logits, differentiated, labels, activation)
            classes = classes[::copies]
        else:
            _, classes = self.target.select(clean, differentiated[::copies], labels)
            scores = tf.gather(differentiated, tf.repeat(classes, copies, axis=0), batch_dims=1)

        per_target = self._maps(x, scores, forward_ops, found)
        grads = tf.stack(per_target, axis=1)  # (rows, K, H, W, C)
        if self.smooth:  # the mean over each image's noisy copies
            grads = tf.reshape(grads, tf.concat([[-1, copies], tf.shape(grads)[1:]], 0))
            grads = tf.reduce_mean(grads[:, 1:], axis=1)
        maps, scale = reduction_ops.reduce_map(grads, self.reduction, self.map_dtype)
        return {
            "maps": maps,
            "map_scale": scale,
            "predicted_class": predicted,
            "predicted_prob": predicted_prob,
            "target_class": classes,
            "target_score": scores[::copies],
        }

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
            spec = (tf.TensorSpec((self.batch_size, *size, 3), tf.uint8),
                    tf.TensorSpec((self.batch_size,), tf.int32))
            found: dict = {}
            function = tf.function(lambda images, labels: self._compute(images, labels, found),
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

    def _run(self, images, labels):
        out = self._concrete_for(images.shape[1:3])(tf.constant(images), tf.constant(labels))
        return {k: v.numpy() for k, v in out.items()}

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

    def _padded(self, *arrays):
        """(rows, chunks): each ``batch_size`` slice of ``arrays``, the last one padded with zeros to the
        compiled batch (one array: the chunk itself rather than a tuple)."""
        b = self.batch_size
        for start in range(0, len(arrays[0]), b):
            chunks = [a[start:start + b] for a in arrays]
            n = len(chunks[0])
            chunks = [np.concatenate([c, np.zeros((b - n, *c.shape[1:]), c.dtype)]) if n < b else c for c in chunks]
            yield n, (chunks[0] if len(chunks) == 1 else chunks)

    def explain(self, images: np.ndarray, labels=None) -> Explanation:
        """Explain ``images``: uint8 (N, H, W, 3), or grayscale (N, H, W, 1) or (N, H, W); ``labels`` (N,) ints for
        ``target='label'``."""
        images = self._check_images(images)
        if not len(images):  # nothing to explain: no labels are needed for it either
            return Explanation.empty(self.target.maps_per_image, self.map_shape, self.map_dtype, self.report)
        labels = self._check_labels(labels, len(images))
        parts = []
        for n, (chunk, chunk_labels) in self._padded(images, labels):
            parts.append({k: v[:n] for k, v in self._run(chunk, chunk_labels).items()})
        return Explanation.concatenate([Explanation(**p, report=self.report) for p in parts])

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

