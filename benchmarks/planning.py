"""What planning an image-folder input costs: listing the tree, inferring the classes, cutting the units of work.

    python -m benchmarks.planning [--files 1000000] [--classes 1000] [--s3-files 100000] [--rounds 3]

Builds a folder of ``--files`` files in ``--classes`` class subfolders (ImageNet's layout) on local disk, each a
hard link to one real PNG per class (scikit-image's astronaut at 64x64: listing reads no pixels, and a million
links cost directory entries, not gigabytes), and times :func:`worker.data.dataset.plan_input` on it
(``--rounds`` times, the first with a cold Python, none with a cold page cache), its peak memory, and the
from_items of its units into Ray Data (what the job does next: in its blocks, and in one block per unit). Then the
same listing of ``--s3-files`` objects on a loopback S3 server (moto). The folder and the server are removed
afterwards. Writes benchmarks/results/planning.{json,md}.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import shutil
import sys
import tempfile
import time

from benchmarks.common import PeakSampler, git_revision, machine, provenance, spread, write


def cpu_flags() -> str:
    """Whether the CPU has AVX2 and AVX-512, as /proc/cpuinfo says."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return "unknown"
    return f"{'AVX2' if 'avx2' in flags else 'no AVX2'}, {'AVX-512' if 'avx512f' in flags else 'no AVX-512'}"


def _rss_mb() -> dict:
    with open("/proc/self/statm") as f:
        return {"rss": int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20}


