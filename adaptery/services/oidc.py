"""OpenID Connect, the relying party's side: discovery, the authorization request, the code exchange, and the
ID token's checks. No database here (`services.sso` owns providers, people and sessions).

What a sign-in must prove before anyone is signed in (OpenID Connect Core 1.0, 3.1.3.7):
- the code came back to the browser that left (`state`, bound to a cookie: `services.sso`), and only the
  party that asked can redeem it (PKCE S256: the verifier never leaves the server);
- the ID token is signed by a key in the provider's JWKS with an asymmetric algorithm the provider announces
  (never `none`, never an HMAC keyed by our own client secret), checked by joserfc;
- `iss` is the configured issuer (which the discovery document must repeat exactly), `aud` holds our client
  id (and `azp` is ours when there are several audiences), `exp` has not passed and `iat` is not in the future
  (each within `oidc_clock_skew_seconds`), `nonce` is the one this sign-in sent;
- claims fetched from the userinfo endpoint are about the same `sub`.

Keys rotate: a token signed with a key id we have not seen refetches the JWKS (at most every
`oidc_jwks_refresh_seconds`, so a stream of bogus key ids cannot make us hammer the provider).
"""

from __future__ import annotations

import base64
import hashlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import httpx
from joserfc import jws, jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet

from adaptery.services.errors import InvalidRequest, ServiceError, Unauthenticated

# Asymmetric signatures only: with HS256 anyone holding the client secret (every replica of every relying
# party sharing it) could mint tokens.
SIGNING_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA", "Ed25519"}
)
DISCOVERY_PATH = "/.well-known/openid-configuration"


class ProviderUnavailable(ServiceError):
    """The provider could not be reached, or answered what OpenID Connect does not allow."""

    status = 502
    type = "server_error"

    def __init__(self, message: str) -> None:
        super().__init__(message, code="provider_unavailable")


class TokenRefused(Unauthenticated):
    """The sign-in's answer did not prove who it claims: the reason is in `code` (and the audit log)."""


@dataclass(frozen=True)
class ProviderConfig:
    """What the protocol needs of one provider."""

    id: str
    name: str
    issuer: str
    client_id: str
    client_secret: str | None
    scopes: tuple[str, ...]


def check_issuer(issuer: str) -> str:
    """An issuer is an https URL without query or fragment; plain http only on this machine (tests, dev)."""
    parts = urlsplit(issuer)
    loopback = parts.hostname in ("127.0.0.1", "localhost", "::1")
    if parts.scheme != "https" and not (parts.scheme == "http" and loopback):
        raise InvalidRequest("issuer must be an https URL (http only on 127.0.0.1 or localhost)", param="issuer")
    if not parts.hostname or parts.query or parts.fragment:
        raise InvalidRequest("issuer must be a URL with a host and no query or fragment", param="issuer")
    return issuer


def pkce_challenge(verifier: str) -> str:
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


@dataclass
class _Cached:
    metadata: dict[str, Any]
    fetched_at: float
    keys: KeySet | None = None
    keys_fetched_at: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)


