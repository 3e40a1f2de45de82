"""Maps of the engine against the independent numpy reference (tests/reference.py)."""

import warnings

import keras
import numpy as np
import pytest

from tests import reference as ref
from tests.conftest import assert_path
from worker import Gradient, GuidedBackprop
from tests.models import small_cnn
from worker.engine.runtime import native_bfloat16

SIZE = 32


@pytest.fixture(scope="module")
def model():
    m = small_cnn(SIZE, classes=2, seed=1)
    return ref.randomize_batchnorm(m, 1)


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(2).integers(0, 256, (5, SIZE, SIZE, 3), dtype=np.uint8)


def test_small_cnn_matches_numpy_reference(model, images, engine_path):
    gbp = GuidedBackprop(model, batch_size=2, preprocessing="scale01", reduction="none", map_dtype="float32",
                         **engine_path)
    assert_path(gbp, engine_path)
    out = gbp.explain(images)
    expected, logits = ref.sequential_saliency(ref.layers_of(model), images / 255.0)
    assert out.maps.shape == (5, 1, SIZE, SIZE, 3)
    np.testing.assert_array_equal(out.predicted_class, logits.argmax(-1))
    np.testing.assert_allclose(out.target_score[:, 0], logits.max(-1), rtol=1e-4, atol=1e-5)
    ref.assert_close(out.maps[:, 0], expected)
    # the reference can tell guided from vanilla: the two differ on this model
    vanilla, _ = ref.sequential_saliency(ref.layers_of(model), images / 255.0, guided=False)
    assert np.abs(vanilla - expected).max() > 0.1 * np.abs(expected).max()
    assert gbp.report["coverage"]["guided"] == {"Relu": 9}
    assert gbp.report["score"] == "logits (final softmax stripped)"


def test_vanilla_gradient_matches_reference(model, images):
    out = Gradient(model, batch_size=5, preprocessing="scale01", reduction="none", map_dtype="float32").explain(images)
    expected, _ = ref.sequential_saliency(ref.layers_of(model), images / 255.0, guided=False)
    ref.assert_close(out.maps[:, 0], expected)


@pytest.mark.rotate(per=("target",))  # each target on one path; the GPU's path runs in the test above too
@pytest.mark.parametrize("target", ["label", "class:0", "top:2"])
def test_targets_match_reference(model, images, target, engine_path):
    gbp = GuidedBackprop(model, batch_size=4, preprocessing="scale01", reduction="none", map_dtype="float32",
                         target=target, **engine_path)
    assert_path(gbp, engine_path)
    labels = np.array([1, 0, 1, 1, 0])
    out = gbp.explain(images, labels=labels)
    layers = ref.layers_of(model)
    if target == "label":
        wanted = [labels]
    elif target == "class:0":
        wanted = [np.zeros(5, int)]
    else:
        _, logits = ref.sequential_saliency(layers, images / 255.0)
        order = np.argsort(-logits, axis=1)
        wanted = [order[:, 0], order[:, 1]]
    assert out.maps.shape[1] == len(wanted)
    for k, classes in enumerate(wanted):
        np.testing.assert_array_equal(out.target_class[:, k], classes)
        expected, _ = ref.sequential_saliency(layers, images / 255.0, target=classes)
        ref.assert_close(out.maps[:, k], expected)


def test_reductions_and_float16(model, images):
    full = GuidedBackprop(model, batch_size=5, preprocessing="scale01", reduction="none",
                          map_dtype="float32").explain(images).maps[:, 0]
    for reduction, fn in [("max_abs", lambda g: np.abs(g).max(-1)), ("sum_abs", lambda g: np.abs(g).sum(-1)),
                          ("l2", lambda g: np.sqrt((g ** 2).sum(-1)))]:
        out = GuidedBackprop(model, batch_size=5, preprocessing="scale01", reduction=reduction,
                             map_dtype="float16").explain(images)
        assert out.maps.dtype == np.float16 and out.maps.shape == (5, 1, SIZE, SIZE)
        assert np.abs(out.maps).reshape(5, -1).max(1).tolist() == [1.0] * 5  # normalised per map
        np.testing.assert_allclose(out.as_float32()[:, 0], fn(full), rtol=2e-3, atol=1e-3 * np.abs(fn(full)).max())


def test_float16_keeps_tiny_gradients():
    """Gradients far below float16's range survive: maps are normalised per map, the scale kept in float32."""

    tiny = keras.Sequential([keras.Input((4, 4, 3)), keras.layers.Flatten(), keras.layers.Dense(3, activation="relu"),
                             keras.layers.Dense(2)])
    w1, b1, w2, b2 = tiny.get_weights()
    tiny.set_weights([np.abs(w1) * 1e-9, b1, w2, b2])
    x = np.random.default_rng(0).integers(1, 256, (2, 4, 4, 3), dtype=np.uint8)
    full = GuidedBackprop(tiny, batch_size=2, map_dtype="float32").explain(x)
    half = GuidedBackprop(tiny, batch_size=2, map_dtype="float16").explain(x)
    assert 0 < np.abs(full.maps).max() < 1e-7  # would round to 0 in plain float16
    np.testing.assert_allclose(half.as_float32(), full.maps, rtol=1e-3, atol=1e-3 * np.abs(full.maps).max())


def test_short_batches_are_padded_and_dropped(model, images):
    gbp = GuidedBackprop(model, batch_size=4, preprocessing="scale01", map_dtype="float32")
    together = gbp.explain(images).maps
    one_by_one = np.concatenate([gbp.explain(images[i:i + 1]).maps for i in range(len(images))])
    np.testing.assert_allclose(together, one_by_one, rtol=1e-5, atol=1e-7)
    assert len(gbp.explain(images[:0])) == 0


def test_resize_on_device_is_wrt_model_input(model):
    big = np.random.default_rng(3).integers(0, 256, (2, 48, 40, 3), dtype=np.uint8)
    out = GuidedBackprop(model, batch_size=2, preprocessing="scale01").explain(big)
    assert out.maps.shape == (2, 1, SIZE, SIZE)
    assert np.isfinite(out.maps.astype(np.float32)).all() and out.maps.max() > 0


def test_bfloat16_precision_keeps_the_map(model, images):
    fp32 = GuidedBackprop(model, batch_size=5, preprocessing="scale01", map_dtype="float32").explain(images)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bf16 = GuidedBackprop(model, batch_size=5, preprocessing="scale01", map_dtype="float32",
                              precision="bfloat16").explain(images)
    # a CPU without native bfloat16 is told that bf16 will be slower than float32 there
    warned = any("without avx512_bf16" in str(w.message) for w in caught)
    assert warned == (native_bfloat16() is False)
    assert bf16.maps.dtype == np.float32
    a, b = fp32.maps.reshape(5, -1), bf16.maps.reshape(5, -1)
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cosine.min() >= 0.95, cosine
