"""Audit a job's output: ``python -m jobs.audit --input maps/ --report audit/``.

Writes ``audit/report.html`` (self-contained) and ``audit/audit.json``.
"""

import sys

from worker.cli import main

if __name__ == "__main__":
    sys.exit(main(["audit", *sys.argv[1:]]))
