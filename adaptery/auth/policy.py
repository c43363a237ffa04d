"""What each caller may do, decided in one place.

Every route of the application declares the permission it needs in `ROUTES` ("METHOD /path" -> permission);
`deps.principal` looks the matched route up on every request and asks `authorize`. A route missing from the
table is refused (fail closed), and `tests/security/test_authorization_matrix.py` fails until it has a line.

A permission is a key scope (what an API key was minted for) plus the least tenant role; platform
permissions need a platform admin. Another tenant's objects are never a 403 here: the data layer
(`db/tenancy.py`) simply does not find them, so they are 404.
"""

from __future__ import annotations

from dataclasses import dataclass

from adaptery.auth.principal import Principal, Role, Scope
from adaptery.services.errors import NotFound, PermissionDenied


@dataclass(frozen=True)
class Permission:
    name: str
    scopes: frozenset[Scope]  # any one of them suffices; empty: any signed-in caller
    role: Role = Role.VIEWER
    platform_admin: bool = False
    person: bool = False  # only the person themself, signed in to the web page: never an API key


def _perm(
    name: str, *scopes: Scope, role: Role = Role.VIEWER, platform_admin: bool = False, person: bool = False
) -> Permission:
    return Permission(name, frozenset(scopes), role, platform_admin, person)


PUBLIC = None  # a route anyone may call (health, sign-in)
SIGNED_IN = _perm("signed_in")  # any authenticated caller, whatever the key's scopes (who am I, sign out)
# What only the person may do, in their own browser session: a key (which may be a narrow or leaked one)
# never changes a password, steps up into platform administration, switches tenant or joins one.
PERSON = _perm("person", person=True)
MODELS_READ = _perm("models.read", Scope.MODELS, Scope.INFERENCE, Scope.FINE_TUNING)
MODELS_WRITE = _perm("models.write", Scope.MODELS, role=Role.MEMBER)
MODELS_DOWNLOAD = _perm("models.download", Scope.MODELS, role=Role.MEMBER)
INFER = _perm("inference", Scope.INFERENCE)
# A user's own saved chats in the web page (each user sees only theirs), the blind arena and the feedback people
# give: kept people's words, read like the tenant's data (the files scope), never with a key that may only chat
# (an application's inference key, which a leak should not turn into a reader of anyone's chats).
CONVERSATIONS = _perm("conversations", Scope.FILES)
# Whoever may chat may rate an answer by its completion id and read the policy that says what is kept.
FEEDBACK = _perm("feedback", Scope.INFERENCE)
# Reading (and withdrawing) collected feedback, narrowed further by the tenant's feedback policy.
FEEDBACK_READ = _perm("feedback.read", Scope.FILES)
FEEDBACK_DATASET = _perm("feedback.dataset", Scope.FILES, role=Role.MEMBER)
FILES_READ = _perm("files.read", Scope.FILES, Scope.FINE_TUNING)
FILES_WRITE = _perm("files.write", Scope.FILES, role=Role.MEMBER)
FINE_TUNING_READ = _perm("fine_tuning.read", Scope.FINE_TUNING)
FINE_TUNING_WRITE = _perm("fine_tuning.write", Scope.FINE_TUNING, role=Role.MEMBER)
KEYS = _perm("keys", Scope.ADMIN, role=Role.MEMBER)  # members manage their own keys, admins everyone's
TENANT_ADMIN = _perm("tenant.admin", Scope.ADMIN, role=Role.ADMIN)
PLATFORM_ADMIN = _perm("platform.admin", Scope.ADMIN, role=Role.VIEWER, platform_admin=True)
# The inference engine's state and metrics: tenant owners and platform admins (`require_engine_admin`)
ENGINE_ADMIN = _perm("engine.admin", Scope.ADMIN)
# The training agents serve every tenant: tenant owners and platform admins (`require_agents_admin`)
AGENTS_ADMIN = _perm("agents.admin", Scope.ADMIN)
# Enrolling and revoking machines: platform admins for the platform's, a tenant's owners and admins for its own
# (`services.enrollment.may_enroll_for` decides per scope; another tenant's agent is a 404)
AGENTS_ENROLL = _perm("agents.enroll", Scope.ADMIN, role=Role.ADMIN)

