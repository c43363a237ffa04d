"""What every route gets through `Depends`: the platform and the authenticated, authorized caller."""

from __future__ import annotations

from dataclasses import replace
from typing import Annotated

from fastapi import Request
from pydantic import Field
from sqlalchemy.orm import Session

from adaptery.auth import policy
from adaptery.auth.principal import Principal
from adaptery.platform import Platform
from adaptery.services import audit, keys, limits, sessions
from adaptery.services.errors import PermissionDenied, Unauthenticated

SESSION_COOKIE = "adaptery_session"
CSRF_COOKIE = "adaptery_csrf"
DEVICE_COOKIE = "adaptery_device"
CSRF_HEADER = "x-csrf-token"
_SAFE_METHODS = ("GET", "HEAD", "OPTIONS")

# The widest integer a database column holds (BIGINT): a client's larger number is a 400 naming its field, never
# the database driver's overflow (a 500). Every integer a request body sends toward the database is bounded by it.
DB_INT_MAX = 2**63 - 1
Positive = Annotated[int, Field(ge=1, le=DB_INT_MAX)]


async def platform(request: Request) -> Platform:
    """Async, though it awaits nothing: FastAPI runs a plain function dependency on its worker pool, a thread hop
    per request for a lookup."""
    return request.app.state.platform


def authenticate(request: Request, s: Session) -> Principal:
    """An API key (Authorization: Bearer) or a browser session cookie with its CSRF token, looked up in `s`."""
    authorization = request.headers.get("authorization", "")
    if authorization:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated(
                "Malformed Authorization header: expected 'Bearer <API key>'.", code="invalid_api_key"
            )
        return keys.authenticate(s, token.strip())
    cookie = request.cookies.get(SESSION_COOKIE)
    if cookie:
        who, csrf = sessions.resolve(s, cookie)
        if request.method not in _SAFE_METHODS and request.headers.get(CSRF_HEADER) != csrf:
            raise PermissionDenied("Missing or wrong CSRF token.", code="csrf_failed")
        return who
    raise Unauthenticated(
        "You didn't provide an API key. You need to provide your API key in an Authorization header using "
        "Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
        code="missing_api_key",
    )


def principal(request: Request) -> Principal:
    """The caller, within its request rate and allowed by `auth.policy` to call the matched route: one database
    transaction (the key or session lookup, its limits, the request counted), on one trip to the worker pool."""
    route = request.scope.get("route")
    path = getattr(route, "path", request.url.path)
    permission = policy.permission_for(request.method, path)
    p: Platform = request.app.state.platform
    denied: PermissionDenied | None = None
    with p.db.system() as s:
        who = replace(authenticate(request, s), ip=request.client.host if request.client else None)
        # Counted before it is authorized: a request refused for its role or scope is one too (and writes an
        # audit row), so a key past its rate gets 429s, not an unlimited stream of audited refusals.
        request.state.caller_limits = limits.count_request(s, who)  # read once a request (`limits.reserve`)
        if permission is not None:
            try:
                policy.authorize(who, permission)
            except PermissionDenied as refused:  # someone known tried what their role or key does not allow
                denied = refused
    if denied is not None:
        with p.db.system() as s:
            detail = {"reason": denied.code, "permission": permission.name}
            audit.record(s, who, "auth.denied", target=f"{request.method} {path}", outcome="failure", detail=detail)
        raise denied
    return who
