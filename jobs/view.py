"""Explore a job's output in the browser: ``python -m jobs.view OUTPUT [--audit REPORT_DIR]``."""

from worker.cli import command

if __name__ == "__main__":
    command("view")