ROUTES: dict[str, Permission | None] = {
    "GET /api/health": PUBLIC,
    "POST /api/auth/login": PUBLIC,
    "POST /api/auth/logout": SIGNED_IN,
    "POST /api/auth/password": PERSON,
    "POST /api/auth/platform": PERSON,
    "DELETE /api/auth/platform": PERSON,
    "POST /api/auth/switch": PERSON,
    "GET /api/invitations": SIGNED_IN,
    "POST /api/invitations/{invitation_id}/accept": PERSON,
    "POST /api/invitations/{invitation_id}/decline": PERSON,
    "GET /api/me": SIGNED_IN,
    "GET /v1/models": MODELS_READ,
    "GET /v1/models/{model_id:path}": MODELS_READ,
    "DELETE /v1/models/{model_id:path}": MODELS_WRITE,
    "POST /v1/chat/completions": INFER,
    "POST /v1/completions": INFER,
    "POST /v1/embeddings": INFER,
    "POST /v1/files": FILES_WRITE,
    "GET /v1/files": FILES_READ,
    "GET /v1/files/{file_id}": FILES_READ,
    "DELETE /v1/files/{file_id}": FILES_WRITE,
    "GET /v1/files/{file_id}/content": FILES_READ,
    "POST /v1/fine_tuning/jobs": FINE_TUNING_WRITE,
    "GET /v1/fine_tuning/jobs": FINE_TUNING_READ,
    "GET /v1/fine_tuning/jobs/{job_id}": FINE_TUNING_READ,
    "POST /v1/fine_tuning/jobs/{job_id}/cancel": FINE_TUNING_WRITE,
    "POST /v1/fine_tuning/jobs/{job_id}/pause": FINE_TUNING_WRITE,
    "POST /v1/fine_tuning/jobs/{job_id}/resume": FINE_TUNING_WRITE,
    "GET /v1/fine_tuning/jobs/{job_id}/events": FINE_TUNING_READ,
    "GET /v1/fine_tuning/jobs/{job_id}/checkpoints": FINE_TUNING_READ,
    "POST /api/fine_tuning/jobs/{job_id}/extend": FINE_TUNING_WRITE,
    "POST /api/fine_tuning/jobs/{job_id}/continue": FINE_TUNING_WRITE,
    "POST /api/fine_tuning/jobs/{job_id}/fork": FINE_TUNING_WRITE,
    "GET /api/fine_tuning/jobs/{job_id}/evaluation": FINE_TUNING_READ,
    "GET /api/models/{model_id}/evaluation": FINE_TUNING_READ,
    "PUT /api/models/{model_id}/evaluation_set": FINE_TUNING_WRITE,
    "POST /api/evaluations": FINE_TUNING_WRITE,
    "GET /api/evaluations": FINE_TUNING_READ,
    "GET /api/evaluations/{evaluation_id}": FINE_TUNING_READ,
    "POST /api/evaluation_tasks": FINE_TUNING_WRITE,
    "GET /api/evaluation_tasks": FINE_TUNING_READ,
    "POST /api/datasets": FILES_WRITE,
    "GET /api/datasets": FILES_READ,
    "GET /api/datasets/{dataset_id}": FILES_READ,
    "PATCH /api/datasets/{dataset_id}": FILES_WRITE,
    "DELETE /api/datasets/{dataset_id}": FILES_WRITE,
    "POST /api/datasets/{dataset_id}/versions": FILES_WRITE,
    "GET /api/datasets/{dataset_id}/versions/{number}": FILES_READ,
    "GET /api/datasets/{dataset_id}/versions/{number}/records": FILES_READ,
    "GET /api/datasets/{dataset_id}/versions/{number}/content": FILES_READ,
    "POST /api/datasets/{dataset_id}/versions/{number}/dedup": FILES_WRITE,
    "POST /api/datasets/{dataset_id}/versions/{number}/scrub": FILES_WRITE,
    "POST /api/datasets/{dataset_id}/versions/{number}/split": FILES_WRITE,
    "POST /api/datasets/{dataset_id}/versions/{number}/validate": FILES_READ,
    "POST /api/datasets/{dataset_id}/versions/{number}/export": FILES_WRITE,
    "GET /api/models": MODELS_READ,
    "POST /api/federations": FINE_TUNING_WRITE,
    "GET /api/federations": FINE_TUNING_READ,
    "GET /api/federations/{federation_id}": FINE_TUNING_READ,
    "POST /api/federations/{federation_id}/sites": FINE_TUNING_WRITE,
    "GET /api/federations/{federation_id}/roster": FINE_TUNING_READ,
    "POST /api/federations/{federation_id}/invitations": FINE_TUNING_WRITE,
    "DELETE /api/federations/{federation_id}/invitations/{invitation_id}": FINE_TUNING_WRITE,
    "PUT /api/federations/{federation_id}/coordinator": FINE_TUNING_WRITE,
    "POST /api/federations/{federation_id}/events": FINE_TUNING_WRITE,
    # A site proves itself with its one-time invitation (and a signature by the key it registers), then with
    # signatures by that key (services.federations).
    "POST /api/federations/join": PUBLIC,
    "POST /api/federations/sites/{site_id}/check-in": PUBLIC,
    "GET /api/conversations": CONVERSATIONS,
    "POST /api/conversations": CONVERSATIONS,
    "GET /api/conversations/{conversation_id}": CONVERSATIONS,
    "PATCH /api/conversations/{conversation_id}": CONVERSATIONS,
    "DELETE /api/conversations/{conversation_id}": CONVERSATIONS,
    "POST /api/conversations/{conversation_id}/messages": CONVERSATIONS,
    "DELETE /api/conversations/{conversation_id}/messages/{message_id}": CONVERSATIONS,
    "GET /api/feedback/policy": FEEDBACK,
    "PUT /api/feedback/policy": TENANT_ADMIN,
    "POST /api/completions/{completion_id}/feedback": FEEDBACK,
    "POST /api/conversations/{conversation_id}/messages/{message_id}/feedback": CONVERSATIONS,
    "GET /api/conversations/{conversation_id}/feedback": CONVERSATIONS,
    "GET /api/feedback": FEEDBACK_READ,
    "GET /api/feedback/{feedback_id}": FEEDBACK_READ,
    "DELETE /api/feedback/{feedback_id}": FEEDBACK_READ,
    "POST /api/feedback/datasets": FEEDBACK_DATASET,
    "POST /api/arena/battles": CONVERSATIONS,
    "GET /api/arena/battles/{battle_id}": CONVERSATIONS,
    "POST /api/arena/battles/{battle_id}/answers/{side}": CONVERSATIONS,
    "POST /api/arena/battles/{battle_id}/answers/{side}/feedback": CONVERSATIONS,
    "POST /api/arena/battles/{battle_id}/vote": CONVERSATIONS,
    "GET /api/arena/leaderboard": FEEDBACK,
    "POST /api/admin/members": TENANT_ADMIN,
    "DELETE /api/admin/members/{username}": TENANT_ADMIN,
    "POST /api/admin/members/{username}/link": TENANT_ADMIN,
    "GET /api/models/{model_id}/download": MODELS_DOWNLOAD,
    "POST /api/models/import": MODELS_WRITE,
    "GET /api/models/{model_id}/sharing": MODELS_READ,
    "PUT /api/models/{model_id}/sharing": MODELS_WRITE,
    "GET /api/keys": KEYS,
    "POST /api/keys": KEYS,
    "DELETE /api/keys/{key_id}": KEYS,
    "POST /api/keys/{key_id}/rotate": KEYS,
    "PATCH /api/keys/{key_id}": KEYS,
    "GET /api/admin/audit": TENANT_ADMIN,
    "GET /api/admin/audit/export": TENANT_ADMIN,
    "GET /api/admin/usage": TENANT_ADMIN,
    "GET /api/admin/usage/export": TENANT_ADMIN,
    "GET /v1/organization/usage/{kind}": TENANT_ADMIN,
    "GET /v1/organization/costs": TENANT_ADMIN,
    "GET /api/admin/limits": TENANT_ADMIN,
    "GET /api/admin/members": TENANT_ADMIN,
    "PUT /api/admin/members/{username}": TENANT_ADMIN,
    "GET /api/platform/tenants": PLATFORM_ADMIN,
    "GET /api/admin/engine": ENGINE_ADMIN,
    "GET /api/admin/agents": AGENTS_ADMIN,
    "POST /api/admin/agents/tokens": AGENTS_ENROLL,
    "GET /api/admin/agents/tokens": AGENTS_ENROLL,
    "DELETE /api/admin/agents/tokens/{token_id}": AGENTS_ENROLL,
    "POST /api/admin/agents/{agent_id}/revoke": AGENTS_ENROLL,
    # An enrolling or renewing machine proves itself with its one-time token or its current certificate.
    "GET /api/fabric/ca": PUBLIC,
    "POST /api/fabric/enroll": PUBLIC,
    "POST /api/fabric/renew": PUBLIC,
    # a presigned URL and the agent's proof of its certificate's key authorize it (services/transfers.py)
    "GET /api/fabric/transfers/{sha256}": PUBLIC,
    "PUT /api/fabric/transfers/{sha256}": PUBLIC,
    "GET /metrics": PLATFORM_ADMIN,  # platform-wide counters, not labelled by tenant
    "PUT /api/platform/tenants/{tenant_id}/limits": PLATFORM_ADMIN,
    # Single sign-on: providers are the platform's, bound to tenants by platform admins; rules and the sign-in
    # policy are each tenant's. The sign-in page lists the providers anyone may start with.
    "GET /api/auth/providers": PUBLIC,
    "GET /api/platform/identity-providers": PLATFORM_ADMIN,
    "POST /api/platform/identity-providers": PLATFORM_ADMIN,
    "DELETE /api/platform/identity-providers/{name}": PLATFORM_ADMIN,
    "PUT /api/platform/tenants/{tenant_id}/identity-providers": PLATFORM_ADMIN,
    "GET /api/admin/sso": TENANT_ADMIN,
    "PUT /api/admin/sso/rules": TENANT_ADMIN,
    "PUT /api/admin/sso/policy": TENANT_ADMIN,
    # Stable model names (services.model_names): only a name's creator or a tenant admin changes what it answers.
    "GET /api/model_names": MODELS_READ,
    "POST /api/model_names": MODELS_WRITE,
    "GET /api/model_names/{name}": MODELS_READ,
    "DELETE /api/model_names/{name}": MODELS_WRITE,
    "POST /api/model_names/{name}/promote": MODELS_WRITE,
    "POST /api/model_names/{name}/rollback": MODELS_WRITE,
    "PUT /api/model_names/{name}/canary": MODELS_WRITE,
    "DELETE /api/model_names/{name}/canary": MODELS_WRITE,
    "POST /api/model_names/{name}/fine_tune": FINE_TUNING_WRITE,
}

