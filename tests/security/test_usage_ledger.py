"""The usage ledger: a known mix of traffic through every path, and the same exact figures in the ledger, the
admin usage API (OpenAI's organization usage shape and Adaptery's summary), its CSV, the costs, the limits'
month and /metrics."""

from __future__ import annotations

import csv
import io
import json
import time
from collections import Counter
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select

from adaptery.auth.secrets import hash_password
from adaptery.db import models as m
from adaptery.engine.generation import GenerationFailed
from adaptery.services import limits, usage
from tests.contracts.openai_schema import validation_errors
from tests.security.conftest import World, add_key
from tests.security.objects import unpack

MODEL = "adaptery-demo"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hello there"}], "temperature": 0}
EMBEDDING_MODEL = "all-MiniLM-L6-v2"
PASSWORD = "correct horse battery"


def key_id(secret: str) -> str:
    return secret.split("-")[2]


def signed_in_page(world: World) -> dict[str, str]:
    """The chat page's way in: a browser session (cookie) and its CSRF token, as the page sends them."""
    with world.platform.db.system() as s:
        s.scalars(select(m.User).where(m.User.username == "lab-owner")).one().password_hash = hash_password(PASSWORD)
    signed_in = world.client.post("/api/auth/login", json={"username": "lab-owner", "password": PASSWORD})
    assert signed_in.status_code == 200, signed_in.text
    return {"x-csrf-token": world.client.cookies.get("adaptery_csrf")}


def stream_usage(response) -> dict[str, int]:  # noqa: ANN001 - an httpx response
    chunks = [line.removeprefix("data: ") for line in response.text.splitlines() if line.startswith("data: ")]
    assert chunks[-1] == "[DONE]"
    return [json.loads(c) for c in chunks[:-1] if json.loads(c).get("usage")][-1]["usage"]


def finish_a_fine_tune(world: World, lora_bytes: bytes, tmp_path: Path) -> tuple[str, int, float]:
    """The world's queued job leased by an agent, its measured seconds reported and its end, as an agent's finish
    message reaches the queue. Returns (model id, trained tokens, cpu seconds)."""
    p, job_id = world.platform, world.ids["job_id"]
    with p.db.system() as s:
        job = s.get(m.FineTuningJob, job_id)
        if job.status == "validating_files":
            job.status = "queued"  # validation is another test's story
    assignment = p.queue.lease("agent-usage")
    assert assignment is not None and assignment.job_id == job_id
    compute = {"cpu_seconds": 12.5, "accelerator_seconds": 0.0, "wall_seconds": 20.0}
    p.queue.charge_compute(job_id, "agent-usage", compute, assignment.attempt)
    p.queue.charge_compute(job_id, "agent-usage", compute, assignment.attempt)  # a retried finish: charged once
    adapter = unpack(lora_bytes, tmp_path / "adapter")
    model_id = p.queue.succeed(job_id, "agent-usage", adapter, {"trained_tokens": 777, "steps": 1}, assignment.attempt)
    assert model_id is not None
    return model_id, 777, 12.5


