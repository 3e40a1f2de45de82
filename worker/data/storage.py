"""Where files live: a pyarrow filesystem for any path or URI, and a local copy of a remote model.

Local paths, ``s3://`` and ``gs://`` (an S3-compatible endpoint comes from ``AWS_ENDPOINT_URL`` or
``?endpoint_override=`` in the URI). An S3 filesystem gets the retry policy's client settings
(:mod:`worker.data.retry`: attempts per request, connect and request timeouts).

Examples:
    >>> fs, path = filesystem("maps/")
    >>> type(fs).__name__, path.endswith("/maps")
    ('LocalFileSystem', True)
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import tempfile

import pyarrow.fs as pafs

from worker.data import retry


class InputError(ValueError):
    """The input dataset cannot be read as asked: raised before any cluster time is spent."""


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a local path or URI."""
    if "://" not in uri:
        return pafs.LocalFileSystem(), posixpath.abspath(uri) if not uri.startswith("/") else uri
    try:
        fs, path = pafs.FileSystem.from_uri(uri)
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"cannot open {uri}: {exc}") from exc
    if isinstance(fs, pafs.S3FileSystem):  # the URI's own options, with the policy's timeouts and attempts
        options = fs.__reduce__()[1][0]
        options.update(connect_timeout=retry.S3_CONNECT_TIMEOUT_S, request_timeout=retry.S3_REQUEST_TIMEOUT_S,
                       retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=retry.S3_ATTEMPTS))
        fs = pafs.S3FileSystem._reconstruct(options)
    return fs, path


def fetch_model(uri: str) -> str:
    """A local path for ``uri``; a model on s3:// or gs:// is copied to a temporary directory once."""
    if "://" not in uri:
        return uri
    local = os.path.join(tempfile.gettempdir(), "guided-saliency-models",
                         hashlib.sha1(uri.encode()).hexdigest()[:16], posixpath.basename(uri.rstrip("/")))
    if not os.path.exists(local):
        fs, path = filesystem(uri)
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"model {uri} does not exist")
        staging = local + f".{os.getpid()}.part"
        os.makedirs(os.path.dirname(staging), exist_ok=True)
        pafs.copy_files(path, staging, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        os.replace(staging, local)
    return local
