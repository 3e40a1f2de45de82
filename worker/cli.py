"""Command line: ``guided-saliency explain --model M --input I --output O [options]`` and ``... demo``.

The same entry is what ``ray job submit -- python -m jobs.explain ...`` runs; a
bare ``ray.init()`` attaches to the cluster named by RAY_ADDRESS or starts a
local one.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is first imported

from worker.job.config import OPTION_GROUPS, JobConfig, Option, options


def add_option(group, o: Option) -> None:
    """The flag of one :class:`~worker.job.config.JobConfig` option: type, default, choices and help from its
    field."""
    help_text = o.help.replace("%", "%%")
    if o.kind is bool:
        group.add_argument(o.flag, dest=o.name, action="store_false" if o.default else "store_true", help=help_text)
    elif o.many:
        group.add_argument(o.flag, dest=o.name, nargs="*", type=o.kind, default=list(o.default), help=help_text)
    else:
        default = "" if o.required or o.default is None else f" (default: {o.default})"
        group.add_argument(o.flag, dest=o.name, type=o.kind, default=o.default, required=o.required,
                           choices=list(o.choices) if o.choices else None, help=help_text + default)


def add_options(p, groups=tuple(OPTION_GROUPS)) -> None:
    """The flags of every option in ``groups``, each group a section of ``--help``."""
    for name in groups:
        section = p.add_argument_group(OPTION_GROUPS[name])
        for o in options():
            if o.group == name:
                add_option(section, o)


def config_from_args(args) -> JobConfig:
    """The run the explain flags describe (each flag's ``dest`` is its field's name)."""
    values = {o.name: getattr(args, o.name) for o in options()}
    return JobConfig(**{**values, "columns": tuple(values["columns"])})


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="guided-saliency", description=__doc__.splitlines()[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--verbose", action="store_true",
                        help="Ray Data's own progress bars and log lines on the console (default: one progress "
                             "line; Ray Data's lines go to its log file)")
    sub = p.add_subparsers(dest="command", required=True)
    add_parser = lambda name, **kw: sub.add_parser(name, parents=[common], **kw)  # noqa: E731
    add_options(add_parser("explain", help="explain every row of a Parquet image dataset"))
    scheduled = add_parser("scheduled", help="run a YAML job file for one logical date (idempotent)")
    scheduled.add_argument("--config", required=True, help="job file (YAML); see worker.job.schedule")
    scheduled.add_argument("--date", help="logical date YYYY-MM-DD (default: today in UTC)")
    add_options(scheduled, ("opt-in",))
    audit = add_parser("audit", help="per-class aggregates, findings and an HTML report of a job's output")
    audit.add_argument("--input", required=True, help="a job's output directory")
    audit.add_argument("--report", required=True, help="directory for report.html and audit.json")
    audit.add_argument("--label-column", help="default: the job's label column")
    audit.add_argument("--controls", type=int, default=0, help="sanity controls on the first N input images")
    audit.add_argument("--interventions", type=int, default=0,
                       help="confirm or refute each class's regions by intervening on N images per class")
    audit.add_argument("--compare-methods", type=int, default=0, metavar="N",
                       help="measure every method's faithfulness (deletion/insertion) and sanity (randomisation, "
                            "class and input sensitivity) on N images per class with the job's model")
    audit.add_argument("--model", help="model for the controls (default: the path the job recorded)")
    add_options(audit, ("opt-in",))
    view = add_parser("view", help="a local web page to filter, sort and page through a job's maps and its audit")
    view.add_argument("output", help="a job's output directory (local, s3:// or gs://)")
    view.add_argument("--audit", help="the audit's report directory, for its classes, findings and shortcuts")
    view.add_argument("--host", default="127.0.0.1", help="the address to listen on (default: this machine only)")
    view.add_argument("--port", type=int, default=8000, help="the port (0: any free one; default 8000)")
    demo = add_parser("demo", help="make real images and a model, run the job and the audit locally")
    demo.add_argument("--output", default="demo_output")
    demo.add_argument("--images", type=int, default=900, help="held-out images the job explains and the audit reads")
    return p


def view(args) -> int:
    """Serve the explorer until interrupted; the page's address is printed first."""
    from worker.explore.server import Explorer, serve

    server = serve(Explorer(args.output, args.audit), args.host, args.port)
    host, port = server.server_address[:2]
    print(f"explorer of {args.output} at http://{host}:{port}/  (Ctrl-C stops it)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.verbose:
        from worker.job.progress import VERBOSE_ENV

        os.environ[VERBOSE_ENV] = "1"
    try:
        if args.command == "demo":
            from worker.demo import run_demo

            summary = run_demo(args.output, held_out=args.images)
        elif args.command == "audit":
            from worker.audit import run_audit

            result = run_audit(args.input, args.report, args.label_column, args.controls, args.model,
                               interventions=args.interventions, echo=print,
                               compare_methods=args.compare_methods,
                               allow_unsafe_deserialization=args.allow_unsafe_deserialization,
                               allow_side_effects=args.allow_side_effects)
            summary = result.summary(args.report)
        elif args.command == "view":
            return view(args)
        elif args.command == "scheduled":
            from worker.job.schedule import load_config, scheduled_run

            summary = scheduled_run(load_config(args.config), args.date,
                                    allow_unsafe_deserialization=args.allow_unsafe_deserialization,
                                    allow_side_effects=args.allow_side_effects)
        else:
            from worker.job import run

            summary = run(config_from_args(args))
    except (ValueError, OSError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0 if summary.get("complete", True) else 1


def command(name: str | None = None) -> None:
    """``python -m jobs.<name>``, and the ``guided-saliency`` script (no ``name``: the subcommand is the first
    argument): run :func:`main`, then leave at once.

    Everything is committed and printed by then; a normal interpreter exit would spend seconds more on
    nothing the user needs: stopping the embedded Ray in order (its processes die with this one) and tearing
    down TensorFlow (~2 s here). Attached to a cluster, leaving only disconnects this driver."""
    argv = sys.argv[1:] if name is None else [name, *sys.argv[1:]]
    if "--verbose" not in argv:  # this process is the driver: its embedded Ray's workers stay off the console
        from worker.job.progress import quiet_tensorflow, quiet_workers

        quiet_workers()
        if argv and argv[0] != "view" and (argv[0] != "audit" or "--controls" in argv
                                           or "--interventions" in argv):  # will use TF
            quiet_tensorflow()
    rc = main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(rc)
