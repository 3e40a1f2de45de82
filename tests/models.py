"""Models the tests build: small, seeded, trained in seconds on a CPU where they need training."""

from __future__ import annotations

import numpy as np


def small_cnn(size: int = 32, classes: int = 2, seed: int = 0):
    """A VGG-style CNN: seven conv-BatchNorm-ReLU blocks (four max-pooled), two ReLU dense layers with
    BatchNorm and dropout, and a softmax head; input size x size x 3."""
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
    return keras.Model(image, out, name="small_cnn")


def train_small_cnn(images: np.ndarray, labels: np.ndarray, classes: int = 10, epochs: int = 2, seed: int = 0):
    """Train :func:`small_cnn` briefly (seconds on a CPU) on uint8 images scaled to [0, 1]."""
    model = small_cnn(images.shape[1], classes, seed)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    x = images.astype("float32") / 255.0
    model.fit(x, labels, epochs=epochs, batch_size=32, verbose=0)
    # a short run leaves BatchNorm's moving statistics near their initial values: settle them
    for start in range(0, len(x) - 127, 128):
        for _ in range(8):
            model(x[start:start + 128], training=True)
    return model
