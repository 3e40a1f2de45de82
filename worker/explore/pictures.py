"""The pictures of the rows on screen: the input image read back by id, its map, and the two laid over each other.

Images are read from the job's input only for the rows a page shows, decoded as the job decoded them (its resize
policy, at the map's size), then kept in a small cache: a page's pictures are asked for one by one, and the same
rows come back when a person pages back or opens one.

Examples:
    >>> import numpy as np
    >>> png(np.zeros((4, 4, 3), np.uint8))[:8]
    b'\\x89PNG\\r\\n\\x1a\\n'
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np

from worker.audit.colormap import hot
from worker.audit.pictures import enlarge, overlay, png
from worker.data.decode import DecodeError, image_cells

SIZES = {"small": 128, "large": 384}  # pixels on screen, the longer side


def magnitude(saliency: np.ndarray, channels_last: bool = False) -> np.ndarray:
    """A stored map as one (H, W) plane of magnitudes: the first map of ``top:K`` runs (K, H, W), the channels'
    largest magnitude for unreduced maps (H, W, C: ``channels_last``)."""
    m = np.abs(np.asarray(saliency, np.float32))
    if m.ndim == 3:
        m = m.max(axis=-1) if channels_last else m[0]
    return m


def _scaled(picture: np.ndarray, size: str) -> np.ndarray:
    from PIL import Image

    longest = SIZES[size]
    h, w = picture.shape[:2]
    factor = longest / max(h, w)
    if factor >= 2 and float(factor).is_integer():
        return enlarge(picture, int(factor))
    return np.asarray(Image.fromarray(picture).resize((round(w * factor), round(h * factor)), Image.BILINEAR))


class Pictures:
    """Pictures of one job's rows: ``picture(row, kind, size)`` with ``kind`` image, map or overlay."""

    def __init__(self, config, cache_rows: int = 512):
        self.config = config
        self._plan = None
        self._lock = threading.Lock()
        self._images: OrderedDict[str, np.ndarray | None] = OrderedDict()
        self.cache_rows = cache_rows

    def _input(self):
        with self._lock:
            if self._plan is None:  # listed once, on the first picture: the server starts at once
                self._plan = self.config.plan_input([self.config.image_column])
            return self._plan

    def prefetch(self, rows: list[dict]) -> None:
        """Read and decode the input images of ``rows`` (a page) in one pass over the row groups holding them."""
        wanted = [r["id"] for r in rows if r["id"] not in self._images and r.get("map") is not None]
        if wanted:
            shapes = {r["id"]: self.plane(r).shape for r in rows if r["id"] in wanted}
            self._read(wanted, shapes)

    def _read(self, ids: list[str], shapes: dict) -> None:
        found: dict[str, np.ndarray | None] = {row_id: None for row_id in ids}
        for table in self._input().read([self.config.image_column], self.config.id_column, ids):
            for row_id, cell in zip(table["id"].to_pylist(), image_cells(table[self.config.image_column])):
                try:
                    found[row_id] = self.config.decode_options(shapes[row_id]).decode(cell)
                except DecodeError:
                    found[row_id] = None
        with self._lock:
            self._images.update(found)
            while len(self._images) > self.cache_rows:
                self._images.popitem(last=False)

    def plane(self, row: dict) -> np.ndarray:
        """The row's map as one (H, W) plane of magnitudes (:func:`magnitude`)."""
        return magnitude(row["map"], channels_last=self.config.reduction == "none")

    def image(self, row: dict) -> np.ndarray | None:
        """The row's input image as the job decoded it, or None (an error row, or not found in the input)."""
        if row.get("map") is None:
            return None
        if row["id"] not in self._images:
            self._read([row["id"]], {row["id"]: self.plane(row).shape})
        return self._images.get(row["id"])

    def picture(self, row: dict, kind: str, size: str = "small") -> bytes:
        """PNG bytes of the row's ``kind`` picture: each map on its own colour scale (0 to its largest
        magnitude)."""
        if kind == "map":
            if row.get("map") is None:
                raise LookupError("this row has no map")
            return png(_scaled(hot(self.plane(row)), size))
        image = self.image(row)
        if image is None:
            raise LookupError("this row's image is not in the input, or does not decode")
        if kind == "image":
            return png(_scaled(image, size))
        if kind == "overlay":
            return png(_scaled(overlay(image, self.plane(row)), size))
        raise LookupError(f"unknown picture {kind!r}: image, map or overlay")
