"""A scheduled run: ``python -m jobs.scheduled --config job.yaml [--date YYYY-MM-DD]``.

Writes under ``<output_root>/date=<date>``; re-running a date adds nothing; with
``incremental: true`` only input files not yet done for this model are read.
"""

from worker.cli import command

if __name__ == "__main__":
    command("scheduled")
