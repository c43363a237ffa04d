"""A site joining a federation by invitation (`adaptery fed join`), and its signed check-ins after that.

The invitation token is `<secret>.<pin>` (as an agent enrollment token is): the site fetches the platform's CA
and trusts it only if it hashes to the pin, then every call goes over HTTPS verified against it. The site makes
its identity key here (it never leaves the site) and registers the public half with the token and a signature
by that key. After joining, the site proves itself by signing each check-in with the same key and the time in
Unix milliseconds; the platform accepts a check-in only if its time is after the last one it accepted from the
site, so a captured check-in cannot be replayed (this process keeps its own times strictly increasing). A check-in
returns where the coordinator's SuperLink listens, the CA its TLS certificate chains to, and the roster the run
admits. The site writes these beside its key and runs its SuperNode with them; its data is never sent.

Nothing here needs Flower or the database: the platform verifies with the same message formats.
"""

from __future__ import annotations

import json
import ssl
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from adaptery.messaging import identity

HTTP_SECONDS = 30.0
KEY_FILE, MEMBERSHIP_FILE, PLATFORM_CA_FILE = "identity.key", "membership.json", "platform-ca.pem"
ROSTER_FILE, SUPERLINK_CA_FILE = "roster.json", "superlink-ca.pem"


class JoinError(RuntimeError):
    pass


def join_message(token: str) -> bytes:
    """What a joining site signs with its identity key: proof that it holds the key it registers."""
    return b"adaptery-federation-join\n" + token.encode()


def check_in_message(site_id: str, when_ms: int) -> bytes:
    return f"adaptery-federation-check-in\n{site_id}\n{when_ms}".encode()


_last_check_in_ms = 0
_check_in_lock = threading.Lock()


def _check_in_time_ms() -> int:
    """Now in Unix milliseconds, after any check-in this process signed before (two in one millisecond would
    otherwise look like a replay of each other)."""
    global _last_check_in_ms
    with _check_in_lock:
        _last_check_in_ms = max(time.time_ns() // 1_000_000, _last_check_in_ms + 1)
        return _last_check_in_ms


def sign(key: ec.EllipticCurvePrivateKey, message: bytes) -> bytes:
    return key.sign(message, ec.ECDSA(hashes.SHA384()))


@dataclass
class Membership:
    """What `fed join` keeps beside the site's key: who it is in which federation, and where the platform is."""

    server_url: str
    site_id: str
    number: int
    name: str
    federation_id: str
    federation: str
    base_model: str

    def save(self, directory: Path) -> None:
        identity.write_private(directory / MEMBERSHIP_FILE, json.dumps(asdict(self), indent=2).encode())

    @classmethod
    def load(cls, directory: Path) -> Membership:
        return cls(**json.loads((directory / MEMBERSHIP_FILE).read_text()))


def _error(response: httpx.Response) -> str:
    try:
        return response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return response.text[:500]


def platform_client(server_url: str, ca_path: Path | None) -> httpx.Client:
    """An HTTP client for the platform: over HTTPS it trusts only the pinned CA."""
    verify: ssl.SSLContext | bool = False
    if server_url.startswith("https://") and ca_path is not None:
        verify = ssl.create_default_context(cafile=str(ca_path))
    return httpx.Client(base_url=server_url.rstrip("/"), verify=verify, timeout=HTTP_SECONDS)


def join(server_url: str, token: str, directory: Path, *, http: httpx.Client | None = None) -> Membership:
    """Make this site's identity key in `directory`, check the platform's CA against the token's pin, and register
    the key with the invitation. `http` replaces the client (tests pass the app's own)."""
    from adaptery.federated.deploy import new_identity_key

    server_url = server_url.rstrip("/")
    try:
        secret, pin = identity.parse_token(token)
    except ValueError as error:
        raise JoinError("an invitation token is '<secret>.<64 hex digits>' (from `adaptery fed invite`)") from error
    key_path = directory / KEY_FILE
    if key_path.exists():
        raise JoinError(f"{directory} already holds a site identity: join with a new directory")
    # Nothing secret goes on this unverified request, and its answer is checked against the pin.
    first = http or platform_client(server_url, None)
    response = first.get("/api/fabric/ca")
    if response.status_code != 200 or identity.ca_pin(response.content) != pin:
        raise JoinError(
            f"the CA that {server_url} presents is not the one this invitation was made for: refusing to trust it"
        )
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    identity.write_private(directory / PLATFORM_CA_FILE, response.content)
    new_identity_key(key_path)
    key = load_key(directory)
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    client = http or platform_client(server_url, directory / PLATFORM_CA_FILE)
    response = client.post(
        "/api/federations/join",
        json={"token": token, "public_key": public.decode(), "signature": sign(key, join_message(secret)).hex()},
    )
    if response.status_code != 201:
        key_path.unlink()  # an identity the federation never accepted would only refuse the next try
        key_path.with_suffix(".pub").unlink(missing_ok=True)
        raise JoinError(f"joining refused ({response.status_code}): {_error(response)}")
    body = response.json()
    membership = Membership(
        server_url=server_url,
        site_id=body["id"],
        number=body["number"],
        name=body["name"],
        federation_id=body["federation_id"],
        federation=body["federation"],
        base_model=body["base_model"],
    )
    membership.save(directory)
    return membership


def load_key(directory: Path) -> ec.EllipticCurvePrivateKey:
    return serialization.load_ssh_private_key((directory / KEY_FILE).read_bytes(), password=None)


def check_in(directory: Path, *, http: httpx.Client | None = None) -> dict:
    """One signed check-in; returns the platform's view (superlink, superlink_ca, roster, status)."""
    membership = Membership.load(directory)
    when_ms = _check_in_time_ms()
    signature = sign(load_key(directory), check_in_message(membership.site_id, when_ms)).hex()
    client = http or platform_client(membership.server_url, directory / PLATFORM_CA_FILE)
    response = client.post(
        f"/api/federations/sites/{membership.site_id}/check-in", json={"time_ms": when_ms, "signature": signature}
    )
    if response.status_code != 200:
        raise JoinError(f"check-in refused ({response.status_code}): {_error(response)}")
    return response.json()


def write_run_files(directory: Path, view: dict) -> bool:
    """The roster and the SuperLink's CA from a check-in, beside the key; False until a coordinator has published
    its SuperLink. A roster that no longer lists this site's key is refused."""
    if not view.get("superlink") or not view.get("superlink_ca"):
        return False
    membership = Membership.load(directory)
    mine = (directory / KEY_FILE).with_suffix(".pub").read_text().split()[:2]
    if view["roster"].get(str(membership.number), "").split()[:2] != mine:
        raise JoinError(f"the roster does not list this site's key as site {membership.number}")
    (directory / ROSTER_FILE).write_text(json.dumps(view["roster"], indent=2) + "\n")
    (directory / SUPERLINK_CA_FILE).write_text(view["superlink_ca"])
    return True
