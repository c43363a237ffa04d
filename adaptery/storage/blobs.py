"""Content-addressed blob store on the local disk.

A blob's key is the SHA-256 of its bytes. Writes stream to a temporary file in the store and are
renamed into place only when complete, so an interrupted upload never leaves a visible blob.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import AsyncIterable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

CHUNK = 1024 * 1024


class BlobTooLarge(ValueError):
    def __init__(self, limit: int) -> None:
        super().__init__(f"file is larger than the limit of {limit} bytes")
        self.limit = limit


@dataclass(frozen=True)
class StoredBlob:
    sha256: str
    size: int


class BlobWriter:
    """A file-like sink that hashes what it is given; the blob exists only once it is closed cleanly."""

    def __init__(self, handle: BinaryIO, max_bytes: int | None) -> None:
        self._handle = handle
        self._digest = hashlib.sha256()
        self._max_bytes = max_bytes
        self.size = 0
        self.blob: StoredBlob | None = None

    def write(self, data: bytes) -> int:
        self.size += len(data)
        if self._max_bytes is not None and self.size > self._max_bytes:
            raise BlobTooLarge(self._max_bytes)
        self._digest.update(data)
        self._handle.write(data)
        return len(data)

    @property
    def sha256(self) -> str:
        return self._digest.hexdigest()


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self._tmp = root / "tmp"
        self._tmp.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise ValueError(f"not a sha256 blob key: {sha256!r}")
        return self.root / "sha256" / sha256[:2] / sha256

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).exists()

    @contextmanager
    def writer(self, max_bytes: int | None = None) -> Iterator[BlobWriter]:
        """Write a blob piece by piece; after the block, `writer.blob` names it. On error nothing remains."""
        fd, tmp_name = tempfile.mkstemp(dir=self._tmp)
        try:
            with os.fdopen(fd, "wb") as handle:
                sink = BlobWriter(handle, max_bytes)
                yield sink
                handle.flush()
                os.fsync(handle.fileno())
            final = self.path(sink.sha256)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp_name, final)
            sink.blob = StoredBlob(sink.sha256, sink.size)
        finally:
            Path(tmp_name).unlink(missing_ok=True)

    def put_stream(self, chunks: Iterable[bytes], max_bytes: int | None = None) -> StoredBlob:
        with self.writer(max_bytes) as sink:
            for chunk in chunks:
                sink.write(chunk)
        return sink.blob

    async def put_async_stream(self, chunks: AsyncIterable[bytes], max_bytes: int | None = None) -> StoredBlob:
        """For request bodies: the bytes go to disk as they arrive, never all in memory."""
        with self.writer(max_bytes) as sink:
            async for chunk in chunks:
                sink.write(chunk)
        return sink.blob

    def put_file(self, source: BinaryIO, max_bytes: int | None = None) -> StoredBlob:
        return self.put_stream(iter(lambda: source.read(CHUNK), b""), max_bytes)

    def put_path(self, path: Path) -> StoredBlob:
        with path.open("rb") as source:
            return self.put_file(source)

    def open(self, sha256: str) -> BinaryIO:
        return self.path(sha256).open("rb")

    def iter_bytes(self, sha256: str) -> Iterator[bytes]:
        with self.open(sha256) as source:
            yield from iter(lambda: source.read(CHUNK), b"")

    def delete(self, sha256: str) -> None:
        self.path(sha256).unlink(missing_ok=True)
