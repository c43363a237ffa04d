"""An enrolled machine's identity: its key pair (made where it runs, never sent), the short-lived client
certificate the platform CA signed for it, and the CA certificate, kept in one directory.

An enrollment token is `<secret>.<pin>`: the secret proves the admin's consent once; the pin is the sha256 of
the platform CA's certificate, so a machine joining over the network trusts the CA it fetched only if it is the
one the admin's platform uses (as kubeadm's discovery hash does), before it sends anything over that channel.

A certificate's subject names who holds it: O = the tenant id (or `adaptery-platform`), OU = the island,
CN = the agent's id. nats-server maps that subject to the agent's user (`verify_and_map`), and the island's leaf
node to its island's account. Renewal proves possession of the current certificate's key: the new request is
signed with that same key, so a replayed request yields a certificate for a key only its holder has.
Nothing here touches the database; agents import it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import json
import os
import ssl
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

KEY_FILE, CERT_FILE, CA_FILE, IDENTITY_FILE = "agent.key", "agent.pem", "ca.pem", "identity.json"
RENEW_AT_FRACTION = 2 / 3  # of a certificate's lifetime


def subject_name(organization: str, island: str, agent_id: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, island),
            x509.NameAttribute(NameOID.COMMON_NAME, agent_id),
        ]
    )


def leaf_server_name(organization: str, island: str) -> str:
    """The one name an island's leaf node serves its island's agents under (its certificate's only SAN), and the
    name those agents check on their leaf's certificate: another island's leaf, or a tenant's leaf on some other
    loopback, cannot pass for theirs (an attacker's find: leaf certificates named 127.0.0.1, so any tenant's leaf
    certificate was good for any island's loopback). A hash: island names may hold what DNS names may not."""
    digest = hashlib.sha256(f"{organization}\0{island}".encode()).hexdigest()[:32]
    return f"leaf-{digest}.adaptery.invalid"


def subject_string(name: x509.Name) -> str:
    """RFC 4514, most specific first (`CN=…,OU=…,O=…`): the form nats-server's verify_and_map compares."""
    return name.rfc4514_string()


def ca_pin(trust_pem: bytes) -> str:
    """The pin of what an enrolled machine will trust (the CA certificates, as the platform serves them)."""
    return hashlib.sha256(trust_pem).hexdigest()


def make_token(secret: str, ca_pem: bytes) -> str:
    return f"{secret}.{ca_pin(ca_pem)}"


def parse_token(token: str) -> tuple[str, str]:
    """(secret, CA pin) of an enrollment token."""
    secret, sep, pin = token.strip().rpartition(".")
    if not sep or not secret or len(pin) != 64 or any(c not in "0123456789abcdef" for c in pin):
        raise ValueError("an enrollment token is '<secret>.<64 hex digits>' (from `adaptery agents token create`)")
    return secret, pin


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def make_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def make_csr(key: ec.EllipticCurvePrivateKey) -> bytes:
    """A request signed by `key`; its subject is the platform's to set, so it names nothing."""
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM)


def write_private(path: Path, data: bytes) -> None:
    """Create with 0600 from the start (the key is never readable by others, even for a moment), then swap in."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.replace(tmp, path)


@dataclass
class Identity:
    """What `adaptery agent enroll` / `island up` keep beside the key: who this machine is and where to dial."""

    agent_id: str
    kind: str  # "agent" or "leaf"
    tenant_id: str | None
    island: str
    roles: list[str]
    server_url: str  # the platform's HTTPS (renewal)
    nats_url: str | None  # where an agent dials the hub directly
    leaf_url: str | None  # where an island's leaf node dials the hub

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Identity:
        return cls(**{name: data.get(name) for name in cls.__dataclass_fields__})

    @property
    def leaf_server_name(self) -> str:
        """The name this machine's island leaf serves under (`leaf_server_name`)."""
        from adaptery.messaging.accounts import PLATFORM_ORGANIZATION

        return leaf_server_name(self.tenant_id or PLATFORM_ORGANIZATION, self.island)

    def tls_hostname(self, url: str) -> str | None:
        """The server name to check when dialing `url`: an agent dialing a loopback address other than the hub's
        own (where it enrolled) is dialing its island's leaf, which serves under its island's name; otherwise the
        URL's host, as usual (None)."""
        host = urlsplit(url).hostname or ""
        if url.rstrip("/") == (self.nats_url or "").rstrip("/") or not _is_loopback(host):
            return None
        return self.leaf_server_name


class IdentityDir:
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    @property
    def key_path(self) -> Path:
        return self.directory / KEY_FILE

    @property
    def cert_path(self) -> Path:
        return self.directory / CERT_FILE

    @property
    def ca_path(self) -> Path:
        return self.directory / CA_FILE

    def exists(self) -> bool:
        return all(p.is_file() for p in (self.key_path, self.cert_path, self.ca_path, self.directory / IDENTITY_FILE))

    def identity(self) -> Identity:
        if not self.exists():
            raise FileNotFoundError(f"{self.directory} holds no enrolled identity: run `adaptery agent enroll` first")
        return Identity.from_json(json.loads((self.directory / IDENTITY_FILE).read_text()))

    def key(self) -> ec.EllipticCurvePrivateKey:
        return serialization.load_pem_private_key(self.key_path.read_bytes(), password=None)

    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_path.read_bytes())

    def save(self, identity: Identity, key: ec.EllipticCurvePrivateKey, cert_pem: bytes, ca_pem: bytes) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.directory.chmod(0o700)
        write_private(self.key_path, key_pem(key))
        self.save_certificate(cert_pem)
        write_private(self.ca_path, ca_pem)
        write_private(self.directory / IDENTITY_FILE, json.dumps(asdict(identity), indent=2).encode())

    def save_certificate(self, cert_pem: bytes) -> None:
        write_private(self.cert_path, cert_pem)

    def renew_at(self) -> dt.datetime:
        cert = self.certificate()
        start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
        return start + (end - start) * RENEW_AT_FRACTION

    def ssl_context(self) -> ssl.SSLContext:
        """A client context: trusts only the platform CA and presents this machine's certificate. Reloading the
        certificate into the same context after a renewal makes every later (re)connection present the new one."""
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.ca_path))
        context.load_cert_chain(str(self.cert_path), str(self.key_path))
        return context
