"""A member's private adapter is out of a colleague's reach by every road to its weights: the model routes, the
job that trained it (extend, continue, fork, its checkpoints) and a job still training from it. Each answer is
the one for an object that does not exist, never a 403 or a 400 that confirms it is there."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.security.conftest import World, add_key
from tests.security.objects import Trained, trained, training_from, unpack

MISSING_MODEL = "ft:adaptery-demo:lab:private:nothere"
MISSING_JOB = "ftjob-doesnotexist000000000"


@pytest.fixture
def colleague(world: World, lora_bytes: bytes, tmp_path: Path) -> dict[str, Trained | str]:
    """lab-target's private adapter from a job, a job training on from it, and a private imported adapter."""
    target = {"Authorization": f"Bearer {add_key(world.platform, world.tenant_id, world.users['lab-target'])}"}
    world.tokens["target"] = target["Authorization"].removeprefix("Bearer ")
    weights = unpack(lora_bytes, tmp_path / "lora")
    job = trained(world, "lab-target", weights, visibility="private")
    imported = world.client.post(
        "/api/models/import",
        params={"base_model": "adaptery-demo", "suffix": "mine"},
        content=lora_bytes,
        headers=target,
    )
    assert imported.status_code == 200, imported.text
    model = imported.json()["id"]
    shared = world.client.put(f"/api/models/{model}/sharing", headers=target, json={"visibility": "private"})
    assert shared.status_code == 200, shared.text
    return {"job": job, "child": training_from(world, "lab-target", job), "imported": model}


def answer(response) -> tuple[int, str | None, str | None]:  # noqa: ANN001
    try:
        error = response.json().get("error") or {}
    except ValueError:  # a zip, an empty 204
        error = {}
    return response.status_code, error.get("code"), error.get("param")


def model_requests(world: World, model: str) -> dict[str, tuple[str, str, dict]]:
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    return {
        "retrieve": ("GET", f"/v1/models/{model}", {}),
        "download": ("GET", f"/api/models/{model}/download", {}),
        "sharing": ("GET", f"/api/models/{model}/sharing", {}),
        "share": ("PUT", f"/api/models/{model}/sharing", {"json": {"visibility": "tenant"}}),
        "delete": ("DELETE", f"/v1/models/{model}", {}),
        "chat": ("POST", "/v1/chat/completions", {"json": {"model": model, **chat}}),
        "fine-tune it": (
            "POST",
            "/v1/fine_tuning/jobs",
            {"json": {"model": model, "training_file": world.ids["file_id"]}},
        ),
        "key for it": ("POST", "/api/keys", {"json": {"name": "k", "allowed_models": [model]}}),
        "chat about it": ("POST", "/api/conversations", {"json": {"model": model}}),
    }


def job_requests(world: World, job_id: str, checkpoint: str) -> dict[str, tuple[str, str, dict]]:
    jobs = f"/v1/fine_tuning/jobs/{job_id}"
    derive = f"/api/fine_tuning/jobs/{job_id}"
    return {
        "retrieve": ("GET", jobs, {}),
        "events": ("GET", f"{jobs}/events", {}),
        "checkpoints": ("GET", f"{jobs}/checkpoints", {}),
        "cancel": ("POST", f"{jobs}/cancel", {}),
        "pause": ("POST", f"{jobs}/pause", {}),
        "resume": ("POST", f"{jobs}/resume", {}),
        "extend": ("POST", f"{derive}/extend", {"json": {"n_epochs": 1}}),
        "continue": ("POST", f"{derive}/continue", {"json": {"checkpoint": checkpoint}}),
        "fork": ("POST", f"{derive}/fork", {"json": {"training_file": world.ids["file_id"]}}),
    }


def differences(world: World, caller: str, hidden: dict, missing: dict) -> list[str]:
    wrong = []
    for name, (method, url, body) in hidden.items():
        got = answer(world.client.request(method, url, headers=world.auth(caller), **body))
        m_method, m_url, m_body = missing[name]
        want = answer(world.client.request(m_method, m_url, headers=world.auth(caller), **m_body))
        if got != want:
            wrong.append(f"{name}: {method} {url} answered {got}, a missing object {want}")
    return wrong


