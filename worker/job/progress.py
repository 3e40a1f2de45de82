"""Quiet, informative progress for a Ray Data pass: one line on the terminal, Ray Data's own lines in its log.

:func:`watch` shows one line (``explain: 640/900 rows (71%), 45 rows/s, ETA 6 s, 0 errors``), rewritten in
place on a terminal and printed every ``PLAIN_EVERY_S`` seconds elsewhere (a CI log), from the counts of one
operator of the dataset being executed (Ray Data's progress hook, which otherwise draws its own bars or, off a
terminal, logs every operator every few seconds). Ray Data's console handler is raised to ERROR, so its
INFO/WARNING lines go only to its log file (``<session>/logs/ray-data/ray-data.log``), and an embedded Ray's
workers' output only to theirs (:func:`quiet_workers`); ``--verbose`` (or ``GUIDED_SALIENCY_VERBOSE=1``) keeps
all of them as Ray has them.

Examples:
    >>> line = Progress("explain", 900, stream=None)._line(450, 3, 9.0)
    >>> line
    'explain: 450/900 rows (50%), 50.0 rows/s, ETA 9 s, 3 errors'
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time

VERBOSE_ENV = "GUIDED_SALIENCY_VERBOSE"
PLAIN_EVERY_S = 15.0  # off a terminal, a progress line this often
ERRORS_EVERY_S = 2.0  # the errors callable is polled this often (it may read files)

_active: dict = {}  # the watched operator's Progress, while a watch() is open


def verbose() -> bool:
    """Whether Ray Data's own progress and log lines should reach the console."""
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def quiet_workers() -> None:
    """Unless :func:`verbose`: the worker processes' output (TensorFlow's start-up lines from each explain actor)
    stays in the session's log files (``<session>/logs/worker-*``) rather than being copied to this console. Only
    for a Ray this process will start (no RAY_ADDRESS, Ray not imported yet: the setting is read at import), so a
    driver on a cluster keeps its workers' lines in its job logs; a failing task still raises here."""
    if not verbose() and not os.environ.get("RAY_ADDRESS") and "ray" not in sys.modules:
        os.environ.setdefault("RAY_LOG_TO_DRIVER", "0")


def quiet_tensorflow() -> None:
    """Unless :func:`verbose`: import TensorFlow and Keras, and let TensorFlow find its devices, with this
    process's stderr set aside, so that the C++ start-up lines they print before any log setting reaches them
    (oneDNN, CUDA drivers, cuInit) stay off the console; if the import fails, they are written back first."""
    if verbose() or "tensorflow" in sys.modules:
        return
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as aside:
        os.dup2(aside.fileno(), 2)
        try:
            import keras  # noqa: F401
            import tensorflow as tf

            tf.config.list_physical_devices()
        except BaseException:
            os.dup2(saved, 2)
            aside.seek(0)
            sys.stderr.buffer.write(aside.read())
            sys.stderr.flush()
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


class Progress:
    """One progress line for ``total`` units of work, written to ``stream`` by a daemon thread; ``errors``
    (optional) is a callable returning the errors so far."""

    def __init__(self, what: str, total: int, unit: str = "rows", errors=None, stream=sys.stderr):
        self.what, self.total, self.unit, self.errors = what, total, unit, errors
        self.stream = stream
        self.done, self.failed = 0, 0
        self.started = time.perf_counter()
        self.tty = bool(stream is not None and getattr(stream, "isatty", lambda: False)())
        self._stop = threading.Event()
        self._thread = None

    def _line(self, done: int, failed: int | None, elapsed: float) -> str:
        rate = done / elapsed if elapsed > 0 else 0.0
        share = f" ({done / self.total:.0%})" if self.total else ""
        eta = f", ETA {(self.total - done) / rate:.0f} s" if rate > 0 and self.total and done < self.total else ""
        errors = "" if failed is None else f", {failed} error{'s' * (failed != 1)}"
        return f"{self.what}: {done}/{self.total} {self.unit}{share}, {rate:.1f} {self.unit}/s{eta}{errors}"

    def _poll_errors(self) -> None:
        if self.errors is not None:
            try:
                self.failed = self.errors()
            except Exception:  # noqa: BLE001 - progress only: a failed count leaves the last one
                pass

    def _write(self, final: bool = False) -> None:
        if self.stream is None:
            return
        line = self._line(self.done, None if self.errors is None else self.failed, time.perf_counter() - self.started)
        if self.tty:
            self.stream.write("\r\x1b[K" + line + ("\n" if final else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def _run(self) -> None:
        last_errors = last_plain = time.perf_counter()
        while not self._stop.wait(0.5):
            now = time.perf_counter()
            if now - last_errors >= ERRORS_EVERY_S:
                self._poll_errors()
                last_errors = now
            if self.tty or now - last_plain >= PLAIN_EVERY_S:
                self._write()
                last_plain = now

    def __enter__(self):
        self._thread = threading.Thread(target=self._run, name="progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._poll_errors()
        if exc[0] is None:
            self.done = max(self.done, self.total)
        self._write(final=True)
        if self.tty and exc[0] is not None:
            self.stream.write("\n")


def _quiet_ray_data() -> None:
    """Ray Data's console handler to ERROR (its file handler keeps every line), and its progress hook to
    :func:`watch`'s operator; once per process."""
    import ray.data  # noqa: F401 - configures Ray Data's logging
    from ray.data._internal.execution import streaming_executor
    from ray.data._internal.progress.base_progress import NoopExecutionProgressManager

    for handler in logging.getLogger("ray.data").handlers:
        if not type(handler).__name__.startswith("SessionFile"):
            handler.setLevel(logging.ERROR)
    if getattr(streaming_executor, "_guided_saliency_hook", False):
        return
    original = streaming_executor.get_progress_manager

    class Watched(NoopExecutionProgressManager):
        def update_operator_progress(self, opstate, resource_manager) -> None:
            watched = _active.get("progress")
            if watched is not None and _active["operator"] in opstate.op.name:
                metrics = opstate.op.metrics
                rows = watched.unit == "rows"
                watched.done = metrics.row_outputs_taken if rows else metrics.num_task_inputs_processed

    def get_progress_manager(ctx, dataset_id, topology, verbose_progress):
        if "progress" not in _active:
            return original(ctx, dataset_id, topology, verbose_progress)
        return Watched(dataset_id, topology, False, verbose_progress)

    streaming_executor.get_progress_manager = get_progress_manager
    streaming_executor._guided_saliency_hook = True


class watch:
    """``with watch("explain", total, "ExplainBatch"):`` -- one progress line while the Ray Data passes inside
    run, counting the rows out of the operator whose name holds ``operator`` (``unit="files"``: the inputs it
    has processed); with :func:`verbose`, Ray Data's own display instead and no line of ours."""

    def __init__(self, what: str, total: int, operator: str, unit: str = "rows", errors=None, stream=sys.stderr):
        self.progress = None if verbose() else Progress(what, total, unit, errors, stream)
        self.operator = operator

    def __enter__(self):
        if self.progress is None:
            return None
        _quiet_ray_data()
        _active.update(progress=self.progress, operator=self.operator)
        return self.progress.__enter__()

    def __exit__(self, *exc):
        if self.progress is not None:
            _active.clear()
            self.progress.__exit__(*exc)
