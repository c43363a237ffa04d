"""Presigned transfer URLs: how an enrolled agent moves a large artifact over HTTPS instead of the bus.

The control plane answers an agent's `transfer` request (over NATS, only for work leased to that agent) with a
URL `/api/fabric/transfers/<sha256>?token=<grant>.<mac>`. The grant names everything the URL may do: the method
(GET or PUT, one of them), the blob, the tenant whose store it is in, the work it is for (a job, an evaluation or
an infer request) and its attempt, the agent, the expiry (minutes) and, for an upload, the size and a nonce that
makes it single-use. The MAC is HMAC-SHA256 under the platform's transfer key (`settings.transfer_key`, or a
0600 key file made on first use), so no field can be changed without the key.

A URL is also bound to its holder: the agent sends its certificate and an ECDSA signature of the token made with
the certificate's key, so a URL that leaks (a log, a proxy) is of no use to anyone else, another agent included.
The control plane checks again at use that the work is still leased to the agent under that attempt
(`ControlPlane.transfer_source`): a URL outlives neither its minutes nor its lease.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from adaptery.storage.crypto import new_master_key_text, write_key_file

TRANSFER_PATH = "/api/fabric/transfers"
CERTIFICATE_HEADER = "Adaptery-Agent-Certificate"  # base64 of the agent's PEM certificate
PROOF_HEADER = "Adaptery-Agent-Proof"  # base64 of its ECDSA-SHA256 signature of PROOF_LABEL + token
PROOF_LABEL = b"adaptery transfer proof v1|"
MAC_LABEL = b"adaptery transfer v1|"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
Purpose = Literal["job", "request", "base"]


class TransferRefused(Exception):
    """A transfer URL that may not be used; `status` is the HTTP status it is answered with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Grant:
    method: Literal["GET", "PUT"]
    sha256: str
    tenant_id: str  # "" for a base model's file (shared by every tenant)
    purpose: Purpose  # job: a fine-tuning job or an evaluation; request: an infer request; base: a base model

    work_id: str
    attempt: int | None
    agent_id: str
    expires_at: int
    size: int | None = None  # an upload's declared bytes
    nonce: str = ""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def load_key(secret: str | None, key_file: Path) -> bytes:
    """The transfer key: the configured secret, else the key file (32 random bytes, 0600, made on first use)."""
    if secret:
        return hashlib.sha256(b"adaptery transfer key|" + secret.encode()).digest()
    if not key_file.exists():
        write_key_file(key_file, new_master_key_text())
    return base64.b64decode(key_file.read_text().strip())


class TransferSigner:
    """Mints and checks grants; it holds no state. That an upload URL is used at most once is kept in the database
    (`services.transfers.spend`), so it holds across a restart and between control-plane processes."""

    def __init__(self, key: bytes, lifetime_seconds: float, clock=time.time) -> None:  # noqa: ANN001 - a clock
        self.key = key
        self.lifetime_seconds = lifetime_seconds
        self.clock = clock

    def sign(self, grant: Grant) -> str:
        payload = _b64(json.dumps(asdict(grant), separators=(",", ":"), sort_keys=True).encode())
        return f"{payload}.{_b64(self._mac(payload))}"

    def grant(self, **fields: object) -> tuple[str, Grant]:
        """A signed URL path for these fields, expiring `lifetime_seconds` from now."""
        expires_at = int(self.clock() + self.lifetime_seconds)
        nonce = _b64(os.urandom(16)) if fields.get("method") == "PUT" else ""
        grant = Grant(**fields, expires_at=expires_at, nonce=nonce)  # type: ignore[arg-type]
        return f"{TRANSFER_PATH}/{grant.sha256}?token={self.sign(grant)}", grant

    def _mac(self, payload: str) -> bytes:
        return hmac.new(self.key, MAC_LABEL + payload.encode(), hashlib.sha256).digest()

    def check(self, token: str, method: str, sha256: str) -> Grant:
        """The grant `token` carries if it is genuine, unexpired and for this method and blob."""
        payload, _, mac = token.partition(".")
        try:
            genuine = hmac.compare_digest(_unb64(mac), self._mac(payload))
            grant = Grant(**json.loads(_unb64(payload))) if genuine else None
        except (ValueError, TypeError):
            grant = None
        if grant is None:
            raise TransferRefused(403, "transfer URL refused: its signature does not match (tampered or forged)")
        if self.clock() > grant.expires_at:
            raise TransferRefused(410, "transfer URL refused: it has expired; ask the control plane for a new one")
        if grant.method != method:
            raise TransferRefused(403, f"transfer URL refused: it is for {grant.method}, not {method}")
        if grant.sha256 != sha256:
            raise TransferRefused(403, "transfer URL refused: it is for another blob")
        return grant


def check_holder(cert: x509.Certificate, token: str, proof_b64: str, agent_id: str) -> None:
    """The presented certificate (already checked against the CA) is the grant's agent's, and the proof is a
    signature of the token by its key."""
    names = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    if not names or names[0].value != agent_id:
        raise TransferRefused(403, "transfer URL refused: it was issued to another agent")
    key = cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise TransferRefused(403, "transfer URL refused: the certificate's key is not an EC key")
    try:
        key.verify(base64.b64decode(proof_b64, validate=True), PROOF_LABEL + token.encode(), ec.ECDSA(hashes.SHA256()))
    except (ValueError, InvalidSignature) as exc:
        raise TransferRefused(403, "transfer URL refused: the proof is not signed by the certificate's key") from exc


def prove(key: ec.EllipticCurvePrivateKey, token: str) -> str:
    """What the agent sends in PROOF_HEADER for `token`."""
    return base64.b64encode(key.sign(PROOF_LABEL + token.encode(), ec.ECDSA(hashes.SHA256()))).decode()


def is_sha256(value: object) -> bool:
    return isinstance(value, str) and bool(_SHA256.match(value))
