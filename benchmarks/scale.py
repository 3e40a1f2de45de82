"""Scale rehearsal: a million rows through the real job, a kill at about half, the resume, a no-op re-run.

    python -m benchmarks.scale [--rows 1000000] [--files 4] [--size 16] [--batch-size 256]

Tiny PNG images (scikit-learn's digits at 16 x 16) and a one-convolution model, so that the model is not the
bottleneck and what grows with the row count shows: the driver (planning, the resume index of done ids, the
end-of-run duplicate check), read tasks (each gets the done ids), Ray's processes.  Every run is
``python -m jobs.explain`` in its own process (Ray started in it, as the README's first command does); the
proportional set size (PSS, shared pages counted once) of the driver and of every process under it is
sampled every 0.5 s.  Runs, in order: the full job; a second job killed (SIGKILL to its whole process group)
once about half its rows are committed, then the same command again (resume); the same command once more
(nothing to do).  The engine alone (one process: read Parquet, decode with the job's decode path,
``explain``) on the first 50 000 rows gives the rate to compare with.  Linux only (reads /proc).
Writes benchmarks/results/scale.{json,md}.

    python -m benchmarks.scale --sizes 30000 100000 300000 [--audit-controls 16 --audit-interventions 10]

The whole chain at several sizes (issue #24): at each size the job (with ``--label-column label``) and then
``python -m jobs.audit`` on its output (clusters; controls and interventions on their bounded samples), each in
its own process with the same PSS sampling; at the largest size also the kill at about half, the resume and
the no-op re-run.  The driver's and all processes' peak PSS are fitted against the rows (least squares), for
the job and for the audit.  Writes benchmarks/results/scale_audit_<largest size>.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from benchmarks.common import git_revision, machine, provenance, write
from benchmarks.job_memory import _children, _pss_mb

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class TreeSampler(threading.Thread):
    """Peak PSS of process ``root`` and of all its descendants."""

    def __init__(self, root: int, interval: float = 0.5):
        super().__init__(daemon=True)
        self.root, self.interval = root, interval
        self.stop, self.driver_peak, self.total_peak = threading.Event(), 0.0, 0.0
        self.timeline: list[tuple[float, float, float]] = []  # (seconds, driver PSS, all processes' PSS)
        self.started = time.perf_counter()
        self.seen: set[int] = set()  # every process seen under the root: this run's own, to clean up after it

    def snapshot(self) -> list[int]:
        tree, todo, pids = _children(), [self.root], []
        while todo:
            pid = todo.pop()
            pids.append(pid)
            todo.extend(tree.get(pid, []))
        self.seen.update(pids)
        return pids

    def kill_seen(self) -> None:
        """SIGKILL the processes this run started that are still alive (the orphans of a killed tree, or a Ray
        process a finished driver left): only those seen under the root, never anyone else's."""
        for pid in sorted(self.seen - {os.getpid()}):
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def run(self):
        while not self.stop.is_set():
            pids = self.snapshot()
            driver = _pss_mb(self.root)
            total = driver + sum(_pss_mb(p) for p in pids[1:])
            self.driver_peak, self.total_peak = max(self.driver_peak, driver), max(self.total_peak, total)
            self.timeline.append((time.perf_counter() - self.started, driver, total))
            self.stop.wait(self.interval)


def make_data(directory: str, rows: int, files: int, size: int) -> tuple[str, str]:
    import io

    import keras
    from PIL import Image

    from tests.images import digits_images

    images, labels = digits_images(size)
    cells = []
    for img in images:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        cells.append(buf.getvalue())
    cells = np.array(cells, dtype=object)
    data = os.path.join(directory, "data")
    os.makedirs(data, exist_ok=True)
    per_file = -(-rows // files)
    for f in range(files):
        start, stop = f * per_file, min(rows, (f + 1) * per_file)
        index = np.arange(start, stop) % len(cells)
        table = pa.table({"image": pa.array(cells[index].tolist(), pa.binary()),
                          "label": pa.array(labels[index].astype(np.int64))})
        pq.write_table(table, os.path.join(data, f"part-{f:03d}.parquet"), row_group_size=16384)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((size, size, 3)), keras.layers.Rescaling(1 / 255),
                              keras.layers.Conv2D(8, 3, activation="relu"), keras.layers.GlobalAveragePooling2D(),
                              keras.layers.Dense(10)])
    path = os.path.join(directory, "tiny.keras")
    model.save(path)
    return data, path


