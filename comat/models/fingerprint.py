"""Content identities of models and files, for cache keys and manifests.

A model's fingerprint is the sha256 over its files' relative paths and contents, so a cache key changes
exactly when the weights or configs do. Hashing gigabytes on every run would be slow, so each file's digest
is remembered by (path, size, mtime); hub snapshots need no hashing at all, since the hub stores weight files
as blobs named by their sha256.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

from comat.core.io import atomic_write_json
from comat.core.runtime import cache_dir
from comat.models.hub import resolve_model_path

MODEL_FILE_SUFFIXES = (".safetensors", ".json", ".bin", ".txt", ".model", ".pth", ".pt")
_lock = threading.Lock()


def _digest_store() -> Path:
    return cache_dir() / "file-digests.json"


def file_sha256(path: str | os.PathLike) -> str:
    path = Path(path)
    real = path.resolve()
    if real.parent.name == "blobs" and len(real.name) == 64:  # hub blob: its name is its sha256
        return real.name
    stat = real.stat()
    key = f"{real}|{stat.st_size}|{stat.st_mtime_ns}"
    with _lock:
        store = _digest_store()
        known = json.loads(store.read_text()) if store.is_file() else {}
        if key in known:
            return known[key]
    h = hashlib.sha256()
    with real.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    digest = h.hexdigest()
    with _lock:
        known = json.loads(store.read_text()) if store.is_file() else {}
        known[key] = digest
        try:
            atomic_write_json(store, known)
        except OSError:  # a read-only cache only costs re-hashing next time
            pass
    return digest


def directory_fingerprint(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in MODEL_FILE_SUFFIXES
                       and "training" not in p.name):
        h.update(f"{path.relative_to(root).as_posix()}|{file_sha256(path)}\n".encode())
    return h.hexdigest()


def model_fingerprint(ref: str | os.PathLike) -> str:
    """sha256 over the model directory's weight and config files (``training.json`` logs excluded)."""
    return directory_fingerprint(resolve_model_path(ref))