# Role checks inside handlers (on top of the route's permission), kept for the routers that call them.
ACTIONS: dict[str, Role] = {
    "read": Role.VIEWER,
    "infer": Role.VIEWER,
    "upload": Role.MEMBER,
    "fine_tune": Role.MEMBER,
    "delete_model": Role.MEMBER,
    "manage_keys": Role.MEMBER,
}


def route_key(method: str, path: str) -> str:
    return f"{method.upper()} {path}"


def permission_for(method: str, path: str) -> Permission | None:
    """The permission a route declared; an undeclared route is refused, never let through."""
    key = route_key(method, path)
    if key not in ROUTES:
        raise PermissionDenied(f"The route '{key}' declares no permission, so nobody may call it.", code="undeclared")
    return ROUTES[key]


def authorize(principal: Principal, permission: Permission) -> None:
    if permission.person and principal.session_id is None:
        raise PermissionDenied(
            "Only a person signed in to the web page may do this, not an API key.", code="session_required"
        )
    if principal.superseded_secret and Scope.ADMIN in permission.scopes:
        raise PermissionDenied(
            "This key's secret was rotated: the old secret serves API calls until the overlap ends, but manages "
            "no keys and nothing of the admin scope; use the new secret.",
            code="rotated_secret",
        )
    if permission.platform_admin and not principal.is_platform_admin:
        raise PermissionDenied("This needs a platform administrator.", code="platform_admin_required")
    if permission.scopes and not (permission.scopes & principal.scopes):
        wanted = " or ".join(sorted(permission.scopes))
        raise PermissionDenied(
            f"This API key lacks the scope this needs ({wanted}); create a key with it.", code="missing_scope"
        )
    if not permission.platform_admin and not principal.has_role(permission.role):
        raise PermissionDenied(
            f"Your role '{principal.role}' may not do this ({permission.name}); it needs '{permission.role}'.",
            code="insufficient_role",
        )


