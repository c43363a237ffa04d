"""The agent's side of a presigned transfer: the bytes are kept only if they hash to what was asked for, a refusal
says why and whether asking again may help, and a base listing with anything but safetensors weights is refused."""

from __future__ import annotations

import hashlib
from pathlib import Path

import httpx
import pytest

from adaptery.agent.bases import _checked
from adaptery.agent.transfers import HttpsTransfers, TransferFailed
from adaptery.messaging import identity

BODY = b"weights " * 1000


def transfers_answering(tmp_path: Path, handler) -> HttpsTransfers:  # noqa: ANN001 - an httpx handler
    key = identity.make_key()
    store = identity.IdentityDir(tmp_path / "id")
    store.directory.mkdir(exist_ok=True)
    identity.write_private(store.key_path, identity.key_pem(key))
    identity.write_private(store.cert_path, b"-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n")
    transfers = HttpsTransfers("http://platform", store.directory)
    transfers.client = httpx.Client(base_url="http://platform", transport=httpx.MockTransport(handler))
    return transfers


def test_a_download_is_kept_only_when_it_hashes_to_what_was_asked(tmp_path):
    sha = hashlib.sha256(BODY).hexdigest()
    transfers = transfers_answering(tmp_path, lambda request: httpx.Response(200, content=BODY[:-1] + b"!"))
    with pytest.raises(TransferFailed, match="damaged") as failed:
        transfers.download("/x?token=t", sha, len(BODY), tmp_path / "out" / "model.safetensors")
    assert failed.value.retryable and list((tmp_path / "out").iterdir()) == []

    transfers = transfers_answering(tmp_path, lambda request: httpx.Response(200, content=BODY))
    target = transfers.download("/x?token=t", sha, len(BODY), tmp_path / "out" / "model.safetensors")
    assert target.read_bytes() == BODY


@pytest.mark.parametrize(("status", "retryable"), [(410, True), (403, False), (409, False), (503, True)])
def test_a_refused_transfer_says_why_and_whether_to_ask_again(tmp_path, status, retryable):
    body = {"error": {"message": "transfer URL refused: it has expired"}}
    transfers = transfers_answering(tmp_path, lambda request: httpx.Response(status, json=body))
    with pytest.raises(TransferFailed, match="it has expired") as failed:
        transfers.download("/x?token=t", "0" * 64, 1, tmp_path / "t")
    assert failed.value.retryable is retryable


def test_a_base_listing_with_pickled_weights_or_odd_names_is_refused():
    good = {"sha256": "a" * 64, "bytes": 1, "url": "/u"}
    assert _checked("b", {"model.safetensors": good, "config.json": good})
    for files in (
        {"model.safetensors": good, "pytorch_model.bin": good},
        {"../model.safetensors": good},
        {"config.json": good},  # no weights at all
        {"model.safetensors": {**good, "sha256": "nope"}},
    ):
        with pytest.raises(ValueError):
            _checked("b", files)
