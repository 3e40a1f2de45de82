"""XLA's persistent compilation cache across process restarts (an actor restarting on the same node).

    python -m benchmarks.xla_cache [--model resnet50] [--batch-size 16] [--rounds 5]

Builds the engine with ``jit_compile=True`` in fresh processes: one fills a cache directory
(``TF_XLA_FLAGS=--tf_xla_persistent_cache_directory=DIR``), then rounds alternate a process with no cache and
one reading the warm cache; each reports its time to first map (load + trace + compile + one batch).  The flag is what
deploy/Dockerfile sets.  Writes benchmarks/results/xla_cache.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile

from benchmarks.common import (
    child_json,
    git_revision,
    machine,
    provenance,
    spread,
    write,
)

CHILD = """
import json, os, sys, time
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
import numpy as np
from benchmarks.engine import build
from worker import GuidedBackprop
model, preset = build(sys.argv[1])
batch = int(sys.argv[2])
start = time.perf_counter()
engine = GuidedBackprop(model, batch_size=batch, preprocessing=preset, jit_compile=True, warmup=False)
engine.explain(np.zeros((batch, *engine.source.input_size, 3), np.uint8))
print(json.dumps({"first_map_s": round(time.perf_counter() - start, 2)}))
"""


def child(model, batch, cache):
    # no cache: the flag emptied, so a TF_XLA_FLAGS set outside cannot bring one in
    flags = f"--tf_xla_persistent_cache_directory={cache}" if cache else ""
    return child_json(["-c", CHILD, model, str(batch)], env={"TF_XLA_FLAGS": flags})["first_map_s"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    runs = {"no cache": [], "warm cache": []}
    with tempfile.TemporaryDirectory(prefix="xla-cache-") as cache:
        filling = child(args.model, args.batch_size, cache)
        cached_files = sum(len(files) for _, _, files in os.walk(cache))
        for r in range(args.rounds):
            for label in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
                runs[label].append(child(args.model, args.batch_size, cache if label == "warm cache" else None))
            print(r, {k: v[-1] for k, v in runs.items()}, flush=True)
    saved = [a - b for a, b in zip(runs["no cache"], runs["warm cache"])]
    results = {"date": datetime.date.today().isoformat(), "machine": machine(), "revision": git_revision(),
               "command": "python -m benchmarks.xla_cache " + " ".join(sys.argv[1:] if argv is None else argv),
               "model": args.model, "batch_size": args.batch_size, "cache_entries": cached_files,
               "filling_run_s": filling, "time_to_first_map_s": runs, "saved_s": saved}
    md = "\n".join([
        f"# XLA persistent cache across restarts ({results['date']})", "",
        *provenance(results),
        f"{args.model}, batch {args.batch_size}, `jit_compile=True`; each run a fresh process, time to first map = "
        f"load + trace + XLA compile + one batch. One run filled the cache first ({filling} s, {cached_files} "
        f"entries); then {args.rounds} rounds, the two kinds alternating; median (min–max).", "",
        "| process | time to first map (s) |", "|---|---|",
        *[f"| {label} | {spread(v)} |" for label, v in runs.items()],
        f"| saved by the cache, paired by round | **{spread(saved)}** |", ""])
    write(results, "xla_cache", md)
    print(md)


if __name__ == "__main__":
    main()
