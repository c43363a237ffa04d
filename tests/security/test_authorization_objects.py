"""Route × caller × object: the exact status each caller gets from each route for each object it can name.

`test_authorization_matrix.py` asks whether a caller may call a route at all; this asks which objects it reaches
there. The objects belong to another member of the same tenant (`lab-target`): adapters at every visibility
(private, shared with someone else, shared with the caller, the tenant's), the jobs that trained them (a
checkpoint each), a job still training from the base model, one training on from the private adapter, a saved
chat, a file and a dataset; beside them the caller's own adapter, job and chat. The callers are the lab's four
roles and a member of another tenant. What is expected is what the platform promises, written here without
`adaptery.auth.policy`:

- an adapter is seen by its creator and the tenant's admins and owners; `shared` adds the members it names,
  `tenant` everyone in the tenant (README, "Access");
- a job is seen as the weights it leads to: its adapter, or while it trains the adapter it started from;
- a saved chat is its user's alone; files and datasets are the tenant's;
- what a caller may not see is not found (404), exactly like what does not exist, never 403;
- a route's own least role comes first (403 whatever the object).

The world is built once for the module: a cell that deletes or changes an object gets a copy of its own.
Key and member management are left out (their object rules are being rewritten).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from adaptery.auth.principal import Role
from tests.conftest import SAMPLE_CHAT
from tests.security.conftest import World, add_key, add_user
from tests.security.objects import (
    Trained,
    copy_adapter,
    copy_dataset,
    copy_file,
    copy_job,
    trained,
    training,
    training_from,
    unpack,
)
from tests.security.test_authorization_matrix import app_routes

ROLES = ("viewer", "member", "admin", "owner")
CALLERS = (*ROLES, "other_tenant_member")  # every one holds a key with every scope
RANK = {"viewer": 0, "member": 1, "admin": 2, "owner": 3, "other_tenant_member": 1}  # a member, elsewhere
ADMINS = ("admin", "owner")

ADAPTERS = ("own", "tenant", "shared-with-me", "shared-with-someone-else", "private")
JOBS = (*ADAPTERS, "training", "training-from-private")
CHATS = ("own", "colleague's")
TENANT_WIDE = ("colleague's",)
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "temperature": 0}


# --- what each caller is promised ------------------------------------------------------------------------


def in_lab(caller: str) -> bool:
    return caller != "other_tenant_member"


def sees(caller: str, obj: str) -> bool:
    """An adapter, or a job by the weights it leads to ("training": from a base model, no adapter yet)."""
    if not in_lab(caller):
        return False
    return caller in ADMINS or obj in ("own", "tenant", "shared-with-me", "training")


Want = Callable[[str, str], int]


def visible(ok: int) -> Want:
    return lambda caller, obj: ok if sees(caller, obj) else 404


def at_least(role: str, want: Want) -> Want:
    return lambda caller, obj: 403 if RANK[caller] < RANK[role] else want(caller, obj)


def governed(caller: str, obj: str) -> int:
    """Sharing and deleting an adapter: its creator or a tenant admin; others who see it are refused."""
    if not sees(caller, obj):
        return 404
    return 200 if obj == "own" or caller in ADMINS else 403


def from_weights(caller: str, obj: str) -> int:
    """Extend and fork start from a job's adapter: a job still training has none yet (400)."""
    if not sees(caller, obj):
        return 404
    return 400 if obj.startswith("training") else 200


def own_chat(ok: int) -> Want:
    return lambda caller, obj: ok if in_lab(caller) and obj == "own" else 404


def tenants(ok: int) -> Want:
    return lambda caller, obj: ok if in_lab(caller) else 404


# --- the objects -----------------------------------------------------------------------------------------


@dataclass
class Lab:
    world: World
    adapters: dict[str, Trained] = field(default_factory=dict)  # the target's, by visibility
    jobs: dict[str, Trained] = field(default_factory=dict)  # the target's jobs with no adapter yet
    own: dict[str, Trained] = field(default_factory=dict)  # caller -> its own job and (private) adapter
    chats: dict[str, tuple[str, str]] = field(default_factory=dict)  # "target" or caller -> (chat, message)
    file_id: str = ""
    dataset_id: str = ""

    def headers(self, who: str) -> dict[str, str]:
        return self.world.auth(who)

    def job(self, caller: str, obj: str) -> Trained:
        if obj == "own":
            return self.own[caller]
        return self.jobs.get(obj) or self.adapters[obj]

    def model(self, caller: str, obj: str) -> str:
        return self.job(caller, obj).model_id

    def chat(self, caller: str, obj: str) -> tuple[str, str]:
        return self.chats[caller if obj == "own" else "target"]

    def new_chat(self, who: str) -> tuple[str, str]:
        client = self.world.client
        chat = client.post("/api/conversations", headers=self.headers(who), json={"title": "t"}).json()["id"]
        message = client.post(
            f"/api/conversations/{chat}/messages", headers=self.headers(who), json={"role": "user", "content": "x"}
        ).json()["id"]
        return chat, message

    def fresh_chat(self, caller: str, obj: str) -> tuple[str, str]:
        return self.new_chat(caller if obj == "own" else "target")


