"""Side-by-side timing: every contender runs in the same process, rounds interleaved, medians reported."""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time


def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "system": platform.system()}


def interleaved(contenders: dict, rounds: int, items_per_call: int, calls: int = 1) -> dict:
    """{name: fn()} -> {name: {"per_second": median, "all": [...]}}; each fn processes items_per_call items."""
    samples = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            samples[name].append(items_per_call * calls / (time.perf_counter() - start))
    return {name: {"per_second": round(statistics.median(v), 2), "all": [round(x, 2) for x in v]}
            for name, v in samples.items()}


def spread(values, digits: int = 2) -> str:
    """Median (min–max) of repeated measurements, rounded to ``digits`` decimals."""
    return f"{round(statistics.median(values), digits)} ({round(min(values), digits)}–{round(max(values), digits)})"


class PeakSampler(threading.Thread):
    """The peak of each reading of ``measure() -> {name: MB}``, sampled every ``interval`` s in the background
    while the ``with`` block runs (a process's ``ru_maxrss`` would not do: its imports may set the peak)."""

    def __init__(self, measure, interval: float):
        super().__init__(daemon=True)
        self.measure, self.interval, self.stop, self.peak = measure, interval, threading.Event(), {}

    def _take(self) -> None:
        for name, value in self.measure().items():
            self.peak[name] = max(self.peak.get(name, 0.0), value)

    def run(self) -> None:
        self._take()
        while not self.stop.wait(self.interval):
            self._take()

    def __enter__(self) -> "PeakSampler":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.join()
        self._take()


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def child_json(args: list[str], env: dict | None = None) -> dict:
    """Run ``python *args`` from the repository root in a fresh process (TensorFlow's logs quiet, ``env`` over
    this process's environment) and return the JSON object its last line of output printed."""
    done = subprocess.run([sys.executable, *args], check=True, capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})})
    return json.loads(done.stdout.strip().splitlines()[-1])


def git_revision() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""


def provenance(results: dict) -> list[str]:
    """The markdown lines under a table's title: machine, revision and the command that made it."""
    m = results["machine"]
    return [f"Machine: {m['cpu']}, {m['cores']} cores. Revision {results['revision']}.",
            f"Command: `{results['command']}`", ""]


def write(results: dict, name: str, markdown: str) -> None:
    here = os.path.join(os.path.dirname(__file__), "results")
    os.makedirs(here, exist_ok=True)
    with open(os.path.join(here, f"{name}.json"), "w") as f:
        json.dump(results, f, indent=2, sort_keys=True)
    with open(os.path.join(here, f"{name}.md"), "w") as f:
        f.write(markdown)


def digits_job_input(directory: str, rows: int, size: int) -> tuple[str, str]:
    """A job's input as users have it: ``rows`` of scikit-learn's digits as PNG at ``size`` in one HF-style
    Parquet file (row groups of 128), and the small CNN (tests.models.small_cnn) (untrained: the cost is the same) saved beside it."""
    import numpy as np

    from tests.images import digits_images
    from tests.models import small_cnn
    from worker.demo import write_hf_parquet

    images, labels = digits_images(size)
    reps = int(np.ceil(rows / len(images)))
    images, labels = np.concatenate([images] * reps)[:rows], np.concatenate([labels] * reps)[:rows]
    os.makedirs(directory, exist_ok=True)
    data = os.path.join(directory, "data.parquet")
    write_hf_parquet(data, images, labels, rows_per_group=128)
    model = os.path.join(directory, "model.keras")
    small_cnn(size, classes=10).save(model)
    return data, model


def local_ray():
    """Start Ray in this process, quietly, as the job benchmarks need it."""
    import ray

    ray.init(logging_level="ERROR", include_dashboard=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    return ray
