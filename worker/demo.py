"""The embedded default: real images shipped inside scikit-learn, and the original question's model.

Nothing is downloaded: ``load_digits`` ships with scikit-learn.
"""

from __future__ import annotations

import numpy as np


def question_model(size: int = 32, classes: int = 2, seed: int = 0):
    """The CNN of the question this project grew from (input size x size x 3, softmax output)."""
    import keras
    from keras import layers

    keras.utils.set_random_seed(seed)

    def block(x, filters, pool):
        x = layers.Conv2D(filters, (3, 3), padding="same")(x)
        x = layers.BatchNormalization()(x)
        x = layers.Activation("relu")(x)
        return layers.MaxPool2D((2, 2))(x) if pool else x

    image = keras.Input((size, size, 3))
    x = block(image, 32, True)
    x = block(x, 64, True)
    x = block(x, 64, True)
    x = block(x, 128, False)
    x = block(x, 128, True)
    x = block(x, 128, False)
    x = block(x, 128, False)
    x = layers.Flatten()(x)
    x = layers.Dense(64, activation="relu")(x)
    x = layers.BatchNormalization()(x)
    x = layers.Dense(32, activation="relu")(x)
    x = layers.Dropout(0.5)(x)
    out = layers.Dense(classes, activation="softmax")(x)
    return keras.Model(image, out, name="question_cnn")


def digits_images(size: int = 32, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's handwritten digits as uint8 RGB (N, size, size, 3) images, and their labels."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    images, labels = digits.images, digits.target
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    out = np.empty((len(images), size, size, 3), np.uint8)
    for i, img in enumerate(images):
        gray = Image.fromarray((img * (255.0 / 16.0)).astype(np.uint8)).resize((size, size), Image.BILINEAR)
        out[i] = np.asarray(gray)[..., None]
    return out, labels.astype(np.int64)


def train_question_model(images: np.ndarray, labels: np.ndarray, classes: int = 10, epochs: int = 2, seed: int = 0):
    """Train the question's model briefly (seconds on a CPU) on uint8 images scaled to [0, 1]."""
    model = question_model(images.shape[1], classes, seed)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(images.astype("float32") / 255.0, labels, epochs=epochs, batch_size=64, verbose=0)
    return model
