"""Which evaluation a finished job gets (held-out set, predecessor), and the evaluation queue's lease, progress,
end and recovery, on SQLite and PostgreSQL. (The whole run, training and scoring included, is in
tests/e2e/test_feedback_loop.py.)"""

from __future__ import annotations

import time

import pytest
from sqlalchemy import delete, func, select

from adaptery.auth.principal import Principal, Role
from adaptery.db import models as m
from adaptery.db.ids import new_id
from adaptery.messaging import protocol
from adaptery.services import evaluations, limits
from adaptery.services import keys as api_keys
from adaptery.services.errors import PermissionDenied
from tests.integration.helpers import upload_sample
from tests.security.conftest import add_key, add_user


@pytest.fixture
def settings_overrides() -> dict[str, object]:
    return {"embedded_agent": False}  # nothing runs the evaluations behind the test's back


class Lab:
    def __init__(self, running) -> None:  # noqa: ANN001
        self.running = running
        self.tenant_id = running.tenant_id
        self.file_id = upload_sample(running.client, running.auth())["id"]
        with running.platform.db.system() as s:
            self.user_id = s.get(m.ApiKey, running.first.api_key.split("-")[2]).user_id

    def job(self, *, adapter: str | None = "tenant", user_id: str | None = None, **fields: object) -> str:
        """A succeeded job on the demo base (with an adapter at that visibility, unless None); its id."""
        hyperparameters = fields.pop("hyperparameters", {"n_epochs": 1})
        with self.running.platform.db.system() as s:
            job = m.FineTuningJob(
                id=new_id("ftjob-"), tenant_id=self.tenant_id, user_id=user_id or self.user_id, model="adaptery-demo",
                training_file=fields.pop("training_file", self.file_id), seed=3, hyperparameters=hyperparameters,
                method={"type": "supervised"}, status="succeeded", created_at=time.time(), **fields,
            )  # fmt: skip
            s.add(job)
            s.flush()
            if adapter is not None:
                job.fine_tuned_model = f"ft:adaptery-demo:default::{job.id}"
                s.add(m.Adapter(id=job.fine_tuned_model, tenant_id=self.tenant_id, base_model="adaptery-demo",
                                job_id=job.id, rank=8, manifest={}, sha256="0" * 64, visibility=adapter,
                                created_by=job.user_id))  # fmt: skip
            return job.id

    def enqueue(self, job_id: str) -> m.Evaluation | None:
        with self.running.platform.db.system() as s:
            evaluation = evaluations.enqueue_for_job(s, s.get(m.FineTuningJob, job_id))
            if evaluation is not None:
                s.expunge(evaluation)
            return evaluation

    def model(self, job_id: str) -> str:
        with self.running.platform.db.system() as s:
            return s.get(m.FineTuningJob, job_id).fine_tuned_model


def labels(evaluation: m.Evaluation) -> dict[str, str]:
    return {entry["label"]: entry["model"] for entry in evaluation.models}


def test_the_held_out_set_is_the_validation_file_else_the_split_else_the_set_kept_beside_the_predecessor(running):
    lab = Lab(running)
    with_file = lab.enqueue(lab.job(validation_file=lab.file_id))
    assert with_file.source == {"kind": "validation_file", "file_id": lab.file_id}
    split = lab.enqueue(lab.job(hyperparameters={"n_epochs": 1, "validation_split": 0.25, "seed": 11}))
    assert split.source == {"kind": "validation_split", "file_id": lab.file_id, "fraction": 0.25, "seed": 11}
    nothing = lab.job()
    assert lab.enqueue(nothing) is None  # no held-out set, and its event says so
    events = running.client.get(f"/v1/fine_tuning/jobs/{nothing}/events", headers=running.auth()).json()["data"]
    assert any(e["message"].startswith("Not evaluated: the job has no validation file") for e in events)

    kept = running.client.put(f"/api/models/{lab.model(nothing)}/evaluation_set", headers=running.auth(),
                              json={"file_id": lab.file_id})  # fmt: skip
    assert kept.status_code == 200, kept.text
    follower = lab.enqueue(lab.job())  # same base and data: the adapter before it is its predecessor
    assert follower.source == {"kind": "evaluation_set", "file_id": lab.file_id, "beside": lab.model(nothing)}


