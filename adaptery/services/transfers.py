"""Using a presigned transfer URL (`auth/transfers.py`): who may, and an upload kept only when its hash matches.

A URL is admitted when its MAC, expiry, method and blob check out, the caller proves it holds the certificate of
the agent it was issued to (a current certificate of the platform's CA, the proof signed by its key), and the
control plane finds the work it was granted for still leased to that agent. An upload URL is then spent: its
nonce's hash is inserted into `spent_transfer_nonces`, whose unique key lets one use win however many processes
try at once, and which outlives a restart, so a replay is refused (409) until the URL has expired anyway (rows
past their URL's expiry are pruned as others are spent). An upload streams into the tenant's store (sealed as it
arrives, never whole in memory) and becomes a blob only if its size and SHA-256 are the ones granted; anything
else leaves nothing behind.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import time
from collections.abc import AsyncIterable

from sqlalchemy import delete
from sqlalchemy.exc import IntegrityError

from adaptery.auth.agent_ca import CertificateAuthority, CertificateRefused
from adaptery.auth.transfers import Grant, TransferRefused, TransferSigner, check_holder
from adaptery.db import models as m
from adaptery.db.session import Database
from adaptery.services.control_plane import ControlPlane, RequestRefused, TransferSource
from adaptery.storage.blobs import BlobStore, BlobTooLarge, StoredBlob


def admit(
    db: Database,
    signer: TransferSigner,
    control: ControlPlane | None,
    ca: CertificateAuthority,
    *,
    token: str,
    method: str,
    sha256: str,
    certificate: str | None,
    proof: str | None,
) -> tuple[Grant, TransferSource]:
    """The grant and what it reads or writes; TransferRefused (with its status) otherwise."""
    grant = signer.check(token, method, sha256)
    if not certificate or not proof:
        raise TransferRefused(401, "transfer refused: send the agent's certificate and its proof of the token")
    try:
        cert = ca.check(base64.b64decode(certificate, validate=True))
    except (binascii.Error, ValueError, CertificateRefused) as exc:
        raise TransferRefused(401, f"transfer refused: {exc}") from exc
    check_holder(cert, token, proof, grant.agent_id)
    if control is None:
        raise TransferRefused(503, "transfer refused: the control plane is not running")
    try:
        source = control.transfer_source(grant)
    except RequestRefused as exc:
        raise TransferRefused(403, f"transfer refused: {exc}") from exc
    if grant.method == "PUT":
        spend(db, grant, now=signer.clock())
    return grant, source


def spend(db: Database, grant: Grant, *, now: float | None = None) -> None:
    """Mark an upload URL used, once for every process and across restarts; TransferRefused(409) if it was."""
    now = time.time() if now is None else now
    nonce_hash = hashlib.sha256(b"adaptery transfer nonce|" + grant.nonce.encode()).hexdigest()
    try:
        with db.system() as s:
            s.execute(delete(m.SpentTransferNonce).where(m.SpentTransferNonce.expires_at < now))
            s.add(m.SpentTransferNonce(nonce_hash=nonce_hash, expires_at=grant.expires_at))
            s.flush()
    except IntegrityError as exc:  # the unique key: another use (here or in another process) came first
        raise TransferRefused(409, "transfer URL refused: this upload URL was already used") from exc


async def receive(blobs: BlobStore, tenant_id: str, grant: Grant, chunks: AsyncIterable[bytes]) -> StoredBlob:
    """Store an upload as it streams in; committed only if it is the blob the grant names."""
    try:
        with blobs.writer(tenant_id, max_bytes=grant.size) as sink:
            async for chunk in chunks:
                sink.write(chunk)
            if sink.size != grant.size or sink.sha256 != grant.sha256:
                raise TransferRefused(
                    422,
                    f"upload arrived damaged ({sink.size} bytes, sha256 {sink.sha256}; expected {grant.size} bytes, "
                    f"sha256 {grant.sha256}): nothing was kept",
                )
    except BlobTooLarge as exc:
        raise TransferRefused(413, f"upload is larger than the {grant.size} bytes granted: nothing was kept") from exc
    return sink.blob
