"""The CLI commands chained as users chain them: explain, audit with controls, explain again.

The audit and its controls rebuild the engine from the job's run record (relu policy, label column) with the
auditor's own opt-ins (the Lambda needs --allow-unsafe-deserialization on the audit's command line too), and an
input's own ``id`` column is kept as the row id.
"""

import json

import keras
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorflow as tf
from keras import layers

from tests import jobdata
from tests.images import encode
from worker.cli import main


def _gelu_lambda_model(path):
    """No ReLU at all (needs --relu-policy warn) and a Lambda (needs --allow-unsafe-deserialization)."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((32, 32, 3)), layers.Lambda(lambda t: tf.identity(t)),
                              layers.Conv2D(4, 3, activation="gelu"), layers.Flatten(), layers.Dense(10)])
    model.save(str(path))
    return str(path)


@pytest.mark.slow
def test_explain_audit_with_controls_then_rerun(ray_local, tmp_path, capsys):
    model = _gelu_lambda_model(tmp_path / "gelu.keras")
    images, labels = jobdata.digits(24)
    jobdata.write_hf(tmp_path / "d.parquet", images, labels, row_group=8)
    explain = ["explain", "--model", model, "--input", str(tmp_path / "d.parquet"), "--output", str(tmp_path / "out"),
               "--preprocessing", "scale01", "--batch-size", "8", "--label-column", "label", "--relu-policy", "warn",
               "--allow-unsafe-deserialization"]
    assert main(explain) == 0
    capsys.readouterr()

    assert main(["audit", "--input", str(tmp_path / "out"), "--report", str(tmp_path / "report"),
                 "--controls", "6", "--allow-unsafe-deserialization"]) == 0, capsys.readouterr().err
    audit = json.loads((tmp_path / "report" / "audit.json").read_text())
    assert audit["controls"]["images"] == 6
    assert set(audit["controls"]["similarity_to_real"]) == {"random_class", "randomized_model", "edges"}
    assert any(g["kind"] == "true" for g in audit["groups"])  # the job's label column, not asked again

    assert main(explain) == 0
    summary = json.loads((tmp_path / "out" / "_summary.json").read_text())
    assert summary["rows_out"] == 24 and summary["rows_this_run"] == 0 and summary["duplicate_ids"] == 0


def test_an_inputs_own_id_column_is_the_row_id(ray_local, job_model, tmp_path, capsys):
    images, _ = jobdata.digits(10)
    ids = [f"user-{i:03d}" for i in range(10)]
    pq.write_table(pa.table({"image": [encode(im) for im in images], "id": ids}), str(tmp_path / "d.parquet"))
    assert main(["explain", "--model", job_model, "--input", str(tmp_path / "d.parquet"), "--output",
                 str(tmp_path / "out"), "--preprocessing", "scale01", "--batch-size", "4"]) == 0
    assert "the input has an 'id' column: it is used as the row id" in capsys.readouterr().out
    out = pq.read_table(str(tmp_path / "out"))
    assert sorted(out["id"].to_pylist()) == ids
    assert np.isfinite(out["target_score"].to_numpy()).all()


@pytest.mark.slow
@pytest.mark.parametrize("method,extra", [("guided_gradcam", ["--smooth", "3", "--noise", "0.1"]),
                                          ("gradcam", ["--reduction", "none"])])
def test_new_methods_through_the_job_give_the_engines_maps(ray_local, job_model, tmp_path, capsys, method, extra):
    """The CLI's --method/--smooth/--cam-layer reach the actors: the job's maps equal the engine's own, run
    here with another batch size (SmoothGrad's noise belongs to each image, not to its batch)."""
    from worker import GradCAM, GuidedGradCAM
    from worker.data.schema import read_maps, read_metadata

    images, labels = jobdata.digits(10)
    jobdata.write_hf(tmp_path / "d.parquet", images, labels, row_group=5)
    assert main(["explain", "--model", job_model, "--input", str(tmp_path / "d.parquet"), "--output",
                 str(tmp_path / "out"), "--preprocessing", "scale01", "--batch-size", "4", "--map-dtype", "float32",
                 "--method", method, *extra]) == 0, capsys.readouterr().err
    table = pq.read_table(str(tmp_path / "out"))
    table = table.take(np.argsort([int(i.split("#")[1]) for i in table["id"].to_pylist()]))
    metadata = read_metadata(table.schema)
    assert metadata["method"] == method and metadata["cam_tensor"]
    engine_cls = {"gradcam": GradCAM, "guided_gradcam": GuidedGradCAM}[method]
    options = {"smooth": 3, "noise": 0.1} if "--smooth" in extra else {"reduction": "none"}
    expected = engine_cls(job_model, batch_size=10, preprocessing="scale01", map_dtype="float32", **options)
    assert metadata["smoothing"] == expected.report["smoothing"]
    want = expected.explain(images).maps[:, 0]
    got = read_maps(table)
    assert got.shape == want.shape == ((10, 32, 32) if "--smooth" in extra else (10, 32, 32, 1))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * np.abs(want).max())
