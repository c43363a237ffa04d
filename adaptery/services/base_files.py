"""Base weights an enrolled agent fetches from the platform instead of being given a local path.

A base's files are the ones a hub snapshot of it may hold (`engine.loading.HUB_ALLOW_PATTERNS`: configs, the
tokenizer, `*.safetensors` weights, never pickles or code), listed with their SHA-256 and size; the agent fetches
each over HTTPS with a presigned URL (`auth/transfers.py`) and checks it against this hash before loading it. A
base without safetensors weights is refused. Hashes are kept per file's path, size and modification time, so a
many-gigabyte base is hashed once per change, not per agent.
"""

from __future__ import annotations

import fnmatch
import hashlib
import threading
from dataclasses import dataclass
from pathlib import Path

from adaptery.db import models as m
from adaptery.db.session import Database
from adaptery.engine.loading import HUB_ALLOW_PATTERNS, ModelNotAvailable, resolve_model_path

CHUNK = 1024 * 1024


class BaseUnavailable(LookupError):
    pass


@dataclass(frozen=True)
class BaseFile:
    path: Path
    sha256: str
    bytes: int


class BaseFiles:
    def __init__(self, db: Database, *, offline: bool) -> None:
        self.db = db
        self.offline = offline
        self._hashes: dict[tuple[str, int, int], str] = {}
        self._lock = threading.Lock()

    def manifest(self, base_id: str) -> dict[str, BaseFile]:
        with self.db.system() as s:
            record = s.get(m.BaseModel, base_id)
            ref = record.ref if record is not None else None
        if ref is None:
            raise BaseUnavailable(f"the platform has no base model {base_id!r}")
        try:
            model_dir = resolve_model_path(ref, offline=self.offline)
        except ModelNotAvailable as exc:
            raise BaseUnavailable(str(exc)) from exc
        files = sorted(
            path
            for path in model_dir.iterdir()
            if path.is_file() and any(fnmatch.fnmatch(path.name, pattern) for pattern in HUB_ALLOW_PATTERNS)
        )
        if not any(path.suffix == ".safetensors" for path in files):
            raise BaseUnavailable(f"base model {base_id!r} has no safetensors weights to hand out")
        return {path.name: self._describe(path) for path in files}

    def _describe(self, path: Path) -> BaseFile:
        resolved = path.resolve()
        info = resolved.stat()
        key = (str(resolved), info.st_size, info.st_mtime_ns)
        with self._lock:
            sha = self._hashes.get(key)
        if sha is None:
            digest = hashlib.sha256()
            with resolved.open("rb") as source:
                for chunk in iter(lambda: source.read(CHUNK), b""):
                    digest.update(chunk)
            sha = digest.hexdigest()
            with self._lock:
                self._hashes[key] = sha
        return BaseFile(resolved, sha, info.st_size)
