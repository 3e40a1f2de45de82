"""The explorer at scale: a slice's time to first screen over 1 and 10 million rows, cold and warm, and the
server's memory.

    python -m benchmarks.explore [--sizes 1000000 10000000] [--rounds 3] [--part-rows 1024]
                                 [--row-group-rows 1024 [0 ...]] [--workdir DIR]

For each size, a job's output as the job lays it out (part files of 1 024 rows, 16 x 16 float16 maps, every
statistic column, 0.1 % error rows, labels and class names) and its input (files of 250 000 rows of scikit-learn's
digits as 16 x 16 PNGs) are written with the output's own schema (``worker.data.schema``), not by running the job:
the job's cost at this scale is measured by ``benchmarks.scale``. Then ``python -m jobs.view OUTPUT --port 0``
runs in its own process, and each slice is asked for as the page asks: ``/api/slice`` (24 rows), then every
picture of the page (image, map, overlay), six at a time as a browser fetches them. *First screen* is the time
from the slice's request to the last picture. *Cold* is the slice's first ask in a fresh server process (the
part files' footers not yet read; the operating system's file cache is not dropped, so the disk's own cold read
is not in it), *warm* the same ask again. Rounds restart the server. The server's peak resident memory is its
``VmHWM``. ``--row-group-rows`` lays the part files out in row groups of that many rows (the job's
``worker.data.sink.ROW_GROUP_ROWS``; 0: one row group per part file, as the job wrote them before); several
values are measured side by side, their rounds interleaved. Writes benchmarks/results/explore.{json,md}
(``explore_parts_N`` for another ``--part-rows``).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.common import git_revision, machine, provenance, write

PART_ROWS = 1024
INPUT_ROWS = 250_000
SLICES = {
    "first page, no filter": "",
    "one class, wrong, by border mass": "true=3&correct=false&sort=-border_mass",
    "a statistic's range, sorted by another": "range=gini:0.5:0.7&sort=entropy",
    "errors only": "error=true",
    "one class sorted, page 100": "true=3&sort=-gini&offset=2376",
}


def _digits_png(size: int = 16) -> list[bytes]:
    import io

    from PIL import Image
    from sklearn.datasets import load_digits

    out = []
    for img in load_digits().images[:10]:
        buffer = io.BytesIO()
        Image.fromarray((img * 255 / 16).astype(np.uint8)).resize((size, size)).convert("RGB").save(buffer, "PNG")
        out.append(buffer.getvalue())
    return out


def _templates(rng, count: int, rows: int, metadata: dict) -> list[pa.Table]:
    """``count`` part tables without ids: random sparse maps, statistics, classes and 0.1 % error rows."""
    from worker.data import schema
    from worker.data.stats import STAT_COLUMNS

    out = []
    for _ in range(count):
        labels = rng.integers(0, 10, rows)
        valid = rng.random(rows) >= 0.001
        maps = (rng.random((rows, 16, 16)) * (rng.random((rows, 16, 16)) < 0.3)).astype(np.float16)
        predicted = np.where(rng.random(rows) < 0.9, labels, rng.integers(0, 10, rows))
        columns = {"label": pa.array(labels),
                   "predicted_class": pa.array(predicted.astype(np.int32), mask=~valid),
                   "predicted_prob": pa.array(rng.random(rows).astype(np.float32), mask=~valid),
                   "target_class": pa.array(predicted.astype(np.int32), mask=~valid),
                   "target_score": pa.array((rng.random(rows) * 20).astype(np.float32), mask=~valid),
                   "map": schema.map_column(maps[valid], valid, (16, 16), "float16"),
                   "map_scale": pa.array(rng.random(rows).astype(np.float32), mask=~valid),
                   "error": pa.array([None if v else "decode: not a decodable image (12 bytes)" for v in valid])}
        columns.update({name: pa.array(rng.random(rows).astype(np.float32), mask=~valid) for name in STAT_COLUMNS})
        table = pa.table(columns)
        out.append(table.replace_schema_metadata(schema.with_metadata(table.schema, metadata).metadata))
    return out


def regroup(source: str, root: str, row_group_rows: int) -> str:
    """A copy of the output ``source`` (same input) with its part files in row groups of ``row_group_rows``."""
    out = os.path.join(root, "maps")
    os.makedirs(out)
    for name in sorted(os.listdir(source)):
        table = pq.read_table(os.path.join(source, name))
        pq.write_table(table, os.path.join(out, name), compression="zstd", row_group_size=row_group_rows or None)
    return out


def write_run(root: str, rows: int, part_rows: int = PART_ROWS, seed: int = 0, row_group_rows: int = 0) -> str:
    """An input and a job's output of ``rows`` rows under ``root``; the output's directory. The output's parts
    cycle through 16 random part tables (the ids are each row's own), so that ten million rows are written in
    minutes."""
    from worker.job.config import JobConfig

    rng = np.random.default_rng(seed)
    data, out = os.path.join(root, "data"), os.path.join(root, "maps")
    os.makedirs(data), os.makedirs(out)
    names = [f"digit {i}" for i in range(10)]
    config = JobConfig(model="model.keras", input=data, output=out, label_column="label",
                       extra_metadata={"class_names": names})
    metadata = {"config": config.to_dict(), "class_names": names, "method": "guided_backprop",
                "model": {"num_classes": 10, "input_size": [16, 16]}}
    templates = _templates(rng, 16, part_rows, metadata)
    labels = np.empty(rows, np.int64)
    for number, start in enumerate(range(0, rows, part_rows)):
        n = min(part_rows, rows - start)
        table = templates[number % len(templates)].slice(0, n)
        labels[start:start + n] = table["label"].to_numpy()
        ids = pa.array([f"part-{(start + i) // INPUT_ROWS:04d}.parquet#{(start + i) % INPUT_ROWS}" for i in range(n)])
        pq.write_table(table.add_column(0, "id", ids), os.path.join(out, f"part-{number:08x}.parquet"),
                       row_group_size=row_group_rows or None)
    pngs = _digits_png()
    for start in range(0, rows, INPUT_ROWS):
        n = min(INPUT_ROWS, rows - start)
        cells = pa.array([pngs[v] for v in labels[start:start + n]], pa.binary())
        pq.write_table(pa.table({"image": cells, "label": labels[start:start + n]}),
                       os.path.join(data, f"part-{start // INPUT_ROWS:04d}.parquet"), row_group_size=8192)
    return out


class Server:
    """``python -m jobs.view OUTPUT --port 0`` in its own process."""

    def __init__(self, output: str):
        self.process = subprocess.Popen([sys.executable, "-m", "jobs.view", output, "--port", "0"],
                                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        line = self.process.stdout.readline()
        self.url = re.search(r"http://[\d.]+:\d+/", line).group(0)

    def get(self, path: str) -> bytes:
        try:
            with urllib.request.urlopen(self.url + path, timeout=600) as response:
                return response.read()
        except urllib.error.HTTPError as exc:
            raise RuntimeError(f"{path}: {exc.code} {exc.read().decode()}") from None

    def peak_mb(self) -> float:
        with open(f"/proc/{self.process.pid}/status") as handle:
            return int(re.search(r"VmHWM:\s+(\d+)", handle.read()).group(1)) / 1024

    def close(self):
        self.process.terminate()
        self.process.wait(timeout=30)


def first_screen(server: Server, query: str) -> dict:
    """Seconds from asking for the slice to the page's last picture; the slice's own seconds."""
    started = time.perf_counter()
    page = json.loads(server.get(f"api/slice?{query}&limit=24" if query else "api/slice?limit=24"))
    listed = time.perf_counter() - started
    pictures = [f"api/picture?part={r['part']}&id={urllib.parse.quote(r['id'])}&kind={kind}"
                for r in page["rows"] if not r["error"] for kind in ("image", "map", "overlay")]
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        sizes = list(pool.map(lambda p: len(server.get(p)), pictures))
    assert all(sizes), "a picture came back empty"
    return {"first_screen": time.perf_counter() - started, "slice": listed, "rows": page["total"],
            "pictures": len(pictures)}


def measure(output: str, rounds: int) -> dict:
    found: dict = {name: {"cold": [], "warm": [], "slice_cold": [], "slice_warm": []} for name in SLICES}
    opening, peaks, matches = [], [], {}
    for _ in range(rounds):
        started = time.perf_counter()
        server = Server(output)
        json.loads(server.get("api/run"))
        opening.append(time.perf_counter() - started)
        try:
            for name, query in SLICES.items():
                cold = first_screen(server, query)
                warm = first_screen(server, query)
                found[name]["cold"].append(cold["first_screen"])
                found[name]["warm"].append(warm["first_screen"])
                found[name]["slice_cold"].append(cold["slice"])
                found[name]["slice_warm"].append(warm["slice"])
                matches[name] = cold["rows"]
            peaks.append(server.peak_mb())
        finally:
            server.close()
    return {"open": opening, "slices": found, "matches": matches, "peak_mb": peaks}


def _fmt(values) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}–{max(values):.2f})"


def _layout(rows: int, part_rows: int, row_group_rows: int) -> str:
    whole = not row_group_rows or row_group_rows >= part_rows  # one row group per part file
    return f"{rows}-{part_rows}" if whole else f"{rows}-{part_rows}-rg{row_group_rows}"


def _output(base: str, rows: int, part_rows: int, row_group_rows: int) -> tuple[str, float]:
    """The output of one layout under ``base``: kept from an earlier run, regrouped from another layout's, or
    written; and the seconds that took."""
    started = time.perf_counter()
    root = os.path.join(base, _layout(rows, part_rows, row_group_rows))
    if os.path.isdir(os.path.join(root, "maps")):  # a --workdir kept from an earlier run: measured again
        return os.path.join(root, "maps"), 0.0
    others = [os.path.join(base, d, "maps") for d in sorted(os.listdir(base))
              if d.startswith(f"{rows}-{part_rows}") and os.path.isdir(os.path.join(base, d, "maps"))]
    output = regroup(others[0], root, row_group_rows) if others else write_run(root, rows, part_rows,
                                                                                row_group_rows=row_group_rows)
    return output, time.perf_counter() - started


def _merge(into: dict, more: dict) -> dict:
    if not into:
        return more
    for name, s in more["slices"].items():
        for key, values in s.items():
            into["slices"][name][key] += values
    into["open"] += more["open"]
    into["peak_mb"] += more["peak_mb"]
    return into


def main() -> None:
    from worker.data.sink import ROW_GROUP_ROWS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--part-rows", type=int, default=PART_ROWS, help="rows per output part file (the job's "
                   "--rows-per-file; default 1024, the job's default)")
    p.add_argument("--row-group-rows", type=int, nargs="+", default=[ROW_GROUP_ROWS],
                   help="rows per row group of the part files, each measured (0: one row group per part file)")
    p.add_argument("--workdir", help="where the runs are written and kept, to be measured again by the same "
                   "command (default: a temporary directory, removed)")
    args = p.parse_args()
    base = args.workdir or tempfile.mkdtemp(prefix="explore-")
    results = {"machine": machine(), "revision": git_revision(), "date": datetime.date.today().isoformat(),
               "command": "python -m benchmarks.explore " + " ".join(sys.argv[1:]), "part_rows": args.part_rows,
               "sizes": {}}
    try:
        for rows in args.sizes:
            layouts = {}
            for group_rows in args.row_group_rows:
                output, written = _output(base, rows, args.part_rows, group_rows)
                layouts[group_rows] = {"output": output, "written_s": written, "parts": len(os.listdir(output)),
                                       "load_before": os.getloadavg()[0]}
            measured: dict = {g: {} for g in layouts}
            for _ in range(args.rounds):  # the layouts' rounds interleaved
                for group_rows, layout in layouts.items():
                    measured[group_rows] = _merge(measured[group_rows], measure(layout["output"], 1))
            for group_rows, layout in layouts.items():
                key = str(rows) if len(layouts) == 1 else f"{rows} rg{group_rows}"
                results["sizes"][key] = {**measured[group_rows], "row_group_rows": group_rows, "rows": rows,
                                         **{k: v for k, v in layout.items() if k != "output"},
                                         "load_after": os.getloadavg()[0]}
            if not args.workdir:
                for layout in layouts.values():
                    shutil.rmtree(os.path.dirname(layout["output"]))
    finally:
        if not args.workdir:
            shutil.rmtree(base, ignore_errors=True)
    lines = [f"# The explorer at scale ({results['date']})", "", *provenance(results),
             "A slice's time to first screen: the slice (24 rows) and its 72 pictures, seconds, median (min–max) over "
             f"{args.rounds} rounds, each a fresh server process. Cold: the slice's first ask in that process; warm: "
             f"the same ask again. The part files hold {args.part_rows:,} rows each (the job's --rows-per-file).", ""]
    for r in results["sizes"].values():
        groups = (f"row groups of {r['row_group_rows']:,} rows" if 0 < r["row_group_rows"] < args.part_rows
                  else "one row group per part file")
        lines += [f"## {r['rows']:,} rows ({r['parts']:,} part files, {groups})", "",
                  f"Server start to its first answer: {_fmt(r['open'])} s; the server's peak resident memory "
                  f"{_fmt(r['peak_mb'])} MB; load average {r['load_before']:.1f} before, {r['load_after']:.1f} after.",
                  "", "| slice | rows matching | first screen, cold | first screen, warm | slice alone, cold | "
                  "slice alone, warm |", "|---|---|---|---|---|---|"]
        for name, s in r["slices"].items():
            lines.append(f"| {name} | {r['matches'][name]:,} | {_fmt(s['cold'])} | {_fmt(s['warm'])} | "
                         f"{_fmt(s['slice_cold'])} | {_fmt(s['slice_warm'])} |")
        lines.append("")
    write(results, "explore" if args.part_rows == PART_ROWS else f"explore_parts_{args.part_rows}",
          "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
