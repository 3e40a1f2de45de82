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
    x = images.astype("float32") / 255.0
    model.fit(x, labels, epochs=epochs, batch_size=32, verbose=0)
    # a short run leaves BatchNorm's moving statistics near their initial values: settle them
    for start in range(0, len(x) - 127, 128):
        for _ in range(8):
            model(x[start:start + 128], training=True)
    return model


def png_bytes(image: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def write_hf_parquet(path, images: np.ndarray, labels: np.ndarray, rows_per_group: int = 256) -> None:
    """Write images as Hugging Face ``datasets`` does: ``image: struct<bytes, path>``, plus ``label``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    cells = [{"bytes": png_bytes(img), "path": f"digit_{i}.png"} for i, img in enumerate(images)]
    table = pa.table({
        "image": pa.array(cells, pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
        "label": pa.array(labels, pa.int64()),
    })
    pq.write_table(table, str(path), row_group_size=rows_per_group)


def overlay(image: np.ndarray, saliency: np.ndarray, scale: int = 4) -> np.ndarray:
    """image | map | blend, side by side, as uint8 RGB (the map normalised to its own max)."""
    from PIL import Image

    from worker.audit.colormap import hot

    heat = hot(saliency)
    if heat.shape[:2] != image.shape[:2]:
        heat = np.asarray(Image.fromarray(heat).resize(image.shape[1::-1], Image.BILINEAR))
    blend = (0.5 * image + 0.5 * heat).astype(np.uint8)
    panel = np.concatenate([image, heat, blend], axis=1)
    return np.asarray(Image.fromarray(panel).resize((panel.shape[1] * scale, panel.shape[0] * scale), Image.NEAREST))


def methods_figure(model, images: np.ndarray, path: str, scale: int = 4) -> None:
    """One row per image: the image, then its guided backprop, Grad-CAM, Guided Grad-CAM and SmoothGrad (over
    guided backprop, 16 copies) maps, each on its own colour scale; a title row names the columns."""
    from PIL import Image, ImageDraw

    from worker import GradCAM, GuidedBackprop, GuidedGradCAM
    from worker.audit.colormap import hot

    options = {"batch_size": len(images), "preprocessing": "scale01", "map_dtype": "float32"}
    columns = {"guided backprop": GuidedBackprop(model, **options), "Grad-CAM": GradCAM(model, **options),
               "Guided Grad-CAM": GuidedGradCAM(model, **options),
               "SmoothGrad": GuidedBackprop(model, smooth=16, noise=0.15, **options)}
    maps = {name: engine.explain(images).as_float32()[:, 0] for name, engine in columns.items()}
    h, w = images.shape[1] * scale, images.shape[2] * scale
    rows = [np.concatenate([images[i]] + [hot(maps[name][i]) for name in columns], axis=1) for i in range(len(images))]
    grid = Image.fromarray(np.concatenate(rows, axis=0)).resize(((len(columns) + 1) * w, len(images) * h), Image.NEAREST)
    figure = Image.new("RGB", (grid.width, grid.height + 16), "white")
    figure.paste(grid, (0, 16))
    draw = ImageDraw.Draw(figure)
    for j, title in enumerate(["image", *columns]):
        draw.text((j * w + 4, 2), title, fill="black")
    figure.save(path)


MARKER = ".guided-saliency-demo"


def run_demo(output: str = "demo_output", images: int = 600, size: int = 32, epochs: int = 8, echo=print) -> dict:
    """Make data and a model, run the job on a local Ray, write overlays; return the job summary."""
    import os
    import shutil

    import pyarrow.parquet as pq
    from PIL import Image

    from worker.data.schema import read_maps
    from worker.job import JobConfig, run

    if os.path.exists(output) and os.listdir(output):
        if not os.path.exists(os.path.join(output, MARKER)):
            raise FileExistsError(f"{output} exists and was not made by the demo; choose another --output")
        echo(f"replacing the previous demo in {output}")
        shutil.rmtree(output)
    for sub in ("data", "model", "overlays"):
        os.makedirs(os.path.join(output, sub), exist_ok=True)
    open(os.path.join(output, MARKER), "w").close()

    pixels, labels = digits_images(size)
    train_x, train_y = pixels[images:], labels[images:]
    test_x, test_y = pixels[:images], labels[:images]
    half = len(test_x) // 2  # two files, to show a directory input
    write_hf_parquet(os.path.join(output, "data", "digits-0.parquet"), test_x[:half], test_y[:half], 128)
    write_hf_parquet(os.path.join(output, "data", "digits-1.parquet"), test_x[half:], test_y[half:], 128)
    echo(f"training the question's CNN on {len(train_x)} digit images ...")
    model = train_question_model(train_x, train_y, classes=10, epochs=epochs)
    model_path = os.path.join(output, "model", "question_cnn.keras")
    model.save(model_path)

    summary = run(JobConfig(model=model_path, input=os.path.join(output, "data"), output=os.path.join(output, "maps"),
                            label_column="label", preprocessing="scale01", rows_per_file=256), echo=echo)
    table = pq.read_table(os.path.join(output, "maps")).sort_by("id")
    maps = read_maps(table)
    ids = table["id"].to_pylist()
    accuracy = float(np.mean(table["predicted_class"].to_numpy() == table["label"].to_numpy()))
    rows = []
    for i in range(min(8, len(ids))):
        file, row = ids[i].split("#")
        source = test_x[int(row) + (half if file.endswith("-1.parquet") else 0)]
        panel = overlay(source, maps[i])
        Image.fromarray(panel).save(os.path.join(output, "overlays", f"{i:02d}.png"))
        rows.append(panel)
    Image.fromarray(np.concatenate(rows, axis=0)).save(os.path.join(output, "overlays", "grid.png"))
    methods_figure(model, test_x[:4], os.path.join(output, "overlays", "methods.png"))
    from worker.audit import run_audit

    audit = run_audit(os.path.join(output, "maps"), os.path.join(output, "audit"), controls=32)
    summary["held_out_accuracy"] = round(accuracy, 4)
    summary["overlays"] = os.path.join(output, "overlays")
    summary["audit_report"] = os.path.join(output, "audit", "report.html")
    summary["audit_findings"] = len(audit["findings"])
    echo(f"held-out accuracy {accuracy:.3f}; overlays (image | map | blend) and methods.png (each method's map) in "
         f"{summary['overlays']}; "
         f"audit report in {summary['audit_report']}")
    return summary
