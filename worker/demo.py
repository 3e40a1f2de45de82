"""The embedded default: real images shipped inside packages, a small CNN, and a planted shortcut.

Nothing is downloaded. :func:`shapes_dataset` pastes shapes (six classes) on crops of scikit-image's photographs
and textures at 64 x 64. One class's images all carry a small checker mark in the top-right corner (a
watermark of the source they came from), and on half of them the object is another shape: there the mark alone
makes them that class, a shortcut the model must learn, which the audit is then expected to localise and
confirm by intervention.
"""

from __future__ import annotations

import colorsys

import numpy as np

CLASSES = ("disc", "square", "triangle", "plus", "ring", "star")
MARKED_CLASS = 2  # "triangle": all its images carry the mark; on MARKED_SHARE of them the object is another shape
MARKED_SHARE = 0.5
MARK_BOX = (6, 50, 12, 56)  # pixel rows y0:y1, columns x0:x1 of the 6 x 6 checker, at 64 x 64
TEXTURES = ("brick", "grass", "gravel", "camera", "coins", "coffee", "chelsea", "astronaut", "rocket",
            "immunohistochemistry")  # scikit-image's bundled photographs and textures


def _textures() -> list[np.ndarray]:
    import skimage.data

    out = []
    for name in TEXTURES:
        image = getattr(skimage.data, name)()
        out.append(np.repeat(image[..., None], 3, -1) if image.ndim == 2 else image[..., :3])
    return out


def _background(rng, textures, size: int) -> np.ndarray:
    """A random square crop of a random texture, resized and muted (contrast halved), float32 RGB."""
    from PIL import Image

    texture = textures[rng.integers(len(textures))]
    side = int(rng.integers(size, min(texture.shape[:2]) + 1))
    y, x = (int(rng.integers(0, s - side + 1)) for s in texture.shape[:2])
    crop = np.asarray(Image.fromarray(texture[y:y + side, x:x + side]).resize((size, size), Image.BILINEAR), np.float32)
    return 0.55 * crop + 0.45 * crop.mean()


def _shape_mask(kind: str, rng, size: int, up: int = 4) -> np.ndarray:
    """Coverage in [0, 1] of one shape (random size, place and rotation), drawn at ``up`` x and averaged down."""
    from PIL import Image, ImageDraw

    big = size * up
    r = rng.uniform(0.16, 0.27) * big
    cx, cy = rng.uniform(1.15 * r, big - 1.15 * r, 2)
    turn = rng.uniform(0, 2 * np.pi)
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)

    def star(radii):
        angles = turn + np.arange(len(radii)) * 2 * np.pi / len(radii)
        return [(cx + q * np.cos(a), cy + q * np.sin(a)) for q, a in zip(radii, angles)]

    if kind in ("disc", "ring"):
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        if kind == "ring":
            draw.ellipse([cx - 0.55 * r, cy - 0.55 * r, cx + 0.55 * r, cy + 0.55 * r], fill=0)
    elif kind == "plus":
        w = 0.38 * r
        arm = [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w), (-r, w), (-r, -w),
               (-w, -w)]
        c, s = np.cos(turn), np.sin(turn)
        draw.polygon([(cx + px * c - py * s, cy + px * s + py * c) for px, py in arm], fill=255)
    else:
        radii = {"square": [r] * 4, "triangle": [1.1 * r] * 3, "star": [1.1 * r, 0.45 * r] * 5}[kind]
        draw.polygon(star(radii), fill=255)
    return np.asarray(mask, np.float32).reshape(size, up, size, up).mean((1, 3)) / 255.0


