"""The browser side: the page itself, sign-in, sessions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import FileResponse, RedirectResponse
from pydantic import BaseModel
from sqlalchemy import select
from sqlalchemy.orm import Session

from adaptery.api.deps import CSRF_COOKIE, SESSION_COOKIE, platform, principal
from adaptery.auth.principal import Principal
from adaptery.db import models as m
from adaptery.platform import Platform
from adaptery.services import audit, models, sessions
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
        "is_platform_admin": who.is_platform_admin,
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
        audit.sign_in(s, body.username, outcome, ip=request.client.host if request.client else None)
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


def _observed_speed(s: Session) -> dict[str, float]:
    """Tokens per second of this tenant's finished jobs, per base model: what a time estimate rests on."""
    tokens: dict[str, float] = {}
    seconds: dict[str, float] = {}
    for job in s.scalars(select(m.FineTuningJob).where(m.FineTuningJob.status == "succeeded")):
        if job.trained_tokens and job.started_at and job.finished_at and job.finished_at > job.started_at:
            tokens[job.model] = tokens.get(job.model, 0) + job.trained_tokens
            seconds[job.model] = seconds.get(job.model, 0) + job.finished_at - job.started_at
    return {model: tokens[model] / seconds[model] for model in tokens}


def _adapter_details(s: Session, adapter: m.Adapter) -> dict[str, Any]:
    job = s.get(m.FineTuningJob, adapter.job_id) if adapter.job_id else None
    details: dict[str, Any] = {
        "method": adapter.method,
        "rank": adapter.rank,
        "sha256": adapter.sha256,
        "visibility": adapter.visibility,
        "created_by": None,
        "job": None,
    }
    if adapter.created_by and (creator := s.get(m.User, adapter.created_by)) is not None:
        details["created_by"] = creator.username
    if job is not None:
        training = s.get(m.File, job.training_file)
        method = job.method or {}  # its hyperparameters hold every option the run used, the top level OpenAI's three
        checkpoint = s.scalars(
            select(m.JobCheckpoint).where(m.JobCheckpoint.job_id == job.id).order_by(m.JobCheckpoint.step.desc())
        ).first()
        details["job"] = {
            "id": job.id,
            "training_file": job.training_file,
            "training_filename": training.filename if training else None,
            "hyperparameters": method.get(method.get("type", ""), {}).get("hyperparameters") or job.hyperparameters,
            "trained_tokens": job.trained_tokens,
            "metrics": {k: v for k, v in (checkpoint.metrics if checkpoint else {}).items() if v is not None},
        }
    return details


@router.get("/api/models", tags=["models"])
def model_catalog(who: Principal = Depends(principal), p: Platform = Depends(platform)) -> dict:
    """The models this caller may use, with what the web page shows about them: base models' fine-tuning
    defaults and observed training speed; adapters' method, rank, training job, data and final metrics."""
    data = []
    with p.db.tenant(who.tenant_id) as s:
        speed = _observed_speed(s)
        for ref in models.list_models(s, viewer=who):
            body: dict[str, Any] = {
                "id": ref.id,
                "object": "model",
                "kind": "adapter" if ref.adapter else "base",
                "base_model": ref.base.id,
                "display_name": ref.base.display_name or ref.base.id,
                "owned_by": ref.owned_by,
                "created": int(ref.created_at),
            }
            if ref.adapter is None:
                body["finetune_defaults"] = ref.base.finetune_defaults
                body["observed_tokens_per_second"] = speed.get(ref.id)
            else:
                body.update(_adapter_details(s, ref.adapter))
            data.append(body)
    return {"object": "list", "data": data}
