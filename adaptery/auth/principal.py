"""Who is calling: the tenant, the user and their role, whichever way they signed in, and what the key allows."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Role(StrEnum):
    OWNER = "owner"
    ADMIN = "admin"
    MEMBER = "member"
    VIEWER = "viewer"


class Scope(StrEnum):
    INFERENCE = "inference"
    FILES = "files"
    FINE_TUNING = "fine-tuning"
    MODELS = "models"
    ADMIN = "admin"


ALL_SCOPES = frozenset(Scope)
_RANK = {Role.VIEWER: 0, Role.MEMBER: 1, Role.ADMIN: 2, Role.OWNER: 3}


@dataclass(frozen=True)
class Principal:
    tenant_id: str
    tenant_name: str
    user_id: str
    username: str
    role: Role
    api_key_id: str | None = None
    session_id: str | None = None
    # A browser session acts with every scope; a key with those it was given.
    scopes: frozenset[Scope] = ALL_SCOPES
    # None: every model the tenant may see; otherwise model ids (bases and adapters) this key may use.
    allowed_models: frozenset[str] | None = None
    is_platform_admin: bool = False
    ip: str | None = None  # where the request came from, for the audit log
    # Signed in with a key's previous secret, still valid during a rotation's overlap: for running clients'
    # API calls only, never to manage keys or anything else of the admin scope.
    superseded_secret: bool = False

    def has_role(self, needed: Role) -> bool:
        return _RANK[self.role] >= _RANK[needed]