def test_the_predecessor_is_the_parent_else_the_latest_earlier_adapter_on_the_same_base_and_data(running):
    lab = Lab(running)
    validation = {"validation_file": lab.file_id}
    first = lab.job(**validation)
    assert labels(lab.enqueue(first)).keys() == {"candidate", "base"}  # the first adapter has none
    second = lab.job(**validation)
    assert labels(lab.enqueue(second)) == {"candidate": lab.model(second), "predecessor": lab.model(first),
                                           "base": "adaptery-demo"}  # fmt: skip
    other_data = upload_sample(running.client, running.auth(), b'{"messages": [{"role": "user", "content": "x"}, '
                               b'{"role": "assistant", "content": "y"}]}\n')["id"]  # fmt: skip
    assert "predecessor" not in labels(lab.enqueue(lab.job(training_file=other_data, **validation)))
    child = lab.job(lineage={"kind": "fork", "parent_job": first, "checkpoint": None}, **validation)
    assert labels(lab.enqueue(child))["predecessor"] == lab.model(first)  # lineage wins over the latest


def test_a_colleagues_private_adapter_is_never_the_predecessor(running):
    lab = Lab(running)
    with running.platform.db.system() as s:
        colleague = m.User(id=new_id("user-"), username="colleague")
        s.add(colleague)
        s.flush()
        colleague_id = colleague.id
    validation = {"validation_file": lab.file_id}
    mine = lab.job(**validation)
    lab.job(adapter="private", user_id=colleague_id, **validation)  # later, same data, but not the owner's to see
    assert labels(lab.enqueue(lab.job(**validation)))["predecessor"] == lab.model(mine)


def test_an_evaluation_is_leased_fenced_reported_and_recovered(running):
    lab = Lab(running)
    queue = running.platform.evaluations
    evaluation = lab.enqueue(lab.job(validation_file=lab.file_id))
    assert queue.lease("agent-a", tenant_scope="another-tenant") is None
    first = queue.lease("agent-a")
    assert first["evaluation_id"] == evaluation.id and first["attempt"] == 1 and first["kind"] == "held_out"
    queue.report(evaluation.id, "agent-a", [{"type": "progress", "done": 3, "total": 12}], 1)
    got = running.client.get(f"/api/evaluations/{evaluation.id}", headers=running.auth()).json()
    assert got["status"] == "running" and got["progress"] == {"done": 3, "total": 12}
    queue.clock = lambda: time.time() + 10_000  # its lease lapses: back to the queue, attempt 2 to another agent
    assert queue.recover() == 1
    second = queue.lease("agent-b")
    assert second["attempt"] == 2
    assert queue.heartbeat(evaluation.id, "agent-a", 1) == "lost"  # the old attempt is over
    queue.finish(evaluation.id, "agent-a", {"state": "succeeded", "result": {}, "attempt": 1})  # ignored
    result = {"kind": "held_out", "models": {"candidate": {"exact_match": 1.0}, "base": {"exact_match": 0.0}},
              "examples": [], "usage": {label: {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0}
                                        for label in ("candidate", "base")}}  # fmt: skip
    queue.finish(evaluation.id, "agent-b", {"state": "succeeded", "result": result, "attempt": 2})
    report = running.client.get(f"/api/fine_tuning/jobs/{evaluation.job_id}/evaluation", headers=running.auth())
    assert report.json()["held_out"]["table"]["candidate"]["exact_match"] == 1.0


def test_a_result_that_does_not_score_the_evaluations_models_fails_it_saying_why(running):
    lab = Lab(running)
    queue = running.platform.evaluations
    evaluation = lab.enqueue(lab.job(validation_file=lab.file_id))
    attempt = queue.lease("agent-a")["attempt"]
    forged = {"kind": "held_out", "models": {"candidate": {}, "someone-else": {}}, "examples": []}
    queue.finish(evaluation.id, "agent-a", {"state": "succeeded", "attempt": attempt, "result": forged})
    got = running.client.get(f"/api/evaluations/{evaluation.id}", headers=running.auth()).json()
    assert got["status"] == "failed"
    assert got["error"] == "the agent's result was refused: result.models must score exactly ['base', 'candidate']"


