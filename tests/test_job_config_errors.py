"""A bad configuration fails with a clear message before any cluster time is spent."""

import pytest

from tests import jobdata
from tests.test_job import config
from worker.dataset import InputError
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
    assert not out.exists()
    assert not ray.is_initialized()  # none of these started a cluster
