"""Feedback on answers: the tenant's collection policy, kept completions, ratings and corrected answers, and
the records a feedback dataset is made of.

The policy is the tenant admin's, and nothing is stored without it:

- `collect`: `off` (the default: no feedback, no votes, no completion is kept), `feedback` (what a person
  rates, corrects or votes on is kept with the prompt and answer it is about, nothing else), or `all`
  (every chat completion is kept too, so an API application can send its users' feedback later by the
  completion's `chatcmpl-` id).
- `readers`: who reads collected feedback besides its author: `admins` (tenant owners and admins),
  `owners` (the default: admins and the owner of the adapter an answer came from) or `members` (everyone
  in the tenant).

The defaults are what a careful institution expects: people's chats are not collected until someone
accountable decides they are, and then read by as few people as the loop needs (the adapter's owner,
who curates and trains, and the admins who answer for the policy). Everything kept here (prompts,
answers, reasons, corrections) is sealed with the tenant's data key, bound to its row and column.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import or_, select
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from adaptery.auth import policy as access
from adaptery.auth.principal import Principal, Role
from adaptery.db import models as m
from adaptery.db.ids import new_id
from adaptery.db.session import Database
from adaptery.services import conversations, models
from adaptery.services.errors import Conflict, InvalidRequest, NotFound, PermissionDenied
from adaptery.storage.crypto import DataKey

COLLECT = ("off", "feedback", "all")
READERS = ("admins", "owners", "members")
DEFAULT_COLLECT, DEFAULT_READERS = "off", "owners"
MAX_REASON = 2_000
MAX_ANSWER = 200_000
RATINGS = (-1, 1)


@dataclass(frozen=True)
class Policy:
    collect: str
    readers: str
    updated_at: float | None = None

    @property
    def collects_feedback(self) -> bool:
        return self.collect in ("feedback", "all")

    @property
    def keeps_completions(self) -> bool:
        return self.collect == "all"

    def describe(self) -> str:
        """The policy in one sentence, as the chat page shows it to everyone."""
        if not self.collects_feedback:
            return (
                "This workspace collects no feedback: ratings, corrections and arena votes are off, and no chat "
                "is kept."
            )
        what = {
            "feedback": "Ratings, corrections and arena votes you give are kept with the prompt and answer they "
            "are about; nothing else is kept.",
            "all": "Every chat completion (web and API) is kept, with the ratings, corrections and arena votes "
            "given on it.",
        }[self.collect]
        who = {
            "admins": "the workspace's admins",
            "owners": "the workspace's admins and the owner of the adapter that answered",
            "members": "every member of the workspace",
        }[self.readers]
        return f"{what} They are read by you, {who}, to improve the models."


# --- the policy ----------------------------------------------------------------------------------


def get_policy(session: Session, tenant_id: str) -> Policy:
    row = session.get(m.FeedbackPolicy, tenant_id)
    if row is None:
        return Policy(DEFAULT_COLLECT, DEFAULT_READERS)
    return Policy(row.collect, row.readers, row.updated_at)


def set_policy(session: Session, who: Principal, *, collect: str | None, readers: str | None) -> Policy:
    if collect is not None and collect not in COLLECT:
        raise InvalidRequest(f"collect must be one of {', '.join(COLLECT)}", param="collect")
    if readers is not None and readers not in READERS:
        raise InvalidRequest(f"readers must be one of {', '.join(READERS)}", param="readers")
    row = session.get(m.FeedbackPolicy, who.tenant_id)
    if row is None:
        row = m.FeedbackPolicy(tenant_id=who.tenant_id, collect=DEFAULT_COLLECT, readers=DEFAULT_READERS)
        session.add(row)
    row.collect = collect or row.collect
    row.readers = readers or row.readers
    row.updated_by, row.updated_at = who.user_id, time.time()
    session.flush()
    return Policy(row.collect, row.readers, row.updated_at)


def require_collection(policy: Policy) -> None:
    """A 409 (the tenant's state, not the caller's rights) when the policy collects no feedback."""
    if not policy.collects_feedback:
        raise Conflict(
            "This workspace's policy collects no feedback; a tenant admin can turn collection on "
            "(PUT /api/feedback/policy).",
            param="policy",
            code="feedback_not_collected",
        )


# --- sealing -------------------------------------------------------------------------------------


def seal(key: DataKey, value: Any, column: str, row_id: str) -> str:
    return key.seal_text(json.dumps(value, ensure_ascii=False), f"{column}|{row_id}")


def unseal(key: DataKey, value: str | None, column: str, row_id: str) -> Any:
    return None if value is None else json.loads(key.open_text(value, f"{column}|{row_id}"))


# --- kept completions ----------------------------------------------------------------------------


def keep_completion(
    db: Database,
    key: DataKey,
    who: Principal,
    completion_id: str,
    *,
    model: str,
    messages: list[dict[str, Any]],
    answers: list[str],
) -> bool:
    """Keep a finished chat completion, sealed, for its person's feedback, if the tenant's policy still keeps them
    (`collect: all`); whether it was kept. The caller asks only for a request that came under such a policy (read
    with its model): one that came while nothing was kept costs nothing here, and one during which an admin turned
    collection off is not kept either."""
    with db.tenant(who.tenant_id) as s:
        if not get_policy(s, who.tenant_id).keeps_completions:
            return False
        s.add(
            m.Completion(
                id=completion_id,
                user_id=who.user_id,
                api_key_id=who.api_key_id,
                model=model,
                prompt=seal(key, messages, "completions.prompt", completion_id),
                answers=seal(key, answers, "completions.answers", completion_id),
            )
        )
    return True


def _completion(session: Session, who: Principal, completion_id: str) -> m.Completion:
    """A completion its caller made; any other (another person's, another tenant's, or none) is a 404."""
    record = session.scalar(
        select(m.Completion).where(m.Completion.id == completion_id, m.Completion.user_id == who.user_id)
    )
    if record is None:
        raise NotFound(
            f"No completion '{completion_id}' is kept for you: it does not exist, is someone else's, or was made "
            "while the workspace's policy kept no completions (collect must be 'all').",
            param="completion_id",
            code="completion_not_found",
        )
    return record


# --- feedback ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """What a person says about an answer; at least a rating or a correction."""

    rating: int | None = None
    reason: str = ""
    correction: str | None = None

    def check(self) -> Verdict:
        if self.rating is not None and self.rating not in RATINGS:
            raise InvalidRequest("rating must be 1 (thumbs up) or -1 (thumbs down)", param="rating")
        if len(self.reason) > MAX_REASON:
            raise InvalidRequest(f"reason must be at most {MAX_REASON} characters", param="reason")
        if self.correction is not None and not self.correction.strip():
            raise InvalidRequest("correction is empty: send the corrected answer, or leave it out", param="correction")
        if self.correction is not None and len(self.correction) > MAX_ANSWER:
            raise InvalidRequest(f"correction must be at most {MAX_ANSWER} characters", param="correction")
        if self.rating is None and self.correction is None:
            raise InvalidRequest("send a rating (1 or -1), a correction, or both", param="rating")
        return self


def upsert(
    session: Session,
    key: DataKey,
    who: Principal,
    existing: m.Feedback | None,
    verdict: Verdict,
    *,
    model: str,
    prompt: list[dict[str, Any]],
    answer: str,
    lineage: dict[str, Any],
) -> m.Feedback:
    row = existing
    if row is None:
        row_id = new_id("fb_")
        row = m.Feedback(
            id=row_id,
            user_id=who.user_id,
            model=model,
            prompt=seal(key, prompt, "feedback.prompt", row_id),
            answer=seal(key, answer, "feedback.answer", row_id),
            **lineage,
        )
        session.add(row)
    row.rating = verdict.rating
    row.reason = seal(key, verdict.reason, "feedback.reason", row.id)
    row.correction = (
        None if verdict.correction is None else seal(key, verdict.correction, "feedback.correction", row.id)
    )
    row.updated_at = time.time()
    session.flush()
    return row


def feedback_on_completion(
    session: Session, key: DataKey, who: Principal, completion_id: str, verdict: Verdict, *, choice_index: int = 0
) -> m.Feedback:
    verdict.check()
    record = _completion(session, who, completion_id)  # a 404 first: whatever the policy, nothing about the id
    require_collection(get_policy(session, who.tenant_id))
    models.get_model(session, record.model, viewer=who, checkpoints=True)  # access lost since: a 404 naming model
    answers = unseal(key, record.answers, "completions.answers", record.id)
    if not 0 <= choice_index < len(answers):
        raise InvalidRequest(
            f"choice_index must be from 0 to {len(answers) - 1}: the completion has {len(answers)} choice(s)",
            param="choice_index",
        )
    existing = session.scalar(
        select(m.Feedback).where(
            m.Feedback.completion_id == completion_id,
            m.Feedback.choice_index == choice_index,
            m.Feedback.user_id == who.user_id,
        )
    )
    prompt = unseal(key, record.prompt, "completions.prompt", record.id)
    lineage = {"completion_id": completion_id, "choice_index": choice_index}
    return upsert(
        session, key, who, existing, verdict, model=record.model, prompt=prompt, answer=answers[choice_index],
        lineage=lineage,
    )  # fmt: skip


def feedback_on_message(
    session: Session, key: DataKey, who: Principal, conversation_id: str, message_id: str, verdict: Verdict
) -> m.Feedback:
    """Feedback on an assistant message of the caller's own saved chat: the prompt is the chat up to it."""
    verdict.check()
    conversation = conversations.get_conversation(session, who.user_id, conversation_id)
    require_collection(get_policy(session, who.tenant_id))
    history = conversations.messages_of(session, conversation)
    position = next((i for i, x in enumerate(history) if x.id == message_id), None)
    if position is None:
        raise NotFound(f"No message '{message_id}' in this conversation.", param="message_id")
    message = history[position]
    if message.role != "assistant":
        raise InvalidRequest("feedback is given on an assistant's answer, not on your own message", param="message_id")
    model = message.model or conversation.model or ""
    models.get_model(session, model, viewer=who, checkpoints=True)  # one its author may use, now as when posted
    system = conversations.system_prompt_of(key, conversation)
    prompt = ([{"role": "system", "content": system}] if system else []) + [
        {"role": x.role, "content": conversations.content_of(key, x)} for x in history[:position]
    ]
    same = m.Feedback.message_id == message_id
    if message.completion_id:  # the answer the API names by its completion id: one row, whichever way it came
        same = or_(same, (m.Feedback.completion_id == message.completion_id) & (m.Feedback.choice_index == 0))
    existing = session.scalar(select(m.Feedback).where(same, m.Feedback.user_id == who.user_id))
    lineage = {"conversation_id": conversation_id, "message_id": message_id, "completion_id": message.completion_id}
    row = upsert(
        session, key, who, existing, verdict, model=answering_model(session, who, model, message.completion_id),
        prompt=prompt, answer=conversations.content_of(key, message), lineage=lineage,
    )  # fmt: skip
    row.conversation_id, row.message_id = conversation_id, message_id
    return row