def engine_alone(data: str, model: str, batch: int, rows: int) -> float:
    """Rows/s of one process: read, decode (the job's decode path), explain; model build excluded."""
    from worker import GuidedBackprop
    from worker.data.decode import DecodeOptions

    engine = GuidedBackprop(model, batch_size=batch)
    options = DecodeOptions(engine.source.input_size)
    files = sorted(os.path.join(data, f) for f in os.listdir(data))
    start = time.perf_counter()
    done = 0
    for batch_table in pq.ParquetFile(files[0]).iter_batches(batch_size=batch * 16, columns=["image"]):
        images = np.stack([options.decode(c) for c in batch_table["image"].to_pylist()])
        engine.explain(images)
        done += len(images)
        if done >= rows:
            break
    return done / (time.perf_counter() - start)


def committed_rows(out: str, counted: dict[str, int]) -> int:
    """Rows in the part files committed to ``out`` so far; ``counted`` keeps each part's rows (a committed part
    never changes), so a poll every 0.5 s reads only the footers of parts new since the last."""
    from worker.data.sink import committed_files

    for path in committed_files(pafs.LocalFileSystem(), out):
        if path not in counted:
            try:
                counted[path] = pq.ParquetFile(path).metadata.num_rows
            except OSError:  # removed again (a chain cleaning up) between the listing and the read
                pass
    return sum(counted.values())


def sampled_run(cmd: list[str], kill_at: int | None = None, out: str | None = None) -> dict:
    """Run ``cmd`` in its own process group (no ``RAY_ADDRESS``: Ray starts in it), its driver's and every
    process's PSS sampled; with ``kill_at``, SIGKILL the group once ``out`` holds that many committed rows."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    sampler = TreeSampler(proc.pid)
    sampler.start()
    killed_at = None
    if kill_at is not None:
        counted: dict[str, int] = {}
        while proc.poll() is None:
            rows = committed_rows(out, counted)
            if rows >= kill_at:
                sampler.snapshot()
                os.killpg(proc.pid, signal.SIGKILL)
                killed_at = rows
                break
            time.sleep(0.5)
    output, _ = proc.communicate()
    seconds = time.perf_counter() - start
    sampler.stop.set()
    sampler.join()
    sampler.kill_seen()  # nothing of this run should be left; be sure (only its own processes)
    timeline = np.array([t for t in sampler.timeline if t[1] > 0] or [(0.0, 0.0, 0.0)])  # while it ran
    quarters = [float(timeline[min(len(timeline) - 1, int(q * len(timeline))), 1]) for q in (0.25, 0.5, 0.75)]
    every = max(1, len(timeline) // 100)  # at most ~100 points of the timeline kept
    result = {"seconds": round(seconds, 1), "driver_peak_pss_mb": round(sampler.driver_peak, 1),
              "all_processes_peak_pss_mb": round(sampler.total_peak, 1), "returncode": proc.returncode,
              "driver_pss_mb_at_quarters": [round(q, 1) for q in quarters] + [round(float(timeline[-1, 1]), 1)],
              "timeline_s_driver_all_mb": np.round(timeline[::every], 1).tolist(), "output": output}
    if killed_at is not None:
        result["killed_with_rows_committed"] = killed_at
    return result


def run_job(data, model, out, batch, kill_at: int | None = None, labels: bool = False) -> dict:
    cmd = [sys.executable, "-m", "jobs.explain", "--model", model, "--input", data, "--output", out,
           "--batch-size", str(batch), "--rows-per-file", "8192", "--no-statistics"]
    cmd += ["--label-column", "label"] if labels else []
    result = sampled_run(cmd, kill_at, out)
    output = result.pop("output")
    if "killed_with_rows_committed" in result:
        return result
    summary_path = os.path.join(out, "_summary.json")
    if result["returncode"] != 0 or not os.path.exists(summary_path):
        raise RuntimeError(f"job failed ({result['returncode']}):\n{output[-3000:]}")
    with open(summary_path) as f:
        summary = json.load(f)
    return {**result, **{k: summary[k] for k in ("rows_in", "rows_out", "rows_resumed", "rows_this_run",
                                                  "duplicate_ids", "complete", "rows_per_second", "timings")}}


def run_audit_process(out: str, report: str, controls: int, interventions: int) -> dict:
    """``python -m jobs.audit`` on a job's output, sampled as the job is; the seconds its own line reports for
    the passes over the maps."""
    import re

    result = sampled_run([sys.executable, "-m", "jobs.audit", "--input", out, "--report", report,
                          "--controls", str(controls), "--interventions", str(interventions)])
    output = result.pop("output")
    if result["returncode"] != 0:
        raise RuntimeError(f"audit failed ({result['returncode']}):\n{output[-3000:]}")
    found = re.search(r"audit: (\d+) maps in (\d+) files aggregated and clustered in ([\d.]+) s", output)
    return {**result, "rows": int(found.group(1)) if found else None,
            "aggregate_and_cluster_seconds": float(found.group(3)) if found else None,
            "last_lines": output.strip().splitlines()[-3:]}


def files_for(args, rows: int) -> int:
    """Input files at a size: ``--files``, or as many as ``--rows-per-input-file`` asks."""
    return -(-rows // args.rows_per_input_file) if args.rows_per_input_file else args.files


def _brief(run: dict) -> dict:
    """A run's result without its PSS timeline, to print."""
    return {k: v for k, v in run.items() if k != "timeline_s_driver_all_mb"}


