"""Which score of the model's output is differentiated: logits (a final softmax stripped) or probability.

Differentiating a softmax output mixes every class into each map, so by default the softmax is found in the
traced graph (through Identity/Cast ops) and its input, the logits, is differentiated instead.
"""

from __future__ import annotations

import tensorflow as tf


def strip_softmax(output: tf.Tensor) -> tuple[tf.Tensor, bool]:
    """If ``output`` is a softmax (through Identity/Cast ops), return its input logits."""
    tensor = output
    while tensor.op.type in ("Identity", "Cast") and tensor.op.inputs:
        tensor = tensor.op.inputs[0]
    if tensor.op.type == "Softmax":
        return tensor.op.inputs[0], True
    return output, False


def class_scores(output: tf.Tensor, score: str) -> tuple[tf.Tensor, tf.Tensor, str]:
    """(float32 logits, the float32 scores to differentiate, a note saying which) of a model output."""
    logits, had_softmax = strip_softmax(output)
    logits = tf.cast(logits, tf.float32)
    if score == "probability":
        if not had_softmax:
            raise ValueError("score='probability' needs a model whose output is a softmax; this one is not")
        return logits, tf.cast(output, tf.float32), "probability (model softmax output)"
    return logits, logits, "logits (final softmax stripped)" if had_softmax else "logits (model output, no softmax)"