def test_a_known_mix_of_traffic_is_counted_the_same_everywhere(world: World, lora_bytes: bytes, tmp_path: Path):
    client = world.client
    owner_key, member_key = world.tokens["owner"], world.tokens["member"]
    owner, member = world.auth("owner"), world.auth("member")
    owner_id, member_id = world.users["lab-owner"], world.users["lab-member"]
    # (kind, user, key, model) -> Counter of requests and tokens, from what each response said it used
    expected: dict[tuple[str, str, str, str], Counter] = {}

    def used(kind: str, user: str, key: str, model: str, usage_object: dict, requests: int = 1) -> None:
        entry = expected.setdefault((kind, user, key, model), Counter())
        entry["requests"] += requests
        entry["prompt_tokens"] += usage_object["prompt_tokens"]
        entry["completion_tokens"] += usage_object.get("completion_tokens", 0)

    # a budget on the tenant: the calls hold their worst case and settle it (the path limited tenants take)
    budget = {"monthly_tokens": 1_000_000, "tokens_per_minute": 100_000}
    limited = client.put(
        f"/api/platform/tenants/{world.tenant_id}/limits", headers=world.auth("platform_admin"), json=budget
    )
    assert limited.status_code == 200, limited.text
    page = signed_in_page(world)
    from_page = client.post("/v1/chat/completions", headers=page, json={**CHAT, "max_tokens": 6})
    assert from_page.status_code == 200, from_page.text
    used("completions", owner_id, "", MODEL, from_page.json()["usage"])
    client.cookies.clear()

    whole = client.post("/v1/chat/completions", headers=owner, json={**CHAT, "max_tokens": 5})
    assert whole.status_code == 200, whole.text
    used("completions", owner_id, key_id(owner_key), MODEL, whole.json()["usage"])

    streamed = client.post(
        "/v1/chat/completions",
        headers=member,
        json={**CHAT, "max_tokens": 7, "stream": True, "stream_options": {"include_usage": True}},
    )
    assert streamed.status_code == 200, streamed.text
    used("completions", member_id, key_id(member_key), MODEL, stream_usage(streamed))

    three = client.post("/v1/chat/completions", headers=member, json={**CHAT, "max_tokens": 4, "n": 3, "seed": 1})
    assert three.status_code == 200, three.text
    assert len(three.json()["choices"]) == 3
    used("completions", member_id, key_id(member_key), MODEL, three.json()["usage"])

    legacy = client.post("/v1/completions", headers=owner, json={"model": MODEL, "prompt": "once", "max_tokens": 3})
    assert legacy.status_code == 200, legacy.text
    used("completions", owner_id, key_id(owner_key), MODEL, legacy.json()["usage"])

    embedded = client.post("/v1/embeddings", headers=member, json={"model": EMBEDDING_MODEL, "input": ["a", "b c"]})
    assert embedded.status_code == 200, embedded.text
    used("embeddings", member_id, key_id(member_key), EMBEDDING_MODEL, embedded.json()["usage"])

    tight = add_key(world.platform, world.tenant_id, owner_id, limits={"tokens_per_minute": 1})
    refused = client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {tight}"}, json=CHAT)
    assert refused.status_code == 429, refused.text  # refused at its limit: nothing was used, nothing is counted

    model_id, trained, cpu_seconds = finish_a_fine_tune(world, lora_bytes, tmp_path)

    # The ledger itself
    now = time.time()
    today = int(now) - int(now) % usage.DAY
    with world.platform.db.system() as s:
        rows = usage.records(s, world.tenant_id, today, today + usage.DAY)
    ledger = {(r.kind, r.user_id, r.api_key_id, r.model): r for r in rows}
    for (kind, user, key, model), figures in expected.items():
        row = ledger[(kind, user, key, model)]
        assert (row.requests, row.prompt_tokens, row.completion_tokens) == (
            figures["requests"],
            figures["prompt_tokens"],
            figures["completion_tokens"],
        ), (kind, user, key, model)
    assert not any(r.api_key_id == key_id(tight) for r in rows)
    training = ledger[("fine_tuning", owner_id, "", model_id)]
    assert (training.trained_tokens, training.requests, training.agent_id) == (trained, 1, "agent-usage")
    compute = ledger[("compute", owner_id, "", MODEL)]  # seconds spent on the base, before the adapter existed
    assert (compute.cpu_seconds, compute.wall_seconds, compute.agent_id) == (cpu_seconds, 20.0, "agent-usage")

    completions = [f for (kind, *_), f in expected.items() if kind == "completions"]
    prompt = sum(f["prompt_tokens"] for f in completions)
    completion = sum(f["completion_tokens"] for f in completions)
    embedding = sum(f["prompt_tokens"] for (kind, *_), f in expected.items() if kind == "embeddings")
    assert prompt > 0 and completion > 0 and embedding > 0

    # OpenAI's organization usage shape, grouped by key and by user
    admin = world.auth("admin")
    page_by_key = client.get(
        "/v1/organization/usage/completions",
        headers=admin,
        params={"start_time": today, "group_by": ["api_key_id", "model"]},
    ).json()
    assert validation_errors("UsageResponse", page_by_key) == []
    (bucket,) = page_by_key["data"]
    assert bucket["start_time"] == today and not page_by_key["has_more"]
    by_key = {
        r["api_key_id"]: (r["num_model_requests"], r["input_tokens"], r["output_tokens"]) for r in bucket["results"]
    }
    for key, user in ((key_id(owner_key), owner_id), (key_id(member_key), member_id)):
        figures = expected.get(("completions", user, key, MODEL), Counter())
        assert by_key[key] == (figures["requests"], figures["prompt_tokens"], figures["completion_tokens"])
    assert by_key[None] == tuple(expected[("completions", owner_id, "", MODEL)][k] for k in
                                 ("requests", "prompt_tokens", "completion_tokens"))  # fmt: skip  # the page chat
    by_user = client.get(
        "/v1/organization/usage/completions", headers=admin, params={"start_time": today, "group_by": "user_id"}
    ).json()["data"][0]["results"]
    assert sum(r["input_tokens"] for r in by_user) == prompt
    assert sum(r["output_tokens"] for r in by_user) == completion
    embeddings_page = client.get("/v1/organization/usage/embeddings", headers=admin, params={"start_time": today})
    assert validation_errors("UsageResponse", embeddings_page.json()) == []
    assert embeddings_page.json()["data"][0]["results"][0]["input_tokens"] == embedding

    # Adaptery's summary (what the admin page draws) and the limits' month agree with it
    summary = client.get("/api/admin/usage", headers=admin).json()
    totals = summary["ledger"]["totals"]
    assert (totals["prompt_tokens"], totals["completion_tokens"]) == (prompt, completion)
    assert (totals["embedding_tokens"], totals["trained_tokens"]) == (embedding, trained)
    assert totals["requests"] == sum(f["requests"] for f in expected.values())
    assert summary["tenant"]["tokens"] == prompt + completion + embedding + trained
    assert summary["keys"][key_id(member_key)]["tokens"] == sum(
        f["prompt_tokens"] + f["completion_tokens"]
        for (_, _, key, _), f in expected.items()
        if key == key_id(member_key)
    )
    assert summary["ledger"]["by_user"]["lab-member"]["completion_tokens"] == sum(
        f["completion_tokens"] for (kind, user, *_), f in expected.items() if user == member_id
    )

    # CSV export: the same rows
    exported = client.get("/api/admin/usage/export", headers=admin)
    assert exported.status_code == 200 and exported.headers["content-type"].startswith("text/csv")
    table = list(csv.DictReader(io.StringIO(exported.text)))
    assert sum(int(r["completion_tokens"]) for r in table) == completion
    assert sum(int(r["trained_tokens"]) for r in table) == trained

    # /metrics, read from the same rows
    scraped = client.get("/metrics", headers=world.auth("platform_admin")).text
    samples = [s for family in text_string_to_metric_families(scraped) for s in family.samples]
    tokens = {
        (s.labels["kind"], s.labels["type"]): s.value
        for s in samples
        if s.name == "adaptery_usage_tokens_total" and s.labels["model"] in (MODEL, EMBEDDING_MODEL, model_id)
    }
    assert tokens[("completions", "prompt")] == prompt
    assert tokens[("completions", "completion")] == completion
    assert tokens[("embeddings", "prompt")] == embedding
    assert tokens[("fine_tuning", "trained")] == trained
    requests = sum(
        s.value for s in samples if s.name == "adaptery_usage_requests_total" and s.labels["kind"] == "completions"
    )
    assert requests == sum(f["requests"] for (kind, *_), f in expected.items() if kind == "completions")


