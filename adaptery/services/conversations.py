"""Saved chats. A conversation is its user's alone: on top of the tenant filter (`db.tenancy`), every
lookup here is narrowed to the owning user, so a colleague's conversation is a 404 like any other.

Titles, system prompts and message contents are stored sealed with the tenant's data key (AES-256-GCM, bound
to their row and column, see `storage.crypto.DataKey.seal_text`); read them with `title_of`, `system_prompt_of`
and `content_of`. Values written before encryption existed (no `enc1:` prefix) read as they are.
"""

from __future__ import annotations

import json
import time
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from adaptery.auth.principal import Principal
from adaptery.db import models as m
from adaptery.db.ids import new_id
from adaptery.services import models
from adaptery.services.errors import InvalidRequest, NotFound
from adaptery.storage.crypto import DataKey

ROLES = ("user", "assistant")
PARAMS = {"temperature": (0.0, 2.0), "max_tokens": (1, 1_000_000), "top_p": (0.0, 1.0)}


def _seal(key: DataKey, text: str, column: str, row_id: str) -> str:
    return key.seal_text(text, f"{column}|{row_id}") if text else ""


def _open(key: DataKey, value: str, column: str, row_id: str) -> str:
    if not value or not value.startswith("enc1:"):
        return value
    return key.open_text(value, f"{column}|{row_id}")


def title_of(key: DataKey, record: m.Conversation) -> str:
    return _open(key, record.title, "conversations.title", record.id)


def system_prompt_of(key: DataKey, record: m.Conversation) -> str:
    return _open(key, record.system_prompt, "conversations.system_prompt", record.id)


def content_of(key: DataKey, message: m.ChatMessage) -> str:
    return _open(key, message.content, "chat_messages.content", message.id)


def check_params(params: dict[str, Any]) -> dict[str, Any]:
    unknown = set(params) - set(PARAMS)
    if unknown:
        raise InvalidRequest(f"unknown parameter(s): {', '.join(sorted(unknown))}", param="params")
    for name, value in params.items():
        low, high = PARAMS[name]
        if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
            raise InvalidRequest(f"{name} must be a number between {low} and {high}", param=f"params.{name}")
    return dict(params)


def check_model(session: Session, who: Principal, model: str | None) -> None:
    """A chat names only a model its user may see and use (what it talks to, what answered): any other is a 404
    naming `model`, exactly like one that does not exist."""
    if model:
        models.get_model(session, model, viewer=who, checkpoints=True)


def check_completion_id(
    session: Session, key: DataKey, user_id: str, role: str, model: str | None, completion_id: str, content: str
) -> str:
    """A message names the completion that wrote it, so feedback given on the page and through the API (by
    `chatcmpl-` id) is about one answer, and a stable name's answer counts for the version that answered. The
    browser says which completion that was; it may name only one of its own user's: where the platform knows the
    completion (a name's routed request, a kept completion) it must be this user's and this model's (a 400 naming
    `model` otherwise); and no other message names it already. What is kept is the completion's own answer where
    the platform kept it, never other words the browser sends with its id: the content to store."""
    if role != "assistant":
        raise InvalidRequest("only an assistant's message has a completion id", param="completion_id")
    if not completion_id.startswith("chatcmpl-") or len(completion_id) > 64:
        raise InvalidRequest("completion_id must be a chat completion id (chatcmpl-…)", param="completion_id")
    routed = session.get(m.ModelNameRequest, completion_id)
    kept = session.get(m.Completion, completion_id)
    taken = session.scalar(select(m.ChatMessage.id).where(m.ChatMessage.completion_id == completion_id))
    if (
        (routed is not None and routed.user_id != user_id)
        or (kept is not None and kept.user_id != user_id)
        or taken is not None
    ):
        raise InvalidRequest(
            f"'{completion_id}' is not a completion of yours that wrote this answer", param="completion_id"
        )
    answered = routed.name_id if routed is not None else kept.model if kept is not None else model
    if answered != model:
        raise InvalidRequest(
            f"'{completion_id}' was answered by '{answered}', not by the message's model '{model}'", param="model"
        )
    if kept is None:
        return content
    answers = json.loads(key.open_text(kept.answers, f"completions.answers|{kept.id}"))
    return answers[0] if answers else content


def list_conversations(session: Session, user_id: str) -> list[tuple[m.Conversation, int]]:
    counts = (
        select(m.ChatMessage.conversation_id, func.count().label("n"))
        .group_by(m.ChatMessage.conversation_id)
        .subquery()
    )
    rows = session.execute(
        select(m.Conversation, func.coalesce(counts.c.n, 0))
        .outerjoin(counts, counts.c.conversation_id == m.Conversation.id)
        .where(m.Conversation.user_id == user_id)
        .order_by(m.Conversation.updated_at.desc())
    )
    return [(c, n) for c, n in rows]


