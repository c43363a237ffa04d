"""Client certificates for agents and island leaf nodes, signed by the platform CA (`auth.tls.ensure_ca`, made
on first use in the data dir, key 0600) or by an external CA given in the settings.

A certificate is short-lived (`agent_certificate_hours`, 24 h by default) and names its holder in its subject
(`messaging.identity.subject_name`); the subject is the platform's choice, never the request's. Its extended key
usage is client authentication (an island's leaf also serves its own loopback), so it never poses as the hub.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from adaptery.auth.tls import ensure_ca

CLOCK_SKEW = dt.timedelta(minutes=5)
AGENT_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)


class CertificateRefused(ValueError):
    """A request or presented certificate the CA will not act on; the message says why."""


@dataclass(frozen=True)
class CertificateAuthority:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @classmethod
    def load(cls, tls_dir: Path, ca_cert: Path | None = None, ca_key: Path | None = None) -> CertificateAuthority:
        if (ca_cert is None) != (ca_key is None):
            raise ValueError("ADAPTERY_CA_CERT and ADAPTERY_CA_KEY go together")
        if ca_cert is not None and ca_key is not None:
            cert = x509.load_pem_x509_certificate(ca_cert.read_bytes())
            key = serialization.load_pem_private_key(ca_key.read_bytes(), password=None)
            return cls(cert, key)
        cert, key = ensure_ca(tls_dir)
        return cls(cert, key)

    def file(self, tls_dir: Path) -> Path:
        """The CA certificate as a file (for nats-server's ca_file)."""
        path = tls_dir / "agents-ca.pem"
        if not path.is_file() or path.read_bytes() != self.pem:
            path.write_bytes(self.pem)
        return path

    def issue(
        self, csr_pem: bytes, subject: x509.Name, lifetime: dt.timedelta, *, server_name: str | None = None
    ) -> x509.Certificate:
        """`server_name`: an island's leaf node, which also serves its island's agents with it, under that name
        only (`identity.leaf_server_name`; never a loopback address, which every tenant's leaf would share)."""
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError as exc:
            raise CertificateRefused(f"csr is not a PEM certificate signing request: {exc}") from exc
        if not csr.is_signature_valid:
            raise CertificateRefused("csr's signature does not match its public key")
        key = csr.public_key()
        if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, AGENT_CURVES):
            # what the agent's own `enroll` makes; a presigned transfer's proof is an ECDSA signature, so an RSA
            # key enrolled an agent that could never fetch its work (and RSA-1024 was taken)
            raise CertificateRefused("csr's key must be an EC key on P-256, P-384 or P-521")
        now = dt.datetime.now(dt.UTC)
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH, *([ExtendedKeyUsageOID.SERVER_AUTH] if server_name else [])]
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.cert.subject)
            .public_key(csr.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + lifetime)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
        )
        if server_name:
            builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(server_name)]), critical=False)
        return builder.sign(self.key, hashes.SHA256())

    def check(self, cert_pem: bytes) -> x509.Certificate:
        """A certificate this CA issued and that is valid now (revocation is the caller's to check)."""
        try:
            cert = x509.load_pem_x509_certificate(cert_pem)
        except ValueError as exc:
            raise CertificateRefused(f"certificate is not PEM: {exc}") from exc
        try:
            cert.verify_directly_issued_by(self.cert)
        except (ValueError, TypeError, InvalidSignature) as exc:
            raise CertificateRefused("certificate was not issued by this platform's CA") from exc
        now = dt.datetime.now(dt.UTC)
        if not cert.not_valid_before_utc - CLOCK_SKEW <= now <= cert.not_valid_after_utc:
            raise CertificateRefused("certificate has expired (or is not yet valid): enroll again with a new token")
        return cert


def serial_hex(cert: x509.Certificate) -> str:
    return format(cert.serial_number, "x")


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)
