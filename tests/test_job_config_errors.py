"""A bad configuration fails with a clear message before any cluster time is spent."""

import pytest

from tests import jobdata
from tests.test_job import config
from worker.data.dataset import InputError
from worker.data.sink import OutputExistsError
from worker.job import run


def test_bad_configuration_fails_before_cluster_time(job_model, tmp_path):
    import ray

    ray.shutdown()
    images, labels = jobdata.digits(4)
    jobdata.write_hf(tmp_path / "d.parquet", images, labels)
    out = tmp_path / "out"
    with pytest.raises(InputError, match=r"no column\(s\) \['picture'\]; its columns are \['image', 'label'\]"):
        run(config(job_model, tmp_path / "d.parquet", out, image_column="picture"))
    with pytest.raises(InputError, match="does not exist"):
        run(config(job_model, tmp_path / "nope", out))
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 nonsense")
    with pytest.raises(InputError, match="not a readable Parquet file"):
        run(config(job_model, tmp_path / "broken.parquet", out))
    with pytest.raises(ValueError, match="needs label_column"):
        run(config(job_model, tmp_path / "d.parquet", out, target="label"))
    with pytest.raises(ValueError, match="does not exist"):
        run(config(str(tmp_path / "missing.keras"), tmp_path / "d.parquet", out))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no Parquet files found"):
        run(config(job_model, tmp_path / "empty", out))
    # a new output: the embedded Ray starts while the probe is built, and is shut down when the probe refuses
    bad = _bad_models(tmp_path)
    with pytest.raises(ValueError, match=bad[0][2]):
        run(config(bad[0][1], tmp_path / "d.parquet", out))
    assert not ray.is_initialized()
    # an existing (empty) output: the probe alone, first
    existing = tmp_path / "existing"
    existing.mkdir()
    for name, model, message in bad:
        with pytest.raises((ValueError, RuntimeError), match=message):
            run(config(model, tmp_path / "d.parquet", existing))
    assert not any(existing.iterdir())
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("not ours")
    with pytest.raises(OutputExistsError, match="not empty.*--overwrite"):
        run(config(job_model, tmp_path / "d.parquet", other))
    assert (other / "notes.txt").exists()  # never overwritten silently
    assert not out.exists()
    assert not ray.is_initialized()  # none of these started a cluster


def _bad_models(tmp_path):
    import keras

    image = keras.Input((32, 32, 3))
    flat = keras.layers.Flatten()(image)
    segmenter = keras.Model(image, keras.layers.Conv2D(2, 1, activation="relu")(image))
    no_relu = keras.Model(image, keras.layers.Dense(10)(keras.layers.Dense(8, activation="sigmoid")(flat)))
    lam = keras.Model(image, keras.layers.Dense(10)(keras.layers.Lambda(lambda t: t * 2.0)(
        keras.layers.Dense(8, activation="relu")(flat))))
    out = []
    for name, model, message in [("segmenter", segmenter, "not an image classifier"),
                                 ("no_relu", no_relu, "no ReLU"), ("lambda", lam, "allow-unsafe-deserialization")]:
        path = tmp_path / f"{name}.keras"
        model.save(str(path))
        out.append((name, str(path), message))
    return out
