"""Scheduled runs: the job file is validated; dates are partitions; incremental mode reads only new files."""

import pyarrow.parquet as pq
import pytest
import yaml

from tests import jobdata
from worker.job.schedule import ConfigError, load_config, parse_config, scheduled_run

BASE = {"model": "m.keras", "input": "in/", "output_root": "out"}


@pytest.mark.parametrize("raw, message", [
    ({**BASE, "batchsize": 8}, r"unknown key\(s\) \['batchsize'\]"),
    ({"model": "m.keras", "input": "in/"}, r"missing required key\(s\) \['output_root'\]"),
    ({**BASE, "incremental": "yes"}, "incremental must be a bool"),
    ({**BASE, "partition": "daily"}, "must contain {date}"),
    ({**BASE, "batch_size": "16"}, "batch_size must be an integer"),
    ({**BASE, "target": "best"}, "bad target"),
    ({**BASE, "columns": "label"}, "columns must be a list"),
    (["model"], "YAML mapping"),
])
def test_bad_job_files(raw, message):
    with pytest.raises((ConfigError, ValueError), match=message):
        parse_config(raw)


def test_invalid_yaml(tmp_path):
    (tmp_path / "job.yaml").write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(tmp_path / "job.yaml"))


def test_incremental_runs(ray_local, job_model, tmp_path):
    data = tmp_path / "in"
    data.mkdir()
    images, labels = jobdata.digits(30)
    jobdata.write_hf(data / "day1.parquet", images[:20], labels[:20], row_group=10)
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump({"model": job_model, "input": str(data), "output_root": str(tmp_path / "out"),
                                        "incremental": True, "preprocessing": "scale01", "batch_size": 8}))
    cfg = load_config(str(job_file))
    first = scheduled_run(cfg, "2026-11-28", echo=lambda *_: None)
    assert first["rows_this_run"] == 20 and first["new_files"] == 1
    jobdata.write_hf(data / "day2.parquet", images[20:], labels[20:])
    second = scheduled_run(cfg, "2026-11-29", echo=lambda *_: None)
    assert second["rows_this_run"] == 10 and second["new_files"] == 1
    again = scheduled_run(cfg, "2026-11-29", echo=lambda *_: None)
    assert again["rows_this_run"] == 0
    day1 = pq.read_table(str(tmp_path / "out" / "date=2026-11-28"))
    day2 = pq.read_table(str(tmp_path / "out" / "date=2026-11-29"))
    assert day1.num_rows == 20 and day2.num_rows == 10
    assert all(i.startswith("day2.parquet#") for i in day2["id"].to_pylist())
    # without incremental, re-running a date resumes: still no duplicate
    plain = {**cfg, "incremental": False}
    rerun = scheduled_run(plain, "2026-11-28", echo=lambda *_: None)
    assert rerun["rows_out"] == 30 and rerun["rows_resumed"] == 20 and rerun["rows_this_run"] == 10
    assert len(set(pq.read_table(str(tmp_path / "out" / "date=2026-11-28"))["id"].to_pylist())) == 30
