"""The browser side: the page itself, sign-in, sessions."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import FileResponse, RedirectResponse
from pydantic import BaseModel

from adaptery.api.deps import CSRF_COOKIE, SESSION_COOKIE, platform, principal
from adaptery.auth.principal import Principal
from adaptery.platform import Platform
from adaptery.services import sessions
from adaptery.services.errors import ServiceError, Unauthenticated

STATIC_DIR = Path(__file__).resolve().parent.parent / "web" / "static"
router = APIRouter(tags=["web"])


class LoginRequest(BaseModel):
    username: str
    password: str


class PasswordRequest(BaseModel):
    password: str


def _me(who: Principal, has_password: bool) -> dict:
    return {
        "user": {"id": who.user_id, "username": who.username},
        "tenant": {"id": who.tenant_id, "name": who.tenant_name},
        "role": who.role.value,
        "has_password": has_password,
    }


def _set_cookies(response: Response, request: Request, new: sessions.NewSession, p: Platform) -> None:
    secure = request.url.scheme == "https"
    max_age = int(p.settings.session_hours * 3600)
    response.set_cookie(
        SESSION_COOKIE, new.token, max_age=max_age, httponly=True, samesite="strict", secure=secure, path="/"
    )
    response.set_cookie(CSRF_COOKIE, new.csrf_token, max_age=max_age, samesite="strict", secure=secure, path="/")


@router.get("/", include_in_schema=False)
def index() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})


@router.get("/api/health", tags=["meta"])
def health() -> dict:
    return {"status": "ok"}


@router.get("/auth/link", include_in_schema=False)
def sign_in_link(token: str, request: Request, p: Platform = Depends(platform)) -> Response:
    try:
        with p.db.system() as s:
            new = sessions.consume_login_link(s, token, p.settings)
    except Unauthenticated:
        return RedirectResponse("/?link=invalid", status_code=303)
    response = RedirectResponse("/", status_code=303)
    _set_cookies(response, request, new, p)
    return response


@router.post("/api/auth/login")
def login(body: LoginRequest, request: Request, response: Response, p: Platform = Depends(platform)) -> dict:
    with p.db.system() as s:
        outcome = sessions.login(s, body.username, body.password, p.settings)
    if isinstance(outcome, ServiceError):
        raise outcome
    _set_cookies(response, request, outcome, p)
    return _me(outcome.principal, has_password=True)


@router.post("/api/auth/logout", status_code=204)
def logout(who: Principal = Depends(principal), p: Platform = Depends(platform)) -> Response:
    if who.session_id:
        with p.db.system() as s:
            sessions.logout(s, who.session_id)
    response = Response(status_code=204)
    response.delete_cookie(SESSION_COOKIE, path="/")
    response.delete_cookie(CSRF_COOKIE, path="/")
    return response


@router.post("/api/auth/password", status_code=204)
def set_password(
    body: PasswordRequest, who: Principal = Depends(principal), p: Platform = Depends(platform)
) -> Response:
    with p.db.system() as s:
        sessions.set_password(s, who.user_id, body.password)
    return Response(status_code=204)


@router.get("/api/me")
def me(who: Principal = Depends(principal), p: Platform = Depends(platform)) -> dict:
    with p.db.system() as s:
        return _me(who, sessions.has_password(s, who.user_id))
