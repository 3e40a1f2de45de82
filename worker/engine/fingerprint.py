"""Content hashes of model artifacts (a file or a directory), without importing TensorFlow."""

from __future__ import annotations

import hashlib
from pathlib import Path


def hash_path(path) -> str:
    """sha256 over the bytes of a file, or of every file under a directory (with relative names)."""
    root = Path(path)
    digest = hashlib.sha256()
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    for file in files:
        if file != root:
            digest.update(str(file.relative_to(root)).encode())
        with open(file, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return "sha256:" + digest.hexdigest()