def chain(args) -> None:
    """Job then audit at each of ``args.sizes``; kill, resume and no-op re-run at the largest.  The tables are
    written after every size, so a long rehearsal that stops keeps what it measured."""
    tmp = tempfile.mkdtemp(prefix="scale-chain-")
    sizes, rows_of = sorted(args.sizes), {}
    try:
        for n in sizes:
            here = os.path.join(tmp, str(n))
            os.makedirs(here)
            started = time.perf_counter()
            data, model = make_data(here, n, files_for(args, n), args.size)
            print(n, f"data in {time.perf_counter() - started:.1f} s", flush=True)
            job = run_job(data, model, os.path.join(here, "full"), args.batch_size, labels=True)
            print(n, "job", _brief(job), flush=True)
            audit = run_audit_process(os.path.join(here, "full"), os.path.join(here, "report"),
                                      args.audit_controls, args.audit_interventions)
            print(n, "audit", _brief(audit), flush=True)
            rows_of[n] = {"job": job, "audit": audit}
            shutil.rmtree(os.path.join(here, "report"), ignore_errors=True)
            if n == sizes[-1] and not args.no_resume:
                shutil.rmtree(os.path.join(here, "full"), ignore_errors=True)  # the disk for the second output
                resumed = os.path.join(here, "resumed")
                for name, kill_at in (("killed", n // 2), ("resume", None), ("no-op re-run", None)):
                    rows_of[n][name] = run_job(data, model, resumed, args.batch_size, kill_at=kill_at, labels=True)
                    print(n, name, _brief(rows_of[n][name]), flush=True)
            shutil.rmtree(here, ignore_errors=True)
            chain_report(args, [m for m in sizes if m in rows_of], rows_of)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for n in sizes:
        for name in ("job", "resume", "no-op re-run"):
            r = rows_of[n].get(name)
            if r is not None:
                assert r["complete"] and r["rows_out"] == n and r["duplicate_ids"] == 0, (n, name, r)
        assert rows_of[n]["audit"]["rows"] == n, rows_of[n]["audit"]


def chain_report(args, sizes: list[int], rows_of: dict) -> None:
    """benchmarks/results/scale_audit_<largest size asked>.{json,md} from the sizes measured so far."""

    def fit(what, key):
        if len(sizes) < 2:
            return {"mb_per_1000_rows": None, "intercept_mb": None}
        slope, intercept = np.polyfit(sizes, [rows_of[n][what][key] for n in sizes], 1)
        return {"mb_per_1000_rows": round(float(slope) * 1000, 3), "intercept_mb": round(float(intercept), 1)}

    fits = {f"{what} {key}": fit(what, key) for what in ("job", "audit")
            for key in ("driver_peak_pss_mb", "all_processes_peak_pss_mb")}
    files = {n: files_for(args, n) for n in sizes}
    results = {"date": datetime.date.today().isoformat(), "machine": machine(), "revision": git_revision(),
               "command": "python -m benchmarks.scale " + " ".join(sys.argv[1:]), "sizes": sizes,
               "files": files, "image_size": args.size, "batch_size": args.batch_size,
               "audit_controls": args.audit_controls, "audit_interventions": args.audit_interventions,
               "load_average": os.getloadavg(), "runs": {str(n): r for n, r in rows_of.items()}, "fits": fits}
    stand_in = ("" if max(sizes) >= 10_000_000 else
                " 10 million rows did not fit the session: these sizes and the fit stand in.")
    lines = [f"# The chain at {', '.join(f'{n:,}' for n in sizes)} rows: job, then audit ({results['date']})", "",
             *provenance(results),
             f"PNG images of {args.size}x{args.size} (scikit-learn digits) in "
             f"{', '.join(f'{f:,}' for f in files.values())} files, a one-convolution "
             f"model, batch {args.batch_size}: `python -m jobs.explain --label-column label`, then `python -m "
             f"jobs.audit` on its output with clusters, `--controls {args.audit_controls} --interventions "
             f"{args.audit_interventions}`; each in its own process (Ray started in it), PSS of its driver and "
             "of every process under it sampled every 0.5 s (the driver's at a quarter, half and three quarters "
             "of the run and at its end show whether it grows as the rows pass). One run of each: a rehearsal on a "
             f"2-core machine (load average at the end {', '.join(f'{x:.1f}' for x in results['load_average'])}), "
             f"not a ratio of interleaved rounds.{stand_in}", "",
             "| rows | run | seconds | rows/s | driver peak PSS (MB) | driver PSS at ¼, ½, ¾, end (MB) | "
             "all processes peak PSS (MB) | note |",
             "|---|---|---|---|---|---|---|---|"]
    for n in sizes:
        for name, r in rows_of[n].items():
            done = r.get("rows_this_run", n if name == "audit" else None)
            rate = f"{done / r['seconds']:,.0f}" if done else ""
            if name == "audit":
                note = (f"maps aggregated and clustered in {r['aggregate_and_cluster_seconds']} s "
                        f"({n / r['aggregate_and_cluster_seconds']:,.0f} maps/s); the audit's rate / the job's: "
                        f"**{(n / r['seconds']) / (n / rows_of[n]['job']['seconds']):.2f}x** whole process")
            elif "killed_with_rows_committed" in r:
                note = f"killed with {r['killed_with_rows_committed']:,} rows committed"
            else:
                t = r["timings"]
                note = (f"rows out {r['rows_out']:,}, resumed {r['rows_resumed']:,}, duplicates {r['duplicate_ids']}; "
                        f"planning {t['planning']} s, starting {t['starting']} s, explaining {t['explaining']} s, "
                        f"checking {t['checking']} s")
            quarters = ", ".join(str(q) for q in r["driver_pss_mb_at_quarters"])
            lines.append(f"| {n:,} | {name} | {r['seconds']} | {rate} | {r['driver_peak_pss_mb']} | {quarters} | "
                         f"{r['all_processes_peak_pss_mb']} | {note} |")
    lines += [""] if len(sizes) < 2 else ["", "Peak PSS against rows (least squares over the sizes, one run each): "
              + "; ".join(f"{k}: **{v['mb_per_1000_rows']} MB per 1 000 rows** (intercept {v['intercept_mb']} MB)"
                          for k, v in fits.items()) + ".", ""]
    md = "\n".join(lines)
    write(results, f"scale_audit_{max(args.sizes)}", md)  # the sizes so far, under the whole run's name
    print(md, flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--files", type=int, default=4)
    p.add_argument("--rows-per-input-file", type=int, help="with --sizes: input files of this many rows each")
    p.add_argument("--size", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--engine-rows", type=int, default=50_000)
    p.add_argument("--sizes", type=int, nargs="+", help="the chain, job then audit, at each size (see above)")
    p.add_argument("--audit-controls", type=int, default=16)
    p.add_argument("--audit-interventions", type=int, default=10)
    p.add_argument("--no-resume", action="store_true", help="with --sizes: no kill, resume and no-op re-run")
    args = p.parse_args(argv)
    if args.sizes:
        if len(set(args.sizes)) < 3 and not args.no_resume:
            p.error("a fit needs three sizes or more (one size, one more point for a fit: with --no-resume)")
        return chain(args)
    tmp = tempfile.mkdtemp(prefix="scale-")
    try:
        started = time.perf_counter()
        data, model = make_data(tmp, args.rows, args.files, args.size)
        data_seconds = round(time.perf_counter() - started, 1)
        print(f"data: {args.rows} rows in {data_seconds} s", flush=True)
        engine_rate = engine_alone(data, model, args.batch_size, min(args.engine_rows, args.rows))
        print(f"engine alone: {engine_rate:.0f} rows/s", flush=True)
        runs = {"full": run_job(data, model, os.path.join(tmp, "full"), args.batch_size)}
        print(runs, flush=True)
        resumed = os.path.join(tmp, "resumed")
        runs["killed"] = run_job(data, model, resumed, args.batch_size, kill_at=args.rows // 2)
        print(runs, flush=True)
        runs["resume"] = run_job(data, model, resumed, args.batch_size)
        runs["no-op re-run"] = run_job(data, model, resumed, args.batch_size)
        print(runs, flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for name in ("full", "resume", "no-op re-run"):
        r = runs[name]
        assert r["complete"] and r["rows_out"] == args.rows and r["duplicate_ids"] == 0, (name, r)
    full = runs["full"]
    results = {"date": datetime.date.today().isoformat(), "machine": machine(), "revision": git_revision(),
               "command": "python -m benchmarks.scale " + " ".join(sys.argv[1:] if argv is None else argv),
               "rows": args.rows, "files": args.files, "image_size": args.size, "batch_size": args.batch_size,
               "engine_alone_rows_per_second": round(engine_rate, 1), "runs": runs,
               "job_rows_per_second_whole_run": round(args.rows / full["seconds"], 1)}
    md = "\n".join([
        f"# Scale rehearsal: {args.rows:,} rows ({results['date']})", "",
        *provenance(results),
        f"{args.rows:,} PNG images of {args.size}x{args.size} (scikit-learn digits) in {args.files} files, a "
        f"one-convolution model, batch {args.batch_size}, `python -m jobs.explain` with Ray started in the job's "
        "process. Peak PSS sampled every 0.5 s. One run of each (a rehearsal, not a ratio: the engine rate is "
        "the reference point).", "",
        "| run | seconds | rows this run | driver peak PSS (MB) | all processes peak PSS (MB) | note |",
        "|---|---|---|---|---|---|",
        *[f"| {name} | {r['seconds']} | {r.get('rows_this_run', '')} | {r['driver_peak_pss_mb']} | "
          f"{r['all_processes_peak_pss_mb']} | "
          + (f"killed with {r['killed_with_rows_committed']:,} rows committed" if 'killed_with_rows_committed' in r
             else f"rows out {r['rows_out']:,}, resumed {r['rows_resumed']:,}, duplicates {r['duplicate_ids']}")
          + " |" for name, r in runs.items()], "",
        f"Engine alone (one process: read, decode, explain; first {min(args.engine_rows, args.rows):,} rows): "
        f"**{engine_rate:,.0f} rows/s**. The whole job: **{results['job_rows_per_second_whole_run']:,} rows/s** "
        f"({results['job_rows_per_second_whole_run'] / engine_rate:.2f}x), start-up included.", ""])
    write(results, "scale", md)
    print(md)


if __name__ == "__main__":
    main()
