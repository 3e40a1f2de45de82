"""What is differentiated for each image: a class score or an intermediate activation.

A target is written as a short string, the same in the CLI and the Python API:

==================== ===================================================
``predicted``        the predicted class (default)
``label``            the label given per image
``class:K``          the fixed class index K
``top:K``            the K highest-scoring classes (K maps per image)
``layer:NAME``       the sum of a layer's activation (e.g. ``conv5_block3_out``)
``layer:NAME:C``     the sum of channel C of that activation
==================== ===================================================

A target selects itself: :meth:`Target.select` picks the scores to differentiate from a traced forward
pass (TensorFlow is imported only there, so parsing and checking need none).

Examples:
    >>> Target.parse("top:3").maps_per_image
    3
    >>> label_problem(7, num_classes=5)
    'label 7 out of range [0, 5)'
"""

from __future__ import annotations

from dataclasses import dataclass

KINDS = ("predicted", "label", "class", "top", "layer")


def label_problem(label, num_classes: int) -> str | None:
    """Why ``label`` cannot be a class index of a model with ``num_classes`` classes (None when it can)."""
    import math
    import numbers

    if label is None:
        return "label is missing"
    if hasattr(label, "item"):  # a numpy scalar
        label = label.item()
    if isinstance(label, numbers.Real) and not isinstance(label, numbers.Integral):
        # a float column (pandas makes one of an integer column with a missing value): 3.0 is class 3
        if not math.isfinite(label) or label != int(label):
            return f"label {label!r} is not a whole class index"
        label = int(label)
    if isinstance(label, bool) or not isinstance(label, numbers.Integral) or not 0 <= int(label) < num_classes:
        return f"label {label!r} out of range [0, {num_classes})"
    return None


@dataclass(frozen=True)
class Target:
    kind: str = "predicted"
    index: int | None = None  # class index, k of top-k, or channel
    layer: str | None = None

    @classmethod
    def parse(cls, spec: "str | Target") -> "Target":
        if isinstance(spec, Target):
            return spec
        parts = str(spec).split(":")
        kind = parts[0]
        try:
            if kind in ("predicted", "label") and len(parts) == 1:
                return cls(kind)
            if kind in ("class", "top") and len(parts) == 2:
                value = int(parts[1])
                if value < (0 if kind == "class" else 1):
                    raise ValueError
                return cls(kind, value)
            if kind == "layer" and len(parts) in (2, 3) and parts[1]:
                channel = int(parts[2]) if len(parts) == 3 else None
                return cls(kind, channel, parts[1])
        except ValueError:
            pass
        raise ValueError(
            f"bad target {spec!r}; use predicted, label, class:K, top:K (K>=1), "
            "layer:NAME or layer:NAME:CHANNEL"
        )

    @property
    def maps_per_image(self) -> int:
        return self.index if self.kind == "top" else 1

    def __str__(self) -> str:
        if self.kind in ("predicted", "label"):
            return self.kind
        if self.kind == "layer":
            return f"layer:{self.layer}" + ("" if self.index is None else f":{self.index}")
        return f"{self.kind}:{self.index}"

    def check_classes(self, num_classes: int) -> None:
        """Refuse a class index or a top-K the model's ``num_classes`` cannot satisfy."""
        if self.kind == "class" and self.index >= num_classes:
            raise ValueError(f"target class {self.index} out of range: the model has {num_classes} classes")
        if self.kind == "top" and self.index > num_classes:
            raise ValueError(f"top:{self.index} asks for more classes than the model's {num_classes}")

    def select(self, logits, differentiated, labels, activation=None):
        """(scores (N, K) to differentiate, their classes (N, K); -1 for layer targets), inside a trace.

        ``logits`` rank the classes, ``differentiated`` are the scores of the chosen ones (logits or
        probabilities), ``labels`` (N,) int32 serve ``label``, ``activation`` the layer of ``layer:NAME``."""
        import tensorflow as tf

        if self.kind == "layer":
            act = tf.cast(activation, tf.float32)
            if self.index is not None:
                if not 0 <= self.index < act.shape[-1]:
                    raise ValueError(f"channel {self.index} out of range: layer {self.layer!r} has "
                                     f"{act.shape[-1]} channels")
                act = act[..., self.index]
            scores = tf.reshape(tf.reduce_sum(tf.reshape(act, [tf.shape(act)[0], -1]), axis=1), [-1, 1])
            return scores, tf.fill(tf.shape(scores), -1)
        if self.kind == "predicted":
            classes = tf.argmax(logits, axis=-1, output_type=tf.int32)[:, None]
        elif self.kind == "label":
            classes = labels[:, None]
        elif self.kind == "class":
            classes = tf.fill([tf.shape(logits)[0], 1], self.index)
        else:
            classes = tf.math.top_k(logits, k=self.index).indices
        return tf.gather(differentiated, classes, batch_dims=1), classes
