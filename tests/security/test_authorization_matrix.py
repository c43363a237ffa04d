"""Every route of the application × every kind of caller, with the status each must get.

The routes come from the application's own route table, so a route added without a line in `EXPECT`
fails here (add one line: the least role and the key scopes that suffice). Expectations are written
independently of `adaptery.auth.policy`: this table is what the platform promises, the policy is how.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastapi.routing import iter_route_contexts

from adaptery.auth.principal import ALL_SCOPES
from adaptery.db import models as m
from tests.security.conftest import World, add_key

ROLES = ("viewer", "member", "admin", "owner")


@dataclass(frozen=True)
class Expect:
    role: str | None = None  # least tenant role; None: public
    scopes: tuple[str, ...] = ()  # any of these key scopes suffices; (): any signed-in caller
    platform_admin: bool = False
    person: bool = False  # the person themself in the web page: every API key gets 403


PUBLIC = Expect()
SIGNED_IN = Expect("viewer")
PERSON = Expect("viewer", person=True)


def need(role: str, *scopes: str) -> Expect:
    return Expect(role, scopes)


PLATFORM = Expect("viewer", ("admin",), platform_admin=True)
MODELS_READ = ("models", "inference", "fine-tuning")

EXPECT: dict[str, Expect] = {
    "GET /": PUBLIC,
    "GET /openapi.json": PUBLIC,
    "MOUNT /static": PUBLIC,
    "GET /auth/link": PUBLIC,
    "GET /invitations/accept": PUBLIC,
    "GET /api/health": PUBLIC,
    "POST /api/auth/login": PUBLIC,
    "POST /api/auth/link": PUBLIC,
    "POST /api/auth/link/holder": PUBLIC,
    "POST /api/auth/logout": SIGNED_IN,
    "POST /api/auth/password": PERSON,
    "POST /api/auth/platform": PERSON,
    "DELETE /api/auth/platform": PERSON,
    "POST /api/auth/switch": PERSON,
    "GET /api/invitations": SIGNED_IN,
    "POST /api/invitations/{invitation_id}/accept": PERSON,
    "POST /api/invitations/{invitation_id}/decline": PERSON,
    "GET /api/me": SIGNED_IN,
    "GET /v1/models": need("viewer", *MODELS_READ),
    "GET /v1/models/{model_id:path}": need("viewer", *MODELS_READ),
    "DELETE /v1/models/{model_id:path}": need("member", "models"),
    "GET /api/models": need("viewer", *MODELS_READ),
    "GET /api/models/{model_id}/download": need("member", "models"),
    "POST /api/models/import": need("member", "models"),
    "GET /api/models/{model_id}/sharing": need("viewer", *MODELS_READ),
    "PUT /api/models/{model_id}/sharing": need("member", "models"),
    "POST /v1/chat/completions": need("viewer", "inference"),
    "POST /v1/completions": need("viewer", "inference"),
    "POST /v1/embeddings": need("viewer", "inference"),
    "POST /v1/files": need("member", "files"),
    "GET /v1/files": need("viewer", "files", "fine-tuning"),
    "GET /v1/files/{file_id}": need("viewer", "files", "fine-tuning"),
    "DELETE /v1/files/{file_id}": need("member", "files"),
    "GET /v1/files/{file_id}/content": need("viewer", "files", "fine-tuning"),
    "POST /v1/fine_tuning/jobs": need("member", "fine-tuning"),
    "GET /v1/fine_tuning/jobs": need("viewer", "fine-tuning"),
    "POST /api/federations": need("member", "fine-tuning"),
    "GET /api/federations": need("viewer", "fine-tuning"),
    "GET /api/federations/{federation_id}": need("viewer", "fine-tuning"),
    "POST /api/federations/{federation_id}/sites": need("member", "fine-tuning"),
    "GET /api/federations/{federation_id}/roster": need("viewer", "fine-tuning"),
    "POST /api/federations/{federation_id}/invitations": need("member", "fine-tuning"),
    "DELETE /api/federations/{federation_id}/invitations/{invitation_id}": need("member", "fine-tuning"),
    "PUT /api/federations/{federation_id}/coordinator": need("member", "fine-tuning"),
    "POST /api/federations/{federation_id}/events": need("member", "fine-tuning"),
    "POST /api/federations/join": PUBLIC,
    "POST /api/federations/sites/{site_id}/check-in": PUBLIC,
    "GET /v1/fine_tuning/jobs/{job_id}": need("viewer", "fine-tuning"),
    "POST /v1/fine_tuning/jobs/{job_id}/cancel": need("member", "fine-tuning"),
    "POST /v1/fine_tuning/jobs/{job_id}/pause": need("member", "fine-tuning"),
    "POST /v1/fine_tuning/jobs/{job_id}/resume": need("member", "fine-tuning"),
    "GET /v1/fine_tuning/jobs/{job_id}/events": need("viewer", "fine-tuning"),
    "GET /v1/fine_tuning/jobs/{job_id}/checkpoints": need("viewer", "fine-tuning"),
    "POST /api/fine_tuning/jobs/{job_id}/extend": need("member", "fine-tuning"),
    "POST /api/fine_tuning/jobs/{job_id}/continue": need("member", "fine-tuning"),
    "POST /api/fine_tuning/jobs/{job_id}/fork": need("member", "fine-tuning"),
    "GET /api/fine_tuning/jobs/{job_id}/evaluation": need("viewer", "fine-tuning"),
    "GET /api/models/{model_id}/evaluation": need("viewer", "fine-tuning"),
    "PUT /api/models/{model_id}/evaluation_set": need("member", "fine-tuning"),
    "POST /api/evaluations": need("member", "fine-tuning"),
    "GET /api/evaluations": need("viewer", "fine-tuning"),
    "GET /api/evaluations/{evaluation_id}": need("viewer", "fine-tuning"),
    "POST /api/evaluation_tasks": need("member", "fine-tuning"),
    "GET /api/evaluation_tasks": need("viewer", "fine-tuning"),
    "POST /api/datasets": need("member", "files"),
    "GET /api/datasets": need("viewer", "files", "fine-tuning"),
    "GET /api/datasets/{dataset_id}": need("viewer", "files", "fine-tuning"),
    "PATCH /api/datasets/{dataset_id}": need("member", "files"),
    "DELETE /api/datasets/{dataset_id}": need("member", "files"),
    "POST /api/datasets/{dataset_id}/versions": need("member", "files"),
    "GET /api/datasets/{dataset_id}/versions/{number}": need("viewer", "files", "fine-tuning"),
    "GET /api/datasets/{dataset_id}/versions/{number}/records": need("viewer", "files", "fine-tuning"),
    "GET /api/datasets/{dataset_id}/versions/{number}/content": need("viewer", "files", "fine-tuning"),
    "POST /api/datasets/{dataset_id}/versions/{number}/dedup": need("member", "files"),
    "POST /api/datasets/{dataset_id}/versions/{number}/scrub": need("member", "files"),
    "POST /api/datasets/{dataset_id}/versions/{number}/split": need("member", "files"),
    "POST /api/datasets/{dataset_id}/versions/{number}/validate": need("viewer", "files", "fine-tuning"),
    "POST /api/datasets/{dataset_id}/versions/{number}/export": need("member", "files"),
    "GET /api/conversations": need("viewer", "files"),
    "POST /api/conversations": need("viewer", "files"),
    "GET /api/conversations/{conversation_id}": need("viewer", "files"),
    "PATCH /api/conversations/{conversation_id}": need("viewer", "files"),
    "DELETE /api/conversations/{conversation_id}": need("viewer", "files"),
    "POST /api/conversations/{conversation_id}/messages": need("viewer", "files"),
    "DELETE /api/conversations/{conversation_id}/messages/{message_id}": need("viewer", "files"),
    "GET /api/feedback/policy": need("viewer", "inference"),
    "PUT /api/feedback/policy": need("admin", "admin"),
    "POST /api/completions/{completion_id}/feedback": need("viewer", "inference"),
    "POST /api/conversations/{conversation_id}/messages/{message_id}/feedback": need("viewer", "files"),
    "GET /api/conversations/{conversation_id}/feedback": need("viewer", "files"),
    "GET /api/feedback": need("viewer", "files"),
    "GET /api/feedback/{feedback_id}": need("viewer", "files"),
    "DELETE /api/feedback/{feedback_id}": need("viewer", "files"),
    "POST /api/feedback/datasets": need("member", "files"),
    "POST /api/arena/battles": need("viewer", "files"),
    "GET /api/arena/battles/{battle_id}": need("viewer", "files"),
    "POST /api/arena/battles/{battle_id}/answers/{side}": need("viewer", "files"),
    "POST /api/arena/battles/{battle_id}/answers/{side}/feedback": need("viewer", "files"),
    "POST /api/arena/battles/{battle_id}/vote": need("viewer", "files"),
    "GET /api/arena/leaderboard": need("viewer", "inference"),
    "GET /api/keys": need("member", "admin"),
    "POST /api/keys": need("member", "admin"),
    "PATCH /api/keys/{key_id}": need("member", "admin"),
    "DELETE /api/keys/{key_id}": need("member", "admin"),
    "POST /api/keys/{key_id}/rotate": need("member", "admin"),
    "GET /api/admin/audit": need("admin", "admin"),
    "GET /api/admin/usage": need("admin", "admin"),
    "GET /api/admin/usage/export": need("admin", "admin"),
    "GET /api/admin/audit/export": need("admin", "admin"),
    "GET /v1/organization/usage/{kind}": need("admin", "admin"),
    "GET /v1/organization/costs": need("admin", "admin"),
    "GET /api/admin/limits": need("admin", "admin"),
    "GET /api/admin/members": need("admin", "admin"),
    "POST /api/admin/members": need("admin", "admin"),
    "PUT /api/admin/members/{username}": need("admin", "admin"),
    "DELETE /api/admin/members/{username}": need("admin", "admin"),
    "POST /api/admin/members/{username}/link": need("admin", "admin"),
    "GET /api/admin/engine": need("owner", "admin"),
    "GET /metrics": PLATFORM,
    "GET /api/admin/agents": need("owner", "admin"),
    "POST /api/admin/agents/tokens": need("admin", "admin"),
    "GET /api/admin/agents/tokens": need("admin", "admin"),
    "DELETE /api/admin/agents/tokens/{token_id}": need("admin", "admin"),
    "POST /api/admin/agents/{agent_id}/revoke": need("admin", "admin"),
    "GET /api/fabric/ca": PUBLIC,
    "POST /api/fabric/enroll": PUBLIC,
    "POST /api/fabric/renew": PUBLIC,
    "GET /api/fabric/transfers/{sha256}": PUBLIC,  # a presigned URL and the agent's certificate key authorize it
    "PUT /api/fabric/transfers/{sha256}": PUBLIC,
    "GET /api/platform/tenants": PLATFORM,
    "PUT /api/platform/tenants/{tenant_id}/limits": PLATFORM,
    "GET /api/auth/providers": PUBLIC,
    "GET /auth/oidc/{provider}/start": PUBLIC,
    "GET /auth/oidc/callback": PUBLIC,
    "GET /api/platform/identity-providers": PLATFORM,
    "POST /api/platform/identity-providers": PLATFORM,
    "DELETE /api/platform/identity-providers/{name}": PLATFORM,
    "PUT /api/platform/tenants/{tenant_id}/identity-providers": PLATFORM,
    "GET /api/admin/sso": need("admin", "admin"),
    "PUT /api/admin/sso/rules": need("admin", "admin"),
    "PUT /api/admin/sso/policy": need("admin", "admin"),
    "GET /api/model_names": need("viewer", *MODELS_READ),
    "POST /api/model_names": need("member", "models"),
    "GET /api/model_names/{name}": need("viewer", *MODELS_READ),
    "DELETE /api/model_names/{name}": need("member", "models"),
    "POST /api/model_names/{name}/promote": need("member", "models"),
    "POST /api/model_names/{name}/rollback": need("member", "models"),
    "PUT /api/model_names/{name}/canary": need("member", "models"),
    "DELETE /api/model_names/{name}/canary": need("member", "models"),
    "POST /api/model_names/{name}/fine_tune": need("member", "fine-tuning"),
}

CALLERS = (
    "no_key",
    "revoked",
    "expired",
    "wrong_scope",
    "other_tenant_member",
    "platform_admin",
    *ROLES,
)
_RANK = {role: i for i, role in enumerate(ROLES)}


def app_routes(app) -> list[tuple[str, str]]:  # noqa: ANN001
    out = []
    for context in iter_route_contexts(app.routes):
        for method in sorted(context.methods or {"MOUNT"}):
            if method != "HEAD":
                out.append((method, context.path))
    return out


def expected(rule: Expect, caller: str, names_an_object: bool) -> str:
    """'ok' (any answer but 401, 403 and 5xx), 'hidden' (not found), or the exact status."""
    if rule.role is None:
        return "ok"
    if caller in ("no_key", "revoked", "expired"):
        return "401"
    if rule.person:
        return "403"  # every caller here holds an API key
    if caller == "wrong_scope":
        return "403" if rule.scopes else "ok"
    if rule.platform_admin:
        return "ok" if caller == "platform_admin" else "403"
    role = {"other_tenant_member": "member", "platform_admin": "owner"}.get(caller, caller)
    if _RANK[role] < _RANK[rule.role]:
        return "403"
    if caller in ("other_tenant_member", "platform_admin") and names_an_object:
        return "hidden"  # the lab's objects do not exist for another tenant, whatever its role there
    return "ok"


def answered_as_expected(status: int, want: str, names_existing: bool = False) -> bool:
    if want == "ok":  # a 404 is no pass where the URL names the caller's own tenant's existing objects
        return status not in (401, 403) and status < 500 and not (status == 404 and names_existing)
    if want == "hidden":  # 404; or 400 for a body refused before any lookup, which says nothing either way
        return status in (400, 404)
    return str(status) == want


def url_for(world: World, path: str) -> tuple[str, bool, bool]:
    """The URL, whether it names an object, and whether every object it names exists (the fixture made it)."""
    names_an_object = "{" in path
    if path == "/static":
        return "/static/app.js", False, False
    original = path
    for name, value in world.ids.items():
        path = path.replace(f"{{{name}:path}}", value).replace(f"{{{name}}}", value)
    # a key is its person's (the fixture's is the owner's): to others it is a 404 by design, pinned by role and
    # whose key in test_authorization_people
    names_existing = names_an_object and "{" not in path and "{key_id}" not in original
    while "{" in path:  # parameters of routes the fixture makes no object for: an id that exists nowhere
        start, end = path.index("{"), path.index("}")
        path = path[:start] + "does-not-exist" + path[end + 1 :]
    return path, names_an_object, names_existing


def wrong_scope_key(world: World, rule: Expect, cache: dict[tuple[str, ...], str]) -> str:
    scopes = tuple(sorted(ALL_SCOPES - set(rule.scopes))) if rule.scopes else ("inference",)
    if scopes not in cache:
        cache[scopes] = add_key(world.platform, world.tenant_id, world.users["lab-owner"], scopes=scopes)
    return cache[scopes]


def test_every_route_is_in_the_expectation_table(platform_running):
    routes = {f"{method} {path}" for method, path in app_routes(platform_running.client.app)}
    missing = sorted(routes - EXPECT.keys())
    assert not missing, "routes without an authorization expectation (add a line to EXPECT):\n" + "\n".join(missing)


def test_authorization_matrix(world: World):
    routes = app_routes(world.client.app)
    # Destructive routes last, so the objects the other routes aim at still exist when they run.
    routes.sort(key=lambda r: (r[0] == "DELETE", r[1].count("/"), r))
    scope_keys: dict[tuple[str, ...], str] = {}
    wrong, checked = [], 0
    deleted: dict[str, bool] = {}
    for method, path in routes:
        rule = EXPECT[f"{method} {path}"]
        url, names_an_object, names_existing = url_for(world, path)
        for caller in CALLERS:
            headers = {}
            if caller == "wrong_scope":
                headers = {"Authorization": f"Bearer {wrong_scope_key(world, rule, scope_keys)}"}
            elif caller != "no_key":
                headers = world.auth(caller)
            body = {"json": {}} if method in ("POST", "PUT", "PATCH") else {}
            response = world.client.request("GET" if method == "MOUNT" else method, url, headers=headers, **body)
            want = expected(rule, caller, names_an_object)
            status = response.status_code
            checked += 1
            # a DELETE's first success removes the object for the callers after it
            existing = names_existing and not (method == "DELETE" and deleted.get(url))
            if not answered_as_expected(status, want, existing and caller in ROLES):
                wrong.append(f"{method} {path} as {caller}: got {status}, want {want} ({response.text[:120]})")
            if method == "DELETE" and status < 300:
                deleted[url] = True
    print(f"authorization matrix: {len({r for r in routes})} routes x {len(CALLERS)} callers = {checked} requests")
    assert not wrong, f"{len(wrong)} of {checked} cells wrong:\n" + "\n".join(wrong)


def test_revoked_and_expired_keys_are_still_refused_after_the_matrix(world: World):
    with world.platform.db.system() as s:
        assert s.get(m.ApiKey, world.tokens["revoked"].split("-")[2]).revoked_at is not None
    for caller in ("revoked", "expired"):
        assert world.client.get("/v1/models", headers=world.auth(caller)).status_code == 401