def require(principal: Principal, action: str) -> None:
    needed = ACTIONS[action]
    if not principal.has_role(needed):
        raise PermissionDenied(f"Your role '{principal.role}' may not {action.replace('_', ' ')}; it needs '{needed}'.")


def require_engine_admin(principal: Principal) -> None:
    """The engine's state spans tenants: tenant owners and platform admins only."""
    if not (principal.role == Role.OWNER or principal.is_platform_admin):
        raise PermissionDenied(
            f"Your role '{principal.role}' may not view the inference engine; it needs 'owner' or a platform admin.",
            code="insufficient_role",
        )


def require_agents_admin(principal: Principal) -> None:
    """The agents run every tenant's jobs: tenant owners and platform admins only."""
    if not (principal.role == Role.OWNER or principal.is_platform_admin):
        raise PermissionDenied(
            f"Your role '{principal.role}' may not view the training agents; it needs 'owner' or a platform admin.",
            code="insufficient_role",
        )


def may_use_model(principal: Principal, model_id: str) -> bool:
    """A key restricted to some models sees and uses only those, by id (bases and adapters alike)."""
    return principal.allowed_models is None or model_id in principal.allowed_models


def check_model(principal: Principal, model_id: str, *, param: str = "model") -> None:
    """404, as for a model that does not exist: a key must not learn which models it was kept from."""
    if not may_use_model(principal, model_id):
        raise NotFound(
            f"The model '{model_id}' does not exist or you do not have access to it.",
            param=param,
            code="model_not_found",
        )


