"""Encryption at rest: a master key wraps one data key per tenant; blobs are sealed in authenticated segments.

Master keys come from a `KeyProvider` (the only thing a KMS integration has to implement: `wrap`/`unwrap` with
a key id). The local provider keeps a 32-byte key in a 0600 file under the data dir, made on first start, or
takes it from `ADAPTERY_MASTER_KEY` (base64; several comma-separated keys are accepted while rotating, the first
one wraps).

Blob format, version 2 (all integers big-endian), written for every new blob:

    header   = b"ADPB" | 2 (1 byte) | key id (16 bytes, the tenant data key's id) | salt (32 bytes) | nonce prefix (7)
    blob key = HKDF-SHA256(ikm = tenant data key, salt = salt, info = b"adaptery blob key v2", length = 32)
    segment  = AES-256-GCM(blob key, nonce = prefix | counter (4 bytes) | last flag (1 byte), aad = header)

Each blob is sealed under a key of its own, derived from the tenant's data key and a random salt kept in its
header (the construction of Tink's AES-GCM-HKDF streaming AEAD). Version 1 sealed every blob of a tenant under
the data key itself with a random 7-byte nonce prefix: with n blobs two share a prefix, and so repeat nonces
under one key, with probability about n²/2^57, over NIST's 2^-32 limit for AES-GCM past some 5,800 blobs of a
tenant. Two blobs now share a key only if their 32-byte salts collide (about n²/2^257): no bound is in reach.
Version 1 blobs stay readable (and `adaptery storage check --verify` checks them):

    header   = b"ADPB" | 1 (1 byte) | key id (16 bytes) | nonce prefix (7 bytes)
    segment  = AES-256-GCM(tenant data key, nonce = prefix | counter | last flag, aad = header)

Each segment holds up to 64 KiB of plaintext and its 16-byte tag. The flag of the final segment is 1, so a
file cut at a segment boundary fails (no final segment), as do reordered, dropped, swapped or edited segments
(counter and header are authenticated; an edited salt derives another key, and nothing opens). An empty blob
is one empty final segment.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

if TYPE_CHECKING:
    from adaptery.settings import Settings

MAGIC = b"ADPB"
VERSION = 2  # what new blobs are written as
KEY_ID_BYTES = 16
SALT_BYTES = 32
PREFIX_BYTES = 7
BLOB_KEY_INFO = b"adaptery blob key v2"
# The header's length by format version (magic | version | key id | [salt] | nonce prefix).
HEADER_SIZES = {
    1: len(MAGIC) + 1 + KEY_ID_BYTES + PREFIX_BYTES,
    2: len(MAGIC) + 1 + KEY_ID_BYTES + SALT_BYTES + PREFIX_BYTES,
}
HEADER_BYTES = HEADER_SIZES[VERSION]
SEGMENT = 64 * 1024
TAG = 16
MASTER_KEY_ENV = "ADAPTERY_MASTER_KEY"
_MAX_SEGMENTS = 2**32


class TamperedError(ValueError):
    """Ciphertext that does not authenticate: edited, truncated, reordered or sealed under another key."""


def key_id(key: bytes) -> str:
    """A stable public name of a key (not the key: a one-way hash of it under a fixed label)."""
    return hmac.new(key, b"adaptery key id", hashlib.sha256).hexdigest()[: KEY_ID_BYTES * 2]


class KeyProvider(Protocol):
    """Wraps tenant data keys under a master key. A KMS-backed provider implements the same three members."""

    @property
    def current_key_id(self) -> str: ...

    def wrap(self, data_key: bytes, context: bytes) -> tuple[str, bytes]:
        """Seal `data_key` under the current master key; returns (master key id, wrapped bytes)."""

    def unwrap(self, master_key_id: str, wrapped: bytes, context: bytes) -> bytes:
        """Open a data key wrapped under the master key `master_key_id`; TamperedError if it does not open."""


def _decode_key(text: str) -> bytes:
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except ValueError as exc:
        raise ValueError("a master key is 32 bytes in base64") from exc
    if len(key) != 32:
        raise ValueError("a master key is 32 bytes in base64")
    return key


def new_master_key_text() -> str:
    return base64.b64encode(os.urandom(32)).decode()


def _seal(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    nonce = os.urandom(12)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def _open(key: bytes, sealed: bytes, aad: bytes) -> bytes:
    try:
        return AESGCM(key).decrypt(sealed[:12], sealed[12:], aad)
    except InvalidTag as exc:
        raise TamperedError("the data does not authenticate") from exc


class LocalKeyProvider:
    """Master keys from the environment variable or a 0600 key file (re-read when an unknown key id is asked
    for, so a running server follows `adaptery keys rotate-master` without a restart)."""

    def __init__(self, key_file: Path, env_value: str | None = None) -> None:
        self.key_file = key_file
        self._env = env_value
        self._lock = threading.Lock()
        self._keys: dict[str, bytes] = {}
        self._current = ""
        self._load(create=True)

    @classmethod
    def from_settings(cls, settings: Settings) -> LocalKeyProvider:
        """ADAPTERY_MASTER_KEY's keys when it is set, else the data dir's key file."""
        env_value = settings.master_key.get_secret_value() if settings.master_key else None
        return cls(settings.master_key_file, env_value or None)

    @property
    def pending_file(self) -> Path:
        return self.key_file.with_name(self.key_file.name + ".new")

    @property
    def uses_environment(self) -> bool:
        return self._env is not None

    def _load(self, *, create: bool) -> None:
        if self._env is not None:
            texts = [part for part in self._env.split(",") if part.strip()]
            if not texts:
                raise ValueError(f"{MASTER_KEY_ENV} is empty")
        else:
            if not self.key_file.exists() and create:
                write_key_file(self.key_file, new_master_key_text())
            texts = [self.key_file.read_text()]
            if self.pending_file.exists():  # a rotation in progress: its new key wraps from now on
                texts.insert(0, self.pending_file.read_text())
        keys = [_decode_key(text) for text in texts]
        with self._lock:
            for key in keys:
                self._keys[key_id(key)] = key
            self._current = key_id(keys[0])

    @property
    def current_key_id(self) -> str:
        return self._current

    def wrap(self, data_key: bytes, context: bytes) -> tuple[str, bytes]:
        if self._env is None:
            self._load(create=False)  # wrap under the newest key even if a rotation ran since we started
        with self._lock:
            current = self._current
            key = self._keys[current]
        return current, _seal(key, data_key, context)

    def unwrap(self, master_key_id: str, wrapped: bytes, context: bytes) -> bytes:
        key = self._keys.get(master_key_id)
        if key is None:
            self._load(create=False)
            key = self._keys.get(master_key_id)
        if key is None:
            raise TamperedError(f"the master key {master_key_id} is not available")
        return _open(key, wrapped, context)


def write_key_file(path: Path, text: str) -> None:
    """Write a key readable by its owner only, atomically (never a moment with a partial or wider file)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text.strip() + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def client_secret_context(provider_id: str) -> bytes:
    """What an identity provider's client secret, sealed under the master key, is bound to."""
    return f"adaptery oidc client secret {provider_id}".encode()