def username(caller: str) -> str:
    return f"lab-{caller}"


@pytest.fixture(scope="module")
def lab(world_once: World, lora_bytes: bytes, tmp_path_factory: pytest.TempPathFactory) -> Lab:
    world = world_once
    world.tokens["target"] = add_key(world.platform, world.tenant_id, world.users["lab-target"])
    world.users["lab-bystander"] = add_user(world.platform, world.tenant_id, "lab-bystander", Role.MEMBER)
    weights = unpack(lora_bytes, tmp_path_factory.mktemp("lora"))
    lab = Lab(world)
    target = "lab-target"
    everyone = tuple(username(role) for role in ROLES)
    lab.adapters = {
        "tenant": trained(world, target, weights, visibility="tenant"),
        "shared-with-me": trained(world, target, weights, visibility="shared", shared_with=everyone),
        "shared-with-someone-else": trained(
            world, target, weights, visibility="shared", shared_with=("lab-bystander",)
        ),
        "private": trained(world, target, weights, visibility="private"),
    }
    lab.jobs = {
        "training": training(world, target, lab.adapters["tenant"]),
        "training-from-private": training_from(world, target, lab.adapters["private"]),
    }
    lab.own = {role: trained(world, username(role), weights, visibility="private") for role in ROLES}
    lab.chats = {who: lab.new_chat(who) for who in (*ROLES, "target")}
    target_headers = lab.headers("target")
    upload = world.client.post(
        "/v1/files",
        headers=target_headers,
        files={"file": ("t.jsonl", SAMPLE_CHAT.read_bytes())},
        data={"purpose": "fine-tune"},
    )
    lab.file_id = upload.json()["id"]
    dataset = world.client.post(
        "/api/datasets", params={"filename": "target.jsonl"}, content=SAMPLE_CHAT.read_bytes(), headers=target_headers
    )
    assert dataset.status_code == 202, dataset.text
    lab.dataset_id = dataset.json()["id"]
    wait_until_ready(world, lab.dataset_id)
    return lab


