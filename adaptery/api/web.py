"""The browser side: the page itself, sign-in, sessions."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import FileResponse, RedirectResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.orm import Session

from adaptery.api.deps import CSRF_COOKIE, DEVICE_COOKIE, SESSION_COOKIE, platform, principal
from adaptery.auth.principal import Principal
from adaptery.auth.secrets import hash_token
from adaptery.engine.loading import ModelNotAvailable
from adaptery.platform import Platform
from adaptery.services import audit, catalog, sessions, sso, tenants
from adaptery.services.errors import PermissionDenied, ServiceError, Unauthenticated

STATIC_DIR = Path(__file__).resolve().parent.parent / "web" / "static"
# Ties a sign-in through an identity provider to the browser that started it. SameSite=Lax, not Strict: the
# provider sends the browser back with a cross-site top-level GET, which must carry it.
OIDC_COOKIE = "adaptery_oidc"
router = APIRouter(tags=["web"])


class LoginRequest(BaseModel):
    username: str = Field(max_length=64)
    password: str = Field(max_length=sessions.MAX_PASSWORD_LENGTH)


class PasswordRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    password: str
    current_password: str | None = Field(None, max_length=sessions.MAX_PASSWORD_LENGTH)


class StepUpRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    password: str = Field(max_length=sessions.MAX_PASSWORD_LENGTH)


class AcceptRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    token: str = Field("", max_length=128)  # from the invitation's accept link


class SwitchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tenant_id: str = Field(max_length=40)


def _me(s: Session, who: Principal) -> dict:
    platform_until = sessions.platform_until(s, who)
    return {
        "user": {"id": who.user_id, "username": who.username},
        "tenant": {"id": who.tenant_id, "name": who.tenant_name},
        "role": who.role.value,
        "is_platform_admin": who.is_platform_admin,
        "platform_admin_until": int(platform_until) if platform_until else None,
        "can_administer_platform": sessions.may_step_up(s, who.user_id),
        "has_password": sessions.has_password(s, who.user_id),
        "sign_in_method": sessions.sign_in_method(s, who),
        "tenants": [{"id": t.id, "name": t.name, "role": t.role} for t in sessions.tenants_of(s, who.user_id)],
        "invitations": len(tenants.invitations_for(s, who.user_id)),
    }


def _set_cookies(response: Response, request: Request, new: sessions.NewSession, p: Platform) -> None:
    secure = request.url.scheme == "https"
    max_age = int(p.settings.session_hours * 3600)
    response.set_cookie(
        SESSION_COOKIE, new.token, max_age=max_age, httponly=True, samesite="strict", secure=secure, path="/"
    )
    response.set_cookie(CSRF_COOKIE, new.csrf_token, max_age=max_age, samesite="strict", secure=secure, path="/")
    if new.device_token:  # sent back only to the sign-in route: it spares this browser the wider locks
        response.set_cookie(
            DEVICE_COOKIE,
            new.device_token,
            max_age=int(p.settings.sign_in_device_days * 86400),
            httponly=True,
            samesite="strict",
            secure=secure,
            path="/api/auth/login",
        )


def _replace_session(response: Response, request: Request, new: sessions.NewSession, p: Platform) -> None:
    """Hand the browser `new`; whatever session it held before ends: the new one shares nothing with it."""
    previous = request.cookies.get(SESSION_COOKIE)
    if previous:
        with p.db.system() as s:
            sessions.end_by_token_hash(s, hash_token(previous))
    _set_cookies(response, request, new, p)


@router.get("/", include_in_schema=False)
def index() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})


@router.get("/invitations/accept", include_in_schema=False)
def invitation_page() -> FileResponse:
    """An invitation's accept link opens the page, which shows the invitation with an Accept button that
    sends the link's token; opening it changes nothing."""
    return index()


@router.get("/api/health", tags=["meta"])
def health() -> dict:
    return {"status": "ok"}


