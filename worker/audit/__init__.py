"""The audit of a job's output: aggregates, clusters, findings, controls and the report.  Reads what the job
wrote (its run record included); the job knows nothing of it.

    >>> from worker.audit import AuditResult, run_audit
    >>> callable(run_audit), AuditResult.__name__
    (True, 'AuditResult')
"""

import importlib

_EXPORTS = {"run_audit": "worker.audit.run", "AuditResult": "worker.audit.result"}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'worker.audit' has no attribute {name!r}")