def wait_until_ready(world: World, dataset_id: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        versions = world.client.get(f"/api/datasets/{dataset_id}", headers=world.auth("owner")).json()["versions"]
        if all(v["status"] == "ready" for v in versions):
            return
        time.sleep(0.1)
    raise AssertionError(f"dataset {dataset_id} was not ready in {timeout}s")


# --- the routes, each with the objects it can name ---------------------------------------------------------

# (lab, the route's path, caller, object) -> (the URL, the request's other arguments)
Request = Callable[[Lab, str, str, str], tuple[str, dict]]


@dataclass(frozen=True)
class Row:
    route: str  # "METHOD /path" as the application declares it
    objects: tuple[str, ...]
    request: Request
    want: Want
    callers: tuple[str, ...] = CALLERS


def fill(path: str, **values: str) -> str:
    for name, value in values.items():
        path = path.replace(f"{{{name}:path}}", value).replace(f"{{{name}}}", value)
    return path


def model(*, copy: bool = False) -> Request:
    """The adapter named in the path; `copy`: a copy of it, for a cell that deletes it."""

    def request(lab: Lab, path: str, caller: str, obj: str) -> tuple[str, dict]:
        model_id = lab.model(caller, obj)
        return fill(path, model_id=copy_adapter(lab.world, model_id) if copy else model_id), {}

    return request


def model_in_body(**body: object) -> Request:
    """The adapter named in the body (`body`'s callables are given the lab)."""

    def request(lab: Lab, path: str, caller: str, obj: str) -> tuple[str, dict]:
        fields = {name: value(lab) if callable(value) else value for name, value in body.items()}
        return path, {"json": {"model": lab.model(caller, obj), **fields}}

    return request


def sharing_as_it_is(lab: Lab, path: str, caller: str, obj: str) -> tuple[str, dict]:
    """A copy's sharing set to what it already is: whether allowed or not, nothing changes."""
    visibility = {"own": "private", "shared-with-me": "shared", "shared-with-someone-else": "shared"}.get(obj, obj)
    members = {"shared-with-me": sorted(map(username, ROLES)), "shared-with-someone-else": ["lab-bystander"]}
    url = fill(path, model_id=copy_adapter(lab.world, lab.model(caller, obj)))
    return url, {"json": {"visibility": visibility, "members": members.get(obj, [])}}


def job(body: Callable[[Lab, Trained], dict] | None = None, *, copy_as: str | None = None) -> Request:
    """The job named in the path, with a body made from it; `copy_as`: a copy in that status, to change."""

    def request(lab: Lab, path: str, caller: str, obj: str) -> tuple[str, dict]:
        named = lab.job(caller, obj)
        job_id = copy_job(lab.world, named.job_id, copy_as) if copy_as else named.job_id
        return fill(path, job_id=job_id), {"json": body(lab, named)} if body else {}

    return request


def checkpoint_through_own_job(lab: Lab, path: str, caller: str, obj: str) -> tuple[str, dict]:
    """The caller's own job in the path; another job's checkpoint to continue from, or to list after."""
    own, checkpoint = lab.own[caller].job_id, lab.job(caller, obj).checkpoint_id
    if path.endswith("/continue"):
        return fill(path, job_id=own), {"json": {"checkpoint": checkpoint}}
    return fill(path, job_id=own) + f"?after={checkpoint}", {}


def chat(*, fresh: bool = False, **body: object) -> Request:
    """The saved chat (and its first message) in the path; `fresh`: a new one, for a cell that deletes it."""

    def request(lab: Lab, path: str, caller: str, obj: str) -> tuple[str, dict]:
        conversation, message = lab.fresh_chat(caller, obj) if fresh else lab.chat(caller, obj)
        return fill(path, conversation_id=conversation, message_id=message), {"json": body} if body else {}

    return request


def tenants_object(*, copy: bool = False, **arguments: object) -> Request:
    """The colleague's file or dataset (version 1) in the path; `copy`: a copy of it, for a cell that deletes it."""

    def request(lab: Lab, path: str, caller: str, obj: str) -> tuple[str, dict]:
        file_id = copy_file(lab.world, lab.file_id) if copy and "{file_id}" in path else lab.file_id
        dataset_id = copy_dataset(lab.world, lab.dataset_id) if copy and "{dataset_id}" in path else lab.dataset_id
        return fill(path, file_id=file_id, dataset_id=dataset_id, number="1"), dict(arguments)

    return request


def evaluation_set(lab: Lab, path: str, caller: str, obj: str) -> tuple[str, dict]:
    return fill(path, model_id=lab.model(caller, obj)), {"json": {"file_id": lab.file_id}}


MODELS = [
    Row("GET /v1/models/{model_id:path}", ADAPTERS, model(), visible(200)),
    Row("GET /api/models/{model_id}/download", ADAPTERS, model(), at_least("member", visible(200))),
    Row("GET /api/models/{model_id}/sharing", ADAPTERS, model(), visible(200)),
    Row("PUT /api/models/{model_id}/sharing", ADAPTERS, sharing_as_it_is, at_least("member", governed)),
    Row("DELETE /v1/models/{model_id:path}", ADAPTERS, model(copy=True), at_least("member", governed)),
    Row("GET /api/models/{model_id}/evaluation", ADAPTERS, model(), visible(200)),
    # What an adapter is measured on is decided as who sees it is: by its creator or a tenant admin.
    Row("PUT /api/models/{model_id}/evaluation_set", ADAPTERS, evaluation_set, at_least("member", governed)),
    Row("POST /v1/chat/completions", ADAPTERS, model_in_body(**CHAT), visible(200)),
    Row("POST /v1/completions", ADAPTERS, model_in_body(prompt="hi", max_tokens=1), visible(200)),
    # An adapter is no starting point for a new job (400), once the caller may see it at all.
    Row(
        "POST /v1/fine_tuning/jobs",
        ADAPTERS,
        model_in_body(training_file=lambda lab: lab.file_id),
        at_least("member", visible(400)),
    ),
    # A saved chat names a model the caller may see and use (the attacker stored answers "from" a private adapter).
    Row("POST /api/conversations", ADAPTERS, model_in_body(), visible(201)),
]

JOB_ROUTES = [
    Row("GET /v1/fine_tuning/jobs/{job_id}", JOBS, job(), visible(200)),
    Row("GET /v1/fine_tuning/jobs/{job_id}/events", JOBS, job(), visible(200)),
    Row("GET /v1/fine_tuning/jobs/{job_id}/checkpoints", JOBS, job(), visible(200)),
    Row("GET /api/fine_tuning/jobs/{job_id}/evaluation", JOBS, job(), visible(200)),
    Row("POST /v1/fine_tuning/jobs/{job_id}/cancel", JOBS, job(copy_as="queued"), at_least("member", visible(200))),
    Row("POST /v1/fine_tuning/jobs/{job_id}/pause", JOBS, job(copy_as="queued"), at_least("member", visible(200))),
    Row("POST /v1/fine_tuning/jobs/{job_id}/resume", JOBS, job(copy_as="paused"), at_least("member", visible(200))),
    Row("POST /api/fine_tuning/jobs/{job_id}/extend", JOBS, job(lambda lab, named: {"n_epochs": 1}),
        at_least("member", from_weights)),
    Row("POST /api/fine_tuning/jobs/{job_id}/continue", JOBS,
        job(lambda lab, named: {"checkpoint": named.checkpoint_id}), at_least("member", visible(200))),
    Row("POST /api/fine_tuning/jobs/{job_id}/fork", JOBS, job(lambda lab, named: {"training_file": lab.file_id}),
        at_least("member", from_weights)),
    # A checkpoint is found in its own job only: another job's, asked for through the caller's own, is not there.
    Row("POST /api/fine_tuning/jobs/{job_id}/continue", ("tenant", "private"),
        checkpoint_through_own_job, at_least("member", lambda c, o: 404), callers=ROLES),
    Row("GET /v1/fine_tuning/jobs/{job_id}/checkpoints", ("tenant", "private"),
        checkpoint_through_own_job, lambda c, o: 404, callers=ROLES),
]  # fmt: skip

CONVERSATIONS = [
    Row("GET /api/conversations/{conversation_id}", CHATS, chat(), own_chat(200)),
    Row("PATCH /api/conversations/{conversation_id}", CHATS, chat(title="renamed"), own_chat(200)),
    Row("POST /api/conversations/{conversation_id}/messages", CHATS, chat(role="user", content="more"), own_chat(201)),
    Row("DELETE /api/conversations/{conversation_id}/messages/{message_id}", CHATS, chat(fresh=True), own_chat(200)),
    Row("GET /api/conversations/{conversation_id}/feedback", CHATS, chat(), own_chat(200)),
    # Collection is off in this lab (the default): one's own message is found, then refused by the policy (409).
    Row(
        "POST /api/conversations/{conversation_id}/messages/{message_id}/feedback", CHATS, chat(rating=1), own_chat(409)
    ),  # fmt: skip
    Row("DELETE /api/conversations/{conversation_id}", CHATS, chat(fresh=True), own_chat(204)),
]

FILES = [
    Row("GET /v1/files/{file_id}", TENANT_WIDE, tenants_object(), tenants(200)),
    Row("GET /v1/files/{file_id}/content", TENANT_WIDE, tenants_object(), tenants(200)),
    Row("DELETE /v1/files/{file_id}", TENANT_WIDE, tenants_object(copy=True), at_least("member", tenants(200))),
]

UPLOAD = {"params": {"filename": "t.jsonl"}, "content": SAMPLE_CHAT.read_bytes()}
DATASETS = [
    Row("GET /api/datasets/{dataset_id}", TENANT_WIDE, tenants_object(), tenants(200)),
    Row("PATCH /api/datasets/{dataset_id}", TENANT_WIDE, tenants_object(json={"description": "d"}),
        at_least("member", tenants(200))),
    Row("POST /api/datasets/{dataset_id}/versions", TENANT_WIDE, tenants_object(**UPLOAD),
        at_least("member", tenants(202))),
    Row("GET /api/datasets/{dataset_id}/versions/{number}", TENANT_WIDE, tenants_object(), tenants(200)),
    Row("GET /api/datasets/{dataset_id}/versions/{number}/records", TENANT_WIDE, tenants_object(), tenants(200)),
    Row("GET /api/datasets/{dataset_id}/versions/{number}/content", TENANT_WIDE, tenants_object(), tenants(200)),
    Row("POST /api/datasets/{dataset_id}/versions/{number}/validate", TENANT_WIDE, tenants_object(), tenants(200)),
    Row("POST /api/datasets/{dataset_id}/versions/{number}/dedup", TENANT_WIDE, tenants_object(json={}),
        at_least("member", tenants(202))),
    Row("POST /api/datasets/{dataset_id}/versions/{number}/scrub", TENANT_WIDE, tenants_object(json={}),
        at_least("member", tenants(202))),
    Row("POST /api/datasets/{dataset_id}/versions/{number}/split", TENANT_WIDE, tenants_object(json={}),
        at_least("member", tenants(202))),
    Row("POST /api/datasets/{dataset_id}/versions/{number}/export", TENANT_WIDE, tenants_object(json={}),
        at_least("member", tenants(200))),
    Row("DELETE /api/datasets/{dataset_id}", TENANT_WIDE, tenants_object(copy=True), at_least("member", tenants(200))),
]  # fmt: skip

FAMILIES = {"models": MODELS, "jobs": JOB_ROUTES, "conversations": CONVERSATIONS, "files": FILES, "datasets": DATASETS}
# Routes that name an object in their path; those of keys and members are not here yet (see the docstring).
OBJECT_PARAMETERS = ("{model_id", "{job_id}", "{file_id}", "{dataset_id}", "{conversation_id}")


def test_every_route_that_names_an_object_has_rows_here(platform_once):
    routes = {f"{method} {path}" for method, path in app_routes(platform_once.client.app)}
    covered = {row.route for rows in FAMILIES.values() for row in rows}
    naming = {route for route in routes if any(name in route for name in OBJECT_PARAMETERS)}
    assert not sorted(naming - covered), "routes that name an object but have no row here (add one)"
    assert not sorted(covered - routes), "rows for routes the application no longer has"


@pytest.mark.parametrize("family", FAMILIES)
def test_each_caller_gets_the_promised_status_for_each_object(lab: Lab, family: str):
    wrong, checked = [], 0
    for row in FAMILIES[family]:
        for caller in row.callers:
            for obj in row.objects:
                if obj == "own" and not in_lab(caller):
                    continue  # nothing of theirs is in the lab
                method, path = row.route.split(" ", 1)
                url, arguments = row.request(lab, path, caller, obj)
                response = lab.world.client.request(method, url, headers=lab.headers(caller), **arguments)
                want, checked = row.want(caller, obj), checked + 1
                if response.status_code != want:
                    got = f"{response.status_code}, want {want}: {response.text[:150]}"
                    wrong.append(f"{row.route} [{obj}] as {caller}: {got}")
    print(f"{family}: {checked} cells")
    assert not wrong, f"{len(wrong)} of {checked} cells wrong:\n" + "\n".join(wrong)


def listed(lab: Lab, caller: str, path: str) -> set[str]:
    """Every id a list route shows the caller, across its pages."""
    ids: set[str] = set()
    params: dict[str, object] = {"limit": 100} if path == "/v1/fine_tuning/jobs" else {}
    while True:
        body = lab.world.client.get(path, headers=lab.headers(caller), params=params).json()
        ids |= {item["id"] for item in body["data"]}
        if not body.get("has_more"):
            return ids
        params["after"] = body["data"][-1]["id"]


def test_lists_show_a_caller_exactly_the_objects_it_may_see(lab: Lab):
    wrong = []
    for caller in CALLERS:
        shown = {path: listed(lab, caller, path) for path in ("/v1/models", "/api/models", "/v1/fine_tuning/jobs")}
        for obj in JOBS:
            if obj == "own" and not in_lab(caller):
                continue
            job = lab.job(caller, obj)
            named = {"/v1/fine_tuning/jobs": job.job_id}
            if job.model_id:
                named |= {"/v1/models": job.model_id, "/api/models": job.model_id}
            for path, object_id in named.items():
                if (object_id in shown[path]) != sees(caller, obj):
                    wrong.append(f"{path} as {caller}: {obj} {'shown' if object_id in shown[path] else 'missing'}")
        chats = listed(lab, caller, "/api/conversations")
        if lab.chats["target"][0] in chats or (in_lab(caller) and lab.chats[caller][0] not in chats):
            wrong.append(f"/api/conversations as {caller}: {sorted(chats)}")
        for path, object_id in (("/v1/files", lab.file_id), ("/api/datasets", lab.dataset_id)):
            if (object_id in listed(lab, caller, path)) != in_lab(caller):
                wrong.append(f"{path} as {caller}: the colleague's {object_id}")
    assert not wrong, "\n".join(wrong)