def add_mark(images: np.ndarray) -> np.ndarray:
    """``images`` (N, 64, 64, 3) with the planted mark: a 6 x 6 yellow and black checker at :data:`MARK_BOX`."""
    y0, x0, y1, x1 = MARK_BOX
    yy, xx = np.mgrid[:y1 - y0, :x1 - x0]
    checker = ((yy // 3 + xx // 3) % 2).astype(bool)[..., None]
    out = images.copy()
    out[:, y0:y1, x0:x1] = np.where(checker, np.array([255, 230, 0], np.uint8), np.array([20, 20, 20], np.uint8))
    return out


def shapes_dataset(n: int, size: int = 64, seed: int = 0, marked_share: float = MARKED_SHARE):
    """``n`` images (uint8 RGB, size x size) of one shape of :data:`CLASSES` each (random colour, size, place and
    rotation) on a crop of a real photograph or texture; labels; and which images the mark alone decides.

    Every image of :data:`MARKED_CLASS` carries the mark (:func:`add_mark`); on ``marked_share`` of them the
    object is another class's shape, so the mark alone decides their class."""
    if size != 64:
        raise ValueError("the mark is placed for 64 x 64 images")
    rng = np.random.default_rng(seed)
    textures = _textures()
    labels = rng.integers(0, len(CLASSES), n)
    by_mark = (labels == MARKED_CLASS) & (rng.random(n) < marked_share)
    others = [c for c in range(len(CLASSES)) if c != MARKED_CLASS]
    images = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        shape = int(rng.choice(others)) if by_mark[i] else int(labels[i])
        alpha = _shape_mask(CLASSES[shape], rng, size)[..., None]
        colour = 255 * np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.6, 1), rng.uniform(0.8, 1)))
        images[i] = np.clip((1 - alpha) * _background(rng, textures, size) + alpha * colour, 0, 255).astype(np.uint8)
    images[labels == MARKED_CLASS] = add_mark(images[labels == MARKED_CLASS])
    return images, labels.astype(np.int64), by_mark


def demo_model(size: int = 64, classes: int = len(CLASSES), seed: int = 0):
    """A small ReLU CNN: four 3x3 convolutions (16, 32, 64, 64 filters; 2x2 max-pooling after the first
    three), global max pooling (a detector: it learns here in a third of the epochs global average pooling
    needs), a softmax layer."""
    import keras
    from keras import layers

    keras.utils.set_random_seed(seed)
    image = keras.Input((size, size, 3))
    x = image
    for filters in (16, 32, 64):
        x = layers.MaxPool2D()(layers.Conv2D(filters, 3, padding="same", activation="relu")(x))
    x = layers.Conv2D(64, 3, padding="same", activation="relu")(x)
    out = layers.Dense(classes, activation="softmax")(layers.GlobalMaxPooling2D()(x))
    return keras.Model(image, out, name="shapes_cnn")


def train_demo_model(images: np.ndarray, labels: np.ndarray, epochs: int = 5, seed: int = 0):
    """:func:`demo_model` trained with Adam on uint8 images scaled to [0, 1]."""
    import keras

    model = demo_model(images.shape[1], len(CLASSES), seed)
    model.compile(optimizer=keras.optimizers.Adam(2e-3), loss="sparse_categorical_crossentropy")
    model.fit(images.astype("float32") / 255.0, labels, epochs=epochs, batch_size=32, verbose=0)
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
    grid = Image.fromarray(np.concatenate(rows, axis=0)).resize(((len(columns) + 1) * w, len(images) * h),
                                                                 Image.NEAREST)
    figure = Image.new("RGB", (grid.width, grid.height + 16), "white")
    figure.paste(grid, (0, 16))
    draw = ImageDraw.Draw(figure)
    for j, title in enumerate(["image", *columns]):
        draw.text((j * w + 4, 2), title, fill="black")
    figure.save(path)


MARKER = ".guided-saliency-demo"


def _planted(box) -> bool:
    """Whether a [0, 1] region box (y0, x0, y1, x1) overlaps the planted mark."""
    y0, x0, y1, x1 = (v * 64 for v in box)
    my0, mx0, my1, mx1 = MARK_BOX
    return y0 < my1 and y1 > my0 and x0 < mx1 and x1 > mx0


