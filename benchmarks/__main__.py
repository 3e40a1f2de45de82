"""Every benchmark with one command: ``python -m benchmarks`` (about 15 minutes on 2 cores).

Runs the engine comparison (ResNet50, MobileNetV2, the question's CNN), the end-to-end Parquet -> Parquet job
and the audit; each writes benchmarks/results/<name>.{json,md}, and results/README.md gathers the tables.
On a machine with a GPU, ``python -m benchmarks.gpu`` adds the GPU table.
"""

import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> int:
    for name in ("engine", "end_to_end", "audit"):
        code = subprocess.call([sys.executable, "-m", f"benchmarks.{name}"], cwd=os.path.dirname(HERE))
        if code:
            return code
    parts = []
    for name in ("engine", "end_to_end", "audit", "gpu"):
        path = os.path.join(HERE, "results", f"{name}.md")
        if os.path.exists(path):
            with open(path) as f:
                parts.append(f.read())
    with open(os.path.join(HERE, "results", "README.md"), "w") as f:
        f.write("# Benchmark results\n\nMade by `python -m benchmarks`; each table names its date, machine and "
                "command.\n\n" + "\n".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
