"""Joining the platform from an agent's or island's machine: enroll once with a token, renew before expiry.

The key pair is made here and never leaves the identity directory. Enrollment first fetches the platform's CA
bundle and trusts it only if it hashes to the pin inside the token; every later call (the CSR, renewals) goes
over HTTPS verified against that bundle. Renewal happens at 2/3 of the certificate's lifetime, with the current
certificate and a request signed by its key; `on_renewed` lets the caller swap the new certificate in (an agent
reloads its TLS context, an island's leaf node reloads its nats-server).
"""

from __future__ import annotations

import datetime as dt
import logging
import ssl
import threading
from collections.abc import Callable
from pathlib import Path

import httpx

from adaptery.messaging import identity
from adaptery.messaging.identity import Identity, IdentityDir

log = logging.getLogger("adaptery.agent")
HTTP_SECONDS = 30.0
RETRY_SECONDS = 30.0  # a failed renewal is tried again after this (the certificate still has a third to run)


class EnrollmentError(RuntimeError):
    pass


def _error(response: httpx.Response) -> str:
    try:
        return response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return response.text[:500]


def _verify(server_url: str, ca_path: Path) -> ssl.SSLContext | bool:
    return ssl.create_default_context(cafile=str(ca_path)) if server_url.startswith("https://") else False


def fetch_trust(server_url: str, pin: str) -> bytes:
    """The platform's CA bundle, fetched without trust and accepted only if it is the one the token names."""
    # Nothing secret is sent on this unverified request, and its answer is checked against the pin.
    response = httpx.get(f"{server_url}/api/fabric/ca", verify=False, timeout=HTTP_SECONDS)  # noqa: S501
    if response.status_code != 200:
        raise EnrollmentError(f"{server_url} did not give its CA ({response.status_code}: {_error(response)})")
    if identity.ca_pin(response.content) != pin:
        raise EnrollmentError(
            f"the CA that {server_url} presents is not the one this token was made for: refusing to trust it "
            "(a wrong address, or someone in between)"
        )
    return response.content


def enroll(server_url: str, token: str, directory: Path, *, kind: str = "agent") -> Identity:
    server_url = server_url.rstrip("/")
    try:
        _, pin = identity.parse_token(token)
    except ValueError as exc:
        raise EnrollmentError(str(exc)) from exc
    trust = fetch_trust(server_url, pin)
    store = IdentityDir(directory)
    directory.mkdir(parents=True, exist_ok=True)
    identity.write_private(store.ca_path, trust)
    key = identity.make_key()
    response = httpx.post(
        f"{server_url}/api/fabric/enroll",
        json={"token": token, "csr": identity.make_csr(key).decode(), "kind": kind},
        verify=_verify(server_url, store.ca_path),
        timeout=HTTP_SECONDS,
    )
    if response.status_code != 200:
        raise EnrollmentError(f"enrollment refused ({response.status_code}): {_error(response)}")
    body = response.json()
    enrolled = Identity(
        agent_id=body["agent_id"],
        kind=body["kind"],
        tenant_id=body["tenant_id"],
        island=body["island"],
        roles=body["roles"],
        server_url=server_url,
        nats_url=body["nats_url"],
        leaf_url=body["leaf_url"],
    )
    store.save(enrolled, key, body["certificate"].encode(), body["ca"].encode())
    return enrolled


def renew(directory: Path) -> None:
    store = IdentityDir(directory)
    current = store.identity()
    csr = identity.make_csr(store.key())  # the same key: the signature proves we hold the certificate's
    response = httpx.post(
        f"{current.server_url}/api/fabric/renew",
        json={"certificate": store.cert_path.read_text(), "csr": csr.decode()},
        verify=_verify(current.server_url, store.ca_path),
        timeout=HTTP_SECONDS,
    )
    if response.status_code != 200:
        raise EnrollmentError(f"renewal refused ({response.status_code}): {_error(response)}")
    store.save_certificate(response.json()["certificate"].encode())


class Renewer:
    """Renews the certificate in `directory` at 2/3 of its lifetime, on its own thread, until stopped."""

    def __init__(self, directory: Path, on_renewed: Callable[[], None]) -> None:
        self.directory = directory
        self.on_renewed = on_renewed
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="adaptery-renewer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        store = IdentityDir(self.directory)
        while not self._stop.is_set():
            wait = (store.renew_at() - dt.datetime.now(dt.UTC)).total_seconds()
            if wait > 0 and self._stop.wait(wait):
                return
            try:
                renew(self.directory)
                self.on_renewed()
                cert = store.certificate()
                log.info("certificate renewed: serial %x, valid until %s", cert.serial_number, cert.not_valid_after_utc)
            except (EnrollmentError, httpx.HTTPError, OSError) as exc:
                log.warning("certificate renewal failed, trying again in %.0f s: %s", RETRY_SECONDS, exc)
                if self._stop.wait(RETRY_SECONDS):
                    return


def reload_into(context: ssl.SSLContext, directory: Path) -> None:
    """Present the renewed certificate on every later handshake of connections using `context`."""
    store = IdentityDir(directory)
    context.load_cert_chain(str(store.cert_path), str(store.key_path))