def answering_model(session: Session, who: Principal, model: str, completion_id: str | None) -> str:
    """The model feedback on an answer counts for: for a stable name, the version that answered it (its canary or
    its current one, as the API's feedback does), known by the completion's id; otherwise the model itself."""
    routed = session.get(m.ModelNameRequest, completion_id) if completion_id else None
    if routed is not None and routed.user_id == who.user_id and routed.name_id == model:
        return routed.adapter_id
    return model


def _owned_adapters(who: Principal) -> Any:
    return select(m.Adapter.id).where(m.Adapter.created_by == who.user_id)


def readable(who: Principal, policy: Policy, author: Any, *model_columns: Any) -> ColumnElement[bool] | None:
    """The condition on rows (by their author and the models that answered) the caller may read; None: all."""
    if who.has_role(Role.ADMIN) or policy.readers == "members":
        return None
    if policy.readers == "owners":
        return or_(author == who.user_id, *(column.in_(_owned_adapters(who)) for column in model_columns))
    return author == who.user_id


class Sight:
    """Which models a caller may read feedback on: those its key allows (`allowed_models`) and it may see (an admin
    sees every model of the tenant, even one deleted since); feedback of its own needs only the key's allowance."""

    def __init__(self, session: Session, who: Principal) -> None:
        self.session, self.who, self.seen = session, who, dict[str, bool]()

    def sees(self, model_id: str) -> bool:
        if model_id not in self.seen:
            self.seen[model_id] = access.may_use_model(self.who, model_id) and (
                self.who.has_role(Role.ADMIN) or _may_use(self.session, self.who, model_id)
            )
        return self.seen[model_id]

    def reads(self, author: str | None, *model_ids: str) -> bool:
        if author == self.who.user_id:
            return all(access.may_use_model(self.who, x) for x in model_ids)
        return all(self.sees(x) for x in model_ids)

    def require(self, model_id: str) -> None:
        """A 404 like an unknown model's for a model the caller may not read feedback on."""
        if not self.sees(model_id):
            raise NotFound(
                f"The model '{model_id}' does not exist or you do not have access to it.",
                param="model",
                code="model_not_found",
            )


