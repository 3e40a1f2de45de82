"""Audit a job's output: ``python -m jobs.audit --input maps/ --report audit/``.

Writes ``audit/report.html`` (self-contained) and ``audit/audit.json``.  The model steps (``--controls``,
``--interventions``, ``--compare-methods``) load the job's model with your own ``--allow-unsafe-deserialization``
and ``--allow-side-effects`` only, never with the opt-ins the job recorded.
"""

from worker.cli import command

if __name__ == "__main__":
    command("audit")
