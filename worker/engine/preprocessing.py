"""Preprocessing that runs inside the compiled function, on the device.

Images travel as ``uint8`` (N, H, W, 3) batches (4x less copying than float32).
On the device they are resized to the model's input size, converted to the
model's channel count and normalised.  **Maps are gradients with respect to the
model input**: the tensor after resizing and normalisation, in the model's
H x W.

Presets follow ``keras.applications``:

========== =========================================================
``none``   float pixels in [0, 255]
``scale01``  pixels / 255, in [0, 1]
``tf``     pixels / 127.5 - 1, in [-1, 1] (MobileNet, Inception, ...)
``caffe``  RGB -> BGR, minus the ImageNet BGR mean (ResNet50, VGG16)
``torch``  pixels / 255, minus ImageNet mean, over ImageNet std
========== =========================================================

``mean``/``std`` (per channel, in pixel units after ``scale``) define a custom one.

Examples:
    >>> import numpy as np
    >>> p = Preprocessing("tf")
    >>> p.apply(np.full((1, 2, 2, 3), 255, np.uint8), size=(2, 2), channels=3).numpy().max().item()
    1.0
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import tensorflow as tf

from worker.engine.options import PRESETS, RESIZE_METHODS, choose

IMAGENET_MEAN_RGB = (0.485, 0.456, 0.406)
IMAGENET_STD_RGB = (0.229, 0.224, 0.225)
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)



@dataclass(frozen=True)
class Preprocessing:
    """How uint8 RGB pixels become the model input."""

    preset: str = "none"
    scale: float = 1.0
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    resize_method: str = "bilinear"

    def __post_init__(self):
        choose("preprocessing preset", self.preset, PRESETS)
        choose("resize method", self.resize_method, RESIZE_METHODS)
        if self.preset != "custom" and (self.mean is not None or self.std is not None or self.scale != 1.0):
            raise ValueError("scale/mean/std are only used with preset='custom'")

    def describe(self) -> dict:
        return asdict(self)

    def apply(self, images: tf.Tensor, size: tuple[int, int], channels: int) -> tf.Tensor:
        """uint8 (N, H, W, 3) -> float32 (N, size[0], size[1], channels)."""
        x = tf.cast(images, tf.float32)
        if tuple(x.shape[1:3]) != tuple(size):
            x = tf.image.resize(x, size, method=self.resize_method)
            x = tf.clip_by_value(x, 0.0, 255.0)
        if self.preset == "scale01":
            x = x / 255.0
        elif self.preset == "tf":
            x = x / 127.5 - 1.0
        elif self.preset == "caffe":
            x = x[..., ::-1] - tf.constant(CAFFE_MEAN_BGR)
        elif self.preset == "torch":
            x = (x / 255.0 - tf.constant(IMAGENET_MEAN_RGB)) / tf.constant(IMAGENET_STD_RGB)
        elif self.preset == "custom":
            x = x * self.scale
            if self.mean is not None:
                x = x - tf.constant(self.mean, tf.float32)
            if self.std is not None:
                x = x / tf.constant(self.std, tf.float32)
        if channels == 1:
            x = tf.reduce_sum(x * tf.constant([0.299, 0.587, 0.114]), axis=-1, keepdims=True)
        elif channels != 3:
            raise ValueError(f"models with {channels} input channels are not supported (1 or 3)")
        return x