def _may_use(session: Session, who: Principal, model_id: str) -> bool:
    try:
        models.get_model(session, model_id, viewer=who, checkpoints=True)
    except NotFound:
        return False
    return True


def list_feedback(
    session: Session, who: Principal, *, model: str | None = None, mine: bool = False, limit: int = 200
) -> list[m.Feedback]:
    sight = Sight(session, who)
    query = select(m.Feedback).order_by(m.Feedback.updated_at.desc(), m.Feedback.id)
    condition = readable(who, get_policy(session, who.tenant_id), m.Feedback.user_id, m.Feedback.model)
    if condition is not None:
        query = query.where(condition)
    if model:
        sight.require(model)
        query = query.where(m.Feedback.model == model)
    if mine:
        query = query.where(m.Feedback.user_id == who.user_id)
    rows: list[m.Feedback] = []
    for row in session.scalars(query):
        if sight.reads(row.user_id, row.model):
            rows.append(row)
            if len(rows) == limit:
                break
    return rows


def get_feedback(session: Session, who: Principal, feedback_id: str) -> m.Feedback:
    query = select(m.Feedback).where(m.Feedback.id == feedback_id)
    condition = readable(who, get_policy(session, who.tenant_id), m.Feedback.user_id, m.Feedback.model)
    row = session.scalar(query if condition is None else query.where(condition))
    if row is not None and not Sight(session, who).reads(row.user_id, row.model):
        row = None
    if row is None:
        raise NotFound(f"No feedback '{feedback_id}'.", param="feedback_id", code="feedback_not_found")
    return row


