"""An s3:// dataset, model and output on a real S3-compatible server (moto) on loopback."""

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from tests import jobdata
from tests.conftest import moto_server, s3_environment, start_ray
from worker.job import JobConfig, run

BUCKET = "saliency-test"


@pytest.fixture(scope="module")
def s3():
    with moto_server() as port, s3_environment(f"http://127.0.0.1:{port}"):
        import boto3

        boto3.client("s3").create_bucket(Bucket=BUCKET)
        ray = start_ray(num_cpus=2)  # workers inherit the endpoint and credentials
        yield pafs.FileSystem.from_uri(f"s3://{BUCKET}")[0]
        ray.shutdown()


def test_s3_input_model_and_output(s3, job_model, tmp_path):
    images, labels = jobdata.digits(20)
    jobdata.write_hf(tmp_path / "part-0.parquet", images[:12], labels[:12], row_group=6)
    jobdata.write_hf(tmp_path / "part-1.parquet", images[12:], labels[12:], row_group=6)
    for name in ("part-0.parquet", "part-1.parquet"):
        pafs.copy_files(str(tmp_path / name), f"{BUCKET}/data/{name}", destination_filesystem=s3)
    pafs.copy_files(job_model, f"{BUCKET}/models/question.keras", destination_filesystem=s3)

    cfg = JobConfig(model=f"s3://{BUCKET}/models/question.keras", input=f"s3://{BUCKET}/data/part-*.parquet",
                    output=f"s3://{BUCKET}/maps/run1", preprocessing="scale01", batch_size=8,
                    label_column="label", rows_per_file=8)
    summary = run(cfg)
    assert summary["rows_out"] == 20 and summary["complete"] and summary["duplicate_ids"] == 0
    table = pq.read_table(f"{BUCKET}/maps/run1", filesystem=s3)
    assert table.num_rows == 20 and table["error"].null_count == 20
    assert sorted(table["id"].to_pylist())[:2] == ["part-0.parquet#0", "part-0.parquet#1"]
    # the same job on S3 resumes instead of duplicating
    assert run(cfg)["rows_this_run"] == 0
    assert pq.read_table(f"{BUCKET}/maps/run1", filesystem=s3).num_rows == 20
