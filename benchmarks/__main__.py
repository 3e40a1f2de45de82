"""Every benchmark with one command: ``python -m benchmarks`` (about an hour and a half on 2 cores).

Runs the engine comparison (ResNet50, MobileNetV2, the small CNN (tests.models.small_cnn)), the Python API's time to first map,
each method's cost, the engine's CPU defaults against their alternatives, a profile of where the engine's time
goes, the job against the simplest loop, the job's memory as rows grow 100x, decode throughput (full vs JPEG
draft), XLA's persistent cache across restarts, the audit, a 1 million-row rehearsal with a kill and
resume, and what every keras.applications family does under every method; each writes
benchmarks/results/<name>.{json,md}, and results/README.md gathers the tables.
On a machine with a GPU, ``python -m benchmarks.gpu`` adds the GPU table.
"""

import glob
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
NAMES = ("engine", "first_map", "methods", "choices", "profile", "loop_vs_job", "job_memory", "decode", "xla_cache",
         "audit", "scale", "applications")


def main() -> int:
    for name in NAMES:
        code = subprocess.call([sys.executable, "-m", f"benchmarks.{name}"], cwd=os.path.dirname(HERE))
        if code:
            return code
    gather()
    return 0


def gather() -> None:
    """results/README.md: every table, in the order they run (gpu last, where it exists)."""
    parts = []
    for name in (*NAMES, "gpu"):  # each table, then its runs at other settings (``--name NAME_...``)
        for path in [os.path.join(HERE, "results", f"{name}.md"),
                     *sorted(glob.glob(os.path.join(HERE, "results", f"{name}_*.md")))]:
            if os.path.exists(path):
                with open(path) as f:
                    parts.append(f.read())
    with open(os.path.join(HERE, "results", "README.md"), "w") as f:
        f.write("# Benchmark results\n\nMade by `python -m benchmarks`; each table names its date, machine and "
                "command.\n\n" + "\n".join(parts))


if __name__ == "__main__":
    sys.exit(main())