def delete_feedback(session: Session, who: Principal, feedback_id: str) -> None:
    """Its author withdraws it; an admin removes any (a reader who is neither gets a 404)."""
    row = get_feedback(session, who, feedback_id)
    if row.user_id != who.user_id and not who.has_role(Role.ADMIN):
        raise NotFound(f"No feedback '{feedback_id}' of yours.", param="feedback_id", code="feedback_not_found")
    session.delete(row)


def feedback_view(key: DataKey, row: m.Feedback) -> dict[str, Any]:
    """The row with its sealed fields opened (the API's feedback object)."""
    return {
        "id": row.id,
        "object": "feedback",
        "user_id": row.user_id,
        "model": row.model,
        "rating": row.rating,
        "reason": unseal(key, row.reason, "feedback.reason", row.id) or "",
        "correction": unseal(key, row.correction, "feedback.correction", row.id),
        "prompt": unseal(key, row.prompt, "feedback.prompt", row.id),
        "answer": unseal(key, row.answer, "feedback.answer", row.id),
        "completion_id": row.completion_id,
        "choice_index": row.choice_index if row.completion_id else None,
        "conversation_id": row.conversation_id,
        "message_id": row.message_id,
        "battle_id": row.battle_id,
        "created_at": int(row.created_at),
        "updated_at": int(row.updated_at),
    }


