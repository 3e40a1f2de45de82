"""The audit's cost: maps/s and the driver's memory at three sizes, and what interventions add.

    python -m benchmarks.audit [--sizes 10000 30000 100000] [--rounds 5] [--interventions 30]

Every audit runs in a process of its own (``python -m benchmarks.audit one ...``); its resident memory is
sampled every 50 ms during the audit: the peak minus the RSS just before (after imports and ``ray.init``) is
what the audit itself held (a process's ``ru_maxrss`` would not do: its imports set the peak). Linux only.
Rounds interleave the sizes.
  scale          synthetic job outputs (10 classes, 32 x 32 float16 maps with their statistics columns) of
                 each size, and one of the largest size in a single class (SpRAy's worst case)
  interventions  a real job's output: scikit-learn's digits at 32 x 32 (1 797 images, three times over),
                 the small CNN (tests.models.small_cnn) trained for 4 epochs, ``python -m jobs.explain``; audited without and with
                 ``interventions=N`` (the engine rebuilt, every class localised and probed)
Reported: median seconds (min–max), maps/s, driver peak and growth, and the growth's slope per 1 000 rows.
Writes benchmarks/results/audit.{json,md} (with ``--no-real``, audit_memory.{json,md}).

    python -m benchmarks.audit compare [REVISION]

The per-block reduction of REVISION (default 55183e4, before issue #24) against this tree's, interleaved in one
process: benchmarks/results/audit_vectorised.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.common import PeakSampler, child_json, git_revision, machine, provenance, spread, write


def synthetic_output(directory, rows, size, classes=10, rows_per_file=10_000, seed=0):
    from worker.data.schema import map_column
    from worker.data.stats import map_statistics

    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    blob = np.exp(-((yy - size / 2) ** 2 + (xx - size / 2) ** 2) / (size * 2.0))
    for start in range(0, rows, rows_per_file):
        n = min(rows_per_file, rows - start)
        labels = rng.integers(0, classes, n)
        maps = (rng.random((n, size, size)) * 0.2 + blob).astype(np.float16)
        stats = map_statistics(maps)
        table = pa.table({"id": [f"r{start + i}" for i in range(n)], "label": labels, "predicted_class": labels,
                          "map": map_column(maps, np.ones(n, bool), (size, size)),
                          "error": pa.nulls(n, pa.string()), **stats})
        pq.write_table(table, os.path.join(directory, f"part-{start:09d}.parquet"))


def real_output(directory) -> str:
    """A job's output on real images with a trained model (and its run record, for the interventions)."""
    from tests.images import digits_images
    from tests.models import train_small_cnn
    from worker.demo import write_hf_parquet

    images, labels = digits_images(32)
    model = os.path.join(directory, "model.keras")
    train_small_cnn(images, labels, epochs=4).save(model)
    data = os.path.join(directory, "digits.parquet")
    write_hf_parquet(data, np.concatenate([images] * 3), np.concatenate([labels] * 3))
    out = os.path.join(directory, "maps")
    subprocess.run([sys.executable, "-m", "jobs.explain", "--model", model, "--input", data, "--output", out,
                    "--label-column", "label", "--preprocessing", "scale01"], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return out


def rss_mb() -> float:
    """This process's resident memory now (Linux: /proc/self/status)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def memory_mb() -> dict:
    """This process's RSS, its parts (anonymous: its own heap; shmem: the object store's pages mapped into it)
    and its PSS (shared pages divided among the processes mapping them), in MB (Linux: /proc/self)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":", 1)[0]
            if key in ("VmRSS", "RssAnon", "RssShmem"):
                out[{"VmRSS": "rss", "RssAnon": "anon", "RssShmem": "shmem"}[key]] = int(line.split()[1]) / 1024
    with open("/proc/self/smaps_rollup") as f:
        out["pss"] = next(int(line.split()[1]) for line in f if line.startswith("Pss:")) / 1024
    return out


def one(output: str, report: str, interventions: int) -> None:
    """The child: one audit, its seconds and this process's peak RSS before and after, as a JSON line."""
    from benchmarks.common import local_ray
    from worker.audit import run_audit

    local_ray()
    before = memory_mb()
    start = time.perf_counter()
    with PeakSampler(memory_mb, 0.05) as sampler:
        result = run_audit(output, report, interventions=interventions)
    seconds = time.perf_counter() - start
    section = result.interventions
    regions = section.regions if section else []
    print(json.dumps({"seconds": seconds, "baseline_mb": before["rss"], "peak_mb": sampler.peak["rss"],
                      "before": before, "peak": sampler.peak, "after": memory_mb(),
                      "rows": result.rows, "regions": len(regions),
                      "confirmed": sum(bool(r.probe["confirmed"]) for r in regions),
                      "intervention_seconds": section.seconds if section else None}))