@router.get("/auth/link", include_in_schema=False)
def sign_in_link_page() -> FileResponse:
    """A one-time sign-in link opens the page, which says whom it signs in and where, with a button that spends
    it: a GET changes nothing, so a mail scanner or a chat's link preview fetching it cannot burn it."""
    return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-store"})


class LinkRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    token: str = Field(min_length=1, max_length=128)  # from the link's query string


class LinkHolder(BaseModel):
    object: str = "sign_in_link"
    username: str = Field(description="The account the link signs in")
    tenant: str = Field(description="The name of the workspace it signs in to")
    purpose: str = Field(description="setup (a first sign-in) or reset (a password reset)")


@router.post("/api/auth/link/holder")
def sign_in_link_holder(body: LinkRequest, p: Platform = Depends(platform)) -> LinkHolder:
    """Whom a usable sign-in link signs in, without spending it (401 `invalid_login_link` otherwise)."""
    with p.db.system() as s:
        held = sessions.login_link_holder(s, body.token)
    return LinkHolder(username=held.username, tenant=held.tenant_name, purpose=held.purpose)


@router.post("/api/auth/link")
def sign_in_with_link(body: LinkRequest, request: Request, response: Response, p: Platform = Depends(platform)) -> dict:
    """Spend a one-time sign-in link: a session for its person, as `/api/auth/login` opens (this browser's
    session before, if any, ends)."""
    try:
        with p.db.system() as s:
            new = sessions.consume_login_link(s, body.token, p.settings)
            audit.record(s, new.principal, "auth.sign_in_link", target=new.principal.username, ip=_ip(request))
    except Unauthenticated as refused:
        with p.db.system() as s:  # whose link it was is unknown (or must not be trusted): filed under no tenant
            audit.record(s, None, "auth.sign_in_link", outcome="failure", actor="anonymous", ip=_ip(request),
                         detail={"reason": refused.code})  # fmt: skip
        raise
    _replace_session(response, request, new, p)
    with p.db.system() as s:
        return _me(s, new.principal)


def _ip(request: Request) -> str | None:
    return request.client.host if request.client else None


class SignInChoice(BaseModel):
    name: str
    display_name: str
    start_url: str


class SignInChoices(BaseModel):
    object: str = "list"
    data: list[SignInChoice]


@router.get("/api/auth/providers")
def sign_in_providers(p: Platform = Depends(platform)) -> SignInChoices:
    """The identity providers the sign-in page offers (those some tenant trusts)."""
    with p.db.system() as s:
        choices = sso.sign_in_choices(s)
        data = [SignInChoice(name=c.name, display_name=c.display_name, start_url=f"/auth/oidc/{c.name}/start")
                for c in choices]  # fmt: skip
    return SignInChoices(data=data)


@router.get("/auth/oidc/{provider}/start", include_in_schema=False)
def sso_start(provider: str, request: Request, tenant: str | None = None, p: Platform = Depends(platform)) -> Response:
    """Off to the identity provider (authorization code with PKCE, state and nonce); `tenant`: where to land."""
    try:
        with p.db.system() as s:
            started = sso.start(s, p.oidc, p.settings, p.master_keys, provider[:64], tenant[:64] if tenant else None)
    except ServiceError as refused:
        return RedirectResponse(f"/?sso={refused.code or 'unavailable'}", status_code=303)
    response = RedirectResponse(started.url, status_code=303)
    response.set_cookie(
        OIDC_COOKIE,
        started.browser_token,
        max_age=int(p.settings.oidc_sign_in_minutes * 60),
        httponly=True,
        samesite="lax",
        secure=request.url.scheme == "https",
        path=sso.CALLBACK_PATH,
    )
    return response