def wrap_context(tenant_id: str, data_key_id: str) -> bytes:
    """What a wrapped data key is bound to: a key wrapped for one tenant does not open as another's."""
    return f"adaptery tenant data key|{tenant_id}|{data_key_id}".encode()


class DataKey:
    """A tenant's data key: seals blobs and small values, and names blobs without revealing their hashes."""

    def __init__(self, key: bytes) -> None:
        self.key = key
        self.id = key_id(key)
        self._id_bytes = bytes.fromhex(self.id)
        self._aead = AESGCM(key)
        self._name_key = hmac.new(key, b"adaptery blob names", hashlib.sha256).digest()

    def blob_name(self, sha256: str) -> str:
        """A blob's file name: keyed, so equal content of two tenants (or a guessed file) is not recognisable."""
        return hmac.new(self._name_key, sha256.encode(), hashlib.sha256).hexdigest()

    # Small values (chat messages, report samples): version byte | nonce | ciphertext.
    def seal_text(self, text: str, context: str) -> str:
        nonce = os.urandom(12)
        sealed = self._aead.encrypt(nonce, text.encode(), context.encode())
        return "enc1:" + base64.b64encode(nonce + sealed).decode()

    def open_text(self, value: str, context: str) -> str:
        if not value.startswith("enc1:"):
            raise TamperedError("the value is not sealed")
        raw = base64.b64decode(value[5:])
        try:
            return self._aead.decrypt(raw[:12], raw[12:], context.encode()).decode()
        except InvalidTag as exc:
            raise TamperedError("the value does not authenticate") from exc

    # Streams.
    def encryptor(self, sink: BinaryIO) -> SegmentWriter:
        return SegmentWriter(self, sink)

    def decrypt_stream(self, source: BinaryIO) -> Iterator[bytes]:
        return _decrypt_segments(self, source)


def _nonce(prefix: bytes, counter: int, last: bool) -> bytes:
    if counter >= _MAX_SEGMENTS:
        raise ValueError("blob too large for one nonce prefix")
    return prefix + counter.to_bytes(4, "big") + (b"\x01" if last else b"\x00")


def _blob_cipher(key: DataKey, salt: bytes) -> AESGCM:
    """The AEAD of one version 2 blob: its own key, derived from the tenant's data key and the blob's salt."""
    blob_key = HKDF(algorithm=SHA256(), length=32, salt=salt, info=BLOB_KEY_INFO).derive(key.key)
    return AESGCM(blob_key)


