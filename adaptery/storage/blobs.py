"""Content-addressed, encrypted blob store on the local disk.

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

from adaptery.storage.crypto import DecryptingReader, SegmentWriter, plaintext_size
from adaptery.storage.keys import Keyring
from adaptery.storage.modes import private_dir

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

    def __init__(self, handle: BinaryIO | SegmentWriter, max_bytes: int | None) -> None:
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
    """Every blob belongs to one tenant and is sealed with that tenant's data key (`storage.crypto`).

    A blob is still named by the SHA-256 of its plaintext (dedup within a tenant, integrity checks), but its
    file name is a keyed hash of that, under the tenant's directory: the same content of two tenants is two
    unrelated files, and nobody with the disk alone can tell which files hold a known document.
    Plaintext for code that needs a path (PEFT, parsers) lives only in `scratch`, a 0700 directory outside the
    data dir that the process removes (see `plaintext`).
    """

    def __init__(self, root: Path, keyring: Keyring, scratch: Path) -> None:
        self.root = root
        self.keyring = keyring
        self.scratch = scratch
        self._tmp = private_dir(private_dir(root) / "tmp")
        scratch.mkdir(mode=0o700, parents=True, exist_ok=True)

    def path(self, tenant_id: str, sha256: str) -> Path:
        """Where the sealed blob lies (ciphertext: use `open`, `iter_bytes` or `plaintext` to read it)."""
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise ValueError(f"not a sha256 blob key: {sha256!r}")
        if not tenant_id or not all(c.isalnum() or c in "-_" for c in tenant_id):
            raise ValueError(f"not a tenant id: {tenant_id!r}")
        name = self.keyring.data_key(tenant_id).blob_name(sha256)
        return self.root / "tenants" / tenant_id / name[:2] / name

    def exists(self, tenant_id: str, sha256: str) -> bool:
        return self.path(tenant_id, sha256).exists()

    def size(self, tenant_id: str, sha256: str) -> int:
        """The plaintext size."""
        with self.path(tenant_id, sha256).open("rb") as sealed:
            return plaintext_size(sealed)

    @contextmanager
    def writer(self, tenant_id: str, max_bytes: int | None = None) -> Iterator[BlobWriter]:
        """Write a blob piece by piece; after the block, `writer.blob` names it. On error nothing remains."""
        key = self.keyring.data_key(tenant_id)
        fd, tmp_name = tempfile.mkstemp(dir=self._tmp)
        try:
            with os.fdopen(fd, "wb") as handle:
                sealed = key.encryptor(handle)
                sink = BlobWriter(sealed, max_bytes)
                yield sink
                sealed.close()
                handle.flush()
                os.fsync(handle.fileno())
            final = self.path(tenant_id, sink.sha256)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp_name, final)
            sink.blob = StoredBlob(sink.sha256, sink.size)
        finally:
            Path(tmp_name).unlink(missing_ok=True)

    def put_stream(self, tenant_id: str, chunks: Iterable[bytes], max_bytes: int | None = None) -> StoredBlob:
        with self.writer(tenant_id, max_bytes) as sink:
            for chunk in chunks:
                sink.write(chunk)
        return sink.blob

    async def put_async_stream(
        self, tenant_id: str, chunks: AsyncIterable[bytes], max_bytes: int | None = None
    ) -> StoredBlob:
        """For request bodies: the bytes go to disk (sealed) as they arrive, never all in memory."""
        with self.writer(tenant_id, max_bytes) as sink:
            async for chunk in chunks:
                sink.write(chunk)
        return sink.blob

    def put_file(self, tenant_id: str, source: BinaryIO, max_bytes: int | None = None) -> StoredBlob:
        return self.put_stream(tenant_id, iter(lambda: source.read(CHUNK), b""), max_bytes)

    def put_path(self, tenant_id: str, path: Path) -> StoredBlob:
        with path.open("rb") as source:
            return self.put_file(tenant_id, source)

    def open(self, tenant_id: str, sha256: str, offset: int = 0) -> DecryptingReader:
        """A file object of the plaintext from `offset` on; a tampered or truncated blob raises `TamperedError`
        while it is read (no byte of a segment comes out before the segment authenticated)."""
        key = self.keyring.data_key(tenant_id)
        return DecryptingReader(key, self.path(tenant_id, sha256).open("rb"), offset)

    def iter_bytes(self, tenant_id: str, sha256: str) -> Iterator[bytes]:
        with self.open(tenant_id, sha256) as source:
            yield from iter(lambda: source.read(CHUNK), b"")

    def copy_to(self, tenant_id: str, sha256: str, target: Path) -> None:
        """Decrypt a blob into `target` (which must lie in `scratch` or another place that is not kept)."""
        with self.open(tenant_id, sha256) as source, target.open("wb") as out:
            os.chmod(target, 0o600)
            for chunk in iter(lambda: source.read(CHUNK), b""):
                out.write(chunk)

    @contextmanager
    def plaintext(self, tenant_id: str, sha256: str) -> Iterator[Path]:
        """A transient plaintext copy for code that needs a path; removed when the block ends."""
        fd, name = tempfile.mkstemp(dir=self.scratch, prefix="blob-")
        os.close(fd)
        target = Path(name)
        try:
            self.copy_to(tenant_id, sha256, target)
            yield target
        finally:
            target.unlink(missing_ok=True)

    def delete(self, tenant_id: str, sha256: str) -> None:
        self.path(tenant_id, sha256).unlink(missing_ok=True)
