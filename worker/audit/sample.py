"""The audit's reads of the job's input, decoded as the job decoded it: one sample (:func:`draw`) that serves the
controls, the interventions, the method comparison and the classes' mean images, and the worst cases' own rows
by id (:func:`images_by_id`).

Examples:
    >>> sample = Draw([("a", np.zeros((2, 2, 3), np.uint8), 0, None), ("b", np.ones((2, 2, 3), np.uint8), 1, None),
    ...                ("c", np.ones((2, 2, 3), np.uint8), 0, None)], first=2, per_class=1, classes=[0, 1], size=(2, 2))
    >>> sample.first(2).ids, sample.per_class(1).ids, sample.per_class(1).classes
    (['a', 'b'], ['a', 'b'], [0, 1])
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from worker.audit.aggregate import resolve
from worker.data.decode import DecodeError, decode_mask, image_cells


def decoded_rows(config, options, with_labels: bool = False, ids=None, with_masks: bool = False):
    """Yield (id, image, label or None, mask or None) for every decodable row of the job's input (``config``, its
    run record), decoded with the job's ``options`` (:class:`~worker.data.decode.DecodeOptions`) at the model's
    input size, masks by :func:`~worker.data.decode.decode_mask` (``with_masks``, where the job had a mask column);
    with ``ids``, only those rows (derived ids open only the row groups they name)."""
    label, mask = config.label_column if with_labels else None, config.mask_column if with_masks else None
    columns = [c for c in (config.image_column, label, mask) if c]
    for table in config.plan_input(columns).read(columns, config.id_column, ids):
        empty = [None] * table.num_rows
        labels = table[label].to_pylist() if label else empty
        masks = image_cells(table[mask]) if mask else empty
        for row_id, cell, value, region in zip(table["id"].to_pylist(), image_cells(table[config.image_column]),
                                               labels, masks):
            try:
                yield (row_id, options.decode(cell), value,
                       None if region is None else decode_mask(region, options.size, options.max_pixels))
            except DecodeError:
                continue


def images_by_id(config, options, ids) -> dict[str, np.ndarray]:
    """The decoded input images of a few rows (the worst cases), read as the job read them."""
    return {row_id: image for row_id, image, _, _ in decoded_rows(config, options, ids=ids)}


@dataclass(frozen=True)
class InputSample:
    """Rows of the job's input read and decoded as the job did: their ``ids``, ``images`` (N, H, W, 3) uint8 at the
    model's input size, ``classes`` (each label resolved as the aggregates resolve it; None where the sample is
    not by class) and ``masks`` ((N, H, W) bool; None without a mask column)."""

    ids: list[str]
    images: np.ndarray
    classes: list | None
    masks: np.ndarray | None

    def by_class(self) -> dict:
        """{class: its images}, in the sample's order."""
        found: dict = {}
        for cls, image in zip(self.classes or [], self.images):
            found.setdefault(cls, []).append(image)
        return {cls: np.stack(images) for cls, images in found.items()}

    def ids_by_class(self) -> dict:
        """{class: its rows' ids}, in the order of :meth:`by_class`."""
        found: dict = {}
        for cls, row_id in zip(self.classes or [], self.ids):
            found.setdefault(cls, []).append(row_id)
        return {cls: np.array(ids, object) for cls, ids in found.items()}


class Draw:
    """One pass over the job's input, kept: the first ``first`` decodable rows, and the first ``per_class`` rows of
    each class in ``classes`` (rows are (id, image, class, mask)). Each step takes its part with :meth:`first` or
    :meth:`per_class`; a smaller part is the beginning of a larger one, so every step sees the rows it would have
    read alone."""

    def __init__(self, rows, first: int = 0, per_class: int = 0, classes=None, size=(0, 0), most: int | None = None):
        self.size = tuple(size)
        self._first: list = []
        self._classes = list(classes) if classes is not None else []
        self._by_class: dict = {c: [] for c in self._classes}
        for row in itertools.islice(rows, most):
            if len(self._first) < first:
                self._first.append(row)
            if row[2] in self._by_class and len(self._by_class[row[2]]) < per_class:
                self._by_class[row[2]].append(row)
            if len(self._first) >= first and all(len(v) >= per_class for v in self._by_class.values()):
                break

    def _sample(self, rows, by_class: bool) -> InputSample:
        masks = [r[3] for r in rows]
        return InputSample(ids=[r[0] for r in rows],
                           images=np.stack([r[1] for r in rows]) if rows else np.zeros((0, *self.size, 3), np.uint8),
                           classes=[r[2] for r in rows] if by_class else None,
                           masks=np.stack(masks) if rows and all(m is not None for m in masks) else None)

    def first(self, n: int) -> InputSample:
        """The first ``n`` decodable rows of the input (any class)."""
        return self._sample(self._first[:n], by_class=False)

    def per_class(self, n: int) -> InputSample:
        """Up to ``n`` rows of each class, in the order of the classes (empty without classes)."""
        return self._sample([r for c in self._classes for r in self._by_class[c][:n]], by_class=True)


def draw(config, options, first: int = 0, per_class: int = 0, classes=None, names=None, most: int | None = None,
         masks: bool = False) -> Draw:
    """The audit's one sample of the job's input (``config``, its run record with the audit's label column,
    decoded with the job's ``options``): the first ``first`` rows and up to ``per_class`` rows of each class in
    ``classes`` (each label resolved by :func:`~worker.audit.aggregate.resolve` with the job's class ``names``).
    Read until both are there or ``most`` rows were read; ``masks`` decodes the job's mask column too."""
    labelled = bool(classes) and bool(config.label_column) and per_class > 0
    rows = ((row_id, image, resolve(label, names) if labelled else None, mask) for row_id, image, label, mask in
            decoded_rows(config, options, with_labels=labelled, with_masks=masks and bool(config.mask_column)))
    return Draw(rows, first, per_class if labelled else 0, classes if labelled else None, options.size, most)
