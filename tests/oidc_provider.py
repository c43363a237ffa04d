"""A real OpenID Provider for the tests: panva's `oidc-provider` (OpenID Certified) on Node.js, run from
tests/oidc/ on a free loopback port. `make test` installs it from tests/oidc/package-lock.json (`npm ci`).

The test holds the provider's signing keys, so it can also mint tokens the provider would never issue (an
expired one, another nonce) with the provider's real key, and forge others with a key of its own."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx
from joserfc import jws, jwt
from joserfc.jwk import RSAKey

from tests.conftest import REPO, free_port

NODE_DIR = REPO / "tests" / "oidc"
CLIENT_ID = "adaptery-test"
CLIENT_SECRET = "a client secret only the tests know"


def new_key(kid: str) -> RSAKey:
    return RSAKey.generate_key(2048, parameters={"kid": kid, "use": "sig", "alg": "RS256"}, private=True)


@dataclass
class OidcProvider:
    issuer: str
    port: int
    workdir: Path
    redirect_uris: list[str]
    post_logout_redirect_uris: list[str]
    keys: list[RSAKey]
    accounts: dict[str, dict[str, Any]]
    process: subprocess.Popen | None = None
    clients: list[dict[str, Any]] = field(default_factory=list)

    @property
    def accounts_file(self) -> Path:
        return self.workdir / "accounts.json"

    def set_groups(self, login: str, groups: list[str]) -> None:
        """What the provider asserts about `login` from their next sign-in on (the file is read per sign-in)."""
        self.accounts[login]["groups"] = groups
        self.accounts_file.write_text(json.dumps(self.accounts))

    def add_account(self, login: str, **claims: Any) -> None:
        self.accounts[login] = {"password": f"{login} password", **claims}
        self.accounts_file.write_text(json.dumps(self.accounts))

    def start(self) -> None:
        node = shutil.which("node")
        if node is None or not (NODE_DIR / "node_modules" / "oidc-provider").is_dir():
            raise RuntimeError("the test OpenID provider is not installed: run `make test` (or npm ci in tests/oidc)")
        self.accounts_file.write_text(json.dumps(self.accounts))
        clients = self.clients or [
            {
                "client_id": CLIENT_ID,
                "client_secret": CLIENT_SECRET,
                "redirect_uris": self.redirect_uris,
                "post_logout_redirect_uris": self.post_logout_redirect_uris,
            }
        ]
        config = {
            "port": self.port,
            "issuer": self.issuer,
            "accounts_file": str(self.accounts_file),
            "keys": [key.as_dict(private=True) for key in self.keys],
            "clients": clients,
        }
        config_path = self.workdir / "provider.json"
        config_path.write_text(json.dumps(config))
        log = (self.workdir / "provider.log").open("a")
        self.process = subprocess.Popen(
            [node, str(NODE_DIR / "provider.mjs"), str(config_path)], stdout=log, stderr=subprocess.STDOUT, cwd=NODE_DIR
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the OpenID provider exited:\n{(self.workdir / 'provider.log').read_text()}")
            try:
                if httpx.get(f"{self.issuer}/.well-known/openid-configuration", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError("the OpenID provider did not answer within 60 s")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None

    def rotate_keys(self) -> RSAKey:
        """The provider signs with a new key from now on (the old one still published), as a rotation does."""
        self.stop()
        fresh = new_key(f"k{len(self.keys) + 1}")
        self.keys.insert(0, fresh)
        self.start()
        return fresh

    # -- tokens the provider would never issue ----------------------------------------------------------------

    def mint(self, claims: dict[str, Any], *, key: RSAKey | None = None, header: dict[str, Any] | None = None) -> str:
        """A token with these claims signed by `key` (default: the provider's current key)."""
        key = key or self.keys[0]
        return jwt.encode({"alg": "RS256", "kid": key.kid, **(header or {})}, claims, key)


def claims_of(token: str) -> dict[str, Any]:
    """A token's claims, unverified (the test reads what the provider issued in order to alter it)."""
    return json.loads(jws.extract_compact(token.encode()).payload)


def start_provider(
    workdir: Path, base_urls: list[str], accounts: dict[str, dict[str, Any]], *, port: int | None = None
) -> OidcProvider:
    """The provider on `port` (default: a free one), with one client whose redirect URIs are these platforms'."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    provider = OidcProvider(
        issuer=f"http://127.0.0.1:{port}",
        port=port,
        workdir=workdir,
        redirect_uris=[f"{url}/auth/oidc/callback" for url in base_urls],
        post_logout_redirect_uris=[f"{url}/" for url in base_urls],
        keys=[new_key("k1")],
        accounts={login: {"password": f"{login} password", **claims} for login, claims in accounts.items()},
    )
    provider.start()
    return provider


def sign_in_at_provider(
    authorize_url: str, login: str, password: str | None = None, browser: httpx.Client | None = None
) -> str:
    """Walk the provider's pages as a browser would: the login form, then back. Returns the URL the provider
    sends the browser back to (our callback, with code and state)."""
    own = browser is None
    browser = browser or httpx.Client(follow_redirects=False, timeout=30)
    provider_origin = "{0.scheme}://{0.netloc}".format(urlsplit(authorize_url))
    try:
        url = authorize_url
        for _ in range(12):
            response = browser.get(url)
            if response.status_code in (302, 303):
                location = urljoin(url, response.headers["location"])
                if not location.startswith(provider_origin + "/"):
                    return location  # leaving the provider: back to the relying party
                url = location
                continue
            form = re.search(r'<form method="post" action="([^"]+)"', response.text)
            assert response.status_code == 200 and form, f"unexpected provider page: {response.text[:500]}"
            posted = browser.post(
                urljoin(url, form.group(1)),
                data={"login": login, "password": password or f"{login} password"},
            )
            assert posted.status_code in (302, 303), f"sign-in at the provider failed: {posted.text[:500]}"
            url = urljoin(url, posted.headers["location"])
        raise AssertionError("the provider never sent the browser back")
    finally:
        if own:
            browser.close()
