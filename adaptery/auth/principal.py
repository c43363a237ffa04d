"""Who is calling: the tenant, the user and their role, whichever way they signed in."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Role(StrEnum):
    OWNER = "owner"
    ADMIN = "admin"
    MEMBER = "member"
    VIEWER = "viewer"


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

    def has_role(self, needed: Role) -> bool:
        return _RANK[self.role] >= _RANK[needed]
