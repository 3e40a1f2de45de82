"""Passes of bounded size: SmoothGrad's copies and top-k's targets split over passes give the maps of one pass;
the loss scale keeps float16 maps; a zero or non-finite map is reported as its row's problem."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.images import digits_images
from tests.models import small_cnn
from worker import GuidedBackprop
from worker.engine.methods import Gradient
from worker.engine.passes import plan_passes
from worker.engine.precision import FLOAT16_SCALE, map_cosines

SIZE = 32


@pytest.fixture(scope="module")
def model():
    return small_cnn(SIZE, classes=6, seed=4)


@pytest.fixture(scope="module")
def images():
    return digits_images(SIZE, limit=5)[0]


def explain(model, images, **options):
    options = {"preprocessing": "scale01", "map_dtype": "float32", "batch_size": 4, **options}
    return GuidedBackprop(model, **options).explain(images)


def test_plan_keeps_every_pass_within_its_bound():
    for batch, smooth, targets, bound in [(16, 50, 1, 16), (16, 0, 5, 16), (3, 7, 4, 5), (8, 256, 10, 64),
                                          (2, 3, 1, 1000), (1, 1, 1, 2)]:
        plan = plan_passes(batch, smooth, targets, bound)
        assert plan.inputs <= bound
        assert plan.copies * plan.copy_passes >= smooth and plan.targets * plan.target_passes >= targets
        assert plan.copies * (plan.copy_passes - 1) < max(smooth, 1)  # no pass of copies past the last one


def test_passes_give_the_maps_of_one_pass(model, images):
    """top:3 with 3 noisy copies in passes of 3 inputs (one target and 2 copies; the last pass has a copy past
    the last one) vs. one pass of every image, copy and target."""
    options = {"target": "top:3", "smooth": 3}
    one = explain(model, images, pass_images=1000, **options)
    assert one.report["passes"]["copy_passes"] == one.report["passes"]["target_passes"] == 1
    split = explain(model, images, pass_images=3, **options)
    assert split.report["passes"] == {"images": 1, "copies": 2, "copy_passes": 2, "targets": 1,
                                      "target_passes": 3}
    # equal up to float rounding: a pass of another shape may sum in another order
    np.testing.assert_allclose(split.maps, one.maps, rtol=1e-4, atol=1e-5 * np.abs(one.maps).max())
    np.testing.assert_allclose(split.target_score, one.target_score, rtol=1e-4,
                               atol=1e-5 * np.abs(one.target_score).max())
    for name in ("predicted_class", "target_class"):
        np.testing.assert_array_equal(getattr(split, name), getattr(one, name))


def test_top_k_in_passes_matches_a_tape_gradient(model, images):
    """The plain gradient of each of the top 3 logits, against tf.GradientTape, one target per pass."""
    out = Gradient(model, preprocessing="scale01", map_dtype="float32", reduction="none", batch_size=4,
                   target="top:3", score="probability", pass_images=1).explain(images)
    assert out.report["passes"]["target_passes"] == 3
    x = tf.constant(images / 255.0, tf.float32)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        probability = model(x, training=False)
        top = tf.math.top_k(probability, 3).indices
        scores = [tf.reduce_sum(tf.gather(probability, top[:, k], batch_dims=1)) for k in range(3)]
    expected = np.stack([tape.gradient(s, x).numpy() for s in scores], axis=1)
    np.testing.assert_array_equal(out.target_class, top.numpy())
    np.testing.assert_allclose(out.maps, expected, rtol=1e-4, atol=1e-6 * np.abs(expected).max())


def _dense(weights_first, weights_second, activation="relu"):
    """8x8x3 -> Dense(4, activation) -> Dense(2), with constant weights."""
    inputs = keras.Input((8, 8, 3))
    h = keras.layers.Dense(4, activation=activation, kernel_initializer=keras.initializers.Constant(weights_first),
                           bias_initializer="ones")(keras.layers.Flatten()(inputs))
    out = keras.layers.Dense(2, kernel_initializer=keras.initializers.Constant(weights_second))(h)
    return keras.Model(inputs, out)


def test_a_zero_map_of_a_score_that_depends_on_the_image_is_a_problem():
    """Negative head weights: guided backprop gates every gradient at the ReLU, while the score moves with the
    image; a model whose score is constant has a zero map that is right, and no problem."""
    images = digits_images(8, limit=3)[0]
    gated = GuidedBackprop(_dense(0.01, -1.0), preprocessing="scale01", batch_size=4).explain(images)
    assert np.all(gated.as_float32() == 0)
    assert all("exactly zero although the score depends on the input" in p for p in gated.problems)
    assert "method='gradient'" in gated.problems[0]
    constant = Gradient(_dense(0.0, 1.0), preprocessing="scale01", batch_size=4).explain(images)
    assert np.all(constant.as_float32() == 0) and list(constant.problems) == [None] * 3
    plain = Gradient(_dense(0.01, -1.0), preprocessing="scale01", batch_size=4).explain(images)
    assert np.all(plain.as_float32() != 0) and list(plain.problems) == [None] * 3


def test_a_non_finite_map_is_a_problem():
    """sqrt at 0 has an infinite gradient: a black image's map is not finite, a bright one's is."""
    inputs = keras.Input((8, 8, 3))
    h = keras.layers.Lambda(lambda t: keras.ops.sqrt(t))(inputs)
    model = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Flatten()(h)))
    images = np.stack([np.zeros((8, 8, 3), np.uint8), np.full((8, 8, 3), 200, np.uint8)])
    out = Gradient(model, preprocessing="scale01", batch_size=2).explain(images)
    assert "non-finite" in out.problems[0] and out.problems[1] is None
    assert np.isfinite(out.as_float32()[1]).all()


def _scaled(model, factor):
    """``model``'s output times ``factor``: every gradient of the backward pass is scaled by it too."""
    inputs = keras.Input(model.inputs[0].shape[1:])
    return keras.Model(inputs, keras.layers.Rescaling(factor)(model(inputs)))