def feedback_of_messages(session: Session, who: Principal, message_ids: list[str]) -> list[m.Feedback]:
    """The caller's own feedback on these messages (the chat page shows it on each answer)."""
    if not message_ids:
        return []
    return list(
        session.scalars(
            select(m.Feedback).where(m.Feedback.user_id == who.user_id, m.Feedback.message_id.in_(message_ids))
        )
    )


# --- curation: feedback as training records ------------------------------------------------------

KINDS = ("sft", "dpo")


@dataclass(frozen=True)
class Curated:
    records: list[dict[str, Any]]
    lineage: list[dict[str, Any]]  # one per record, in order: where it came from
    skipped: dict[str, int]


def _ends_with_user(prompt: list[dict[str, Any]]) -> bool:
    return bool(prompt) and prompt[-1].get("role") == "user"


def curate(session: Session, key: DataKey, who: Principal, *, kind: str, model: str | None) -> Curated:
    """The records the caller's readable feedback makes, oldest first.

    SFT: `{"messages": prompt + answer}` for each answer rated up without a correction, and for each correction
    (the corrected text is the answer). DPO, in OpenAI's preference format: a correction is preferred to the
    answer it corrects; an arena vote prefers the winner's answer to the loser's (ties say nothing)."""
    if kind not in KINDS:
        raise InvalidRequest(f"kind must be one of {', '.join(KINDS)}", param="kind")
    policy = get_policy(session, who.tenant_id)
    sight, authors = Sight(session, who), Authors(session, who)
    if model:
        sight.require(model)
    require_members_read(policy)
    everyone = Everyone(session, who)
    records: list[dict[str, Any]] = []
    lineage: list[dict[str, Any]] = []
    skipped = {"no_prompt": 0, "not_used": 0, "ties": 0}
    query = select(m.Feedback).order_by(m.Feedback.created_at, m.Feedback.id)
    condition = readable(who, policy, m.Feedback.user_id, m.Feedback.model)
    if condition is not None:
        query = query.where(condition)
    if model:
        query = query.where(m.Feedback.model == model)
    for row in session.scalars(query):
        if not (sight.reads(row.user_id, row.model) and authors.may_use(row.user_id, row.model)):
            continue
        if not everyone.may_use(row.model):
            continue  # not counted: the caller learns nothing of feedback it may not read
        view = feedback_view(key, row)
        prompt, answer, correction = view["prompt"], view["answer"], view["correction"]
        if not _ends_with_user(prompt):
            skipped["no_prompt"] += 1
            continue
        source = {k: view[k] for k in ("completion_id", "conversation_id", "message_id", "battle_id") if view[k]}
        source.update(feedback=row.id, model=row.model)
        if kind == "sft" and (correction is not None or row.rating == 1):
            text = correction if correction is not None else answer
            records.append({"messages": [*prompt, {"role": "assistant", "content": text}]})
            lineage.append({**source, "from": "correction" if correction is not None else "thumbs_up"})
        elif kind == "dpo" and correction is not None and correction.strip() != (answer or "").strip():
            records.append(_pair(prompt, correction, answer))
            lineage.append({**source, "from": "correction"})
        else:
            skipped["not_used"] += 1
    if kind == "dpo":
        battles = select(m.ArenaBattle).where(m.ArenaBattle.winner.is_not(None)).order_by(m.ArenaBattle.voted_at)
        condition = readable(who, policy, m.ArenaBattle.user_id, m.ArenaBattle.model_a, m.ArenaBattle.model_b)
        if condition is not None:
            battles = battles.where(condition)
        if model:
            battles = battles.where(or_(m.ArenaBattle.model_a == model, m.ArenaBattle.model_b == model))
        for battle in session.scalars(battles):
            pair = (battle.model_a, battle.model_b)
            if not (sight.reads(battle.user_id, *pair) and authors.may_use(battle.user_id, *pair)):
                continue
            if not everyone.may_use(*pair):
                continue
            if battle.winner == "tie":
                skipped["ties"] += 1
                continue
            prompt = unseal(key, battle.prompt, "arena_battles.prompt", battle.id)
            answer_a = unseal(key, battle.answer_a, "arena_battles.answer_a", battle.id)
            answer_b = unseal(key, battle.answer_b, "arena_battles.answer_b", battle.id)
            chosen, rejected = (answer_a, answer_b) if battle.winner == "a" else (answer_b, answer_a)
            if not _ends_with_user(prompt) or chosen.strip() == rejected.strip():
                skipped["not_used"] += 1
                continue
            records.append(_pair(prompt, chosen, rejected))
            winner = battle.model_a if battle.winner == "a" else battle.model_b
            loser = battle.model_b if battle.winner == "a" else battle.model_a
            lineage.append({"battle": battle.id, "from": "arena_vote", "winner": winner, "loser": loser})
    return Curated(records, lineage, skipped)


