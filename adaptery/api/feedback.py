"""Feedback: the tenant's policy, feedback on answers (by completion id for API applications, by message for the
web chat), reading it, and turning it into a dataset version."""

from __future__ import annotations

import asyncio
import json
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Response
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field

from adaptery.api.datasets import dataset_object
from adaptery.api.deps import platform, principal
from adaptery.auth.policy import require
from adaptery.auth.principal import Principal
from adaptery.platform import Platform
from adaptery.services import audit, blob_refs, conversations, datasets, feedback
from adaptery.services.errors import InvalidRequest

router = APIRouter(tags=["feedback"])


class PolicyObject(BaseModel):
    object: Literal["feedback.policy"] = "feedback.policy"
    collect: str = Field(description="off: nothing; feedback: what people rate, correct or vote on; all: every "
                         "chat completion too")  # fmt: skip
    readers: str = Field(description="who reads collected feedback besides its author: admins, owners (admins and "
                         "the answering adapter's owner) or members")  # fmt: skip
    description: str
    updated_at: int | None


class PolicyChange(BaseModel):
    model_config = ConfigDict(extra="forbid")
    collect: Literal["off", "feedback", "all"] | None = None
    readers: Literal["admins", "owners", "members"] | None = None


class VerdictFields(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rating: Literal[1, -1] | None = Field(None, description="1: thumbs up, -1: thumbs down")
    reason: str = Field("", max_length=feedback.MAX_REASON)
    correction: str | None = Field(None, max_length=feedback.MAX_ANSWER, description="the answer as it should be")

    def verdict(self) -> feedback.Verdict:
        return feedback.Verdict(self.rating, self.reason, self.correction)


class CompletionVerdict(VerdictFields):
    choice_index: int = Field(0, ge=0, le=1000)


class FeedbackObject(BaseModel):
    id: str
    object: Literal["feedback"] = "feedback"
    user_id: str | None
    model: str
    rating: int | None
    reason: str
    correction: str | None
    prompt: list[dict[str, Any]]
    answer: str
    completion_id: str | None
    choice_index: int | None
    conversation_id: str | None
    message_id: str | None
    battle_id: str | None = None
    created_at: int
    updated_at: int


class FeedbackList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FeedbackObject]


class DatasetRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=128, description="a new dataset, or the next version of this one")
    kind: Literal["sft", "dpo"] = "sft"
    model: str | None = Field(None, max_length=255, description="only feedback on answers of this model")
    base_model: str | None = Field(None, max_length=128, description="whose tokenizer and context validate records")
    dedup: bool = True
    scrub: bool = True


def _policy_object(policy: feedback.Policy) -> PolicyObject:
    updated = int(policy.updated_at) if policy.updated_at else None
    return PolicyObject(
        collect=policy.collect, readers=policy.readers, description=policy.describe(), updated_at=updated
    )


@router.get("/api/feedback/policy")
def get_policy(who: Principal = Depends(principal), p: Platform = Depends(platform)) -> PolicyObject:
    """What this workspace collects and who reads it: every member may see it (the chat page shows it)."""
    with p.db.tenant(who.tenant_id) as s:
        return _policy_object(feedback.get_policy(s, who.tenant_id))


@router.put("/api/feedback/policy")
def set_policy(
    body: PolicyChange, who: Principal = Depends(principal), p: Platform = Depends(platform)
) -> PolicyObject:
    with p.db.tenant(who.tenant_id) as s:
        before = feedback.get_policy(s, who.tenant_id)
        policy = feedback.set_policy(s, who, collect=body.collect, readers=body.readers)
        detail = {"collect": [before.collect, policy.collect], "readers": [before.readers, policy.readers]}
        audit.record(s, who, "feedback.policy", target=who.tenant_id, detail=detail)
        return _policy_object(policy)


@router.post("/api/completions/{completion_id}/feedback")
def feedback_on_completion(
    completion_id: str, body: CompletionVerdict, who: Principal = Depends(principal), p: Platform = Depends(platform)
) -> FeedbackObject:
    """An API application's user's word on a chat completion it made (kept when the policy is `all`)."""
    key = p.keyring.data_key(who.tenant_id)
    with p.db.tenant(who.tenant_id) as s:
        row = feedback.feedback_on_completion(
            s, key, who, completion_id, body.verdict(), choice_index=body.choice_index
        )
        audit.record(s, who, "feedback.give", target=row.id, detail={"completion": completion_id})
        return FeedbackObject(**feedback.feedback_view(key, row))


@router.post("/api/conversations/{conversation_id}/messages/{message_id}/feedback")
def feedback_on_message(
    conversation_id: str,
    message_id: str,
    body: VerdictFields,
    who: Principal = Depends(principal),
    p: Platform = Depends(platform),
) -> FeedbackObject:
    """Thumbs and corrections on an answer of the caller's own saved chat."""
    key = p.keyring.data_key(who.tenant_id)
    with p.db.tenant(who.tenant_id) as s:
        row = feedback.feedback_on_message(s, key, who, conversation_id, message_id, body.verdict())
        audit.record(s, who, "feedback.give", target=row.id, detail={"message": message_id})
        return FeedbackObject(**feedback.feedback_view(key, row))


