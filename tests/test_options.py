"""One source of truth for options: the CLI's flags and the job file's keys are made from JobConfig's fields."""

from __future__ import annotations

import dataclasses

import pytest

from worker.cli import config_from_args, parser
from worker.job.config import JobConfig, options
from worker.job.schedule import ConfigError, job_file_options, parse_config

REQUIRED = ["--model", "m.keras", "--input", "in/", "--output", "out/"]
INTERNAL = {"files", "extra_metadata"}  # set by the scheduler and the job, never by a person


def _explain(argv):
    return parser().parse_args(["explain", *REQUIRED, *argv])


def test_every_field_is_an_option_or_named_internal():
    names = {f.name for f in dataclasses.fields(JobConfig)}
    assert names - {o.name for o in options()} == INTERNAL


def test_every_flags_default_is_its_fields_default():
    parsed = config_from_args(_explain([]))
    assert parsed == JobConfig(model="m.keras", input="in/", output="out/")
    defaults = {f.name: f.default for f in dataclasses.fields(JobConfig)}
    explain = parser()._subparsers._group_actions[0].choices["explain"]
    flags = {a.dest: a for a in explain._actions if a.dest in defaults}
    assert set(flags) == {o.name for o in options()}
    for name, action in flags.items():
        default = defaults[name]
        if default is dataclasses.MISSING:
            assert action.required, name
        else:
            assert action.default == (list(default) if isinstance(default, tuple) else default), name


def _other_value(o):
    """A value of the option's type that is not its default."""
    if o.choices:
        return next(c for c in o.choices if c != o.default)
    if o.kind is bool:
        return not o.default
    if o.many:
        return ["a", "b"]
    if o.kind is int:
        return (o.default or 0) + 3
    if o.kind is float:
        return (o.default or 0) + 0.25
    return "layer:conv" if o.name == "target" else f"x_{o.name}"


@pytest.mark.parametrize("o", [o for o in options() if not o.required], ids=lambda o: o.name)
def test_each_flag_sets_its_field(o):
    value = _other_value(o)
    if o.kind is bool:
        argv = [o.flag]
    elif o.many:
        argv = [o.flag, *value]
    else:
        argv = [o.flag, str(value)]
    got = getattr(config_from_args(_explain(argv)), o.name)
    assert got == (tuple(value) if o.many else value)


def test_job_file_keys_are_the_options_but_output_and_opt_ins():
    keys = set(job_file_options())
    assert keys == {o.name for o in options()} - {"output", "allow_unsafe_deserialization", "allow_side_effects"}
    base = {"model": "m.keras", "input": "in/", "output_root": "out"}
    for o in job_file_options().values():
        if o.required:
            continue
        value = _other_value(o)
        if o.name == "target":
            value = "class:1"
        cfg = parse_config({**base, o.name: value})
        assert cfg[o.name] == (tuple(value) if o.many else value)


@pytest.mark.parametrize("key", ["allow_unsafe_deserialization", "allow_side_effects"])
def test_a_job_file_cannot_opt_in(key):
    with pytest.raises(ConfigError, match="opt-ins come from the command line") as err:
        parse_config({"model": "m.keras", "input": "in/", "output_root": "out", key: True})
    assert "--" + key.replace("_", "-") in str(err.value)
    args = parser().parse_args(["scheduled", "--config", "job.yaml", "--" + key.replace("_", "-")])
    assert getattr(args, key) is True


@pytest.mark.parametrize("key, value, expected", [
    ("batch_size", True, "an integer"), ("noise", "0.1", "a number"), ("columns", "a", "a list of"),
    ("overwrite", "yes", "true or false"), ("cam_layer", 3, "a string")])
def test_job_file_types_come_from_the_fields(key, value, expected):
    with pytest.raises(ConfigError, match=f"{key} must be {expected}"):
        parse_config({"model": "m.keras", "input": "in/", "output_root": "out", key: value})
