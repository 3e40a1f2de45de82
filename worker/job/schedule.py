"""Scheduled runs from a YAML job file: one partition per logical date, optionally incremental.

A job file names inputs, model, options and an output root::

    model: s3://models/resnet50.keras
    input: s3://images/daily/
    output_root: s3://saliency/resnet50
    partition: "date={date}"        # default
    incremental: true               # only input files not yet done for this model
    preprocessing: caffe
    target: predicted
    batch_size: 32

``guided-saliency scheduled --config job.yaml --date 2026-11-29`` writes under
``<output_root>/date=2026-11-29``; without ``--date`` the logical date is today in
UTC, on every deployment path (one rule, whatever the clock's zone).  Re-running
the same date resumes instead of duplicating rows.  In incremental mode a manifest
``<output_root>/_manifests/<model hash>.json`` records every input file done for
this model and these options; the next run processes only files not in it.

One scheduled run at a time per output root: a run holds a lease on it
(:mod:`worker.data.lease`), and a run that finds another live one (an overlapping
trigger, a retry while the first still runs) exits cleanly, saying so, with
nothing written.

Examples:
    >>> cfg = parse_config({"model": "m.keras", "input": "in/", "output_root": "out"})
    >>> output_for(cfg, "2026-11-29")
    'out/date=2026-11-29'
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import posixpath

from worker.data import dataset, storage
from worker.data.lease import Lease, OutputBusyError
from worker.data.storage import fetch_model
from worker.engine.fingerprint import hash_path
from worker.job.config import JobConfig, options
from worker.job.driver import run

SCHEDULE_KEYS = {"output_root": str, "partition": str, "incremental": bool}
REQUIRED = ("model", "input", "output_root")


class ConfigError(ValueError):
    """The job file is invalid; the message names the key and what is expected."""


def job_file_options() -> dict:
    """The job options a job file may set: every option of the CLI's explain flags but the output (the
    schedule's ``output_root`` and ``partition`` make it) and the opt-ins, which only the command line of
    whoever runs the schedule gives."""
    return {o.name: o for o in options() if o.name != "output" and o.group != "opt-in"}


def _check_type(key: str, value, o) -> None:
    kinds = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    if value is None and (o.optional or o.required):
        return
    items = value if o.many else [value]
    if o.many and not isinstance(value, list):
        raise ConfigError(f"{key} must be a list of {kinds[o.kind][2:]}s, got {value!r}")
    for item in items:
        ok = isinstance(item, o.kind) and not (o.kind is not bool and isinstance(item, bool))
        if o.kind is float:
            ok = isinstance(item, (int, float)) and not isinstance(item, bool)
        if not ok:
            raise ConfigError(f"{key} must be {kinds[o.kind]}, got {value!r}")


def parse_config(raw) -> dict:
    """Check a job file's mapping (every key known, of its option's type, the run's options valid) and fill
    in the schedule's defaults.

    Examples:
        >>> parse_config({"model": "m.keras", "input": "in/", "output_root": "out", "batch_size": "32"})
        Traceback (most recent call last):
        ...
        worker.job.schedule.ConfigError: batch_size must be an integer, got '32'
    """
    if not isinstance(raw, dict):
        raise ConfigError("the job file must be a YAML mapping of option: value")
    known = job_file_options()
    unknown = sorted(set(raw) - set(known) - set(SCHEDULE_KEYS))
    if unknown:
        opt_ins = sorted(o.flag for o in options() if o.group == "opt-in" and o.name in unknown)
        hint = (f"; opt-ins come from the command line of whoever runs the schedule ({', '.join(opt_ins)})"
                if opt_ins else "")
        raise ConfigError(f"unknown key(s) {unknown}; allowed: {sorted(set(known) | set(SCHEDULE_KEYS))}{hint}")
    missing = [k for k in REQUIRED if not raw.get(k)]
    if missing:
        raise ConfigError(f"missing required key(s) {missing}")
    cfg = {"partition": "date={date}", "incremental": False, **raw}
    for key, kind in SCHEDULE_KEYS.items():
        if not isinstance(cfg[key], kind):
            raise ConfigError(f"{key} must be a {kind.__name__}, got {cfg[key]!r}")
    if "{date}" not in cfg["partition"]:
        raise ConfigError("partition must contain {date}")
    for key, value in raw.items():
        if key in known:
            _check_type(key, value, known[key])
    if "columns" in cfg:
        cfg["columns"] = tuple(cfg["columns"])
    job = job_config(cfg, "1970-01-01")
    job.validate()
    return cfg


def load_config(path: str) -> dict:
    import yaml

    fs, p = storage.filesystem(path)
    with fs.open_input_stream(p) as handle:
        try:
            raw = yaml.safe_load(handle.read())
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    return parse_config(raw)


def output_for(cfg: dict, date: str) -> str:
    return posixpath.join(cfg["output_root"], cfg["partition"].format(date=date))


def job_config(cfg: dict, date: str, files=None, **opt_ins) -> JobConfig:
    """The run of one date; ``opt_ins`` (``allow_unsafe_deserialization``, ``allow_side_effects``) are those of
    whoever runs the schedule, from their command line."""
    job_options = {k: v for k, v in cfg.items() if k not in SCHEDULE_KEYS}
    return JobConfig(**job_options, **opt_ins, output=output_for(cfg, date), files=files,
                     extra_metadata={"schedule": {"date": date, "incremental": cfg["incremental"]}})


def _manifest_path(cfg: dict) -> str:
    """One manifest per model artifact and options (a new model or option set starts afresh)."""
    chosen = {k: v for k, v in cfg.items() if k not in SCHEDULE_KEYS and k not in ("actors", "batch_size")}
    key = hash_path(fetch_model(cfg["model"])) + json.dumps(chosen, sort_keys=True, default=list)
    return posixpath.join(cfg["output_root"], "_manifests", hashlib.sha256(key.encode()).hexdigest()[:24] + ".json")


def today_utc() -> str:
    return datetime.datetime.now(datetime.timezone.utc).date().isoformat()


def scheduled_run(cfg: dict, date: str | None = None, echo=print, **opt_ins) -> dict:
    """Run ``cfg`` (from :func:`parse_config`) for ``date``; ``opt_ins`` as in :func:`job_config`."""
    date = date or today_utc()
    datetime.date.fromisoformat(date)
    fs, root = storage.filesystem(cfg["output_root"])
    try:
        lease = Lease(fs, root).acquire()
    except OutputBusyError as exc:
        echo(f"not started: {exc}")
        return {"output": output_for(cfg, date), "skipped": str(exc), "rows_this_run": 0, "complete": True}
    try:
        return _run_date(cfg, date, echo, opt_ins)
    finally:
        lease.release()


def _run_date(cfg: dict, date: str, echo, opt_ins: dict) -> dict:
    files = None
    manifest = {"files": {}}
    config = job_config(cfg, date, **opt_ins)
    if cfg["incremental"]:
        fs, path = storage.filesystem(_manifest_path(cfg))
        if fs.get_file_info(path).type.name == "File":
            with fs.open_input_stream(path) as handle:
                manifest = json.loads(handle.read())
        listed = dataset.list_input(config.input, config.input_format).files  # as the run will list it
        files = [f for f in listed if f not in manifest["files"]]
        echo(f"incremental: {len(files)} new of {len(listed)} input files")
        if not files:
            return {"output": output_for(cfg, date), "rows_this_run": 0, "new_files": 0, "complete": True}
    summary = run(dataclasses.replace(config, files=files), echo=echo)
    if cfg["incremental"] and summary["complete"]:
        for f in files:
            manifest["files"][f] = date
        fs.create_dir(posixpath.dirname(path), recursive=True)
        with fs.open_output_stream(path) as handle:
            handle.write(json.dumps(manifest, indent=2, sort_keys=True).encode())
    summary["new_files"] = len(files) if files is not None else None
    return summary