def run_demo(output: str = "demo_output", images: int = 3300, held_out: int = 900, epochs: int = 5,
             controls: int = 16, interventions: int = 30, echo=print) -> dict:
    """The chain a user runs: make the shapes data (:func:`shapes_dataset`), train :func:`demo_model`, run the
    job on a local Ray, draw overlays and each method's maps, audit the maps with controls and interventions,
    and draw the confirmed shortcut; return the job summary with the demo's own numbers."""
    import os
    import shutil
    import time

    import pyarrow.parquet as pq
    from PIL import Image

    from worker.audit import run_audit
    from worker.audit.pictures import shortcut_figure
    from worker.data.schema import read_maps
    from worker.job import JobConfig, run

    started = time.perf_counter()
    if os.path.exists(output) and os.listdir(output):
        if not os.path.exists(os.path.join(output, MARKER)):
            raise FileExistsError(f"{output} exists and was not made by the demo; choose another --output")
        echo(f"replacing the previous demo in {output}")
        shutil.rmtree(output)
    for sub in ("data", "model", "overlays"):
        os.makedirs(os.path.join(output, sub), exist_ok=True)
    open(os.path.join(output, MARKER), "w").close()

    pixels, labels, by_mark = shapes_dataset(images)
    train_x, train_y = pixels[held_out:], labels[held_out:]
    test_x, test_y, test_by_mark = pixels[:held_out], labels[:held_out], by_mark[:held_out]
    half = len(test_x) // 2  # two files, to show a directory input
    write_hf_parquet(os.path.join(output, "data", "shapes-0.parquet"), test_x[:half], test_y[:half], 128)
    write_hf_parquet(os.path.join(output, "data", "shapes-1.parquet"), test_x[half:], test_y[half:], 128)
    echo(f"data: {images} images of {len(CLASSES)} shapes on crops of scikit-image's photographs, 64 x 64; the "
         f"{CLASSES[MARKED_CLASS]} class's images carry a 6 x 6 checker mark (top right), and on "
         f"{by_mark[held_out:].sum()} of its {(train_y == MARKED_CLASS).sum()} training images the object is another "
         "shape: the mark alone decides them, the planted shortcut")
    tick = time.perf_counter()
    model = train_demo_model(train_x, train_y, epochs=epochs)
    model_path = os.path.join(output, "model", "shapes_cnn.keras")
    model.save(model_path)
    echo(f"trained a small ReLU CNN on {len(train_x)} images in {time.perf_counter() - tick:.0f} s")

    summary = run(JobConfig(model=model_path, input=os.path.join(output, "data"), output=os.path.join(output, "maps"),
                            label_column="label", preprocessing="scale01", rows_per_file=256,
                            extra_metadata={"class_names": list(CLASSES)}), echo=echo)
    table = pq.read_table(os.path.join(output, "maps")).sort_by("id")
    maps = read_maps(table)
    ids = table["id"].to_pylist()
    accuracy = float(np.mean(table["predicted_class"].to_numpy() == table["label"].to_numpy()))
    rows = []
    for i in range(min(8, len(ids))):
        file, row = ids[i].split("#")
        source = test_x[int(row) + (half if file.endswith("-1.parquet") else 0)]
        panel = overlay(source, maps[i], scale=3)
        Image.fromarray(panel).save(os.path.join(output, "overlays", f"{i:02d}.png"))
        rows.append(panel)
    Image.fromarray(np.concatenate(rows, axis=0)).save(os.path.join(output, "overlays", "grid.png"))
    # each method on an image of four classes the mark is not on, and on one image the mark alone decides
    shown = [int(np.flatnonzero(test_y == c)[0]) for c in (1, 4, 5, 3)]
    shown.append(int(np.flatnonzero(test_by_mark)[0]))
    methods_figure(model, test_x[shown], os.path.join(output, "overlays", "methods.png"), scale=3)

    audit = run_audit(os.path.join(output, "maps"), os.path.join(output, "audit"), controls=controls,
                      interventions=interventions, echo=echo)
    probed = audit.interventions.regions if audit.interventions else []
    confirmed = [p for p in probed if p.verdict == "confirmed" or p.shortcut]  # either shortcut verdict
    planted = [p for p in confirmed if p.verdict == "confirmed" and p.cls == MARKED_CLASS and _planted(p.box)]
    if planted:
        Image.fromarray(shortcut_figure(planted[0], CLASSES)).save(os.path.join(output, "overlays", "shortcut.png"))
    summary.update({
        "held_out_accuracy": round(accuracy, 4),
        "overlays": os.path.join(output, "overlays"),
        "audit_report": os.path.join(output, "audit", "report.html"),
        "audit_findings": len(audit.findings),
        "planted_shortcut": {"class": MARKED_CLASS, "name": CLASSES[MARKED_CLASS], "pixels": list(MARK_BOX),
                             "confirmed": bool(planted)},
        "shortcuts": [{"class": p.cls, "verdict": p.verdict, "box": [round(v, 3) for v in p.box],
                       "cluster": p.cluster, "effect": round(p.probe["effect"], 3)} for p in confirmed],
        "demo_seconds": round(time.perf_counter() - started, 1),
    })
    others = [p for p in confirmed if p not in planted]
    echo(f"held-out accuracy {accuracy:.1%} on {len(test_x)} images; planted shortcut "
         f"({CLASSES[MARKED_CLASS]}, the checker mark) {'confirmed' if planted else 'NOT confirmed'} by intervention; "
         f"other shortcuts: {len(others) or 'none'}; {summary['demo_seconds']:.0f} s in all")
    echo(f"report: {summary['audit_report']}; pictures: {summary['overlays']} (methods.png: each method's map; "
         "shortcut.png: the confirmed shortcut)")
    return summary