def get_conversation(session: Session, user_id: str, conversation_id: str) -> m.Conversation:
    record = session.scalar(
        select(m.Conversation).where(m.Conversation.id == conversation_id, m.Conversation.user_id == user_id)
    )
    if record is None:
        raise NotFound(f"No conversation '{conversation_id}'.", param="conversation_id", code="conversation_not_found")
    return record


def messages_of(session: Session, conversation: m.Conversation) -> list[m.ChatMessage]:
    return list(
        session.scalars(
            select(m.ChatMessage).where(m.ChatMessage.conversation_id == conversation.id).order_by(m.ChatMessage.seq)
        )
    )


def create_conversation(
    session: Session,
    user_id: str,
    key: DataKey,
    *,
    title: str = "",
    model: str | None = None,
    system_prompt: str = "",
    params: dict[str, Any] | None = None,
) -> m.Conversation:
    record_id = new_id("conv_")
    record = m.Conversation(
        id=record_id,
        user_id=user_id,
        title=_seal(key, title.strip(), "conversations.title", record_id),
        model=model,
        system_prompt=_seal(key, system_prompt, "conversations.system_prompt", record_id),
        params=check_params(params or {}),
    )
    session.add(record)
    session.flush()
    return record


def update_conversation(session: Session, conversation: m.Conversation, key: DataKey, changes: dict[str, Any]) -> None:
    if "params" in changes:
        changes["params"] = check_params(changes["params"] or {})
    if "title" in changes:
        changes["title"] = _seal(key, (changes["title"] or "").strip(), "conversations.title", conversation.id)
    if "system_prompt" in changes:
        prompt = changes["system_prompt"] or ""
        changes["system_prompt"] = _seal(key, prompt, "conversations.system_prompt", conversation.id)
    for name, value in changes.items():
        setattr(conversation, name, value)
    conversation.updated_at = time.time()


def add_message(
    session: Session,
    conversation: m.Conversation,
    key: DataKey,
    *,
    role: str,
    content: str,
    model: str | None = None,
    stopped: bool = False,
    completion_id: str | None = None,
    user_id: str | None = None,
) -> m.ChatMessage:
    """`completion_id`: the chat completion that wrote an assistant message (`check_completion_id`)."""
    if role not in ROLES:
        raise InvalidRequest(f"role must be one of {', '.join(ROLES)}", param="role")
    if completion_id is not None:
        content = check_completion_id(
            session, key, user_id or conversation.user_id, role, model, completion_id, content
        )
    last = session.scalar(select(func.max(m.ChatMessage.seq)).where(m.ChatMessage.conversation_id == conversation.id))
    message_id = new_id("msg_")
    message = m.ChatMessage(
        id=message_id,
        conversation_id=conversation.id,
        seq=(last or 0) + 1,
        role=role,
        content=key.seal_text(content, f"chat_messages.content|{message_id}"),
        model=model,
        stopped=stopped,
        completion_id=completion_id,
    )
    session.add(message)
    if role == "user" and not conversation.title:
        title = _distinct_title(session, key, conversation, _title_from(content))
        conversation.title = _seal(key, title, "conversations.title", conversation.id)
    conversation.updated_at = time.time()
    session.flush()
    return message


def truncate_from(session: Session, conversation: m.Conversation, message_id: str) -> int:
    """Delete a message and every later one (regenerate, edit and resend); returns how many went."""
    message = session.scalar(
        select(m.ChatMessage).where(m.ChatMessage.id == message_id, m.ChatMessage.conversation_id == conversation.id)
    )
    if message is None:
        raise NotFound(f"No message '{message_id}' in this conversation.", param="message_id")
    result = session.execute(
        delete(m.ChatMessage).where(m.ChatMessage.conversation_id == conversation.id, m.ChatMessage.seq >= message.seq)
    )
    conversation.updated_at = time.time()
    return result.rowcount


def delete_conversation(session: Session, conversation: m.Conversation) -> None:
    session.execute(delete(m.ChatMessage).where(m.ChatMessage.conversation_id == conversation.id))
    session.delete(conversation)


def _distinct_title(session: Session, key: DataKey, conversation: m.Conversation, title: str) -> str:
    """`title`, or `title (2)`, `(3)`…: chats opened with the same question stay apart in the list."""
    others = session.scalars(
        select(m.Conversation).where(
            m.Conversation.user_id == conversation.user_id, m.Conversation.id != conversation.id
        )
    )
    taken = {title_of(key, other) for other in others}
    candidate, number = title, 1
    while candidate in taken:
        number += 1
        candidate = f"{title} ({number})"
    return candidate


def _title_from(content: str) -> str:
    line = " ".join(content.split())
    return line if len(line) <= 60 else line[:57].rstrip() + "…"
