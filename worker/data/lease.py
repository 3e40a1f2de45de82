"""One run at a time per output: a lease file, claimed by write-then-verify and kept fresh by a heartbeat.

A run claims ``<dir>/_lease.json`` (owner token, host, pid, heartbeat time).  Another run that finds a live
lease is refused with :class:`OutputBusyError`; a lease whose heartbeat is older than ``stale_s``, or whose
holder is a dead process on this host (a killed driver), is taken over.  Claiming writes the lease, waits
``settle_s`` (far longer than the gap between any claimant's check and its write) and reads it back: of two
runs that claim at once only the last writer goes on.  That works on object stores too, which are strongly
consistent but have no create-if-absent in pyarrow's filesystems.

Examples:
    >>> import tempfile, pyarrow.fs as pafs
    >>> root = tempfile.mkdtemp()
    >>> with Lease(pafs.LocalFileSystem(), root, settle_s=0):
    ...     Lease(pafs.LocalFileSystem(), root, settle_s=0).acquire()  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    worker.data.lease.OutputBusyError: ...
"""

from __future__ import annotations

import json
import os
import posixpath
import socket
import threading
import time
import uuid

import pyarrow.fs as pafs

LEASE_FILE = "_lease.json"


class OutputBusyError(RuntimeError):
    """Another live run holds this output."""


_HELD: set[str] = set()  # the owner tokens of the leases this process holds now


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Lease:
    def __init__(self, fs: pafs.FileSystem, root: str, *, stale_s: float = 120, heartbeat_s: float = 20,
                 settle_s: float | None = None):
        self.fs, self.root = fs, root
        self.path = posixpath.join(root, LEASE_FILE)
        if settle_s is None:  # a local check-to-write gap is microseconds; an object store's, a round trip
            settle_s = 0.2 if isinstance(fs, pafs.LocalFileSystem) else 2.0
        self.stale_s, self.heartbeat_s, self.settle_s = stale_s, heartbeat_s, settle_s
        self.owner = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self) -> dict | None:
        """The lease as stored; None if there is none or it is not readable JSON. A storage error is raised
        (a throttled read-back is not someone else's lease): the caller retries (:mod:`worker.data.retry`)."""
        try:
            with self.fs.open_input_stream(self.path) as handle:
                return json.loads(handle.read())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def _write(self) -> None:
        record = {"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(), "heartbeat": time.time()}
        # an object store's put replaces the whole object at once; a local file written in place by two claimants
        # at once can end as one's bytes over the other's longer tail, a lease nobody can read (no winner): write
        # beside it and rename over it, which replaces it at once
        local = isinstance(self.fs, pafs.LocalFileSystem)
        path = f"{self.path}.{self.owner}.tmp" if local else self.path
        with self.fs.open_output_stream(path) as handle:
            handle.write(json.dumps(record).encode())
        if local:
            self.fs.move(path, self.path)

    def _live_holder(self) -> dict | None:
        held = self._read()
        if not held or held.get("owner") == self.owner:
            return None
        age = time.time() - float(held.get("heartbeat", 0))
        if age > self.stale_s:
            return None
        here = held.get("host") == socket.gethostname()
        if here and not _alive(int(held.get("pid", 0))):
            return None
        if here and held.get("pid") == os.getpid() and held.get("owner") not in _HELD:
            return None  # a run of this process that ended without removing it (its store was down then)
        return {**held, "age": age}

    def _busy(self, held: dict) -> OutputBusyError:
        return OutputBusyError(
            f"{self.root} is being written by another run (host {held.get('host')}, pid {held.get('pid')}, "
            f"alive {held['age']:.0f} s ago); one run at a time per output. If that run was killed on another "
            f"machine, its lease expires {self.stale_s:.0f} s after its last heartbeat")

    def acquire(self) -> "Lease":
        if self.fs.get_file_info(self.root).type == pafs.FileType.File:
            raise NotADirectoryError(f"output {self.root} is a file, not a directory")
        held = self._live_holder()
        if held:
            raise self._busy(held)
        _HELD.add(self.owner)  # from its first write on, a claim of this process is as live as another process's
        try:
            self.fs.create_dir(self.root, recursive=True)
            self._write()
            time.sleep(self.settle_s)
            held = self._read()
            if not held or held.get("owner") != self.owner:
                raise self._busy({**(held or {}), "age": 0.0})
        except BaseException:
            _HELD.discard(self.owner)
            raise
        self._thread = threading.Thread(target=self._beat, daemon=True, name="lease-heartbeat")
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self._write()
            except OSError:  # a passing storage error: the next beat tries again
                pass

    def release(self) -> None:
        """Stop the heartbeat and remove the lease. A store that fails now leaves it behind, to be taken over
        (stale, its process dead, or a later run of this process); it must not hide the run's own outcome."""
        self._stop.set()
        _HELD.discard(self.owner)
        if self._thread is not None:
            self._thread.join()
        try:
            held = self._read()
            if held and held.get("owner") == self.owner:
                self.fs.delete_file(self.path)
        except OSError:
            pass

    def __enter__(self) -> "Lease":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