@router.get("/api/conversations/{conversation_id}/feedback")
def feedback_of_conversation(
    conversation_id: str, who: Principal = Depends(principal), p: Platform = Depends(platform)
) -> FeedbackList:
    """The caller's own feedback on this chat's answers."""
    key = p.keyring.data_key(who.tenant_id)
    with p.db.tenant(who.tenant_id) as s:
        record = conversations.get_conversation(s, who.user_id, conversation_id)
        ids = [x.id for x in conversations.messages_of(s, record)]
        rows = feedback.feedback_of_messages(s, who, ids)
        return FeedbackList(data=[FeedbackObject(**feedback.feedback_view(key, row)) for row in rows])


@router.get("/api/feedback")
def list_feedback(
    model: Annotated[str | None, Query(max_length=255)] = None,
    mine: bool = False,
    limit: Annotated[int, Query(ge=1, le=1000)] = 200,
    who: Principal = Depends(principal),
    p: Platform = Depends(platform),
) -> FeedbackList:
    """The feedback the caller may read under the policy, newest first."""
    key = p.keyring.data_key(who.tenant_id)
    with p.db.tenant(who.tenant_id) as s:
        rows = feedback.list_feedback(s, who, model=model, mine=mine, limit=limit)
        return FeedbackList(data=[FeedbackObject(**feedback.feedback_view(key, row)) for row in rows])


@router.get("/api/feedback/{feedback_id}")
def get_feedback(
    feedback_id: str, who: Principal = Depends(principal), p: Platform = Depends(platform)
) -> FeedbackObject:
    key = p.keyring.data_key(who.tenant_id)
    with p.db.tenant(who.tenant_id) as s:
        return FeedbackObject(**feedback.feedback_view(key, feedback.get_feedback(s, who, feedback_id)))


@router.delete("/api/feedback/{feedback_id}", status_code=204)
def delete_feedback(feedback_id: str, who: Principal = Depends(principal), p: Platform = Depends(platform)) -> Response:
    with p.db.tenant(who.tenant_id) as s:
        feedback.delete_feedback(s, who, feedback_id)
        audit.record(s, who, "feedback.delete", target=feedback_id)
    return Response(status_code=204)


@router.post("/api/feedback/datasets", status_code=201)
async def build_dataset(
    body: DatasetRequest, who: Principal = Depends(principal), p: Platform = Depends(platform)
) -> dict:
    """The feedback the caller may read, as a new dataset version (SFT records or DPO pairs) with lineage back to
    each completion, conversation and battle; validated like any upload, then deduplicated and PII-scrubbed
    (each a version of its own). Answers once the last version is ready."""
    require(who, "upload")
    datasets.check_name(body.name)  # before any feedback is read: a bad name answers the same whatever there is
    key = p.keyring.data_key(who.tenant_id)

    def curate() -> feedback.Curated:
        with p.db.tenant(who.tenant_id) as s:
            return feedback.curate(s, key, who, kind=body.kind, model=body.model)

    curated = await run_in_threadpool(curate)
    if not curated.records:
        raise InvalidRequest(
            f"No feedback you may read makes a {body.kind.upper()} record yet"
            + (f" for '{body.model}'" if body.model else "")
            + (": SFT takes thumbs-up answers and corrections" if body.kind == "sft" else
               ": DPO takes corrections and arena votes (not ties)"),
            param="kind",
            code="no_feedback",
        )  # fmt: skip
    lines = (json.dumps(r, ensure_ascii=False, separators=(",", ":")).encode() + b"\n" for r in curated.records)
    blob = await run_in_threadpool(p.blobs.put_stream, who.tenant_id, lines)
    try:
        with p.db.tenant(who.tenant_id) as s:
            dataset, version = datasets.add_feedback_version(
                s, who, blob, name=body.name, kind=body.kind, model=body.base_model, lineage=curated.lineage,
                skipped=curated.skipped, only_model=body.model,
            )  # fmt: skip
            dataset_id, version_id = dataset.id, version.id
            detail = {"version": version.number, "kind": body.kind, "records": len(curated.records)}
            audit.record(s, who, "feedback.dataset", target=dataset.id, detail=detail)
    except Exception:
        with p.db.system() as system:
            blob_refs.release(system, p.blobs, who.tenant_id, blob.sha256)
        raise
    await asyncio.wrap_future(p.submit_version(who.tenant_id, version_id))
    for operation, params, wanted in (("dedup", {}, body.dedup), ("scrub", {}, body.scrub)):
        if not wanted:
            continue
        with p.db.tenant(who.tenant_id) as s:
            dataset = datasets.get_dataset(s, dataset_id)
            latest = datasets.get_version(s, dataset)
            if latest.status != "ready":
                break  # validation failed: the version says why
            (made,) = datasets.start_operation(s, dataset, latest.number, operation, params)
            made_id = made.id
        await asyncio.wrap_future(p.submit_version(who.tenant_id, made_id))
    with p.db.tenant(who.tenant_id) as s:
        dataset = datasets.get_dataset(s, dataset_id)
        versions = datasets.versions_of(s, dataset)
        return dataset_object(dataset, versions, key, datasets.exported_files(s, dataset, versions))
