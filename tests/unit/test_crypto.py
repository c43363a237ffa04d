"""Sealed blobs: round trips at every segment edge, and tampering, truncation and key mix-ups fail loudly.

New blobs are format version 2 (a key per blob, derived from the tenant's data key and a salt in the header);
blobs written as version 1 (every blob under the data key itself) stay readable.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from adaptery.settings import Settings
from adaptery.storage.crypto import (
    HEADER_BYTES,
    SEGMENT,
    TAG,
    DataKey,
    DecryptingReader,
    LocalKeyProvider,
    TamperedError,
    plaintext_size,
    read_header,
    wrap_context,
)

SALT = slice(21, 53)  # where a version 2 header keeps its salt: after b"ADPB", the version and the key id


def seal(key: DataKey, data: bytes, piece: int = 10_000) -> bytes:
    out = io.BytesIO()
    writer = key.encryptor(out)
    for start in range(0, len(data), piece):
        writer.write(data[start : start + piece])
    writer.close()
    return out.getvalue()


def unseal(key: DataKey, sealed: bytes, offset: int = 0) -> bytes:
    with DecryptingReader(key, io.BytesIO(sealed), offset) as reader:
        return reader.read()


@pytest.fixture
def key() -> DataKey:
    return DataKey(os.urandom(32))


@pytest.mark.parametrize("size", [0, 1, SEGMENT - 1, SEGMENT, SEGMENT + 1, 3 * SEGMENT, 3 * SEGMENT + 17])
def test_round_trip_at_segment_edges(key, size):
    data = os.urandom(size)
    sealed = seal(key, data)
    assert unseal(key, sealed) == data
    assert plaintext_size(io.BytesIO(sealed)) == size
    # the plaintext does not show through (a run of 16+ random bytes turns up in the output by chance ~never;
    # a byte or two would, about once in five runs)
    assert size < 16 or data[:64] not in sealed
    for offset in {0, 1, SEGMENT, SEGMENT + 5, size}:
        if offset <= size:
            assert unseal(key, sealed, offset) == data[offset:]


def test_same_plaintext_seals_differently(key):
    data = b"the same words" * 1000
    assert seal(key, data) != seal(key, data)


def test_lines_read_across_segments(key):
    lines = [f"line {i} ".encode() * (i % 50) + b"\n" for i in range(2000)]
    with DecryptingReader(key, io.BytesIO(seal(key, b"".join(lines)))) as reader:
        assert list(reader) == lines


def corrupt(sealed: bytes, position: int) -> bytes:
    return sealed[:position] + bytes([sealed[position] ^ 1]) + sealed[position + 1 :]


def test_a_flipped_bit_anywhere_fails(key):
    sealed = seal(key, os.urandom(2 * SEGMENT + 100))
    header = (0, 4, 5, 20, SALT.start, SALT.stop - 1, HEADER_BYTES - 1)  # magic, version, key id, salt, prefix
    body = (HEADER_BYTES + 10, HEADER_BYTES + SEGMENT + TAG + 3, len(sealed) - 1)
    for position in header + body:
        with pytest.raises(TamperedError):
            unseal(key, corrupt(sealed, position))


def test_truncation_at_a_segment_boundary_or_inside_fails(key):
    sealed = seal(key, os.urandom(3 * SEGMENT))
    for length in (HEADER_BYTES + SEGMENT + TAG, HEADER_BYTES + 2 * (SEGMENT + TAG), len(sealed) - 1, 10):
        with pytest.raises(TamperedError):
            unseal(key, sealed[:length])


def test_reordered_or_dropped_segments_fail(key):
    sealed = seal(key, os.urandom(3 * SEGMENT + 5))
    header, body = sealed[:HEADER_BYTES], sealed[HEADER_BYTES:]
    seg = [body[i : i + SEGMENT + TAG] for i in range(0, len(body), SEGMENT + TAG)]
    for reordered in ([seg[1], seg[0], seg[2], seg[3]], [seg[0], seg[2], seg[3]], [seg[0], seg[1], seg[2], seg[2]]):
        with pytest.raises(TamperedError):
            unseal(key, header + b"".join(reordered))


def test_another_key_or_a_spliced_header_fails(key):
    other = DataKey(os.urandom(32))
    sealed = seal(key, b"secret " * 100)
    with pytest.raises(TamperedError, match="another key"):
        unseal(other, sealed)
    second = seal(key, b"secret " * 100)
    with pytest.raises(TamperedError):  # another blob's header (its nonce prefix) on this body
        unseal(key, second[:HEADER_BYTES] + sealed[HEADER_BYTES:])


def test_each_blob_is_sealed_under_a_key_of_its_own(key):
    """The format as documented: the segments open under HKDF-SHA256(data key, the header's salt), and two blobs
    of the same plaintext have different salts, so different keys (version 1 used the data key for all)."""
    data = b"the same words" * 10_000  # three segments
    first, second = seal(key, data), seal(key, data)
    headers = [read_header(io.BytesIO(sealed)) for sealed in (first, second)]
    assert [h.version for h in headers] == [2, 2] and all(len(h.salt) == 32 for h in headers)
    assert headers[0].salt != headers[1].salt
    blob_keys = [
        HKDF(algorithm=SHA256(), length=32, salt=h.salt, info=b"adaptery blob key v2").derive(key.key) for h in headers
    ]
    assert blob_keys[0] != blob_keys[1] and key.key not in blob_keys
    for sealed, header, blob_key in zip((first, second), headers, blob_keys, strict=True):
        nonce = header.prefix + (0).to_bytes(4, "big") + b"\x00"
        body = sealed[HEADER_BYTES : HEADER_BYTES + SEGMENT + TAG]
        assert AESGCM(blob_key).decrypt(nonce, body, sealed[:HEADER_BYTES]) == data[:SEGMENT]
        with pytest.raises(InvalidTag):  # the data key alone opens nothing
            AESGCM(key.key).decrypt(nonce, body, sealed[:HEADER_BYTES])


def test_another_blobs_salt_or_a_downgraded_version_fails(key):
    data = os.urandom(SEGMENT + 100)
    sealed, other = seal(key, data), seal(key, data)
    with pytest.raises(TamperedError):  # the other blob's salt (its key) on this blob's segments
        unseal(key, sealed[: SALT.start] + other[SALT] + sealed[SALT.stop :])
    with pytest.raises(TamperedError):  # read as version 1: the data key itself, which sealed nothing here
        unseal(key, sealed[:4] + b"\x01" + sealed[5:])
    with pytest.raises(TamperedError, match="unknown blob format version 3"):
        unseal(key, sealed[:4] + b"\x03" + sealed[5:])


# Version 1, as the code before version 2 wrote it: every blob sealed under the tenant's data key itself.
V1_KEY = DataKey(bytes(range(32)))
V1_PREFIX = bytes.fromhex("a1a2a3a4a5a6a7")
V1_SMALL = bytes.fromhex(  # b"sealed by version 1\n", made by that code with the prefix above
    "41445042015fb9f8c26719e5e68c9c51d15461dd9aa1a2a3a4a5a6a7"
    "e4127d0122b73efca969b0df0df3114fd625af55a65ae7385f230d8178ca1c7da35025aa"
)
V1_EMPTY = bytes.fromhex("41445042015fb9f8c26719e5e68c9c51d15461dd9aa1a2a3a4a5a6a73b341e67595d87378945edf1800eed04")
V1_THREE_SEGMENTS_SHA256 = "8d2db4e6a230f0d0df4709ad6b0a164e99528f71e8b42743782477909dd37725"  # of its sealed bytes


def seal_v1(key: DataKey, data: bytes, prefix: bytes | None = None) -> bytes:
    """Write a blob in format version 1 (what stores hold from before version 2)."""
    prefix = prefix if prefix is not None else os.urandom(7)
    header = b"ADPB\x01" + bytes.fromhex(key.id) + prefix
    pieces = [data[i : i + SEGMENT] for i in range(0, len(data), SEGMENT)] or [b""]
    segments = [
        AESGCM(key.key).encrypt(prefix + n.to_bytes(4, "big") + bytes([n == len(pieces) - 1]), piece, header)
        for n, piece in enumerate(pieces)
    ]
    return header + b"".join(segments)


def three_segments() -> bytes:
    return bytes(i % 251 for i in range(2 * SEGMENT + 1000))


def test_seal_v1_writes_what_version_1_wrote():
    assert seal_v1(V1_KEY, b"sealed by version 1\n", V1_PREFIX) == V1_SMALL
    assert seal_v1(V1_KEY, b"", V1_PREFIX) == V1_EMPTY
    assert hashlib.sha256(seal_v1(V1_KEY, three_segments(), V1_PREFIX)).hexdigest() == V1_THREE_SEGMENTS_SHA256


@pytest.mark.parametrize("size", [0, 1, SEGMENT, SEGMENT + 1, 2 * SEGMENT + 1000])
def test_version_1_blobs_still_read(size):
    data = three_segments()[:size]
    sealed = seal_v1(V1_KEY, data)
    assert read_header(io.BytesIO(sealed)).version == 1
    assert unseal(V1_KEY, sealed) == data and plaintext_size(io.BytesIO(sealed)) == size
    for offset in {1, SEGMENT, SEGMENT + 5, size}:
        if offset <= size:
            assert unseal(V1_KEY, sealed, offset) == data[offset:]
    assert unseal(V1_KEY, V1_SMALL) == b"sealed by version 1\n" and unseal(V1_KEY, V1_EMPTY) == b""


def test_a_tampered_version_1_blob_still_fails():
    sealed = seal_v1(V1_KEY, three_segments())
    for position in (5, 20, 21, 27, 28 + 10, len(sealed) - 1):
        with pytest.raises(TamperedError):
            unseal(V1_KEY, corrupt(sealed, position))
    with pytest.raises(TamperedError):
        unseal(V1_KEY, sealed[: 28 + SEGMENT + TAG])  # cut at a segment boundary
    with pytest.raises(TamperedError, match="another key"):
        unseal(DataKey(os.urandom(32)), sealed)


def test_sealed_text_is_bound_to_its_row(key):
    sealed = key.seal_text("hello", "chat_messages.content|msg_1")
    assert "hello" not in sealed and key.open_text(sealed, "chat_messages.content|msg_1") == "hello"
    with pytest.raises(TamperedError):
        key.open_text(sealed, "chat_messages.content|msg_2")


def test_blob_names_are_keyed_per_tenant(key):
    sha = "ab" * 32
    assert key.blob_name(sha) != DataKey(os.urandom(32)).blob_name(sha) and sha not in key.blob_name(sha)


def test_master_key_file_is_private_and_wraps_bound_to_the_tenant(tmp_path, monkeypatch):
    monkeypatch.delenv("ADAPTERY_MASTER_KEY", raising=False)
    provider = LocalKeyProvider.from_settings(Settings(data_dir=tmp_path))
    assert stat.S_IMODE((tmp_path / "keys" / "master.key").stat().st_mode) == 0o600
    data_key = os.urandom(32)
    master_id, wrapped = provider.wrap(data_key, wrap_context("t1", "k"))
    assert provider.unwrap(master_id, wrapped, wrap_context("t1", "k")) == data_key
    with pytest.raises(TamperedError):
        provider.unwrap(master_id, wrapped, wrap_context("t2", "k"))  # moved to another tenant's row
    again = LocalKeyProvider(tmp_path / "keys" / "master.key")
    assert again.current_key_id == provider.current_key_id  # made once, then read


def test_master_key_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPTERY_MASTER_KEY", "not base64!")
    with pytest.raises(ValueError, match="32 bytes"):
        LocalKeyProvider.from_settings(Settings(data_dir=tmp_path))
    monkeypatch.setenv("ADAPTERY_MASTER_KEY", "QUFB" * 10 + "QUE=")  # 32 bytes of "A"
    provider = LocalKeyProvider.from_settings(Settings(data_dir=tmp_path))
    assert not (tmp_path / "keys" / "master.key").exists()  # the environment's key: no file is made
    master_id, wrapped = provider.wrap(b"k" * 32, b"ctx")
    assert provider.unwrap(master_id, wrapped, b"ctx") == b"k" * 32


def test_scratch_is_private_and_a_dead_process_leftover_is_removed(tmp_path):
    from adaptery.storage.modes import SCRATCH_PREFIX, make_scratch

    dead = tmp_path / f"{SCRATCH_PREFIX}999999999-x"  # no such pid
    dead.mkdir()
    (dead / "plain.txt").write_text("left behind by a killed server")
    alive = tmp_path / f"{SCRATCH_PREFIX}{os.getpid()}-y"
    alive.mkdir()
    scratch = make_scratch(tmp_path)
    assert stat.S_IMODE(scratch.stat().st_mode) == 0o700
    assert not dead.exists() and alive.exists()