class OidcClient:
    """Talks to providers for the platform; discovery documents and key sets are cached per issuer."""

    def __init__(
        self,
        make_http: Callable[[], httpx.Client],
        *,
        clock_skew_seconds: float,
        metadata_seconds: float,
        jwks_refresh_seconds: float,
    ) -> None:
        # called at the first request: an HTTP client loads the CA bundle (~0.1 s), which a platform with no single
        # sign-on configured never needs
        self._http: httpx.Client | None = None
        self._make_http = make_http
        self._http_lock = threading.Lock()
        self.clock_skew = clock_skew_seconds
        self.metadata_seconds = metadata_seconds
        self.jwks_refresh_seconds = jwks_refresh_seconds
        self._cache: dict[str, _Cached] = {}
        self._lock = threading.Lock()

    @property
    def http(self) -> httpx.Client:
        with self._http_lock:
            if self._http is None:
                self._http = self._make_http()
            return self._http

    @http.setter
    def http(self, client: httpx.Client) -> None:
        self._http = client

    def close(self) -> None:
        if self._http is not None:
            self._http.close()

    # -- discovery -----------------------------------------------------------------------------------------

    def _get_json(self, url: str, what: str, **kwargs: Any) -> dict[str, Any]:
        try:
            response = self.http.get(url, **kwargs)
        except httpx.HTTPError as exc:
            raise ProviderUnavailable(f"The identity provider's {what} could not be read: {exc}") from exc
        return _json_object(response, what)

    def metadata(self, provider: ProviderConfig) -> dict[str, Any]:
        with self._lock:
            cached = self._cache.get(provider.issuer)
        if cached and time.time() - cached.fetched_at < self.metadata_seconds:
            return cached.metadata
        document = self._get_json(provider.issuer.rstrip("/") + DISCOVERY_PATH, "discovery document")
        if document.get("issuer") != provider.issuer:  # OpenID Connect Discovery 4.3: exactly the configured one
            raise ProviderUnavailable(
                f"The discovery document of '{provider.name}' names the issuer {document.get('issuer')!r}, not "
                f"{provider.issuer!r}: refused (a provider speaks only for its own issuer)."
            )
        for needed in ("authorization_endpoint", "token_endpoint", "jwks_uri"):
            if not isinstance(document.get(needed), str):
                raise ProviderUnavailable(f"The discovery document of '{provider.name}' has no {needed}.")
        with self._lock:
            self._cache[provider.issuer] = _Cached(document, time.time())
        return document

    def _cached(self, provider: ProviderConfig) -> _Cached:
        self.metadata(provider)
        with self._lock:
            return self._cache[provider.issuer]

    def _key_set(self, provider: ProviderConfig, kid: str | None) -> KeySet:
        """The provider's keys, refetched when stale or when `kid` is one we have not seen (key rotation)."""
        cached = self._cached(provider)
        with cached.lock:
            now = time.time()
            known = cached.keys is not None and (kid is None or any(key.kid == kid for key in cached.keys))
            stale = now - cached.keys_fetched_at >= self.metadata_seconds
            may_refetch = now - cached.keys_fetched_at >= self.jwks_refresh_seconds
            if cached.keys is None or stale or (not known and may_refetch):
                document = self._get_json(cached.metadata["jwks_uri"], "key set (JWKS)")
                try:
                    cached.keys = KeySet.import_key_set(document)  # type: ignore[arg-type]
                except (JoseError, ValueError, TypeError, KeyError) as exc:
                    raise ProviderUnavailable(f"The key set of '{provider.name}' could not be read: {exc}") from exc
                cached.keys_fetched_at = now
            return cached.keys

    # -- the flow ------------------------------------------------------------------------------------------

    def authorization_url(
        self, provider: ProviderConfig, *, redirect_uri: str, state: str, nonce: str, code_verifier: str
    ) -> str:
        endpoint = self.metadata(provider)["authorization_endpoint"]
        query = {
            "response_type": "code",
            "client_id": provider.client_id,
            "redirect_uri": redirect_uri,
            "scope": " ".join(provider.scopes),
            "state": state,
            "nonce": nonce,
            "code_challenge": pkce_challenge(code_verifier),
            "code_challenge_method": "S256",
        }
        return endpoint + ("&" if "?" in endpoint else "?") + urlencode(query)

    def exchange_code(
        self, provider: ProviderConfig, *, code: str, redirect_uri: str, code_verifier: str
    ) -> dict[str, Any]:
        """The token endpoint's answer to our code (with the PKCE verifier and the client's credentials)."""
        metadata = self.metadata(provider)
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": redirect_uri,
            "code_verifier": code_verifier,
        }
        auth = None
        methods = metadata.get("token_endpoint_auth_methods_supported") or ["client_secret_basic"]
        if provider.client_secret is None:
            form["client_id"] = provider.client_id
        elif "client_secret_basic" in methods:
            # RFC 6749 2.3.1: each part form-encoded before the Basic scheme joins them
            auth = httpx.BasicAuth(quote(provider.client_id, safe=""), quote(provider.client_secret, safe=""))
        else:
            form.update(client_id=provider.client_id, client_secret=provider.client_secret)
        try:
            response = self.http.post(metadata["token_endpoint"], data=form, auth=auth)
        except httpx.HTTPError as exc:
            raise ProviderUnavailable(f"The identity provider's token endpoint could not be reached: {exc}") from exc
        if response.status_code != 200:
            body = _safe_json(response)
            raise TokenRefused(
                f"The identity provider refused the sign-in's code: {body.get('error', response.status_code)}",
                code="code_refused",
            )
        tokens = _json_object(response, "token response")
        if not isinstance(tokens.get("id_token"), str):
            raise TokenRefused("The identity provider's answer has no ID token.", code="no_id_token")
        return tokens

    def verify_id_token(self, provider: ProviderConfig, id_token: str, *, nonce: str) -> dict[str, Any]:
        """The ID token's claims, once its signature, issuer, audience, times and nonce all check out."""
        metadata = self.metadata(provider)
        try:
            header = jws.extract_compact(id_token.encode("ascii")).protected
        except (JoseError, ValueError, UnicodeError) as exc:
            raise TokenRefused("The ID token is not a signed JWT.", code="malformed_token") from exc
        algorithm = header.get("alg")
        announced = set(metadata.get("id_token_signing_alg_values_supported") or ["RS256"])
        if algorithm not in SIGNING_ALGORITHMS & announced:
            raise TokenRefused(
                f"The ID token's algorithm {algorithm!r} is not an asymmetric one this provider announces.",
                code="bad_algorithm",
            )
        kid = header.get("kid")
        keys = self._key_set(provider, kid if isinstance(kid, str) else None)
        try:
            token = jwt.decode(id_token, keys, algorithms=[algorithm])
        except JoseError as exc:  # a bad signature, or a key id the provider does not publish
            raise TokenRefused(f"The ID token's signature does not verify: {exc.error}", code="bad_signature") from exc
        claims = token.claims
        registry = jwt.JWTClaimsRegistry(
            leeway=int(self.clock_skew),
            iss={"essential": True, "value": provider.issuer},
            aud={"essential": True, "value": provider.client_id},
            sub={"essential": True},
            exp={"essential": True},
            iat={"essential": True},
            nonce={"essential": True, "value": nonce},
        )
        try:
            registry.validate(claims)
        except JoseError as exc:
            claim = getattr(exc, "claim", None) or "claims"
            code = "expired_token" if exc.error == "expired_token" else f"bad_{claim}"
            raise TokenRefused(f"The ID token was refused: {exc.description or exc.error}", code=code) from exc
        audiences = claims["aud"] if isinstance(claims["aud"], list) else [claims["aud"]]
        if len(audiences) > 1 and claims.get("azp") != provider.client_id:
            raise TokenRefused("The ID token is for several parties and not authorized for us.", code="bad_azp")
        return dict(claims)

    def userinfo(self, provider: ProviderConfig, access_token: str, *, subject: str) -> dict[str, Any]:
        """The userinfo endpoint's claims (where the provider puts groups), which must be about `subject`."""
        endpoint = self.metadata(provider).get("userinfo_endpoint")
        if not isinstance(endpoint, str):
            return {}
        claims = self._get_json(endpoint, "userinfo", headers={"Authorization": f"Bearer {access_token}"})
        if claims.get("sub") != subject:
            raise TokenRefused("The provider's userinfo is about someone else than the ID token.", code="bad_userinfo")
        return claims

    def end_session_url(self, provider: ProviderConfig, *, id_token: str | None, post_logout_redirect_uri: str) -> str:
        """RP-initiated logout at the provider, or "" where it offers none (or cannot be reached)."""
        try:
            endpoint = self.metadata(provider).get("end_session_endpoint")
        except ServiceError:
            return ""
        if not isinstance(endpoint, str):
            return ""
        query = {"client_id": provider.client_id, "post_logout_redirect_uri": post_logout_redirect_uri}
        if id_token:
            query["id_token_hint"] = id_token
        return endpoint + ("&" if "?" in endpoint else "?") + urlencode(query)


def _safe_json(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _json_object(response: httpx.Response, what: str) -> dict[str, Any]:
    if response.status_code != 200:
        raise ProviderUnavailable(f"The identity provider's {what} answered HTTP {response.status_code}.")
    body = _safe_json(response)
    if not body:
        raise ProviderUnavailable(f"The identity provider's {what} is not a JSON object.")
    return body