def test_an_evaluation_set_with_bad_lines_is_refused_naming_them(running):
    lab = Lab(running)
    model = lab.model(lab.job())
    good = b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n'
    content = good + b'{"messages": [oops\n' + b'{"messages": [{"role": "user", "content": "q"}]}\n'
    bad = running.client.post(
        "/v1/files", headers=running.auth(), data={"purpose": "evals"}, files={"file": ("set.jsonl", content)}
    ).json()["id"]
    for response in (
        running.client.post("/api/evaluations", headers=running.auth(), json={"model": model, "file_id": bad}),
        running.client.put(f"/api/models/{model}/evaluation_set", headers=running.auth(), json={"file_id": bad}),
    ):
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == "file_id"
        assert "2 invalid line(s) of 3: line 2" in error["message"] and "line 3" in error["message"]
    missing = running.client.post("/api/evaluations", headers=running.auth(), json={"model": model})
    assert missing.status_code == 400 and "has no held-out set" in missing.json()["error"]["message"]
    unknown = running.client.post("/api/evaluations", headers=running.auth(), json={"model": model, "kind": "lm_eval"})
    assert unknown.status_code == 400 and unknown.json()["error"]["param"] == "task"


def test_over_nats_an_agent_reaches_only_the_evaluation_leased_to_it_and_only_if_it_asked_for_evaluations(running):
    from tests.integration.test_control_plane import ask

    lab = Lab(running)
    control = running.platform.control
    evaluation = lab.enqueue(lab.job(validation_file=lab.file_id))
    assert control._lease("old-agent", {}) == {"assignment": None}  # an agent that runs no evaluations gets none
    assignment = control._lease("agent-a", {"kinds": [protocol.EVALUATION_KIND]})["evaluation"]
    assert assignment["evaluation_id"] == evaluation.id
    sha = assignment["evaluation_file"]["sha256"]
    assert ask(control, "agent-a", evaluation.id, "download", {"sha256": sha, "offset": 0})["data"].startswith(b"{")
    assert ask(control, "agent-a", evaluation.id, "download", {"sha256": sha, "attempt": 1})["data"].startswith(b"{")
    assert (
        "not leased to you"
        in ask(control, "agent-a", evaluation.id, "download", {"sha256": sha, "attempt": 2})["error"]
    )  # an attempt that is not (or no longer) the agent's
    assert "not leased to you" in ask(control, "agent-b", evaluation.id, "download", {"sha256": sha})["error"]
    assert "not part of" in ask(control, "agent-a", evaluation.id, "download", {"sha256": "0" * 64})["error"]
    assert "uploads nothing" in ask(control, "agent-a", evaluation.id, "upload", b"x", **{
        protocol.UPLOAD_HEADER: "0" * 32, protocol.OFFSET_HEADER: "0"})["error"]  # fmt: skip
    assert "no 'checkpoint'" in ask(control, "agent-a", evaluation.id, "checkpoint", {"step": 1})["error"]
    assert ask(control, "agent-b", evaluation.id, "heartbeat", {"attempt": 1}) == {"verdict": "lost"}
    assert "not leased to you" in ask(control, "agent-b", evaluation.id, "finish", {"state": "failed"})["error"]
    assert ask(control, "agent-a", evaluation.id, "heartbeat", {"attempt": 1}) == {"verdict": "continue"}


def test_an_lm_eval_key_names_no_model_its_requester_may_not_see_and_is_not_theirs_to_rotate(running):
    """FINDINGS L5: the key minted for a member's lm-eval listed a colleague's private predecessor, and the member
    could rotate it (taking the platform's key, with that model, into their hands)."""
    lab = Lab(running)
    with running.platform.db.system() as s:
        member = m.User(id=new_id("user-"), username="evaluating-member")
        colleague = m.User(id=new_id("user-"), username="private-colleague")
        s.add_all([member, colleague])
        s.flush()
        s.add(m.Membership(id=new_id("mem_"), tenant_id=lab.tenant_id, user_id=member.id, role="member"))
        s.add(m.EvaluationTask(id=new_id("evtask-"), tenant_id=lab.tenant_id, name="t", config={},
                               data_sha256="0" * 64, records=1))  # fmt: skip
        member_id, colleague_id = member.id, colleague.id
    validation = {"validation_file": lab.file_id}
    hidden = lab.job(adapter="private", user_id=colleague_id, **validation)
    mine = lab.job(user_id=colleague_id, **validation)  # the colleague's, tenant-visible: the member evaluates it
    who = Principal(tenant_id=lab.tenant_id, tenant_name="default", user_id=member_id, username="evaluating-member",
                    role=Role.MEMBER)  # fmt: skip
    with running.platform.db.tenant(lab.tenant_id) as s:
        evaluation = evaluations.create_lm_eval(s, who, lab.model(mine), "t")
        assert lab.model(hidden) not in {entry["model"] for entry in evaluation.models}
        key = api_keys.create_key(s, tenant_id=lab.tenant_id, user_id=member_id, scopes=["inference"])
        evaluation.api_key_id = key.record.id
        key_id = key.record.id
    with running.platform.db.tenant(lab.tenant_id) as s, pytest.raises(PermissionDenied):
        api_keys.rotate_key(s, who, key_id, overlap_seconds=0)


