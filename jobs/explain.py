"""Explain a Parquet image dataset: ``python -m jobs.explain --model M --input I --output O``.

Submit to a cluster with ``ray job submit --working-dir . -- python -m jobs.explain ...``.
"""

import sys

from worker.cli import main

if __name__ == "__main__":
    sys.exit(main(["explain", *sys.argv[1:]]))