class SegmentWriter:
    """Encrypts what is written to it in SEGMENT-sized pieces (format version 2); `close()` seals the final
    segment."""

    def __init__(self, key: DataKey, sink: BinaryIO) -> None:
        self._sink = sink
        salt = os.urandom(SALT_BYTES)
        self._prefix = os.urandom(PREFIX_BYTES)
        self._header = MAGIC + bytes([VERSION]) + key._id_bytes + salt + self._prefix
        self._aead = _blob_cipher(key, salt)
        self._buffer = bytearray()
        self._counter = 0
        self.closed = False
        sink.write(self._header)

    def _emit(self, chunk: bytes, last: bool) -> None:
        nonce = _nonce(self._prefix, self._counter, last)
        self._sink.write(self._aead.encrypt(nonce, chunk, self._header))
        self._counter += 1

    def write(self, data: bytes) -> int:
        self._buffer += data
        # Keep at least one byte back so the final segment is never empty unless the whole blob is.
        while len(self._buffer) > SEGMENT:
            self._emit(bytes(self._buffer[:SEGMENT]), last=False)
            del self._buffer[:SEGMENT]
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._emit(bytes(self._buffer), last=True)
            self._buffer.clear()
            self.closed = True


@dataclass(frozen=True)
class BlobHeader:
    version: int
    key_id: str
    salt: bytes  # empty in version 1
    prefix: bytes
    raw: bytes  # the header's bytes: every segment's associated data

    @property
    def size(self) -> int:
        return len(self.raw)


def read_header(source: BinaryIO) -> BlobHeader:
    start = source.read(len(MAGIC) + 1)
    if len(start) != len(MAGIC) + 1 or not start.startswith(MAGIC):
        raise TamperedError("not an encrypted blob (bad header)")
    version = start[-1]
    if version not in HEADER_SIZES:
        raise TamperedError(f"unknown blob format version {version}")
    rest = source.read(HEADER_SIZES[version] - len(start))
    if len(rest) != HEADER_SIZES[version] - len(start):
        raise TamperedError("not an encrypted blob (bad header)")
    salt = rest[KEY_ID_BYTES : KEY_ID_BYTES + SALT_BYTES] if version == 2 else b""
    return BlobHeader(version, rest[:KEY_ID_BYTES].hex(), salt, rest[-PREFIX_BYTES:], start + rest)


def _decrypt_segments(key: DataKey, source: BinaryIO, first: int = 0) -> Iterator[bytes]:
    header = read_header(source)
    if header.key_id != key.id:
        raise TamperedError("the blob was sealed under another key")
    aead = key._aead if header.version == 1 else _blob_cipher(key, header.salt)
    counter = first
    if first:
        source.seek(header.size + first * (SEGMENT + TAG))
    pending = source.read(SEGMENT + TAG)
    if first and not pending:
        return  # reading from the end (a resumed download that already has everything)
    while True:
        following = source.read(SEGMENT + TAG) if len(pending) == SEGMENT + TAG else b""
        last = not following
        try:
            plain = aead.decrypt(_nonce(header.prefix, counter, last), pending, header.raw)
        except InvalidTag as exc:
            where = "truncated or its end altered" if last else f"segment {counter} altered"
            raise TamperedError(f"the blob does not authenticate ({where})") from exc
        yield plain
        if last:
            return
        counter += 1
        pending = following


class DecryptingReader:
    """A read-only file object over an encrypted blob: plaintext comes out only after its segment verified."""

    def __init__(self, key: DataKey, source: BinaryIO, offset: int = 0) -> None:
        """`offset`: start reading the plaintext there (only the segments from there on are read)."""
        self._source = source
        self._segments = _decrypt_segments(key, source, offset // SEGMENT)
        self._buffer = b""
        self._eof = False
        self.closed = False
        if offset % SEGMENT:
            self.read(offset % SEGMENT)

    def readable(self) -> bool:
        return True

    def _fill(self, size: int) -> None:
        while not self._eof and (size < 0 or len(self._buffer) < size):
            try:
                self._buffer += next(self._segments)
            except StopIteration:
                self._eof = True

    def read(self, size: int = -1) -> bytes:
        self._fill(size)
        if size < 0:
            data, self._buffer = self._buffer, b""
        else:
            data, self._buffer = self._buffer[:size], self._buffer[size:]
        return data

    def readline(self, size: int = -1) -> bytes:
        while b"\n" not in self._buffer and not self._eof:
            self._fill(len(self._buffer) + 1)
        end = self._buffer.find(b"\n")
        end = len(self._buffer) if end < 0 else end + 1
        if size >= 0:
            end = min(end, size)
        data, self._buffer = self._buffer[:end], self._buffer[end:]
        return data

    def __iter__(self) -> Iterator[bytes]:
        while line := self.readline():
            yield line

    def close(self) -> None:
        if not self.closed:
            self._source.close()
            self.closed = True

    def __enter__(self) -> DecryptingReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def plaintext_size(source: BinaryIO) -> int:
    """The plaintext length of the sealed blob `source` (from its header and length; its body is not read)."""
    header = read_header(source)
    body = source.seek(0, os.SEEK_END) - header.size
    segments = max(1, -(-body // (SEGMENT + TAG)))
    return body - segments * TAG
