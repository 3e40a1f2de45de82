"""Pictures of an audit, as uint8 RGB arrays: an image with its map laid over it, a 16 x 16 grid as a heat
square, a region drawn as a box, a probed region's evidence (:func:`shortcut_panels`), and PNG encodings of
them for the report's page and the README.

Examples:
    >>> enlarge(np.zeros((2, 2, 3), np.uint8), 3).shape
    (6, 6, 3)
"""

from __future__ import annotations

import base64

import numpy as np

from worker.audit.colormap import hot
from worker.data.decode import encode_png as png

BOX = (0, 255, 255)  # a region's outline: cyan, seen on the heat colours and on most images


def enlarge(image: np.ndarray, scale: int) -> np.ndarray:
    """``image`` (H, W, 3) uint8, each pixel a ``scale`` x ``scale`` block."""
    return np.repeat(np.repeat(np.asarray(image, np.uint8), scale, 0), scale, 1)


def heat(grid: np.ndarray, size: int, vmax: float | None = None) -> np.ndarray:
    """A map (any resolution) in the hot colours on ``vmax`` (default its own max), ``size`` x ``size``,
    bilinear from a full-resolution map, blocks from a coarse grid."""
    from PIL import Image

    rgb = Image.fromarray(hot(grid, vmax))
    smooth = grid.shape[0] >= size // 2
    return np.asarray(rgb.resize((size, size), Image.BILINEAR if smooth else Image.NEAREST))


def overlay(image: np.ndarray, saliency: np.ndarray, vmax: float | None = None) -> np.ndarray:
    """``image`` with ``saliency`` (any resolution, resized to the image's) laid over it in the hot colours."""
    from PIL import Image

    resized = np.asarray(Image.fromarray(np.asarray(saliency, np.float32)).resize(image.shape[1::-1], Image.BILINEAR))
    return (0.45 * image + 0.55 * hot(np.clip(resized, 0, None), vmax)).astype(np.uint8)


def with_box(picture: np.ndarray, box, scale: int = 1) -> np.ndarray:
    """``picture`` with the pixel ``box`` (y0, x0, y1, x1, in the unscaled image) outlined, two pixels wide."""
    from PIL import Image, ImageDraw

    out = Image.fromarray(np.asarray(picture, np.uint8))
    y0, x0, y1, x1 = (int(v) * scale for v in box)
    draw = ImageDraw.Draw(out)
    for inset in (0, 1):
        draw.rectangle([x0 + inset, y0 + inset, x1 - 1 - inset, y1 - 1 - inset], outline=BOX)
    return np.asarray(out)


def png64(picture: np.ndarray) -> str:
    """A uint8 RGB array as base64 PNG, for a ``data:`` URL."""
    return base64.b64encode(png(picture)).decode()


def flip_chart(probed, width: int = 256, height: int = 192) -> np.ndarray:
    """Bars: for each fill, the share of correctly classified images that leave the class when the region is
    neutralised (red) against the same fill at random places (grey); then the region pasted into other
    classes' images: the share moved to the class (red) against a random box (grey)."""
    from PIL import Image, ImageDraw

    pairs = [(how, f["flip_rate"], f["control_flip_rate"]) for how, f in probed.probe["fills"].items()]
    s = probed.probe["sufficiency"]
    pairs.append(("pasted", s["moved_to_class"], s["control_moved"]))
    picture = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(picture)
    top, bottom = 18, height - 18
    slot = width // len(pairs)
    draw.text((4, 2), "region (red) vs random place (grey)", fill="black")
    for i, (name, real, control) in enumerate(pairs):
        x = i * slot + slot // 6
        bar = slot // 3
        for j, (value, colour) in enumerate(((real, (200, 30, 30)), (control, (150, 150, 150)))):
            v = 0.0 if value != value else float(value)  # NaN: no image to measure
            draw.rectangle([x + j * bar, bottom - v * (bottom - top), x + (j + 1) * bar - 2, bottom], fill=colour)
        draw.text((x, bottom + 3), name, fill="black")
    draw.line([0, bottom, width, bottom], fill="black")
    return np.asarray(picture)


def shortcut_panels(probed, names=None, scale: int = 4) -> list[tuple[str, np.ndarray]]:
    """A probed region (a :class:`~worker.audit.intervene.ProbedRegion`: its numbers, mean image, mean map and
    examples) as captioned pictures: the region on the mean image and on the mean map, one image and its map,
    the same image after each fill with the model's class, and the flip rates against random placement."""
    def name(c: int) -> str:
        return f"{c} ({names[c]})" if names and 0 <= c < len(names) else str(c)

    box = probed.pixels
    size = probed.mean_image.shape[0] * scale
    panels = [("mean image, region", with_box(enlarge(probed.mean_image, scale), box, scale)),
              ("mean map, region", with_box(heat(probed.mean_map, size), box, scale))]
    for e in probed.examples[:1]:
        original = e.versions["original"]
        panels.append((f"image: class {name(original.predicted)}",
                       with_box(enlarge(original.image, scale), box, scale)))
        panels.append(("its map", with_box(enlarge(overlay(original.image, e.map), scale), box, scale)))
        for how, v in e.versions.items():
            if how != "original":
                panels.append((f"{how} fill: class {name(v.predicted)}", with_box(enlarge(v.image, scale), box, scale)))
    panels.append(("flip rate", flip_chart(probed, height=size)))
    return panels


def shortcut_figure(probed, names, scale: int = 3) -> np.ndarray:
    """:func:`shortcut_panels` side by side with their captions under a title line, one uint8 RGB picture."""
    from PIL import Image, ImageDraw

    panels = shortcut_panels(probed, names, scale)
    gap, caption, title = 8, 16, 20
    height = max(p.shape[0] for _, p in panels)
    width = sum(p.shape[1] for _, p in panels) + gap * (len(panels) + 1)
    figure = Image.new("RGB", (width, title + height + caption + gap), "white")
    draw = ImageDraw.Draw(figure)
    cls = probed.cls
    draw.text((gap, 4), f"confirmed shortcut: class {cls} ({names[cls]}) relies on the boxed region", fill="black")
    x = gap
    for text, picture in panels:
        figure.paste(Image.fromarray(picture), (x, title))
        draw.text((x, title + height + 2), text, fill="black")
        x += picture.shape[1] + gap
    return np.asarray(figure)
