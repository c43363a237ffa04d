"""What each role may do, decided in one place."""

from __future__ import annotations

from adaptery.auth.principal import Principal, Role
from adaptery.services.errors import PermissionDenied

# action -> the least role that may perform it
ACTIONS: dict[str, Role] = {
    "read": Role.VIEWER,
    "infer": Role.VIEWER,
    "upload": Role.MEMBER,
    "fine_tune": Role.MEMBER,
    "delete_model": Role.MEMBER,
    "manage_keys": Role.MEMBER,
}


def require(principal: Principal, action: str) -> None:
    needed = ACTIONS[action]
    if not principal.has_role(needed):
        raise PermissionDenied(f"Your role '{principal.role}' may not {action.replace('_', ' ')}; it needs '{needed}'.")