@router.get(sso.CALLBACK_PATH, include_in_schema=False)
def sso_callback(
    request: Request,
    state: str | None = None,
    code: str | None = None,
    error: str | None = None,
    iss: str | None = None,
    p: Platform = Depends(platform),
) -> Response:
    """The identity provider's answer: a session here, or back to the sign-in page with why not."""
    outcome = sso.finish(
        p.db,
        p.oidc,
        p.settings,
        p.master_keys,
        state=state[:512] if state else None,
        code=code[:4096] if code else None,
        error=error[:128] if error else None,
        issuer=iss[:512] if iss else None,
        browser_token=request.cookies.get(OIDC_COOKIE),
        ip=_ip(request),
    )
    if outcome.new is None:
        reason = (outcome.refusal.code if outcome.refusal else None) or "refused"
        return RedirectResponse(f"/?sso={reason}", status_code=303)
    response = RedirectResponse("/", status_code=303)
    response.delete_cookie(OIDC_COOKIE, path=sso.CALLBACK_PATH)
    _replace_session(response, request, outcome.new, p)
    return response


@router.post("/api/auth/login")
def login(body: LoginRequest, request: Request, response: Response, p: Platform = Depends(platform)) -> dict:
    with p.db.system() as s:
        outcome = sessions.login(
            s,
            body.username,
            body.password,
            p.settings,
            ip=_ip(request),
            device_cookie=request.cookies.get(DEVICE_COOKIE),
        )
        audit.sign_in(s, body.username, outcome, ip=_ip(request))
    if isinstance(outcome, ServiceError):
        raise outcome
    _replace_session(response, request, outcome, p)
    with p.db.system() as s:
        return _me(s, outcome.principal)


class SignOut(BaseModel):
    object: str = "sign_out"
    end_session_url: str = Field(description="Go here to end the identity provider's session too")


@router.post(
    "/api/auth/logout",
    status_code=204,
    responses={200: {"model": SignOut, "description": "Signed out here; the provider's session ends at the URL"}},
)
def logout(who: Principal = Depends(principal), p: Platform = Depends(platform)) -> Response:
    """End this session. One opened through an identity provider that offers RP-initiated logout answers 200
    with the URL that ends the provider's session too (the page goes there)."""
    with p.db.system() as s:
        record = sessions.logout(s, who.session_id) if who.session_id else None
        end_session = sso.end_session_url(s, p.oidc, p.settings, p.master_keys, record)
        detail = None
        if record is not None:
            detail = {"method": record.sign_in_method or sessions.PASSWORD, "provider_logout": bool(end_session)}
        audit.record(s, who, "auth.sign_out", target=who.username, detail=detail)
    response = Response(status_code=204)
    if end_session:
        response = Response(SignOut(end_session_url=end_session).model_dump_json(), media_type="application/json")
    response.delete_cookie(SESSION_COOKIE, path="/")
    response.delete_cookie(CSRF_COOKIE, path="/")
    return response


@router.post("/api/auth/password", status_code=204)
def change_password(
    body: PasswordRequest, who: Principal = Depends(principal), p: Platform = Depends(platform)
) -> Response:
    """Your own password: give the current one (or, just after signing in with a one-time link, none).
    Every other session of yours ends."""
    with p.db.system() as s:
        refusal = sessions.change_password(s, who, body.current_password, body.password, p.settings)
        outcome = "failure" if refusal else "success"
        detail = {"with_current_password": body.current_password is not None}  # none: set after a one-time link
        audit.record(s, who, "user.password_change", target=who.username, outcome=outcome, detail=detail)
    if refusal:
        raise refusal
    return Response(status_code=204)


@router.post("/api/auth/platform")
def enter_platform_administration(
    body: StepUpRequest, who: Principal = Depends(principal), p: Platform = Depends(platform)
) -> dict:
    """Platform admins: step up into platform administration, with your password, for a few minutes."""
    with p.db.system() as s:
        outcome = sessions.elevate(s, who, body.password, p.settings)
        audit.record(
            s,
            who,
            "auth.platform_step_up",
            target=who.username,
            outcome="failure" if isinstance(outcome, ServiceError) else "success",
        )
    if isinstance(outcome, ServiceError):
        raise outcome
    with p.db.system() as s:
        return _me(s, outcome)


@router.delete("/api/auth/platform", status_code=204)
def leave_platform_administration(who: Principal = Depends(principal), p: Platform = Depends(platform)) -> Response:
    with p.db.system() as s:
        sessions.leave_platform(s, who)
        audit.record(s, who, "auth.platform_leave", target=who.username)
    return Response(status_code=204)


