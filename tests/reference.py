"""An independent numpy forward + guided backward, written from the layer equations.

It shares no code with the engine: it reads a Keras model's weights and
re-implements Conv2D('same', stride 1), BatchNormalization (inference),
ReLU/ReLU6, MaxPool2D(2), Flatten, Dense and Dropout (inference) in float64.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def conv_same(x, kernel, bias):
    kh, kw = kernel.shape[:2]
    ph, pw = kh // 2, kw // 2
    xp = np.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
    patches = sliding_window_view(xp, (kh, kw), axis=(1, 2))  # N,H,W,C,kh,kw
    return np.einsum("nhwcij,ijco->nhwo", patches, kernel) + bias


def conv_same_backward(grad, x_shape, kernel):
    kh, kw = kernel.shape[:2]
    ph, pw = kh // 2, kw // 2
    n, h, w, c = x_shape
    dxp = np.zeros((n, h + 2 * ph, w + 2 * pw, c))
    for i in range(kh):
        for j in range(kw):
            dxp[:, i:i + h, j:j + w, :] += np.einsum("nhwo,co->nhwc", grad, kernel[i, j])
    return dxp[:, ph:ph + h, pw:pw + w, :]


def maxpool2(x):
    n, h, w, c = x.shape
    h2, w2 = h // 2, w // 2
    windows = x[:, :h2 * 2, :w2 * 2].reshape(n, h2, 2, w2, 2, c).transpose(0, 1, 3, 5, 2, 4).reshape(n, h2, w2, c, 4)
    return windows.max(-1), windows.argmax(-1)


def maxpool2_backward(grad, arg, x_shape):
    n, h, w, c = x_shape
    h2, w2 = grad.shape[1:3]
    onehot = (np.arange(4) == arg[..., None]) * grad[..., None]  # n,h2,w2,c,4
    dx = np.zeros(x_shape)
    dx[:, :h2 * 2, :w2 * 2] = onehot.reshape(n, h2, w2, c, 2, 2).transpose(0, 1, 4, 2, 5, 3).reshape(n, h2 * 2, w2 * 2, c)
    return dx


def guided_gate(grad, pre, upper=None):
    passes = (pre > 0) & (grad > 0)
    if upper is not None:
        passes &= pre < upper
    return grad * passes


def vanilla_gate(grad, pre, upper=None):
    passes = pre > 0
    if upper is not None:
        passes &= pre < upper
    return grad * passes


def sequential_saliency(layers, x, target=None, guided=True, capture=None):
    """Forward ``layers`` (list of (kind, params)) on float x; backward the target logit.

    kinds: conv(kernel, bias), bn(gamma, beta, mean, var, eps), relu(upper or None),
    pool, flatten, dense(kernel, bias). The last layer's output is the logits.
    Returns (input gradient, logits), and with ``capture=i`` also (output of layer i, its gradient).
    """
    gate = guided_gate if guided else vanilla_gate
    tape, h = [], np.asarray(x, np.float64)
    captured = None
    for i, (kind, p) in enumerate(layers):
        tape.append((kind, p, h))
        if kind == "conv":
            h = conv_same(h, *p)
        elif kind == "bn":
            gamma, beta, mean, var, eps = p
            h = (h - mean) / np.sqrt(var + eps) * gamma + beta
        elif kind == "relu":
            h = np.maximum(h, 0) if p is None else np.clip(h, 0, p)
        elif kind == "pool":
            h, arg = maxpool2(h)
            tape[-1] = (kind, arg, tape[-1][2])
        elif kind == "flatten":
            h = h.reshape(len(h), -1)
        elif kind == "dense":
            h = h @ p[0] + p[1]
        if i == capture:
            captured = h
    logits = h
    target = logits.argmax(-1) if target is None else np.asarray(target)
    g = np.zeros_like(logits)
    g[np.arange(len(g)), target] = 1.0
    for i, (kind, p, inp) in reversed(list(enumerate(tape))):
        if i == capture:
            captured = (captured, g)
        if kind == "conv":
            g = conv_same_backward(g, inp.shape, p[0])
        elif kind == "bn":
            g = g * p[0] / np.sqrt(p[3] + p[4])
        elif kind == "relu":
            g = gate(g, inp, p)
        elif kind == "pool":
            g = maxpool2_backward(g, p, inp.shape)
        elif kind == "flatten":
            g = g.reshape(inp.shape)
        elif kind == "dense":
            g = g @ p[0].T
    return (g, logits) if capture is None else (g, logits, *captured)


def resize_bilinear(maps, size):
    """(N, h, w) -> (N, *size), bilinear with half-pixel centres (TensorFlow 2's ``tf.image.resize``)."""
    def axis(n_in, n_out):
        pos = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5
        low = np.floor(pos)
        frac = pos - low
        return np.clip(low, 0, n_in - 1).astype(int), np.clip(low + 1, 0, n_in - 1).astype(int), frac
    y0, y1, fy = axis(maps.shape[1], size[0])
    x0, x1, fx = axis(maps.shape[2], size[1])
    rows = maps[:, y0] * (1 - fy)[None, :, None] + maps[:, y1] * fy[None, :, None]
    return rows[:, :, x0] * (1 - fx)[None, None, :] + rows[:, :, x1] * fx[None, None, :]


def grad_cam(activation, gradient, size):
    """Grad-CAM from an activation (N, h, w, c) and the plain gradient of the score there, upsampled."""
    weights = gradient.mean(axis=(1, 2), keepdims=True)
    return resize_bilinear(np.maximum((activation * weights).sum(-1), 0), size)


def layers_of(model):
    """Translate a plain Keras model (the question's CNN) into reference layers."""
    out = []
    for layer in model.layers:
        name = type(layer).__name__
        w = [np.asarray(v, np.float64) for v in layer.get_weights()]
        if name == "Conv2D":
            out.append(("conv", (w[0], w[1])))
        elif name == "BatchNormalization":
            out.append(("bn", (w[0], w[1], w[2], w[3], layer.epsilon)))
        elif name == "Activation":
            out.append(("relu", None))
        elif name == "MaxPooling2D":
            out.append(("pool", None))
        elif name == "Flatten":
            out.append(("flatten", None))
        elif name == "Dense":
            out.append(("dense", (w[0], w[1])))
            if layer.get_config()["activation"] == "relu":
                out.append(("relu", None))
        elif name in ("InputLayer", "Dropout"):
            continue
        else:
            raise ValueError(f"reference has no {name}")
    return out


def randomize_batchnorm(model, seed: int):
    """Non-trivial BatchNorm statistics (in place), so BatchNorm is really tested; returns the model."""
    import keras

    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights([rng.uniform(0.5, 1.5, gamma.shape), rng.normal(0, 0.1, beta.shape),
                               rng.normal(0, 0.1, mean.shape), rng.uniform(0.5, 2.0, var.shape)])
    return model


def assert_close(actual, expected, rtol=1e-5):
    """Equal up to ``rtol`` of the expected map's largest magnitude (maps have no natural per-pixel scale)."""
    err = np.abs(actual - expected).max()
    assert err <= rtol * np.abs(expected).max(), f"max abs error {err} vs max {np.abs(expected).max()}"


def sigmoid(z):
    return 1 / (1 + np.exp(-z))


def swish_derivative(z):
    """d/dz of z * sigmoid(z)."""
    return sigmoid(z) * (1 + z * (1 - sigmoid(z)))


def gelu_derivative(z):
    """d/dz of the exact GELU, z * Phi(z)."""
    from scipy.special import erf

    return 0.5 * (1 + erf(z / np.sqrt(2))) + z * np.exp(-z * z / 2) / np.sqrt(2 * np.pi)