def child(output, report, interventions=0) -> dict:
    return child_json(["-m", "benchmarks.audit", "one", output, report, str(interventions)])


def compare(revision: str, rounds: int = 7) -> None:
    """The per-block reduction of ``revision``'s worker/audit/aggregate.py (``git show``) against this tree's, in
    one process, rounds interleaved (order alternating), on one 10 000-row file of 32 x 32 and of 16 x 16 maps
    (the whole file in one call for both). Writes benchmarks/results/audit_vectorised.{json,md}."""
    import importlib.util
    import statistics

    from worker.audit import aggregate as new

    source = subprocess.run(["git", "show", f"{revision}:worker/audit/aggregate.py"], capture_output=True, text=True,
                            check=True).stdout
    tmp = tempfile.mkdtemp(prefix="audit-compare-")
    try:
        path = os.path.join(tmp, "aggregate_then.py")
        with open(path, "w") as f:
            f.write(source)
        spec = importlib.util.spec_from_file_location("aggregate_then", path)
        old = importlib.util.module_from_spec(spec)
        sys.modules["aggregate_then"] = old
        spec.loader.exec_module(old)
        rows = []
        for size in (32, 16):
            synthetic_output(os.path.join(tmp, str(size)), 10_000, size, 10)
            table = pq.read_table(os.path.join(tmp, str(size), "part-000000000.parquet"))
            rates = {"then": [], "now": []}
            for r in range(rounds):
                for name, module in ((("then", old), ("now", new)) if r % 2 == 0 else (("now", new), ("then", old))):
                    start = time.perf_counter()
                    module.partial_aggregates(table, "label")
                    rates[name].append(table.num_rows / (time.perf_counter() - start))
            rows.append({"maps": f"{size} x {size}", **rates,
                         "ratio": [b / a for a, b in zip(rates["then"], rates["now"])]})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    results = {"date": datetime.date.today().isoformat(), "machine": machine(), "revision": git_revision(),
               "command": f"python -m benchmarks.audit compare {revision}", "then": revision, "rounds": rounds,
               "load_average": os.getloadavg(), "rows": rows}
    md = "\n".join([f"# The audit's per-block reduction, {revision} against now ({results['date']})", "",
                     *provenance(results),
                     f"`partial_aggregates` on one file of 10 000 synthetic maps (10 classes), the whole file in one "
                     f"call, {rounds} rounds interleaved in one process; maps/s, median (min–max), and the ratio "
                     f"paired by round. Load average at the end {results['load_average'][0]:.1f} (a shared 2-core "
                     "machine).", "",
                     "| maps | then | now | now / then |", "|---|---|---|---|",
                     *[f"| {r['maps']} | {spread(r['then'], 0)} | {spread(r['now'], 0)} | **{spread(r['ratio'], 2)}** |"
                       for r in rows], ""])
    write(results, "audit_vectorised", md)
    print(md)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["one"]:
        return one(argv[1], argv[2], int(argv[3]))
    if argv[:1] == ["compare"]:
        return compare(argv[1] if len(argv) > 1 else "55183e4")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 30_000, 100_000])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--interventions", type=int, default=30, help="images per class for the interventions")
    p.add_argument("--no-real", action="store_true", help="only the synthetic outputs (no trained model, no "
                   "interventions): the memory slope and the rate")
    p.add_argument("--data", help="keep the synthetic outputs in this folder and reuse them on a later run")
    args = p.parse_args(argv)
    if len(set(args.sizes)) < 3:
        p.error("a slope that can tell flat from linear needs three sizes or more")
    tmp = tempfile.mkdtemp(prefix="audit-bench-")
    specs = {f"{n} x 10 classes": (n, 10) for n in args.sizes}
    specs[f"{max(args.sizes)} x 1 class"] = (max(args.sizes), 1)
    runs: dict[str, list] = {name: [] for name in specs}
    if not args.no_real:
        runs.update({"without interventions": [], "with interventions": []})
    try:
        outputs = {}
        for name, (rows, classes) in specs.items():
            outputs[name] = os.path.join(args.data or tmp, name.replace(" ", ""))
            if not os.path.exists(os.path.join(outputs[name], "_done")):
                shutil.rmtree(outputs[name], ignore_errors=True)
                synthetic_output(outputs[name], rows, 32, classes)
                open(os.path.join(outputs[name], "_done"), "w").close()
        if not args.no_real:
            os.makedirs(os.path.join(tmp, "real"))
            real = real_output(os.path.join(tmp, "real"))
        for r in range(args.rounds):
            jobs = [(name, outputs[name], 0) for name in specs]
            if not args.no_real:
                jobs += [("without interventions", real, 0), ("with interventions", real, args.interventions)]
            for name, output, n in (jobs if r % 2 == 0 else jobs[::-1]):
                runs[name].append(child(output, os.path.join(tmp, "report"), n))
                print(r, name, runs[name][-1], flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    def row(name):
        rs = runs[name]
        rows = rs[0]["rows"]
        return {"name": name, "rows": rows, "seconds": [x["seconds"] for x in rs],
                "maps_per_second": [rows / x["seconds"] for x in rs], "peak_mb": [x["peak_mb"] for x in rs],
                "growth_mb": [x["peak_mb"] - x["baseline_mb"] for x in rs],
                **{f"{k}_growth_mb": [x["peak"][k] - x["before"][k] for x in rs] for k in ("anon", "shmem", "pss")},
                "regions": rs[0]["regions"], "confirmed": rs[0]["confirmed"],
                "intervention_seconds": [x["intervention_seconds"] for x in rs if x["intervention_seconds"] is not None]}

    table = [row(name) for name in runs]
    scale = [t for t in table if t["name"].endswith("10 classes")]

    def slope(key):
        """MB per 1 000 rows, least squares over every run of the 10-class sizes, and its standard error."""
        x = np.array([t["rows"] for t in scale for _ in t[key]], float)
        y = np.array([g for t in scale for g in t[key]], float)
        (b, a), cov = np.polyfit(x, y, 1, cov=True) if len(x) > 3 else (np.polyfit(x, y, 1), np.zeros((2, 2)))
        return round(float(b) * 1000, 4), round(float(np.sqrt(cov[0, 0])) * 1000, 4)

    slopes = {k: slope(k) for k in ("growth_mb", "anon_growth_mb", "shmem_growth_mb", "pss_growth_mb")}
    results = {"date": datetime.date.today().isoformat(), "machine": machine(), "revision": git_revision(),
               "command": "python -m benchmarks.audit " + " ".join(argv), "rounds": args.rounds,
               "load_average": os.getloadavg(), "interventions": args.interventions, "runs": table,
               "driver_growth_mb_per_1000_rows": slopes["growth_mb"][0],
               "slopes_mb_per_1000_rows": slopes}
    lines = [f"# Audit benchmark ({results['date']})", "", *provenance(results),
             f"Each audit in a process of its own, {args.rounds} rounds interleaved; median (min–max). The driver's "
             "memory sampled every 50 ms during the audit, its peak minus just before it (after imports and "
             "`ray.init`): *RSS*, and its parts *anon* (the process's own heap) and *shmem* (the object store's "
             "pages mapped into it), and *PSS* (shared pages divided among the processes that map them). "
             f"Synthetic outputs: 32 x 32 float16 maps in files of 10 000 rows. Load average at the end "
             f"{', '.join(f'{x:.1f}' for x in results['load_average'])} (a shared machine: rates are noisy, the "
             "interleaving spreads it over every size).", "",
             "| output | rows | seconds | maps/s | driver peak RSS MB | RSS growth MB | anon | shmem | PSS growth MB "
             "| regions probed (confirmed) |",
             "|---|---|---|---|---|---|---|---|---|---|",
             *[f"| {t['name']} | {t['rows']} | {spread(t['seconds'], 1)} | {spread(t['maps_per_second'], 0)} | "
               f"{spread(t['peak_mb'], 0)} | {spread(t['growth_mb'], 0)} | {spread(t['anon_growth_mb'], 0)} | "
               f"{spread(t['shmem_growth_mb'], 0)} | {spread(t['pss_growth_mb'], 0)} | "
               f"{t['regions']} ({t['confirmed']}) |" for t in table], "",
             "Driver growth over the 10-class sizes, MB per 1 000 rows (least squares over every run, ± its standard "
             "error): " + ", ".join(f"{k.replace('_growth_mb', '').replace('growth_mb', 'RSS')} **{v[0]}** (± {v[1]})"
                                    for k, v in slopes.items()) + ".", ""]
    if not args.no_real:
        without, with_ = (next(t for t in table if t["name"] == n) for n in ("without interventions",
                                                                              "with interventions"))
        extra = [b - a for a, b in zip(without["seconds"], with_["seconds"])]
        results["interventions_extra_seconds"] = extra
        lines += [f"Interventions ({args.interventions} images per class): **+{spread(extra, 1)} s** on the whole "
                  "audit, paired by round; the interventions step itself, the engine's rebuild in the driver "
                  f"included, {spread(with_['intervention_seconds'], 1)} s for {with_['regions']} regions.", ""]
    md = "\n".join(lines)
    write(results, "audit_memory" if args.no_real else "audit", md)
    print(md)


if __name__ == "__main__":
    main()