def can_see_adapter(principal: Principal, *, visibility: str, created_by: str | None, shared_with: set[str]) -> bool:
    """Visibility inside a tenant: `tenant` everyone, `shared` its creator and named members, `private` its
    creator; tenant admins and owners see every adapter of their tenant, to govern them."""
    if visibility == "tenant" or principal.has_role(Role.ADMIN) or principal.user_id == created_by:
        return True
    return visibility == "shared" and principal.user_id in shared_with


def may_share_adapter(principal: Principal, *, created_by: str | None) -> bool:
    return principal.has_role(Role.ADMIN) or (principal.user_id == created_by and principal.has_role(Role.MEMBER))


def may_manage_key(principal: Principal, key_owner_id: str, owner_role: Role | None, action: str) -> bool:
    """A key is its person's: they do anything with it, and only they rotate it (a new secret is a new way
    to act as them). Tenant admins read (redacted), revoke and limit the keys of people at or below their
    own role, so an admin can stop a leaked key without ever holding it."""
    if principal.user_id == key_owner_id:
        return True
    if action == "rotate" or not principal.has_role(Role.ADMIN):
        return False
    return owner_role is None or principal.has_role(owner_role)


def may_grant_role(principal: Principal, current: Role | None, wanted: Role) -> bool:
    """Admins manage members and viewers; only an owner makes or unmakes owners and admins."""
    if principal.role == Role.OWNER:
        return True
    return (
        principal.role == Role.ADMIN
        and wanted in (Role.MEMBER, Role.VIEWER)
        and current
        not in (
            Role.OWNER,
            Role.ADMIN,
        )
    )
