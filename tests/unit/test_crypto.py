"""Sealed blobs: round trips at every segment edge, and tampering, truncation and key mix-ups fail loudly."""

from __future__ import annotations

import io
import os
import stat

import pytest

from adaptery.storage.crypto import (
    HEADER_BYTES,
    SEGMENT,
    TAG,
    DataKey,
    DecryptingReader,
    LocalKeyProvider,
    TamperedError,
    plaintext_size,
    wrap_context,
)


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
    assert plaintext_size(len(sealed)) == size
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
    for position in (0, 4, 5, HEADER_BYTES - 1, HEADER_BYTES + 10, HEADER_BYTES + SEGMENT + TAG + 3, len(sealed) - 1):
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
    provider = LocalKeyProvider.from_environment(tmp_path / "keys" / "master.key")
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
        LocalKeyProvider.from_environment(tmp_path / "master.key")
    monkeypatch.setenv("ADAPTERY_MASTER_KEY", "QUFB" * 10 + "QUE=")  # 32 bytes of "A"
    provider = LocalKeyProvider.from_environment(tmp_path / "master.key")
    assert not (tmp_path / "master.key").exists()  # the environment's key: no file is made
    master_id, wrapped = provider.wrap(b"k" * 32, b"ctx")
    assert provider.unwrap(master_id, wrapped, b"ctx") == b"k" * 32


def test_scratch_is_private_and_a_dead_process_leftover_is_removed(tmp_path):
    from adaptery.storage.blobs import SCRATCH_PREFIX, make_scratch

    dead = tmp_path / f"{SCRATCH_PREFIX}999999999-x"  # no such pid
    dead.mkdir()
    (dead / "plain.txt").write_text("left behind by a killed server")
    alive = tmp_path / f"{SCRATCH_PREFIX}{os.getpid()}-y"
    alive.mkdir()
    scratch = make_scratch(tmp_path)
    assert stat.S_IMODE(scratch.stat().st_mode) == 0o700
    assert not dead.exists() and alive.exists()
