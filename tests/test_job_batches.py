"""Batch compositions through the real job: seeded random mixes of good rows and every kind of bad row, at
every position, with batches that are all bad, batches a resume has emptied, batch sizes that do and do not
divide the row count, every target kind and every method.

Each case asserts rows out = rows in with no duplicate, each bad row's error, and each good row's map,
classes and score equal to what the engine gives for that row's image alone (batch of one).  The default
run holds the regression case (a batch in which no row has a usable label: it aborted the job); the slow
run holds the seeded cases.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests import jobdata, rotation
from tests.images import bomb_png, encode
from worker.data.schema import read_maps
from worker.job import run
from worker.job.config import JobConfig, build_engine

CLASSES = 10
MAX_PIXELS = 50_000_000  # below the bomb's 20000 x 20000

# kind -> (how a cell is made from a good image, the start of its row's error); labels are bad separately
ENCODED_BAD = {
    "undecodable": (lambda image: b"this is not an image at all", "decode: not a decodable image"),
    "empty": (lambda image: b"", "decode: image is empty (0 bytes)"),
    "null": (lambda image: None, "decode: image is missing (null)"),
    "bomb": (lambda image: bomb_png(), "decode: image of 20000x20000 pixels exceeds the limit of 50000000"),
}
TENSOR_BAD = {
    "nan": (lambda image: np.where(image == image.max(), np.nan, image.astype(np.float64)).tolist(),
            "decode: tensor has NaN or infinite values"),
    "out_of_range": (lambda image: (image.astype(np.float64) + 300).tolist(), "decode: tensor values span"),
    "bad_shape": (lambda image: image[:, :, :2].astype(np.float64).tolist(), "decode: tensor of shape (32, 32, 2)"),
    "null": (lambda image: None, "decode: image is missing (null)"),
}
BAD_LABELS = {"missing": (None, "label is missing"), "too_large": (CLASSES, f"label {CLASSES} out of range"),
              "negative": (-1, "label -1 out of range"), "fraction": (1.5, "label 1.5 is not a whole class index")}
METHODS = ("guided_backprop", "deconvnet", "gradient", "gradcam", "guided_gradcam")


@dataclasses.dataclass
class Case:
    """One input file and the job over it: ``expected[i]`` is the start of row i's error, or None."""

    column: str  # "encoded" (PNG bytes) or "tensor" (nested float lists)
    target: str
    method: str
    batch_size: int
    cells: list
    labels: list
    expected: list
    images: list  # the good image each row was made from

    def write(self, path):
        kind = pa.binary() if self.column == "encoded" else pa.list_(pa.list_(pa.list_(pa.float64())))
        label_type = pa.float64() if any(isinstance(v, float) for v in self.labels) else pa.int64()
        pq.write_table(pa.table({"image": pa.array(self.cells, kind), "label": pa.array(self.labels, label_type)}),
                       str(path), row_group_size=max(1, len(self.cells) // 3))


def make_case(seed: int, layer: str, images: np.ndarray, digits: np.ndarray, *, column=None, target=None,
              method=None, batch_size=None, bad_share=None) -> Case:
    rng = np.random.default_rng(seed)
    column = column or rng.choice(["encoded", "tensor"])
    target = target or rng.choice(["predicted", "label", f"class:{rng.integers(CLASSES)}", "top:2", f"layer:{layer}"])
    gradient_methods = METHODS[:3]  # a layer target differentiates an activation: input-gradient methods only
    method = method or rng.choice(gradient_methods if target.startswith("layer:") else METHODS)
    batch_size = int(batch_size or rng.choice([1, 2, 3, 4, 5, 8]))
    n = int(rng.integers(2 * batch_size + 1, 4 * batch_size + 8))
    bad_share = rng.uniform(0.2, 0.7) if bad_share is None else bad_share
    bad = rng.random(n) < bad_share
    start = int(rng.integers(0, n - 2 * batch_size + 1))
    bad[start:start + 2 * batch_size] = True  # a run of bad rows as long as two batches: one batch at least is all bad
    kinds = ENCODED_BAD if column == "encoded" else TENSOR_BAD
    bad_kinds = list(kinds) + (list(BAD_LABELS) if target == "label" else [])
    label_as_float = target == "label" and rng.random() < 0.5  # a float label column, as pandas makes them
    cells, labels, expected = [], [], []
    for i in range(n):
        image = images[i % len(images)]
        label = int(digits[i % len(images)])
        cell = encode(image) if column == "encoded" else image.astype(np.float64).tolist()
        error = None
        if bad[i]:
            kind = bad_kinds[rng.integers(len(bad_kinds))]
            if kind in BAD_LABELS:
                label, error = BAD_LABELS[kind]
            else:
                make, error = kinds[kind]
                cell = make(image)
        cells.append(cell)
        labels.append(float(label) if label_as_float and label is not None else label)
        expected.append(error)
    return Case(str(column), str(target), str(method), batch_size, cells, labels, expected,
                [images[i % len(images)] for i in range(n)])


@pytest.fixture(scope="module")
def digits():
    return jobdata.digits(40)


@pytest.fixture(scope="module")
def layer_name(job_model):
    import keras

    model = keras.saving.load_model(job_model, compile=False)
    return [layer.name for layer in model.layers if isinstance(layer, keras.layers.Conv2D)][-2]


def check_case(case: Case, job_model, tmp_path, *, resume_from=None):
    """Run ``case`` through the real job (after a first run cut short by deleting part files, when
    ``resume_from`` is a fraction of them to keep) and check every row against the engine alone."""
    case.write(tmp_path / "d.parquet")
    config = JobConfig(model=job_model, input=str(tmp_path / "d.parquet"), output=str(tmp_path / "out"),
                       preprocessing="scale01", batch_size=case.batch_size, target=case.target, method=case.method,
                       label_column="label", map_dtype="float32", max_pixels=MAX_PIXELS, rows_per_file=3)
    if resume_from is not None:  # a first run, then lose part of it: the re-run's batches are what the resume left
        run(config, echo=lambda *_: None)
        parts = sorted((tmp_path / "out").glob("part-*.parquet"))
        for part in parts[int(len(parts) * resume_from):]:
            part.unlink()
        (tmp_path / "out" / "_summary.json").unlink()
    summary = run(config, echo=lambda *_: None)
    n = len(case.cells)
    assert summary["rows_out"] == n and summary["duplicate_ids"] == 0 and summary["complete"], summary

    table = pq.read_table(str(tmp_path / "out"))
    rows = {int(r.split("#")[1]): i for i, r in enumerate(table["id"].to_pylist())}
    assert sorted(rows) == list(range(n))
    errors = table["error"].to_pylist()
    maps = read_maps(table)
    engine = build_engine(config, job_model, batch_size=1)
    for i, error in enumerate(case.expected):
        got = errors[rows[i]]
        if error is not None:
            assert got is not None and got.startswith(error), (i, got, error)
            assert np.isnan(maps[rows[i]]).all()
            continue
        assert got is None, (i, got)
        label = None if case.target != "label" else np.array([int(case.labels[i])])
        alone = engine.explain(case.images[i][None], label)
        np.testing.assert_allclose(maps[rows[i]].reshape(alone.maps.shape[1:]), alone.as_float32()[0],
                                   rtol=1e-4, atol=1e-6)
        assert table["predicted_class"][rows[i]].as_py() == int(alone.predicted_class[0])
        target_class = table["target_class"][rows[i]].as_py()
        assert np.atleast_1d(target_class).tolist() == alone.target_class[0].tolist()


def test_a_batch_with_no_usable_label_is_row_errors(ray_local, job_model, digits, tmp_path):
    """The regression: every row of a batch fails its label check (a float column, 1.5 and out of range),
    and the job wrote row errors rather than aborting; whole-number floats are labels."""
    images, labels = digits
    bad = [1.5, 10.0, -1.0, None]
    case = Case("encoded", "label", "guided_backprop", 4, [encode(im) for im in images[:10]],
                bad + [float(v) for v in labels[4:10]],
                ["label 1.5 is not", "label 10 out of range", "label -1 out of range", "label is missing"]
                + [None] * 6, list(images[:10]))
    check_case(case, job_model, tmp_path)


# new compositions each commit (tests/rotation.py), every other one after a resume; -m exhaustive draws 6
@pytest.mark.slow
@pytest.mark.parametrize("seed, resumed", [(seed, i % 2 == 1) for i, seed in
                                           enumerate(rotation.draw("batch_compositions", range(2**20), 2,
                                                                   exhaustive_k=6))])
def test_random_batch_compositions(ray_local, job_model, digits, layer_name, tmp_path, seed, resumed):
    images, labels = digits
    check_case(make_case(seed, layer_name, images, labels), job_model, tmp_path,
               resume_from=0.5 if resumed else None)


@pytest.mark.slow
@pytest.mark.parametrize("column", ["encoded", "tensor"])
def test_every_row_bad(ray_local, job_model, digits, layer_name, tmp_path, column):
    images, labels = digits
    case = make_case(100, layer_name, images, labels, column=column, target="label", batch_size=3, bad_share=1.0)
    assert all(e is not None for e in case.expected)
    check_case(case, job_model, tmp_path)
