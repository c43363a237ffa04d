"""An enrolled agent's large artifacts over HTTPS: datasets, checkpoints, adapters, streamed with presigned URLs.

The control plane hands a URL over the bus for one blob of work leased to this agent (`AgentLink.transfer_url`);
this moves the bytes on the platform's HTTPS server, verified against the CA bundle the agent enrolled with (and
the system's, for a server certificate from a public CA). Each request carries the agent's certificate and a
signature of the URL's token by its key (`auth/transfers.py`), so the URL is worth nothing to anyone else.
Nothing is held whole in memory: a download streams to a partial file, hashing as it goes, and becomes the target
only if its SHA-256 (and size) are the ones asked for; an upload streams from the file with its length declared,
and the server keeps it only if its hash matches.
"""

from __future__ import annotations

import base64
import hashlib
import ssl
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx

from adaptery.auth.transfers import CERTIFICATE_HEADER, PROOF_HEADER, prove
from adaptery.messaging.identity import IdentityDir
from adaptery.messaging.protocol import RemoteError

CHUNK = 1024 * 1024
CONNECT_SECONDS = 10.0
READ_SECONDS = 120.0
RETRYABLE_STATUSES = {408, 410, 425, 429, 500, 502, 503, 504}  # an expired URL: ask for a new one


class TransferFailed(RemoteError):
    """The server refused or broke off a transfer; `retryable` as for the bus's errors."""


def server_context(ca_path: Path) -> ssl.SSLContext:
    """The platform CA the agent enrolled with, and the system's roots (a server certificate from a public CA)."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.load_verify_locations(cafile=str(ca_path))
    return context


class HttpsTransfers:
    def __init__(self, server_url: str, identity_dir: Path) -> None:
        self.server_url = server_url.rstrip("/")
        self.identity = IdentityDir(identity_dir)
        verify: ssl.SSLContext | bool = (
            server_context(self.identity.ca_path) if self.server_url.startswith("https://") else False
        )
        timeout = httpx.Timeout(READ_SECONDS, connect=CONNECT_SECONDS)
        self.client = httpx.Client(base_url=self.server_url, verify=verify, timeout=timeout)

    def close(self) -> None:
        self.client.close()

    def _headers(self, url: str) -> dict[str, str]:
        token = parse_qs(urlsplit(url).query).get("token", [""])[0]
        return {
            CERTIFICATE_HEADER: base64.b64encode(self.identity.cert_path.read_bytes()).decode(),
            PROOF_HEADER: prove(self.identity.key(), token),  # read each time: a renewal swaps both
        }

    def download(self, url: str, sha256: str, size: int | None, target: Path) -> Path:
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".part")
        digest, received = hashlib.sha256(), 0
        try:
            with self.client.stream("GET", url, headers=self._headers(url)) as response:
                _raise_for(response)
                with partial.open("wb") as handle:
                    for chunk in response.iter_bytes(CHUNK):
                        handle.write(chunk)
                        digest.update(chunk)
                        received += len(chunk)
        except httpx.TransportError as exc:
            partial.unlink(missing_ok=True)
            raise TransferFailed(f"download of {sha256} broke off: {exc}", retryable=True) from exc
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        if (size is not None and received != size) or digest.hexdigest() != sha256:
            partial.unlink(missing_ok=True)
            raise TransferFailed(f"blob {sha256} arrived incomplete or damaged", retryable=True)
        partial.replace(target)
        return target

    def upload(self, url: str, path: Path, size: int) -> None:
        headers = {**self._headers(url), "Content-Length": str(size), "Content-Type": "application/octet-stream"}
        try:
            response = self.client.put(url, content=_chunks(path), headers=headers)
        except httpx.TransportError as exc:
            raise TransferFailed(f"upload of {path.name} broke off: {exc}", retryable=True) from exc
        _raise_for(response)


def _chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as source:
        yield from iter(lambda: source.read(CHUNK), b"")


def _raise_for(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    response.read()
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = response.text[:300]
    retryable = response.status_code in RETRYABLE_STATUSES
    raise TransferFailed(f"transfer refused ({response.status_code}): {message}", retryable=retryable)