def test_a_colleagues_evaluation_never_replaces_the_owners_report_but_makes_their_own(running):
    """M5: a colleague who may use the adapter evaluates it; the owner's job report (held-out table, promote
    advice) still shows the owner's own evaluation, and the colleague's shows in the colleague's report only."""
    lab = Lab(running)
    job_id = lab.job(adapter="tenant", hyperparameters={"validation_split": 0.5})
    model = lab.model(job_id)
    colleague = add_user(running.platform, lab.tenant_id, "colleague-m5", Role.MEMBER)
    theirs = running.auth(add_key(running.platform, lab.tenant_id, colleague))
    table = {"candidate": {"exact_match": 0.9}, "base": {"exact_match": 0.1}}
    worse = {"candidate": {"exact_match": 0.0}, "base": {"exact_match": 0.9}}
    owners = lab.enqueue(job_id).id
    attack = running.client.post("/api/evaluations", headers=theirs, json={"model": model, "file_id": lab.file_id})
    assert attack.status_code == 200, attack.text
    with running.platform.db.system() as s:
        for evaluation_id, result, at in ((owners, table, 1.0), (attack.json()["id"], worse, 2.0)):
            row = s.get(m.Evaluation, evaluation_id)
            row.status, row.result, row.created_at = "succeeded", {"models": result, "examples": []}, time.time() + at
    mine = running.client.get(f"/api/fine_tuning/jobs/{job_id}/evaluation", headers=running.auth()).json()
    assert mine["held_out"]["evaluation_id"] == owners and mine["recommendation"]["promote"] is True
    assert [e["id"] for e in mine["evaluations"]] == [owners]
    also = running.client.get(f"/api/models/{model}/evaluation", headers=running.auth()).json()
    assert also["held_out"]["evaluation_id"] == owners
    seen = running.client.get(f"/api/fine_tuning/jobs/{job_id}/evaluation", headers=theirs).json()
    assert seen["held_out"]["evaluation_id"] == attack.json()["id"] and seen["recommendation"]["promote"] is False


def test_an_evaluation_is_refused_when_the_keys_monthly_tokens_are_spent(running):
    """M4: an evaluation generates answers from three models, so a key (or tenant) whose month's tokens are spent
    is refused (429), as chat and fine-tuning are; with budget left it is queued."""
    lab = Lab(running)
    model = lab.model(lab.job())
    key_id = running.first.api_key.split("-")[2]
    body = {"model": model, "file_id": lab.file_id}
    assert running.client.patch(f"/api/keys/{key_id}", headers=running.auth(),
                                json={"limits": {"monthly_tokens": 10**6}}).status_code == 200  # fmt: skip
    assert running.client.post("/api/evaluations", headers=running.auth(), json=body).status_code == 200
    with running.platform.db.system() as s:
        s.get(m.UsageCounter, (f"key:{key_id}", limits.month_period(time.time()))).tokens = 10**6
    refused = running.client.post("/api/evaluations", headers=running.auth(), json=body)
    assert refused.status_code == 429, refused.text


