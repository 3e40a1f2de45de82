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
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from ray.data import Datasink

from worker.data.lease import LEASE_FILE
from worker.data.schema import with_metadata

JOB_FILE = "_job.json"
SUMMARY_FILE = "_summary.json"
TMP_DIR = "_tmp"
WORKERS_DIR = "_workers"


class OutputExistsError(RuntimeError):
    """The output directory holds another job's results."""


def committed_files(fs: pafs.FileSystem, root: str) -> list[str]:
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=False, allow_not_found=True))
    return sorted(i.path for i in infos if i.type == pafs.FileType.File and posixpath.basename(i.path).startswith("part-")
                  and i.path.endswith(".parquet"))


def read_ids(fs: pafs.FileSystem, files: list[str]) -> np.ndarray:
    """The ``id`` column of ``files``, as one fixed-width bytes array (:func:`worker.data.dataset.id_bytes`)."""
    from worker.data.dataset import id_bytes

    parts = [id_bytes(pq.read_table(path, columns=["id"], filesystem=fs)["id"]) for path in files]
    return np.concatenate(parts) if parts else np.array([], np.bytes_)


def _remove_staging(fs: pafs.FileSystem, root: str) -> None:
    if fs.get_file_info(posixpath.join(root, TMP_DIR)).type == pafs.FileType.Directory:
        fs.delete_dir(posixpath.join(root, TMP_DIR))


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
        self.result = {"rows": 0, "errors": 0, "files": []}

    def claim(self) -> tuple[np.ndarray, list[str]]:
        """Claim the directory for the owner; return the ids the same job already wrote there (resume) and
        the committed files they came from."""
        fs, root = self.fs, self.root
        info = fs.get_file_info(root)
        if info.type == pafs.FileType.File:
            raise OutputExistsError(f"output {root} is a file, not a directory")
        existing = (fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
                    if info.type != pafs.FileType.NotFound else [])
        # the lease of the run doing this (and a claimant's copy of it on its way to being renamed over it)
        existing = [i for i in existing if not posixpath.basename(i.path).startswith(LEASE_FILE)]
        job_path = posixpath.join(root, JOB_FILE)
        if existing:
            owner = None
            if fs.get_file_info(job_path).type == pafs.FileType.File:
                with fs.open_input_stream(job_path) as handle:
                    owner = json.loads(handle.read())
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
        _remove_staging(fs, root)  # left by a run that died
        with fs.open_output_stream(job_path) as handle:
            handle.write(json.dumps(self.owner, indent=2, sort_keys=True).encode())
        files = committed_files(fs, root)
        return read_ids(fs, files), files

    @property
    def min_rows_per_write(self):
        return self.rows_per_file

    def on_write_start(self, schema=None) -> None:
        self.fs.create_dir(self.root, recursive=True)
        _remove_staging(self.fs, self.root)

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
        target = posixpath.join(self.root, TMP_DIR, f"{uuid.uuid4().hex}.parquet") if self.atomic_rename else final
        if self.atomic_rename:
            self.fs.create_dir(posixpath.dirname(target), recursive=True)
        pq.write_table(table, target, filesystem=self.fs, compression="zstd")
        if self.atomic_rename:
            self.fs.move(target, final)
        return {"rows": table.num_rows, "errors": table.num_rows - table["error"].null_count, "files": [name]}

    def on_write_complete(self, write_result) -> None:
        returns = write_result.write_returns
        self.result = {
            "rows": sum(r["rows"] for r in returns),
            "errors": sum(r["errors"] for r in returns),
            "files": sorted(f for r in returns for f in r["files"]),
        }
        _remove_staging(self.fs, self.root)

    def on_write_failed(self, error: Exception) -> None:
        _remove_staging(self.fs, self.root)  # committed parts stay: a re-run resumes from them

    def finish(self, summary: dict) -> None:
        """Write the run's summary (``_summary.json``): the directory is complete for this run."""
        with self.fs.open_output_stream(posixpath.join(self.root, SUMMARY_FILE)) as handle:
            handle.write(json.dumps(summary, indent=2, sort_keys=True).encode())