@router.post("/api/auth/switch")
def switch_tenant(
    body: SwitchRequest,
    request: Request,
    response: Response,
    who: Principal = Depends(principal),
    p: Platform = Depends(platform),
) -> dict:
    """Continue in another of your tenants (a new session there; this one ends)."""
    with p.db.system() as s:
        new = sessions.switch_tenant(s, who, body.tenant_id, p.settings)
        audit.record(s, new.principal, "auth.switch_tenant", target=new.principal.tenant_name, ip=who.ip)
    _set_cookies(response, request, new, p)
    with p.db.system() as s:
        return _me(s, new.principal)


@router.get("/api/me")
def me(who: Principal = Depends(principal), p: Platform = Depends(platform)) -> dict:
    with p.db.system() as s:
        return _me(s, who)


@router.get("/api/invitations")
def my_invitations(who: Principal = Depends(principal), p: Platform = Depends(platform)) -> dict:
    """Tenants that invited you; you join one by accepting its invitation."""
    with p.db.system() as s:
        data = [
            {
                "id": invitation.id,
                "object": "invitation",
                "tenant": {"id": tenant.id, "name": tenant.name},
                "role": invitation.role,
                "created_at": int(invitation.created_at),
                "expires_at": int(invitation.expires_at),
            }
            for invitation, tenant in tenants.invitations_for(s, who.user_id)
        ]
    return {"object": "list", "data": data}


def _answer(p: Platform, who: Principal, invitation_id: str, *, accept: bool, token: str | None = None) -> dict:
    action = "member.invitation_accept" if accept else "member.invitation_decline"
    try:
        with p.db.system() as s:
            invitation = tenants.answer_invitation(s, who.user_id, invitation_id, accept=accept, token=token)
            detail = {"role": invitation.role}
            audit.record(s, who, action, tenant_id=invitation.tenant_id, target=who.username, detail=detail)
            return _me(s, who)
    except PermissionDenied as refused:  # the invitation exists and is theirs, the link did not match
        with p.db.system() as s:
            audit.record(s, who, action, target=who.username, outcome="failure", detail={"reason": refused.code})
        raise


@router.post("/api/invitations/{invitation_id}/accept")
def accept_invitation(
    invitation_id: str,
    body: AcceptRequest | None = None,
    who: Principal = Depends(principal),
    p: Platform = Depends(platform),
) -> dict:
    """Join the tenant that invited you, with the invited role: yours to accept, signed in as yourself in the
    web page (an API key cannot accept for you), with the token of the accept link its admin sent you
    (403 `invitation_link_required` without it: the pending list alone is not enough)."""
    return _answer(p, who, invitation_id, accept=True, token=body.token if body else None)


@router.post("/api/invitations/{invitation_id}/decline")
def decline_invitation(
    invitation_id: str, who: Principal = Depends(principal), p: Platform = Depends(platform)
) -> dict:
    return _answer(p, who, invitation_id, accept=False)


@router.get("/api/models", tags=["models"])
def model_catalog(who: Principal = Depends(principal), p: Platform = Depends(platform)) -> dict:
    """The models this caller may use, with what the web page shows about them: each one's context length;
    base models' fine-tuning defaults and observed training speed; adapters' method, rank, training job, data
    and final metrics."""
    with p.db.tenant(who.tenant_id) as s:
        data = catalog.model_catalog(s, who)
    contexts = {base: _context_length(p, base) for base in {body["base_model"] for body in data}}
    for body in data:
        body["context_length"] = contexts[body["base_model"]]
    return {"object": "list", "data": data}


def _context_length(p: Platform, base_id: str) -> int | None:
    """The longest prompt plus answer the base takes, in tokens (the page bounds max tokens by it)."""
    try:
        return p.token_budget(base_id).context
    except (ServiceError, ModelNotAvailable, OSError, ValueError):
        return None  # its files are not here (yet): the server still refuses what does not fit