def test_prices_turn_the_ledger_into_cost(world: World):
    world.platform.settings.usage_prices = {MODEL: {"prompt": 1_000_000.0, "completion": 2_000_000.0}}
    response = world.client.post("/v1/chat/completions", headers=world.auth("owner"), json={**CHAT, "max_tokens": 3})
    spent = response.json()["usage"]
    cost = spent["prompt_tokens"] * 1.0 + spent["completion_tokens"] * 2.0  # prices are per million tokens
    now = int(time.time())
    costs = world.client.get(
        "/v1/organization/costs",
        headers=world.auth("admin"),
        params={"start_time": now - now % usage.DAY, "group_by": "line_item"},
    ).json()
    assert validation_errors("UsageResponse", costs) == []
    items = {r["line_item"]: r["amount"]["value"] for r in costs["data"][0]["results"]}
    assert items == {
        f"{MODEL}, input": spent["prompt_tokens"] * 1.0,
        f"{MODEL}, output": spent["completion_tokens"] * 2.0,
    }
    assert world.client.get("/api/admin/usage", headers=world.auth("admin")).json()["ledger"]["totals"]["cost"] == cost


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"start_time": 0, "bucket_width": "1h"}, "bucket_width"),
        ({"start_time": 0, "group_by": "agent_id"}, "group_by"),
        ({"start_time": 100, "end_time": 50}, "end_time"),
        ({"start_time": 0, "page": "nonsense"}, "page"),
    ],
)
def test_a_bad_usage_query_is_a_400_naming_the_field(world_once: World, params: dict, field: str):
    world = world_once
    response = world.client.get("/v1/organization/usage/completions", headers=world.auth("admin"), params=params)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == field


