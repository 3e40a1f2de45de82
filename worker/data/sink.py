"""Output directories: committed atomically, owned by one job, resumable.

Layout of an output directory::

    _job.json           which job owns it (fingerprint, options, metadata)
    part-<hash>.parquet committed files: readers only ever see whole files
    _tmp/               files being written (local filesystems; removed on the next run)
    _summary.json       written when a run completes
    _workers/           one JSON per explain actor: host, pid, GPUs it was pinned to, threads

A part file's name is a hash of the ids it holds, so a write task that Ray
retries rewrites the same file instead of adding a duplicate.  On object stores
(S3, GCS) an object only appears when its upload completes, so files are
written in place; on local filesystems they are written to ``_tmp/`` and renamed.
Every storage step goes through :func:`worker.data.retry.call` (the retry policy);
one that fails for good is a one-line :class:`~worker.data.retry.StorageError`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from ray.data import Datasink

from worker.data import retry
from worker.data.lease import LEASE_FILE
from worker.data.schema import read_metadata, with_metadata

log = logging.getLogger(__name__)

JOB_FILE = "_job.json"
SUMMARY_FILE = "_summary.json"
TMP_DIR = "_tmp"
WORKERS_DIR = "_workers"
#: rows per row group of a part file: a reader after a few rows (the explorer's page)
#: reads their row groups, not the whole part, however many rows the job puts in one file
ROW_GROUP_ROWS = 1024


class OutputExistsError(RuntimeError):
    """The output directory holds another job's results."""


def committed_files(fs: pafs.FileSystem, root: str) -> list[str]:
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=False, allow_not_found=True))
    return sorted(i.path for i in infos if i.type == pafs.FileType.File and posixpath.basename(i.path).startswith("part-")
                  and i.path.endswith(".parquet"))


def read_ids(fs: pafs.FileSystem, files: list[str]) -> np.ndarray:
    """The ``id`` column of ``files``, as one fixed-width bytes array (:func:`worker.data.dataset.id_bytes`);
    each file read under the retry policy (a retry of all of them at once might never see every read pass)."""
    from worker.data.dataset import id_bytes

    parts = [retry.call(lambda p=path: id_bytes(pq.read_table(p, columns=["id"], filesystem=fs)["id"]),
                        f"reading the ids of {path}") for path in files]
    return np.concatenate(parts) if parts else np.array([], np.bytes_)


def _remove_staging(fs: pafs.FileSystem, root: str) -> None:
    if fs.get_file_info(posixpath.join(root, TMP_DIR)).type == pafs.FileType.Directory:
        fs.delete_dir(posixpath.join(root, TMP_DIR))


def _ours(name: str) -> bool:
    """An entry a run of ours writes; readers skip names starting with ``_`` or ``.`` (pyarrow's and Ray's
    dataset discovery), so those cannot mislead them either."""
    return name.startswith(("_", ".")) or (name.startswith("part-") and name.endswith(".parquet"))


