"""The engine through the API: n, logprobs, penalties, seeds, adapters imported at runtime, a rank above
the limit (400), /metrics and the admin view of adapter tiers, and who may see them."""

from __future__ import annotations

import io
import sys
import zipfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from engine_helpers import make_adapter  # noqa: E402

from adaptery.auth.policy import require_engine_admin  # noqa: E402
from adaptery.auth.principal import Principal, Role  # noqa: E402
from adaptery.services.errors import PermissionDenied  # noqa: E402

QUESTION = [{"role": "user", "content": "What does an adapter do?"}]


@pytest.fixture
def adapter_model(running, demo_model_dir, tmp_path) -> str:
    path = make_adapter(demo_model_dir, tmp_path / "dora", "dora", rank=8, seed=4)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for file in path.glob("adapter_*"):
            archive.write(file, file.name)
    response = running.client.post(
        "/api/models/import", params={"base_model": "adaptery-demo", "suffix": "eng"}, content=buffer.getvalue(),
        headers=running.auth(),
    )  # fmt: skip
    assert response.status_code == 200, response.text
    return response.json()["id"]


def chat(running, **body):
    return running.client.post(
        "/v1/chat/completions", headers=running.auth(), json={"model": "adaptery-demo", "messages": QUESTION, **body}
    )


def test_n_logprobs_penalties_and_seed(running):
    response = chat(running, n=3, temperature=1.2, seed=7, max_tokens=8, logprobs=True, top_logprobs=2)
    assert response.status_code == 200, response.text
    body = response.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert len({c["message"]["content"] for c in body["choices"]}) > 1  # seeds 7, 8, 9
    for choice in body["choices"]:
        entries = choice["logprobs"]["content"]
        assert entries and all(e["logprob"] <= 0 and len(e["top_logprobs"]) == 2 for e in entries)
    assert body["usage"]["completion_tokens"] == sum(len(c["logprobs"]["content"]) for c in body["choices"])
    again = chat(running, n=3, temperature=1.2, seed=7, max_tokens=8).json()
    assert [c["message"]["content"] for c in again["choices"]] == [c["message"]["content"] for c in body["choices"]]
    greedy = chat(running, temperature=0, max_tokens=12).json()["choices"][0]["message"]["content"]
    assert chat(running, temperature=0.8, top_k=1, max_tokens=12).json()["choices"][0]["message"]["content"] == greedy
    penalized = chat(running, temperature=0, max_tokens=12, frequency_penalty=2, presence_penalty=2)
    assert penalized.status_code == 200
    legacy = running.client.post(
        "/v1/completions", headers=running.auth(),
        json={"model": "adaptery-demo", "prompt": "Hello", "max_tokens": 4, "logprobs": 2, "temperature": 0},
    ).json()  # fmt: skip
    logprobs = legacy["choices"][0]["logprobs"]
    assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == legacy["usage"]["completion_tokens"]
    assert all(len(top) <= 2 for top in logprobs["top_logprobs"])


@pytest.mark.parametrize(
    ("body", "param"),
    [({"top_logprobs": 2}, "top_logprobs"), ({"top_k": -2}, "top_k"), ({"presence_penalty": 3}, "presence_penalty")],
)
def test_bad_sampling_options(running, body, param):
    response = chat(running, **body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_streamed_choices_and_an_imported_dora_adapter(running, adapter_model):
    with running.client.stream(
        "POST", "/v1/chat/completions", headers=running.auth(),
        json={"model": adapter_model, "messages": QUESTION, "n": 2, "max_tokens": 6, "temperature": 0, "stream": True},
    ) as response:  # fmt: skip
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line.startswith("data: {")]
    finished = [line for line in lines if '"finish_reason":"' in line]
    assert len(finished) == 2 and '"index":0' in "".join(finished) and '"index":1' in "".join(finished)
    state = running.client.get("/api/admin/engine", headers=running.auth()).json()
    base = state["bases"]["adaptery-demo"]
    assert base["path"] == "native"
    assert [a["model"] for a in base["adapters"]["memory"]] == [adapter_model]
    assert state["adapters"] and next(iter(state["adapters"].values()))["served"].startswith("DoRA native")
    process = state["process"]  # in-process here: no re-execution, so the allocator is whatever pytest runs on
    assert process["allocator"] in ("system", "jemalloc", "tcmalloc") and process["torch_threads"] >= 1
    metrics = running.client.get("/metrics", headers=running.auth())
    assert metrics.status_code == 200
    assert 'adaptery_engine_requests_total{base="adaptery-demo",outcome="length",path="native"}' in metrics.text
    assert "adaptery_engine_adapter_load_seconds_count 1.0" in metrics.text


def test_rank_above_the_servers_limit_is_a_clear_400(running, adapter_model):
    running.platform.engine.max_lora_rank = 4  # as if the limit was lowered after the import
    running.platform.engine._adapters.clear()
    response = chat(running, model=adapter_model)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "model" and "rank 8 is above this server's maximum LoRA rank of 4" in error["message"]


def test_engine_views_need_an_owner(running, adapter_model):
    other = running.new_tenant("other", "someone")
    # the other tenant's owner sees the engine, but not this tenant's adapter by name
    state = running.client.get("/api/admin/engine", headers=running.auth(other.api_key)).json()
    assert "adaptery-demo" in state["bases"] or state["bases"] == {}
    assert adapter_model not in str(state)
    assert "process" not in state and "other_tenants_adapters" not in state  # the platform's, not a tenant's
    assert running.client.get("/metrics").status_code == 401
    # platform-wide counters are for platform admins only: a tenant's owner learns nothing of the others
    assert running.client.get("/metrics", headers=running.auth(other.api_key)).status_code == 403


@pytest.mark.parametrize(("role", "admin", "allowed"), [("owner", False, True), ("admin", False, False),
                                                        ("member", False, False), ("viewer", True, True)])  # fmt: skip
def test_only_owners_and_platform_admins_see_the_engine(role, admin, allowed):
    who = Principal(tenant_id="t", tenant_name="t", user_id="u", username="u", role=Role(role), is_platform_admin=admin)
    if allowed:
        require_engine_admin(who)
    else:
        with pytest.raises(PermissionDenied):
            require_engine_admin(who)
