"""Audit a job's output: ``python -m jobs.audit --input maps/ --report audit/``.

Writes ``audit/report.html`` (self-contained) and ``audit/audit.json``.
"""

from worker.cli import command

if __name__ == "__main__":
    command("audit")
