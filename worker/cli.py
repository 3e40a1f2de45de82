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

from worker.data.decode import DEFAULT_MAX_PIXELS, RESIZE_POLICIES
from worker.engine.options import (ACTIVATIONS, MAP_DTYPES, METHODS, PRECISIONS, PRESETS, REDUCTIONS,
                                   RELU_POLICIES, SCORES)


def add_opt_in_arguments(p) -> None:
    """The opt-ins: given by the person running the command, never taken from a run record."""
    p.add_argument("--allow-unsafe-deserialization", action="store_true",
                   help="load models carrying Python code (Lambda layers); only for models you trust")
    p.add_argument("--allow-side-effects", action="store_true",
                   help="run a model whose graph holds ops outside the allowlist of pure computation (file or "
                        "network I/O, save/restore, print, Python callbacks, loops); only for models you trust")


def add_explain_arguments(p: argparse.ArgumentParser) -> None:
    io = p.add_argument_group("data")
    io.add_argument("--model", required=True, help=".keras, .h5 or SavedModel directory; local, s3:// or gs://")
    io.add_argument("--input", required=True, help="Parquet file, directory or glob; local, s3:// or gs://")
    io.add_argument("--output", required=True, help="output directory (Parquet parts + _job.json + _summary.json)")
    io.add_argument("--input-format", default="auto", choices=["auto", "parquet", "images", "tfrecord"],
                    help="parquet, images (a folder tree of image files) or tfrecord; auto: from the files found")
    io.add_argument("--image-feature", default="image/encoded", help="TFRecord input: the encoded image's feature")
    io.add_argument("--label-feature", default="image/class/label", help="TFRecord input: the class index's feature")
    io.add_argument("--image-column", default="image")
    io.add_argument("--id-column", help="stable row id; default: the input's 'id' column if it has one, "
                                        "else <file>#<row>")
    io.add_argument("--label-column", help="class labels (needed for --target label); passed through")
    io.add_argument("--mask-column", help="ground-truth mask (image/tensor) or box [y0, x0, y1, x1] in [0, 1]")
    io.add_argument("--columns", nargs="*", default=[], help="other input columns to pass through")
    io.add_argument("--overwrite", action="store_true", help="replace an output that belongs to another job")
    io.add_argument("--rows-per-file", type=int, default=1024)
    m = p.add_argument_group("method")
    m.add_argument("--method", default="guided_backprop", choices=list(METHODS),
                   help="guided_backprop | deconvnet (positive gradients at every ReLU, no forward gate) | "
                        "gradient (plain) | gradcam | guided_gradcam (guided map x Grad-CAM)")
    m.add_argument("--cam-layer", help="gradcam / guided_gradcam: layer or scope name (default: the last "
                                       "convolutional activation)")
    m.add_argument("--smooth", type=int, default=0, help="SmoothGrad: average over N noisy copies per image")
    m.add_argument("--noise", type=float, default=0.15,
                   help="SmoothGrad noise, a fraction of each image's input span (default 0.15)")
    m.add_argument("--target", default="predicted",
                   help="predicted | label | class:K | top:K | layer:NAME[:CHANNEL]")
    m.add_argument("--score", default="logits", choices=SCORES)
    m.add_argument("--preprocessing", default="none", choices=[x for x in PRESETS if x != "custom"])
    m.add_argument("--resize", default="stretch", choices=RESIZE_POLICIES)
    m.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="decompression-bomb guard")
    m.add_argument("--jpeg-draft", action="store_true",
                   help="decode large JPEGs at 1/2-1/8 scale (faster; pixels differ slightly from a full decode)")
    m.add_argument("--reduction", default="max_abs", choices=REDUCTIONS)
    m.add_argument("--map-dtype", default="float16", choices=MAP_DTYPES)
    m.add_argument("--precision", default="float32", choices=PRECISIONS)
    m.add_argument("--no-statistics", action="store_true", help="skip the per-row map statistics columns")
    m.add_argument("--relu-policy", default="error", choices=RELU_POLICIES)
    m.add_argument("--activations", default="relu", choices=ACTIVATIONS,
                   help="relu: the method's rule at ReLUs (capped, thresholded, leaky, PReLU); all: at every "
                        "activation (swish, GELU, hard-swish, ELU, SELU, sigmoid, ...): f'(x) * max(g, 0) for "
                        "guided backprop")
    add_opt_in_arguments(m)
    r = p.add_argument_group("resources")
    r.add_argument("--batch-size", type=int, default=16)
    r.add_argument("--actors", type=int, help="explain actors (default: one per GPU, else 1)")
    r.add_argument("--gpus-per-actor", type=float, help="default 1 when the cluster has GPUs, else 0")
    r.add_argument("--cpus-per-actor", type=float)
    r.add_argument("--decode-cpus", type=float, help="CPUs kept for reading/decoding (default 25%%)")
    r.add_argument("--gpu-memory-limit-mb", type=int, help="hard TF memory limit (needed for fractional GPUs)")
    r.add_argument("--actor-start-timeout", dest="actor_start_timeout_s", type=int, default=600,
                   help="seconds for nodes to join and free the actors' resources before the job fails "
                        "saying why (default 600)")


def config_from_args(args):
    """The explain flags are named like :class:`~worker.job.config.JobConfig`'s fields (``--no-statistics`` aside)."""
    import dataclasses

    from worker.job.config import JobConfig

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(JobConfig) if hasattr(args, f.name)}
    return JobConfig(**{**values, "columns": tuple(args.columns)}, statistics=not args.no_statistics)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="guided-saliency", description=__doc__.splitlines()[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--verbose", action="store_true",
                        help="Ray Data's own progress bars and log lines on the console (default: one progress "
                             "line; Ray Data's lines go to its log file)")
    sub = p.add_subparsers(dest="command", required=True)
    add_parser = lambda name, **kw: sub.add_parser(name, parents=[common], **kw)  # noqa: E731
    add_explain_arguments(add_parser("explain", help="explain every row of a Parquet image dataset"))
    scheduled = add_parser("scheduled", help="run a YAML job file for one logical date (idempotent)")
    scheduled.add_argument("--config", required=True, help="job file (YAML); see worker.job.schedule")
    scheduled.add_argument("--date", help="logical date YYYY-MM-DD (default: today in UTC)")
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
    add_opt_in_arguments(audit.add_argument_group("opt-ins (yours: the job's recorded ones are not used)"))
    demo = add_parser("demo", help="make real images and a model, run the job and the audit locally")
    demo.add_argument("--output", default="demo_output")
    demo.add_argument("--images", type=int, default=900, help="held-out images the job explains and the audit reads")
    return p


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
            summary = {"report": args.report, "groups": len(result["groups"]), "findings": result["findings"],
                       **({"skipped": result["skipped"]} if result.get("skipped") else {})}
        elif args.command == "scheduled":
            from worker.job.schedule import load_config, scheduled_run

            summary = scheduled_run(load_config(args.config), args.date)
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
        if argv and (argv[0] != "audit" or "--controls" in argv or "--interventions" in argv):  # will use TF
            quiet_tensorflow()
    rc = main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(rc)