def require_members_read(policy: Policy) -> None:
    """A dataset is a tenant-wide object: every member with the files scope reads its records, content and
    versions, exports it and trains on it. So feedback becomes one only where every member may read feedback
    (`readers: members`); under a narrower policy a dataset would hand the feedback to people it keeps it from."""
    if policy.readers != "members":
        raise PermissionDenied(
            f"This workspace's feedback policy lets only {policy.readers} read feedback (readers: "
            f"{policy.readers}), and a dataset is read by every member: a feedback dataset is built only when the "
            "policy's readers are 'members' (a tenant admin sets it with PUT /api/feedback/policy).",
            param="readers",
            code="feedback_readers",
        )


class Everyone:
    """Whether every member of the caller's tenant may use a model (a base, or a tenant-visible adapter), so
    feedback on it is read by everyone `readers: members` names, and a dataset made of it tells no one more: an
    adapter private to its owner or shared with a few keeps its feedback out of datasets."""

    def __init__(self, session: Session, who: Principal) -> None:
        self.session, self.anyone = session, Principal(who.tenant_id, who.tenant_name, "", "", Role.VIEWER)
        self.seen = dict[str, bool]()

    def may_use(self, *model_ids: str) -> bool:
        for model_id in model_ids:
            if model_id not in self.seen:
                self.seen[model_id] = _may_use(self.session, self.anyone, model_id)
        return all(self.seen[x] for x in model_ids)


class Authors:
    """Whether feedback's author (a member of the caller's tenant) may use the models it is about: a dataset takes
    no answer "of" a model from someone who could not have had it answer (nor one who lost access since)."""

    def __init__(self, session: Session, who: Principal) -> None:
        self.session, self.who, self.seen = session, who, dict[tuple[str, str], bool]()

    def may_use(self, user_id: str | None, *model_ids: str) -> bool:
        return all(self._may_use(user_id, x) for x in model_ids)

    def _may_use(self, user_id: str | None, model_id: str) -> bool:
        if user_id is None:
            return False
        if (user_id, model_id) not in self.seen:
            role = self.session.scalar(
                select(m.Membership.role).where(
                    m.Membership.tenant_id == self.who.tenant_id, m.Membership.user_id == user_id
                )
            )
            author = (
                None if role is None else Principal(self.who.tenant_id, self.who.tenant_name, user_id, "", Role(role))
            )
            self.seen[user_id, model_id] = author is not None and (
                author.has_role(Role.ADMIN) or _may_use(self.session, author, model_id)
            )
        return self.seen[user_id, model_id]


def _pair(prompt: list[dict[str, Any]], preferred: str, non_preferred: str) -> dict[str, Any]:
    return {
        "input": {"messages": prompt},
        "preferred_output": [{"role": "assistant", "content": preferred}],
        "non_preferred_output": [{"role": "assistant", "content": non_preferred}],
    }