class AtomicParquetDatasink(Datasink):
    """Ray Data sink that owns its output directory: each write task commits one whole Parquet file, named
    by its ids.

    Its life: :meth:`claim` (before the plan is built: refuse another job's output, or return what this job
    already wrote, for resume), Ray's hooks :meth:`on_write_start` (a fresh staging directory) and
    :meth:`on_write_complete` / :meth:`on_write_failed` (the run's counts; staging removed), then
    :meth:`finish` (the run's summary).

    Args:
        owner: what is written to ``_job.json``; its ``fingerprint`` says which job this is.
        metadata: stored in every part file's schema (:func:`worker.data.schema.with_metadata`).
        overwrite: delete another job's output instead of refusing it.
    """

    def __init__(self, fs: pafs.FileSystem, root: str, owner: dict, metadata: dict, rows_per_file: int = 1024,
                 overwrite: bool = False):
        self.fs, self.root, self.owner, self.metadata = fs, root, owner, metadata
        self.rows_per_file, self.overwrite = rows_per_file, overwrite
        self.atomic_rename = isinstance(fs, pafs.LocalFileSystem)
        self.where = root if self.atomic_rename else f"{fs.type_name}://{root}"
        self.result = {"rows": 0, "errors": 0, "files": []}

    def _io(self, what: str, fn):
        return retry.call(fn, f"{what} {self.where}")

    def _put(self, path: str, data: bytes) -> None:
        """A small file written whole: beside it and renamed on local filesystems (a full volume must not leave
        a truncated ``_job.json`` that stops every later run), in place on object stores (atomic there)."""
        staging = f"{path}.{uuid.uuid4().hex}.tmp" if self.atomic_rename else path
        try:
            with self.fs.open_output_stream(staging) as handle:
                handle.write(data)
            if self.atomic_rename:
                self.fs.move(staging, path)
        finally:
            if self.atomic_rename and self.fs.get_file_info(staging).type == pafs.FileType.File:
                self.fs.delete_file(staging)

    def claim(self) -> tuple[np.ndarray, list[str]]:
        """Claim the directory for the owner; return the ids the same job already wrote there (resume) and
        the committed files they came from."""
        files = self._io("claiming the output", self._claim)
        ids = [self._io(f"reading {posixpath.basename(path)} in", lambda p=path: self._part_ids(p)) for path in files]
        return (np.concatenate(ids) if ids else np.array([], np.bytes_)), files

    def _claim(self) -> list[str]:
        fs, root = self.fs, self.root
        info = fs.get_file_info(root)
        if info.type == pafs.FileType.File:
            raise OutputExistsError(f"output {root} is a file, not a directory")
        existing = (fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
                    if info.type != pafs.FileType.NotFound else [])
        # the lease of the run doing this (and a claimant's copy of it on its way to being renamed over it)
        existing = [i for i in existing if not posixpath.basename(i.path).startswith(LEASE_FILE)]
        job_path = posixpath.join(root, JOB_FILE)
        same = False
        if existing:
            owner = None
            if fs.get_file_info(job_path).type == pafs.FileType.File:
                with fs.open_input_stream(job_path) as handle:
                    text = handle.read()
                try:
                    owner = json.loads(text)
                except ValueError:
                    raise OutputExistsError(
                        f"output {self.where} has a {JOB_FILE} that is not readable JSON (truncated?), so which job "
                        "owns it is unknown: pass overwrite=True (CLI: --overwrite) to start again, or choose a "
                        "new output") from None
            same = owner is not None and owner.get("fingerprint") == self.owner["fingerprint"]
            if not same and not self.overwrite:
                what = "another job's results" if owner else "files that no job of ours wrote"
                raise OutputExistsError(
                    f"output {root} is not empty: it holds {what}. Choose a new output, or pass "
                    "overwrite=True (CLI: --overwrite) to delete it and start again")
            if not same:
                for item in existing:  # everything but the lease of the run doing this
                    (fs.delete_dir if item.type == pafs.FileType.Directory else fs.delete_file)(item.path)
        fs.create_dir(root, recursive=True)
        if self.atomic_rename:
            _remove_staging(fs, root)  # left by a run that died
        foreign = sorted(posixpath.basename(i.path) for i in existing if not _ours(posixpath.basename(i.path)))
        if same and foreign:
            raise OutputExistsError(
                f"output {self.where} holds {foreign[:3]}, which this job did not write (readers of the output would "
                "take them for part of it): move them out of the output and run the same command again")
        self._put(job_path, json.dumps(self.owner, indent=2, sort_keys=True).encode())
        return committed_files(fs, root)

    def _part_ids(self, path: str) -> np.ndarray:
        """A committed part's ids, once it is known to be a whole part file of this job."""
        from worker.data.dataset import id_bytes

        try:
            table = pq.read_table(path, columns=["id"], filesystem=self.fs)
            job = (read_metadata(table.schema) or {}).get("job", {})
            problem = None if job.get("fingerprint") == self.owner["fingerprint"] else "another job's part file"
        except (pa.ArrowInvalid, pa.ArrowKeyError, KeyError, ValueError) as exc:  # truncated, not Parquet, no id
            problem = f"not a readable part file ({retry.first_line(exc)})"
        if problem:
            raise OutputExistsError(
                f"output {self.where} holds {posixpath.basename(path)}: {problem}. Move it out of the output and run "
                "the same command again: its rows are explained again")
        return id_bytes(table["id"])

    @property
    def min_rows_per_write(self):
        return self.rows_per_file

    def on_write_start(self, schema=None) -> None:
        def start():
            self.fs.create_dir(self.root, recursive=True)
            if self.atomic_rename:
                _remove_staging(self.fs, self.root)

        self._io("preparing the output", start)

    def write(self, blocks, ctx) -> dict:
        tables = [pa.table(b) if not isinstance(b, pa.Table) else b for b in blocks]
        tables = [t for t in tables if t.num_rows]
        if not tables:
            return {"rows": 0, "errors": 0, "files": []}
        table = pa.concat_tables(tables, promote_options="permissive")
        table = table.replace_schema_metadata(with_metadata(table.schema, self.metadata).metadata)
        digest = hashlib.sha1("\n".join(table["id"].to_pylist()).encode()).hexdigest()[:20]
        name = f"part-{digest}.parquet"
        final = posixpath.join(self.root, name)

        def commit():
            target = posixpath.join(self.root, TMP_DIR, f"{uuid.uuid4().hex}.parquet") if self.atomic_rename else final
            if self.atomic_rename:
                self.fs.create_dir(posixpath.dirname(target), recursive=True)
            try:
                pq.write_table(table, target, filesystem=self.fs, compression="zstd", row_group_size=ROW_GROUP_ROWS)
            except BaseException:  # a full volume: give the half-written file's space back
                if self.atomic_rename and self.fs.get_file_info(target).type == pafs.FileType.File:
                    self.fs.delete_file(target)
                raise
            if self.atomic_rename:
                self.fs.move(target, final)

        self._io(f"writing {name} ({table.num_rows} rows) to", commit)
        return {"rows": table.num_rows, "errors": table.num_rows - table["error"].null_count, "files": [name]}

    def on_write_complete(self, write_result) -> None:
        returns = write_result.write_returns
        self.result = {
            "rows": sum(r["rows"] for r in returns),
            "errors": sum(r["errors"] for r in returns),
            "files": sorted(f for r in returns for f in r["files"]),
        }
        if self.atomic_rename:
            self._io("removing the staging directory of", lambda: _remove_staging(self.fs, self.root))

    def on_write_failed(self, error: Exception) -> None:
        """Committed parts stay (a re-run resumes from them). The staging directory goes if it can: readers
        never look in it, the next run removes it anyway, and this must not hide the write's own error."""
        if self.atomic_rename:
            try:
                _remove_staging(self.fs, self.root)
            except OSError as exc:
                log.warning("could not remove %s/%s after the failed write: %s", self.where, TMP_DIR, exc)

    def finish(self, summary: dict) -> None:
        """Write the run's summary (``_summary.json``): the directory is complete for this run."""
        data = json.dumps(summary, indent=2, sort_keys=True).encode()
        self._io("writing the summary of", lambda: self._put(posixpath.join(self.root, SUMMARY_FILE), data))