def test_usage_pages_through_buckets_with_next_page(world_once: World):
    world = world_once
    admin, start = world.auth("admin"), 1_700_000_000 - 1_700_000_000 % usage.DAY
    pages, params = [], {"start_time": start, "end_time": start + 10 * usage.DAY, "limit": 4}
    while True:
        body = world.client.get("/v1/organization/usage/embeddings", headers=admin, params=params).json()
        pages.append([b["start_time"] for b in body["data"]])
        if not body["has_more"]:
            break
        params["page"] = body["next_page"]
    assert [len(p) for p in pages] == [4, 4, 2]
    assert sum(pages, []) == [start + i * usage.DAY for i in range(10)]


def test_another_tenant_sees_none_of_this_usage(world: World):
    world.client.post("/v1/chat/completions", headers=world.auth("owner"), json={**CHAT, "max_tokens": 2})
    now = int(time.time())
    other = world.client.get(
        "/v1/organization/usage/completions",
        headers=world.auth("other_tenant_member"),
        params={"start_time": now - now % usage.DAY},
    )
    assert other.status_code == 403  # a member is no tenant admin; and an admin of that tenant sees its own:
    with world.platform.db.system() as s:
        assert usage.records(s, world.other_tenant_id, 0, now + usage.DAY) == []


def test_chat_tokens_reach_the_usage_page_without_any_limit(world: World):
    """The defect as a new user met it: requests were counted, tokens stayed 0 (tenant and key alike)."""
    response = world.client.post("/v1/chat/completions", headers=world.auth("member"), json={**CHAT, "max_tokens": 3})
    spent = response.json()["usage"]["total_tokens"]
    page = world.client.get("/api/admin/usage", headers=world.auth("admin")).json()
    assert page["tenant"]["requests"] == 1 and page["tenant"]["tokens"] == spent
    assert page["keys"][key_id(world.tokens["member"])]["tokens"] == spent