def test_a_colleagues_private_adapter_is_answered_as_a_missing_model(world: World, colleague: dict):
    missing = model_requests(world, MISSING_MODEL)
    for model in (colleague["job"].model_id, colleague["imported"]):
        wrong = differences(world, "member", model_requests(world, model), missing)
        assert not wrong, "\n".join(wrong)
        for listing in ("/v1/models", "/api/models"):
            ids = [x["id"] for x in world.client.get(listing, headers=world.auth("member")).json()["data"]]
            assert model not in ids


@pytest.mark.parametrize("which", ["job", "child"])
def test_the_jobs_behind_a_private_adapter_are_answered_as_missing_jobs(world: World, colleague: dict, which: str):
    """The job that trained it, and a job training on from it: their checkpoints are the same weights."""
    job = colleague[which]
    missing = job_requests(world, MISSING_JOB, job.checkpoint_id)
    wrong = differences(world, "member", job_requests(world, job.job_id, job.checkpoint_id), missing)
    assert not wrong, "\n".join(wrong)
    listed = world.client.get("/v1/fine_tuning/jobs?limit=100", headers=world.auth("member")).json()["data"]
    assert job.job_id not in [x["id"] for x in listed]


def test_its_creator_and_the_tenant_admins_still_reach_them(world: World, colleague: dict):
    job, child = colleague["job"], colleague["child"]
    for caller in ("target", "admin"):
        headers = world.auth(caller)
        assert world.client.get(f"/v1/models/{job.model_id}", headers=headers).status_code == 200
        assert world.client.get(f"/v1/fine_tuning/jobs/{child.job_id}", headers=headers).status_code == 200
        extended = world.client.post(
            f"/api/fine_tuning/jobs/{job.job_id}/extend", headers=headers, json={"n_epochs": 1}
        )
        assert extended.status_code == 200, extended.text
        continued = world.client.post(
            f"/api/fine_tuning/jobs/{child.job_id}/continue", headers=headers, json={"checkpoint": child.checkpoint_id}
        )
        assert continued.status_code == 200, continued.text


def test_once_shared_with_the_tenant_a_colleague_trains_on_from_it(world: World, colleague: dict):
    job = colleague["job"]
    shared = world.client.put(
        f"/api/models/{job.model_id}/sharing", headers=world.auth("target"), json={"visibility": "tenant"}
    )
    assert shared.status_code == 200, shared.text
    for kind, body in (("extend", {"n_epochs": 1}), ("continue", {"checkpoint": job.checkpoint_id})):
        response = world.client.post(
            f"/api/fine_tuning/jobs/{job.job_id}/{kind}", headers=world.auth("member"), json=body
        )
        assert response.status_code == 200, response.text
    checkpoints = world.client.get(f"/v1/fine_tuning/jobs/{job.job_id}/checkpoints", headers=world.auth("member"))
    assert [c["id"] for c in checkpoints.json()["data"]] == [job.checkpoint_id]


@pytest.mark.parametrize(("visibility", "shared_with"), [("shared", ("lab-member",)), ("private", ())])
def test_an_adapter_grown_from_a_restricted_one_is_seen_by_no_more_people(
    world: World, lora_bytes: bytes, tmp_path: Path, visibility: str, shared_with: tuple[str, ...]
):
    """The attack: a member a colleague's adapter was shared with extended it, and the new adapter was
    visible to the whole tenant."""
    from adaptery.db import models as m
    from adaptery.services import models

    weights = unpack(lora_bytes, tmp_path / "lora")
    source = trained(world, "lab-target", weights, visibility=visibility, shared_with=shared_with)
    grower = "lab-member" if visibility == "shared" else "lab-target"
    child = training_from(world, grower, source)
    with world.platform.db.tenant(world.tenant_id) as s:  # the job succeeds, as the queue registers it
        adapter = models.register_adapter(
            s,
            world.platform.blobs,
            tenant_id=world.tenant_id,
            model_id=f"ft:adaptery-demo:lab:grown:{visibility}",
            base_model="adaptery-demo",
            job_id=child.job_id,
            adapter_dir=weights,
        )
        assert adapter.visibility == visibility
        s.get(m.FineTuningJob, child.job_id).fine_tuned_model = adapter.id
    model = f"/v1/models/{adapter.id}"
    assert world.client.get(model, headers=world.auth("viewer")).status_code == 404
    target = {"Authorization": f"Bearer {add_key(world.platform, world.tenant_id, world.users['lab-target'])}"}
    assert world.client.get(model, headers=target).status_code == 200  # the source's creator still sees it
    grower_headers = target if grower == "lab-target" else world.auth("member")
    assert world.client.get(model, headers=grower_headers).status_code == 200