def build_tree(root: str, files: int, classes: int) -> float:
    """``files`` hard links to one PNG in ``classes`` folders; seconds it took."""
    from PIL import Image
    from skimage import data

    started = time.perf_counter()
    os.makedirs(root, exist_ok=True)
    source = os.path.join(root, "source.png")
    Image.fromarray(data.astronaut()).resize((64, 64)).save(source)
    tree = os.path.join(root, "photos")
    per_class = -(-files // classes)
    made = 0
    with open(source, "rb") as f:
        png = f.read()
    for c in range(classes):
        folder = os.path.join(tree, f"n{c:08d}")
        os.makedirs(folder)
        first = os.path.join(folder, f"n{c:08d}_0.png")
        with open(first, "wb") as f:  # one inode per class: a file system caps the links to one (ext4: 65000)
            f.write(png)
        for i in range(1, min(per_class, files - made)):
            os.link(first, os.path.join(folder, f"n{c:08d}_{i}.png"))
        made += min(per_class, files - made)
    return time.perf_counter() - started


def time_plan(uri: str, rounds: int) -> dict:
    from worker.data.dataset import plan_input

    seconds, peaks = [], []
    for _ in range(rounds):
        before = _rss_mb()["rss"]
        with PeakSampler(_rss_mb, 0.05) as sampler:
            started = time.perf_counter()
            source = plan_input(uri, ["image", "label"])
            seconds.append(time.perf_counter() - started)
        peaks.append(sampler.peak["rss"] - before)
        rows, units, classes = source.rows, len(source.units), len(source.class_names)
        del source
    return {"seconds": [round(s, 2) for s in seconds], "peak_mb": [round(p) for p in peaks], "rows": rows,
            "units": units, "classes": classes}


def time_from_items(uri: str, rounds: int) -> dict:
    """The job's next step: the units into a Ray Data dataset (``ray.data.from_items``), materialised, in the job's
    blocks (at most :data:`~worker.job.driver.MAX_UNIT_BLOCKS`) and in one block per unit, rounds interleaved."""
    import ray

    from worker.data.dataset import plan_input
    from worker.job.driver import MAX_UNIT_BLOCKS

    source = plan_input(uri, ["image", "label"])
    items = [dataclasses.asdict(u) for u in source.units]
    ways = {"job": min(len(items), MAX_UNIT_BLOCKS), "one per unit": len(items)}
    found: dict = {way: {"blocks": blocks, "seconds": [], "object_store_mb": []} for way, blocks in ways.items()}
    ray.init(logging_level="ERROR", include_dashboard=False, num_cpus=2)
    try:
        for _ in range(rounds):
            for way, blocks in ways.items():
                started = time.perf_counter()
                ds = ray.data.from_items(items, override_num_blocks=blocks).materialize()
                found[way]["seconds"].append(round(time.perf_counter() - started, 2))
                found[way]["object_store_mb"].append(round(ds.size_bytes() / 2**20, 1))
                del ds
    finally:
        ray.shutdown()
    return found


def s3_listing(root: str, files: int, classes: int, rounds: int) -> dict:
    import pyarrow.fs as pafs

    from tests.conftest import moto_server, s3_environment

    with moto_server() as port, s3_environment(f"http://127.0.0.1:{port}"):
        import boto3

        boto3.client("s3").create_bucket(Bucket="photos")
        tree = os.path.join(root, "s3tree")
        build_tree(tree, files, classes)
        s3 = pafs.FileSystem.from_uri("s3://photos")[0]
        started = time.perf_counter()
        pafs.copy_files(os.path.join(tree, "photos"), "photos/train", destination_filesystem=s3, use_threads=True)
        upload = time.perf_counter() - started
        result = time_plan("s3://photos/train/", rounds)
    result["upload_seconds"] = round(upload, 1)
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--files", type=int, default=1_000_000)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--s3-files", type=int, default=100_000)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    root = tempfile.mkdtemp(prefix="planning-")
    try:
        build = build_tree(root, args.files, args.classes)
        print(f"built {args.files} files in {build:.0f} s", flush=True)
        uri = os.path.join(root, "photos")
        local = time_plan(uri, args.rounds)
        print("local", local, flush=True)
        ray_items = time_from_items(uri, args.rounds)
        print("from_items", ray_items, flush=True)
        shutil.rmtree(os.path.join(root, "photos"))
        s3 = s3_listing(root, args.s3_files, max(1, args.classes // 10), args.rounds) if args.s3_files else None
        print("s3", s3, flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    load = [round(x, 1) for x in os.getloadavg()]
    results = {"date": datetime.date.today().isoformat(), "machine": {**machine(), "cpu_flags": cpu_flags()},
               "load_average_at_end": load,
               "revision": git_revision(),
               "command": "python -m benchmarks.planning " + " ".join(sys.argv[1:] if argv is None else argv),
               "files": args.files, "classes": args.classes, "local": local, "from_items": ray_items,
               "s3_files": args.s3_files, "s3": s3}
    lines = [
        f"# Planning an image folder ({results['date']})", "",
        *provenance(results)[:-1], f"CPU: {results['machine']['cpu_flags']}. Load average at the end (1, 5, 15 "
        f"min): {', '.join(map(str, load))}: the host was shared.", "",
        "`worker.data.dataset.plan_input` on an image folder: list every file, take the class subfolders, cut the "
        f"units of work (median and range over {args.rounds} rounds; peak memory above the process's before).", "",
        "| where | files | classes | units | seconds | peak memory (MB) |", "|---|---|---|---|---|---|",
        f"| local disk | {local['rows']} | {local['classes']} | {local['units']} | {spread(local['seconds'])} | "
        f"{spread(local['peak_mb'], 0)} |"]
    if s3:
        lines.append(f"| loopback S3 (moto) | {s3['rows']} | {s3['classes']} | {s3['units']} | "
                     f"{spread(s3['seconds'])} | {spread(s3['peak_mb'], 0)} |")
    lines += ["", f"Then the job hands the {local['units']} units to Ray Data (`ray.data.from_items`, materialised; "
              "rounds interleaved):", "", "| blocks | seconds | object store (MB) |", "|---|---|---|"]
    lines += [f"| {r['blocks']} ({way}) | {spread(r['seconds'])} | {spread(r['object_store_mb'], 1)} |"
              for way, r in ray_items.items()]
    lines.append("")
    write(results, "planning", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
