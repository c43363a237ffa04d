"""/api/conversations: the web chat's saved conversations, each its user's own."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Response
from pydantic import BaseModel, ConfigDict, Field

from adaptery.api.deps import platform, principal
from adaptery.auth.principal import Principal
from adaptery.db import models as m
from adaptery.platform import Platform
from adaptery.services import conversations
from adaptery.storage.crypto import DataKey

router = APIRouter(prefix="/api/conversations", tags=["conversations"])


class ConversationFields(BaseModel):
    model_config = ConfigDict(extra="forbid")
    title: str | None = Field(None, max_length=200)
    model: str | None = Field(None, max_length=255)
    system_prompt: str | None = Field(None, max_length=20_000)
    params: dict[str, Any] | None = None


class NewMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: str
    content: str = Field(max_length=1_000_000)
    model: str | None = Field(None, max_length=255)
    stopped: bool = False
    completion_id: str | None = Field(None, max_length=64, description="the chatcmpl-… id that wrote this answer")


def message_object(key: DataKey, message: m.ChatMessage) -> dict[str, Any]:
    return {
        "id": message.id,
        "object": "chat.message",
        "role": message.role,
        "content": conversations.content_of(key, message),
        "model": message.model,
        "stopped": message.stopped,
        "completion_id": message.completion_id,
        "created_at": int(message.created_at),
    }


def conversation_object(
    key: DataKey, record: m.Conversation, messages: list[m.ChatMessage] | None = None, count: int | None = None
) -> dict[str, Any]:
    body = {
        "id": record.id,
        "object": "conversation",
        "title": conversations.title_of(key, record) or "New chat",
        "model": record.model,
        "system_prompt": conversations.system_prompt_of(key, record),
        "params": record.params,
        "created_at": int(record.created_at),
        "updated_at": int(record.updated_at),
    }
    if messages is not None:
        body["messages"] = [message_object(key, x) for x in messages]
        body["message_count"] = len(messages)
    elif count is not None:
        body["message_count"] = count
    return body


@router.get("")
def list_conversations(who: Principal = Depends(principal), p: Platform = Depends(platform)) -> dict:
    with p.db.tenant(who.tenant_id) as s:
        rows = conversations.list_conversations(s, who.user_id)
        key = p.keyring.data_key(who.tenant_id)
        return {"object": "list", "data": [conversation_object(key, c, count=n) for c, n in rows]}


@router.post("", status_code=201)
def create_conversation(
    body: ConversationFields, who: Principal = Depends(principal), p: Platform = Depends(platform)
) -> dict:
    with p.db.tenant(who.tenant_id) as s:
        key = p.keyring.data_key(who.tenant_id)
        conversations.check_model(s, who, body.model)
        record = conversations.create_conversation(
            s,
            who.user_id,
            key,
            title=body.title or "",
            model=body.model,
            system_prompt=body.system_prompt or "",
            params=body.params,
        )
        return conversation_object(key, record, [])


@router.get("/{conversation_id}")
def get_conversation(
    conversation_id: str, who: Principal = Depends(principal), p: Platform = Depends(platform)
) -> dict:
    with p.db.tenant(who.tenant_id) as s:
        record = conversations.get_conversation(s, who.user_id, conversation_id)
        key = p.keyring.data_key(who.tenant_id)
        return conversation_object(key, record, conversations.messages_of(s, record))


@router.patch("/{conversation_id}")
def update_conversation(
    conversation_id: str,
    body: ConversationFields,
    who: Principal = Depends(principal),
    p: Platform = Depends(platform),
) -> dict:
    with p.db.tenant(who.tenant_id) as s:
        record = conversations.get_conversation(s, who.user_id, conversation_id)
        key = p.keyring.data_key(who.tenant_id)
        conversations.check_model(s, who, body.model)
        conversations.update_conversation(s, record, key, body.model_dump(exclude_unset=True))
        return conversation_object(key, record, conversations.messages_of(s, record))


@router.delete("/{conversation_id}", status_code=204)
def delete_conversation(
    conversation_id: str, who: Principal = Depends(principal), p: Platform = Depends(platform)
) -> Response:
    with p.db.tenant(who.tenant_id) as s:
        conversations.delete_conversation(s, conversations.get_conversation(s, who.user_id, conversation_id))
    return Response(status_code=204)


@router.post("/{conversation_id}/messages", status_code=201)
def add_message(
    conversation_id: str, body: NewMessage, who: Principal = Depends(principal), p: Platform = Depends(platform)
) -> dict:
    with p.db.tenant(who.tenant_id) as s:
        record = conversations.get_conversation(s, who.user_id, conversation_id)
        key = p.keyring.data_key(who.tenant_id)
        conversations.check_model(s, who, body.model)
        message = conversations.add_message(
            s, record, key, role=body.role, content=body.content, model=body.model, stopped=body.stopped,
            completion_id=body.completion_id, user_id=who.user_id,
        )  # fmt: skip
        return message_object(key, message)


@router.delete("/{conversation_id}/messages/{message_id}")
def truncate_messages(
    conversation_id: str, message_id: str, who: Principal = Depends(principal), p: Platform = Depends(platform)
) -> dict:
    """Delete this message and every later one: what regenerating an answer does."""
    with p.db.tenant(who.tenant_id) as s:
        record = conversations.get_conversation(s, who.user_id, conversation_id)
        deleted = conversations.truncate_from(s, record, message_id)
        return {
            "object": "list",
            "deleted": deleted,
            "data": [
                message_object(p.keyring.data_key(who.tenant_id), x) for x in conversations.messages_of(s, record)
            ],
        }