def test_float16_scales_the_score_against_underflow(images):
    """Two layers of gain 1e-4: the forward pass and the score are within float16's range, the input gradient
    (1e-8) is not.  Unscaled, every map is exactly zero and says so; scaled, the maps are float32's."""
    inputs = keras.Input((SIZE, SIZE, 3))
    gain = keras.initializers.Constant(1e-4)
    hidden = keras.layers.Dense(1, kernel_initializer=gain)(keras.layers.Flatten()(inputs))
    tiny = keras.Model(inputs, keras.layers.Dense(2, kernel_initializer=gain)(hidden))
    options = {"preprocessing": "scale01", "map_dtype": "float32", "batch_size": 4}
    reference = Gradient(tiny, **options).explain(images)
    assert np.abs(reference.as_float32()).max() < 3e-8  # rounds to 0 in float16 (smallest subnormal 6e-8)
    unscaled = Gradient(tiny, precision="float16", **options)
    unscaled.loss_scale.top = unscaled.loss_scale.value = 1.0
    zero = unscaled.explain(images)
    assert np.all(zero.as_float32() == 0) and all("underflowed in float16" in p for p in zero.problems)
    scaled = Gradient(tiny, precision="float16", **options).explain(images)
    assert scaled.report["loss_scale_start"] == FLOAT16_SCALE and list(scaled.problems) == [None] * len(images)
    assert map_cosines(scaled.as_float32(), reference.as_float32()).min() > 0.99


def test_float16_lowers_the_scale_where_the_gradient_overflows(model, images):
    """The gradient times 100 overflows float16 at the first scale: the pass is redone at lower scales."""
    big = _scaled(model, 100.0)
    reference = explain(big, images)
    engine = GuidedBackprop(big, preprocessing="scale01", map_dtype="float32", batch_size=4, precision="float16")
    out = engine.explain(images)
    assert engine.loss_scale.value < FLOAT16_SCALE and list(out.problems) == [None] * len(images)
    assert np.isfinite(out.maps).all()
    assert map_cosines(out.as_float32(), reference.as_float32()).min() > 0.99
