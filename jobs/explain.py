"""Explain a Parquet image dataset: ``python -m jobs.explain --model M --input I --output O``.

Submit to a cluster with ``ray job submit --working-dir . -- python -m jobs.explain ...``.
"""

from worker.cli import command

if __name__ == "__main__":
    command("explain")
