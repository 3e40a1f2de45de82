"""The storage retry policy, in one place: what is retried, how often, for how long, by whom.

Three layers touch a storage call; their numbers are here and nowhere else:

* **pyarrow's S3 client** (every ``s3://`` filesystem :func:`worker.data.storage.filesystem` makes):
  ``S3_ATTEMPTS`` tries per request (``AwsStandardS3RetryStrategy``: connection errors, 5xx, ``SlowDown``,
  with the AWS SDK's short backoff), a connection given up after ``S3_CONNECT_TIMEOUT_S`` and a request after
  ``S3_REQUEST_TIMEOUT_S`` without a byte (without it a store that accepts and never answers holds a write
  for ever). 3 is also pyarrow's default, which matters: pickling an ``S3FileSystem`` to a Ray worker keeps the
  timeouts but drops the retry strategy (pyarrow 26), so workers run with 3 whatever the driver asked.
* **this module's** :func:`call`, around each of the output's and the lease's storage steps (write one part
  file, claim the directory, write the summary): a transient error (:func:`is_transient`: the store refused,
  reset or timed out a connection, answered 5xx or throttled) is retried after ``BACKOFF_S`` (then the last
  step, repeated) until ``WINDOW_S`` have passed since the first failure; anything else (a full volume, a
  read-only or forbidden output, a missing or corrupt file) at once. Then it raises :class:`StorageError`,
  one line naming the step, the cause and the fix.
* **Ray Data** retries no exception of ours: ``DataContext.retried_io_errors`` applies to Ray's own file
  readers and writers, which the job does not use (its reader and sink are its own), and ``max_map_retries``
  stays 0 so a write is never retried twice over. Ray still re-runs a task whose worker process died.

So a run whose storage stops answering ends within ``WINDOW_S`` + one step's own bound (``GIVE_UP_S``) of the
first failure, with one line, and a shorter outage costs only the wait.

Examples:
    >>> call(lambda: 42, "count")
    42
    >>> try:
    ...     call(lambda: open("/nonexistent/x"), "reading x")
    ... except StorageError as exc:
    ...     print(exc)  # doctest: +ELLIPSIS
    reading x: [Errno 2] No such file or directory: ...; a file is missing or not whole: restore it, then run ...
"""

from __future__ import annotations

import errno
import logging
import re
import time

import pyarrow as pa

log = logging.getLogger(__name__)

S3_ATTEMPTS = 3
S3_CONNECT_TIMEOUT_S = 5.0
S3_REQUEST_TIMEOUT_S = 20.0
WINDOW_S = 60.0
BACKOFF_S = (1.0, 2.0, 4.0, 8.0)
# one S3 call's own worst case: each attempt's timeouts and the SDK's backoff between them (under a second)
CALL_BOUND_S = S3_ATTEMPTS * (S3_CONNECT_TIMEOUT_S + S3_REQUEST_TIMEOUT_S) + 5
GIVE_UP_S = WINDOW_S + CALL_BOUND_S

# what the AWS SDK (through Arrow's messages) and the OS say for a store that is down, overloaded or throttling
_TRANSIENT = re.compile(
    r"NETWORK_CONNECTION|SLOW_DOWN|SlowDown|SERVICE_UNAVAILABLE|INTERNAL_FAILURE|THROTTLING|REQUEST_TIMEOUT|"
    r"HTTP status 5\d\d|Timeout was reached|Could not connect|Connection (reset|refused)|Broken pipe")
_TRANSIENT_ERRNO = {errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED, errno.ETIMEDOUT, errno.EPIPE,
                    errno.EHOSTUNREACH, errno.ENETUNREACH}


class StorageError(OSError):
    """A storage step failed for good: one line naming the step, the cause and what to do."""


def is_transient(exc: BaseException) -> bool:
    """Worth another try: the store refused, reset or timed out a connection, failed (5xx) or throttled."""
    if isinstance(exc, StorageError) or not isinstance(exc, (OSError, pa.ArrowException)):
        return False
    return getattr(exc, "errno", None) in _TRANSIENT_ERRNO or bool(_TRANSIENT.search(str(exc)))


def first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def advice(exc: BaseException) -> str:
    """What the user can do about a storage error that is not worth retrying, or that outlasted the window."""
    code, text = getattr(exc, "errno", None), str(exc)
    if code == errno.ENOSPC or "No space left" in text:
        return "the output's volume is full: free space on it, then run the same command again"
    if code in (errno.EROFS, errno.EACCES, errno.EPERM) or re.search(r"Read-only|Permission denied|ACCESS_DENIED",
                                                                     text):
        return "the output is not writable: make it writable or choose another output"
    if is_transient(exc):
        return "the store did not answer: run the same command again once it does"
    if isinstance(exc, (FileNotFoundError, pa.ArrowInvalid)):
        return "a file is missing or not whole: restore it, then run the same command again"
    return "fix the cause, then run the same command again"


def call(fn, what: str, *, window_s: float = WINDOW_S, sleep=time.sleep):
    """``fn()``, retried per the policy above; a failure for good is a :class:`StorageError` (one line)."""
    first_failure, attempt = None, 0
    while True:
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001
            if isinstance(exc, StorageError):
                raise
            if not isinstance(exc, (OSError, pa.ArrowException)):
                raise
            now = time.monotonic()
            first_failure = now if first_failure is None else first_failure
            if not is_transient(exc):
                raise StorageError(f"{what}: {first_line(exc)}; {advice(exc)}") from exc
            if now - first_failure >= window_s:
                raise StorageError(f"{what}: {first_line(exc)} (retried {attempt} times over "
                                   f"{now - first_failure:.0f} s); {advice(exc)}") from exc
            delay = BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)]
            attempt += 1
            log.warning("%s: %s; retry %d in %.0f s", what, first_line(exc), attempt, delay)
            sleep(min(delay, max(0.0, first_failure + window_s - now)))