def test_a_held_out_evaluations_tokens_reach_the_ledger_and_spend_the_month(running):
    """A held-out evaluation generates on the agent, not through /v1: its tokens, which the agent reports per model,
    are charged once when it finishes, as inference is (the tenant's month, and the ledger by creator and model,
    kind `evaluations`, apart from chat), so a budget the evaluation spends refuses the next request (429)."""
    lab = Lab(running)
    client, queue = running.client, running.platform.evaluations
    evaluation = lab.enqueue(lab.job(validation_file=lab.file_id))
    with running.platform.db.system() as s:
        limits.set_tenant_limits(s, lab.tenant_id, {"monthly_tokens": 100})
    attempt = queue.lease("agent-a")["attempt"]
    spent = {"candidate": {"requests": 2, "prompt_tokens": 40, "completion_tokens": 30},
             "base": {"requests": 2, "prompt_tokens": 40, "completion_tokens": 10}}  # fmt: skip
    result = {"kind": "held_out", "models": {"candidate": {"exact_match": 1.0}, "base": {"exact_match": 0.0}},
              "examples": [], "usage": spent}  # fmt: skip
    queue.finish(evaluation.id, "agent-a", {"state": "succeeded", "result": result, "attempt": attempt})
    queue.finish(evaluation.id, "agent-a", {"state": "succeeded", "result": result, "attempt": attempt})  # ignored
    assert client.get(f"/api/evaluations/{evaluation.id}", headers=running.auth()).json()["status"] == "succeeded"

    models = labels(evaluation)
    with running.platform.db.system() as s:
        rows = s.scalars(select(m.UsageRecord).where(m.UsageRecord.tenant_id == lab.tenant_id)).all()
        month = s.get(m.UsageCounter, (f"tenant:{lab.tenant_id}", limits.month_period(time.time())))
    charged = {(r.kind, r.model, r.user_id, r.agent_id): (r.requests, r.prompt_tokens, r.completion_tokens)
               for r in rows}  # fmt: skip
    assert charged == {
        ("evaluations", models["candidate"], lab.user_id, "agent-a"): (2, 40, 30),
        ("evaluations", models["base"], lab.user_id, "agent-a"): (2, 40, 10),
    }
    assert month.tokens == 120

    page = client.get("/v1/organization/usage/evaluations", headers=running.auth(),
                      params={"start_time": int(time.time()) - 60, "group_by": ["model"]}).json()  # fmt: skip
    results = {r["model"]: r for bucket in page["data"] for r in bucket["results"]}
    assert results[models["candidate"]]["input_tokens"] == 40 and results[models["base"]]["output_tokens"] == 10
    totals = client.get("/api/admin/usage", headers=running.auth()).json()["ledger"]["totals"]
    assert totals["evaluation_tokens"] == 120 and totals["prompt_tokens"] == 0  # told apart from chat
    assert totals["total_tokens"] == 120

    chat = {"model": "adaptery-demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    assert client.post("/v1/chat/completions", headers=running.auth(), json=chat).status_code == 429
    again = client.post("/api/evaluations", headers=running.auth(), json={"model": models["candidate"]})
    assert again.status_code == 429, again.text


def test_a_held_out_result_without_its_token_usage_fails_saying_why(running):
    lab = Lab(running)
    queue = running.platform.evaluations
    evaluation = lab.enqueue(lab.job(validation_file=lab.file_id))
    attempt = queue.lease("agent-a")["attempt"]
    scored = {"candidate": {"exact_match": 1.0}, "base": {"exact_match": 0.0}}
    negative = {"candidate": {"requests": 1, "prompt_tokens": -5, "completion_tokens": 1},
                "base": {"requests": 1, "prompt_tokens": 5, "completion_tokens": 1}}  # fmt: skip
    forged = {"kind": "held_out", "models": scored, "examples": [], "usage": negative}
    queue.finish(evaluation.id, "agent-a", {"state": "succeeded", "attempt": attempt, "result": forged})
    got = running.client.get(f"/api/evaluations/{evaluation.id}", headers=running.auth()).json()
    assert got["status"] == "failed"
    assert got["error"] == (
        "the agent's result was refused: result.usage.candidate.prompt_tokens must be an integer from 0 to 1000000000"
    )
    with running.platform.db.system() as s:
        assert s.scalars(select(m.UsageRecord).where(m.UsageRecord.kind == "evaluations")).all() == []


def test_an_lm_eval_runs_calls_through_v1_are_charged_and_marked_as_the_evaluations(running):
    """An lm-eval run calls the platform's /v1 with the key minted at lease: those calls are charged there like any
    inference (its creator, the model, the minted key, the tenant's month), and marked `evaluations` in the
    ledger so usage reports tell them from chat."""
    lab = Lab(running)
    platform = running.platform
    data = platform.blobs.put_stream(lab.tenant_id, [b'{"question": "q", "answer": "a"}\n']).sha256
    with platform.db.system() as s:
        s.add(m.EvaluationTask(id=new_id("evtask-"), tenant_id=lab.tenant_id, name="t", config={},
                               data_sha256=data, records=1))  # fmt: skip
    who = Principal(tenant_id=lab.tenant_id, tenant_name="default", user_id=lab.user_id, username="owner",
                    role=Role.OWNER)  # fmt: skip
    with platform.db.tenant(lab.tenant_id) as s:
        evaluation = evaluations.create_lm_eval(s, who, lab.model(lab.job()), "t")
        s.expunge(evaluation)
    minted = platform.evaluations.lease("agent-a")
    assert minted["evaluation_id"] == evaluation.id
    chat = {"model": "adaptery-demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    answer = running.client.post(
        "/v1/chat/completions", headers={"Authorization": f"Bearer {minted['api_key']}"}, json=chat
    )
    assert answer.status_code == 200, answer.text
    usage = answer.json()["usage"]
    with platform.db.system() as s:
        key_id = s.get(m.Evaluation, evaluation.id).api_key_id
        rows = s.scalars(select(m.UsageRecord).where(m.UsageRecord.tenant_id == lab.tenant_id)).all()
        month = s.get(m.UsageCounter, (f"tenant:{lab.tenant_id}", limits.month_period(time.time())))
    assert [(r.kind, r.model, r.user_id, r.api_key_id, r.prompt_tokens, r.completion_tokens) for r in rows] == [
        ("evaluations", "adaptery-demo", lab.user_id, key_id, usage["prompt_tokens"], usage["completion_tokens"])
    ]
    assert month.tokens == usage["total_tokens"]


def test_an_evaluation_spends_the_budget_of_the_key_that_asked_for_it(running):
    """Before, a key kept to a small monthly budget could ask for evaluations whose tokens spent only the tenant's:
    an lm-eval run's calls came with the key minted for it, a held-out run's with none. Now both spend the month of
    the key the evaluation was asked for with, and an lm-eval call is refused once that key's budget is spent."""
    lab = Lab(running)
    platform = running.platform
    key_id = running.first.api_key.split("-")[2]
    month = limits.month_period(time.time())
    assert running.client.patch(f"/api/keys/{key_id}", headers=running.auth(),
                                json={"limits": {"monthly_tokens": 1000}}).status_code == 200  # fmt: skip
    data = platform.blobs.put_stream(lab.tenant_id, [b'{"question": "q", "answer": "a"}\n']).sha256
    with platform.db.system() as s:
        s.add(m.EvaluationTask(id=new_id("evtask-"), tenant_id=lab.tenant_id, name="t", config={},
                               data_sha256=data, records=1))  # fmt: skip
    who = Principal(tenant_id=lab.tenant_id, tenant_name="default", user_id=lab.user_id, username="owner",
                    role=Role.OWNER, api_key_id=key_id)  # fmt: skip
    with platform.db.tenant(lab.tenant_id) as s:
        evaluations.create_lm_eval(s, who, lab.model(lab.job()), "t")
    minted = {"Authorization": f"Bearer {platform.evaluations.lease('agent-a')['api_key']}"}
    chat = {"model": "adaptery-demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    answer = running.client.post("/v1/chat/completions", headers=minted, json=chat)
    assert answer.status_code == 200, answer.text
    with platform.db.system() as s:
        spent = s.get(m.UsageCounter, (f"key:{key_id}", month))
        assert spent.tokens == answer.json()["usage"]["total_tokens"]
        spent.tokens = 1000  # the asking key's month is spent (by anything)
    refused = running.client.post("/v1/chat/completions", headers=minted, json=chat)
    assert refused.status_code == 429, refused.text
    assert "the API key that asked for this evaluation" in refused.json()["error"]["message"]

    with platform.db.system() as s:
        s.get(m.UsageCounter, (f"key:{key_id}", month)).tokens = 0
        s.get(m.ApiKey, key_id).monthly_tokens = 10**6  # room for a held-out run's worst case
    asked = running.client.post("/api/evaluations", headers=running.auth(),
                                json={"model": lab.model(lab.job()), "file_id": lab.file_id})  # fmt: skip
    assert asked.status_code == 200, asked.text
    held_out = platform.evaluations.lease("agent-b")
    assert held_out["evaluation_id"] == asked.json()["id"]
    with platform.db.system() as s:
        evaluation = s.get(m.Evaluation, held_out["evaluation_id"])
        assert evaluation.requester_key_id == key_id
        names = list(labels(evaluation))
    used = {"requests": 1, "prompt_tokens": 30, "completion_tokens": 20}
    result = {"kind": "held_out", "models": {name: {"exact_match": 1.0} for name in names}, "examples": [],
              "usage": {name: used for name in names}}  # fmt: skip
    platform.evaluations.finish(held_out["evaluation_id"], "agent-b",
                                {"state": "succeeded", "result": result, "attempt": held_out["attempt"]})  # fmt: skip
    with platform.db.system() as s:
        assert s.get(m.Evaluation, held_out["evaluation_id"]).status == "succeeded"
        assert s.get(m.UsageCounter, (f"key:{key_id}", month)).tokens == 50 * len(names)
        assert s.get(m.UsageCounter, (f"key:{key_id}", month)).reserved == 0  # its worst case was given back


def _finish(platform, leased: dict, tokens: int) -> None:  # noqa: ANN001
    with platform.db.system() as s:
        names = list(labels(s.get(m.Evaluation, leased["evaluation_id"])))
    used = {"requests": 1, "prompt_tokens": tokens, "completion_tokens": 0}
    result = {"kind": "held_out", "models": {name: {"exact_match": 1.0} for name in names}, "examples": [],
              "usage": {name: used for name in names}}  # fmt: skip
    platform.evaluations.finish(leased["evaluation_id"], "agent-a",
                                {"state": "succeeded", "result": result, "attempt": leased["attempt"]})  # fmt: skip


def test_evaluations_queued_at_once_cannot_together_spend_past_the_month_of_the_key_that_asked(running):
    """An attacker's find: an evaluation was checked only against the month already spent, so a key kept to 300
    tokens queued five at once (its counter still 0) and spent 3530. Each now holds its worst case until it ends;
    the ledger names the key that asked."""
    lab, platform, client = Lab(running), running.platform, running.client
    model = lab.model(lab.job())
    key = add_key(platform, lab.tenant_id, lab.user_id, scopes=["fine-tuning", "inference", "files"],
                  limits={"monthly_tokens": 10**6})  # fmt: skip
    key_id, month, body = key.split("-")[2], limits.month_period(time.time()), {"model": model, "file_id": lab.file_id}
    first = client.post("/api/evaluations", headers=running.auth(key), json=body)
    assert first.status_code == 200, first.text
    with platform.db.system() as s:
        worst = s.get(m.UsageCounter, (f"key:{key_id}", month)).reserved
        s.get(m.ApiKey, key_id).monthly_tokens = worst + worst // 2  # room for one evaluation, not two
    assert worst > 0
    second = client.post("/api/evaluations", headers=running.auth(key), json=body)
    assert second.status_code == 429 and second.json()["error"]["code"] == "insufficient_quota", second.text
    assert "this evaluation's worst case" in second.json()["error"]["message"]
    with platform.db.system() as s:  # nothing of the refused one is left: no evaluation, no hold
        assert s.scalar(select(func.count()).select_from(m.Evaluation).where(m.Evaluation.model == model)) == 1
    leased = platform.evaluations.lease("agent-a")
    _finish(platform, leased, 10)
    with platform.db.system() as s:
        counter = s.get(m.UsageCounter, (f"key:{key_id}", month))
        scored = len(s.get(m.Evaluation, leased["evaluation_id"]).models)
        assert counter.reserved == 0 and counter.tokens == 10 * scored  # charged what it used
        ledger = s.scalars(select(m.UsageRecord).where(m.UsageRecord.kind == "evaluations",
                                                       m.UsageRecord.model == model)).all()  # fmt: skip
        assert [row.api_key_id for row in ledger] == [key_id]  # the ledger names the key that asked
    assert client.post("/api/evaluations", headers=running.auth(key), json=body).status_code == 200  # room again


def test_an_evaluation_needs_the_inference_scope_and_the_base_model_and_dies_with_the_key_that_asked(running):
    """An attacker's finds: a key without the inference scope, or kept to the adapter alone, had both the adapter
    and the base answer prompts of its choosing through an evaluation; and evaluations queued by a key revoked
    afterwards (or a person removed) still ran, charged to the tenant."""
    lab, platform, client = Lab(running), running.platform, running.client
    model = lab.model(lab.job())
    body = {"model": model, "file_id": lab.file_id}
    no_inference = add_key(platform, lab.tenant_id, lab.user_id, scopes=["fine-tuning", "files"])
    refused = client.post("/api/evaluations", headers=running.auth(no_inference), json=body)
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "missing_scope", refused.text
    adapter_only = add_key(platform, lab.tenant_id, lab.user_id, scopes=["fine-tuning", "inference"],
                           allowed_models=[model])  # fmt: skip
    for kind in ({}, {"kind": "lm_eval", "task": "anything"}):
        refused = client.post("/api/evaluations", headers=running.auth(adapter_only), json={**body, **kind})
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "model_not_allowed", refused.text

    asker = add_key(platform, lab.tenant_id, lab.user_id, scopes=["fine-tuning", "inference"])
    queued = client.post("/api/evaluations", headers=running.auth(asker), json=body)
    assert queued.status_code == 200, queued.text
    with platform.db.system() as s:
        s.get(m.ApiKey, asker.split("-")[2]).revoked_at = time.time()
    assert platform.evaluations.lease("agent-a") is None  # it does not run
    with platform.db.system() as s:
        row = s.get(m.Evaluation, queued.json()["id"])
        assert row.status == "failed" and "the API key that asked for it was revoked" in row.error
        assert s.scalar(select(func.count()).select_from(m.UsageReservation)) == 0  # its hold was given back

    member = add_user(platform, lab.tenant_id, "leaver", Role.MEMBER)
    theirs = add_key(platform, lab.tenant_id, member, scopes=["fine-tuning", "inference"])
    queued = client.post("/api/evaluations", headers=running.auth(theirs), json=body)
    assert queued.status_code == 200, queued.text
    with platform.db.system() as s:
        s.execute(delete(m.Membership).where(m.Membership.user_id == member))
    assert platform.evaluations.lease("agent-a") is None
    with platform.db.system() as s:
        assert "no longer a member" in s.get(m.Evaluation, queued.json()["id"]).error

    # an lm-eval run already under way: the key minted for it dies with the key that asked for it
    data = platform.blobs.put_stream(lab.tenant_id, [b'{"question": "q", "answer": "a"}\n']).sha256
    with platform.db.system() as s:
        s.add(m.EvaluationTask(id=new_id("evtask-"), tenant_id=lab.tenant_id, name="under-way", config={},
                               data_sha256=data, records=1))  # fmt: skip
    asker = add_key(platform, lab.tenant_id, lab.user_id, scopes=["fine-tuning", "inference"])
    queued = client.post("/api/evaluations", headers=running.auth(asker),
                         json={"model": model, "kind": "lm_eval", "task": "under-way"})  # fmt: skip
    assert queued.status_code == 200, queued.text
    minted = {"Authorization": f"Bearer {platform.evaluations.lease('agent-a')['api_key']}"}
    chat = {"model": "adaptery-demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    collect = client.put("/api/feedback/policy", headers=running.auth(), json={"collect": "all"})
    assert collect.status_code == 200, collect.text
    answered = client.post("/v1/chat/completions", headers=minted, json=chat)
    assert answered.status_code == 200, answered.text
    with platform.db.system() as s:  # the run's calls are the evaluation's, not answers to give feedback on
        assert s.get(m.Completion, answered.json()["id"]) is None
        s.get(m.ApiKey, asker.split("-")[2]).revoked_at = time.time()
    refused = client.post("/v1/chat/completions", headers=minted, json=chat)
    assert refused.status_code == 401, refused.text
    assert "the API key that asked for it was revoked" in refused.json()["error"]["message"]
