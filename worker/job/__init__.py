"""The job: the run record (:mod:`~worker.job.config`), the Ray stages, actor planning, the driver and
scheduled runs.  Uses the engine and the data side; neither knows of it.

    >>> from worker.job import JobConfig, run
    >>> JobConfig(model="m.keras", input="in/", output="out/").method
    'guided_backprop'
"""

import importlib

_EXPORTS = {"JobConfig": "worker.job.config", "run": "worker.job.driver", "scheduled_run": "worker.job.schedule",
            "explain_dataset": "worker.job.frames", "Output": "worker.job.frames"}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'worker.job' has no attribute {name!r}")