def test_a_call_under_no_limit_writes_its_month_once_when_it_settles(world: World, monkeypatch):  # noqa: ANN001
    """Nothing is held, so `reserve` writes nothing (it was two upserts and a commit a call, before the first
    token); the month counts the request with its tokens when the call settles, as the ledger does."""
    subjects = [f"tenant:{world.tenant_id}", f"key:{key_id(world.tokens['member'])}"]

    def month() -> list[tuple[int, int]]:
        with world.platform.db.system() as s:
            counted = limits.usage(s, subjects)
        return [(counted[subject]["requests"], counted[subject]["tokens"]) for subject in subjects]

    before, seen_at_settle = month(), []
    real = limits.settle

    def settle(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202 - limits.settle's signature
        seen_at_settle.append(month())
        return real(*args, **kwargs)

    monkeypatch.setattr(limits, "settle", settle)
    response = world.client.post("/v1/chat/completions", headers=world.auth("member"), json={**CHAT, "max_tokens": 3})
    spent = response.json()["usage"]["total_tokens"]
    assert seen_at_settle == [before]  # the call ran, and its reservation had written nothing
    assert month() == [(requests + 1, tokens + spent) for requests, tokens in before]


def test_a_stream_that_fails_after_its_first_tokens_is_counted_with_them(world: World, monkeypatch):  # noqa: ANN001
    engine = world.platform.engine
    real = engine.generate
    produced: list[int] = []

    def fails_after_the_first_delta(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202 - the engine's signature
        deltas, usage_so_far = real(*args, **kwargs), args[5]
        for delta in deltas:
            yield delta
            produced.append(usage_so_far.completion_tokens)
            deltas.close()  # the real generation stops here, as when a device fails mid-answer
            raise GenerationFailed("the accelerator fell over")

    monkeypatch.setattr(engine, "generate", fails_after_the_first_delta)
    body = {**CHAT, "max_tokens": 20, "stream": True}
    response = world.client.post("/v1/chat/completions", headers=world.auth("member"), json=body)
    assert response.status_code == 200 and "the accelerator fell over" in response.text
    now = int(time.time())
    with world.platform.db.system() as s:
        (row,) = usage.records(s, world.tenant_id, now - now % usage.DAY, now + usage.DAY)
    assert produced and produced[0] >= 1
    assert (row.requests, row.failed_requests, row.completion_tokens) == (1, 1, produced[0])
    assert row.prompt_tokens > 0


def test_a_cost_budget_is_held_before_and_settled_after_like_a_token_budget(world: World):
    world.platform.settings.usage_prices = {MODEL: {"prompt": 1_000_000.0, "completion": 2_000_000.0}}  # 1, 2 a token
    owner, admin = world.auth("owner"), world.auth("admin")
    before = world.client.post("/v1/chat/completions", headers=owner, json={**CHAT, "max_tokens": 2}).json()["usage"]
    spent_before = before["prompt_tokens"] + 2 * before["completion_tokens"]  # made before any budget was set
    budget = spent_before + before["prompt_tokens"] + 2 * 3 + 1  # room for one more call of max_tokens 3, no more
    limited = world.client.put(
        f"/api/platform/tenants/{world.tenant_id}/limits",
        headers=world.auth("platform_admin"),
        json={"monthly_cost": budget},
    )
    assert limited.status_code == 200 and limited.json()["monthly_cost"] == budget
    served = world.client.post("/v1/chat/completions", headers=owner, json={**CHAT, "max_tokens": 3})
    assert served.status_code == 200, served.text
    spent = spent_before + served.json()["usage"]["prompt_tokens"] + 2 * served.json()["usage"]["completion_tokens"]
    refused = world.client.post("/v1/chat/completions", headers=owner, json={**CHAT, "max_tokens": 3})
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "insufficient_quota", refused.text
    assert world.client.get("/api/admin/usage", headers=admin).json()["ledger"]["totals"]["cost"] == spent
    with world.platform.db.system() as s:
        row = s.get(m.UsageCounter, (f"tenant:{world.tenant_id}", limits.cost_period(time.time())))
        assert (row.tokens, row.reserved) == (spent * limits.MICROS, 0)  # settled to what it cost, nothing held
    world.client.put(
        f"/api/platform/tenants/{world.tenant_id}/limits",
        headers=world.auth("platform_admin"),
        json={"monthly_cost": spent},
    )
    body = {"model": MODEL, "training_file": world.ids["file_id"]}
    job = world.client.post("/v1/fine_tuning/jobs", headers=owner, json=body)
    assert job.status_code == 429 and job.json()["error"]["code"] == "insufficient_quota"  # spent: no new fine-tune
