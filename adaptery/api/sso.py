"""Single sign-on administration: platform admins add identity providers and bind them to tenants; a tenant's
admins map the provider's groups to roles and decide whether passwords and links still sign in. (The sign-in
itself, /auth/oidc/..., lives with the other browser routes in `api.web`.) Every change is audited."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Response
from pydantic import BaseModel, ConfigDict, Field

from adaptery.api.deps import platform, principal
from adaptery.auth.principal import Principal, Role
from adaptery.db import models as m
from adaptery.platform import Platform
from adaptery.services import audit, sessions, sso, tenants

router = APIRouter(tags=["sso"])


class ProviderBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=63, description="Short name: lowercase letters, digits and '-'")
    issuer: str = Field(min_length=1, max_length=512, description="The issuer URL (https; http only on loopback)")
    client_id: str = Field(min_length=1, max_length=255)
    client_secret: str | None = Field(None, max_length=1024, description="Kept sealed; never shown again")
    display_name: str = Field("", max_length=128, description="What the sign-in button says")
    scopes: list[str] = Field(default_factory=lambda: ["openid", "email", "profile", "groups"], max_length=20)
    groups_claim: str = "groups"
    username_claim: str = "preferred_username"


class BindingBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    providers: list[str] = Field(max_length=50, description="Names of the providers this tenant trusts (all of them)")


class RuleBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    provider: str = Field(max_length=64)
    group: str = Field(max_length=255, description="A value of the provider's groups claim")
    role: Role


class RulesBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rules: list[RuleBody] = Field(max_length=sso.MAX_RULES)


class PolicyBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    password_sign_in: bool
    link_sign_in: bool


def _provider(row: m.IdentityProvider) -> dict[str, Any]:
    return {
        "object": "identity_provider",
        "name": row.name,
        "display_name": row.display_name,
        "issuer": row.issuer,
        "client_id": row.client_id,
        "has_client_secret": bool(row.secret_sealed) or row.managed_by_settings,
        "scopes": row.scopes,
        "groups_claim": row.groups_claim,
        "username_claim": row.username_claim,
        "managed_by_settings": row.managed_by_settings,
        "created_at": int(row.created_at),
    }


def _tenant_sso(s: Any, tenant_id: str) -> dict[str, Any]:
    policy = sessions.sign_in_policy(s, tenant_id)
    return {
        "object": "tenant.sso",
        "providers": [{"name": p.name, "display_name": p.display_name} for p in sso.bound_providers(s, tenant_id)],
        "rules": [rule.as_dict() for rule in sso.rules_of(s, tenant_id)],
        "password_sign_in": policy.password_sign_in,
        "link_sign_in": policy.link_sign_in,
    }


@router.get("/api/platform/identity-providers")
def list_identity_providers(who: Principal = Depends(principal), p: Platform = Depends(platform)) -> dict[str, Any]:
    """Every identity provider (platform admins)."""
    with p.db.system() as s:
        return {"object": "list", "data": [_provider(row) for row in sso.list_providers(s)]}


@router.post("/api/platform/identity-providers", status_code=201)
def create_identity_provider(
    body: ProviderBody, who: Principal = Depends(principal), p: Platform = Depends(platform)
) -> dict[str, Any]:
    """Add an OpenID Connect provider; register `<public URL>/auth/oidc/callback` as its redirect URI (and
    `<public URL>/` as its post-logout redirect URI). It signs nobody in until bound to a tenant."""
    with p.db.system() as s:
        row = sso.create_provider(s, p.master_keys, sso.NewProvider(**body.model_dump()))
        detail = {"issuer": row.issuer, "client_id": row.client_id}
        audit.record(s, who, "sso.provider_create", target=row.name, detail=detail)
        return {**_provider(row), "redirect_uri": sso.redirect_uri(p.settings)}


@router.delete("/api/platform/identity-providers/{name}", status_code=204)
def delete_identity_provider(
    name: str, who: Principal = Depends(principal), p: Platform = Depends(platform)
) -> Response:
    """Remove a provider added here: every tenant stops trusting it, its people's sessions end."""
    with p.db.system() as s:
        row = sso.delete_provider(s, name)
        audit.record(s, who, "sso.provider_delete", target=row.name, detail={"issuer": row.issuer})
    return Response(status_code=204)


@router.put("/api/platform/tenants/{tenant_id}/identity-providers")
def bind_identity_providers(
    tenant_id: str, body: BindingBody, who: Principal = Depends(principal), p: Platform = Depends(platform)
) -> dict[str, Any]:
    """The providers a tenant trusts (the whole list). One taken away ends its sessions there, and its rules."""
    with p.db.system() as s:
        tenants.get_tenant(s, tenant_id)
        added, removed = sso.bind(s, tenant_id, body.providers)
        policy = sessions.sign_in_policy(s, tenant_id)  # local sign-in comes back if nobody administers via SSO
        detail = {"added": added, "removed": removed, "password_sign_in": policy.password_sign_in,
                  "link_sign_in": policy.link_sign_in}  # fmt: skip
        audit.record(s, who, "sso.provider_bind", tenant_id=tenant_id, target=tenant_id, detail=detail)
        return _tenant_sso(s, tenant_id)


@router.get("/api/admin/sso")
def read_tenant_sso(who: Principal = Depends(principal), p: Platform = Depends(platform)) -> dict[str, Any]:
    """Your tenant's identity providers, its group → role rules, and whether passwords and links sign in."""
    with p.db.system() as s:
        return _tenant_sso(s, who.tenant_id)


@router.put("/api/admin/sso/rules")
def set_role_rules(body: RulesBody, who: Principal = Depends(principal), p: Platform = Depends(platform)) -> dict:
    """Replace the rules that give people coming from a provider their role here: a person in a group gets its
    role (the highest of their groups'); with none, no access. They apply at each person's next sign-in."""
    rules = [sso.Rule(rule.provider, rule.group, rule.role) for rule in body.rules]
    with p.db.system() as s:
        added, removed = sso.set_rules(s, who, rules)
        detail = {"added": [r.as_dict() for r in added], "removed": [r.as_dict() for r in removed]}
        audit.record(s, who, "sso.rules_change", target=who.tenant_name, detail=detail)
        return _tenant_sso(s, who.tenant_id)


@router.put("/api/admin/sso/policy")
def set_sign_in_policy(body: PolicyBody, who: Principal = Depends(principal), p: Platform = Depends(platform)) -> dict:
    """Whether local passwords and one-time links still sign in to your tenant (off only once it trusts an
    identity provider). Sessions opened a way you turn off end at once."""
    with p.db.system() as s:
        ended = sso.set_policy(
            s, who.tenant_id, password_sign_in=body.password_sign_in, link_sign_in=body.link_sign_in, who=who
        )
        audit.record(s, who, "sso.policy_change", target=who.tenant_name, detail={**body.model_dump(), "ended": ended})
        return _tenant_sso(s, who.tenant_id)
