"""/v1/chat/completions and /v1/completions, streamed (SSE) or whole."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Depends
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from adaptery.api.deps import platform, principal
from adaptery.auth.policy import require
from adaptery.auth.principal import Principal
from adaptery.db.ids import new_id
from adaptery.engine.generation import AdapterSpec, Delta, PromptTooLong, Usage
from adaptery.engine.sampling import SamplingParams
from adaptery.platform import Platform
from adaptery.services import models
from adaptery.services.errors import InvalidRequest

router = APIRouter(prefix="/v1", tags=["inference"])
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict[str, Any]] | None = None


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI clients send fields we accept and ignore (user, store)

    model: str
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = Field(None, ge=1)
    logprobs: bool | None = None


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[dict[str, Any]] | None = None


class CompletionRequest(SamplingFields):
    prompt: str | list[str]
    echo: bool | None = None


@dataclass
class Prepared:
    model_id: str
    base_id: str
    base_ref: str
    adapter: AdapterSpec | None
    prompt_ids: list[int]
    params: SamplingParams


def _text_of(message: ChatMessage, index: int) -> str:
    if message.content is None:
        return ""
    if isinstance(message.content, str):
        return message.content
    parts = []
    for part in message.content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise InvalidRequest(
                f"only text content parts are supported (got type {part.get('type')!r})",
                param=f"messages[{index}].content",
            )
        parts.append(part["text"])
    return "".join(parts)


def _messages(body: ChatRequest) -> list[dict[str, str]]:
    out = []
    for i, message in enumerate(body.messages):
        role = _ROLES.get(message.role)
        if role is None:
            raise InvalidRequest(
                f"Invalid value: '{message.role}'. Supported roles: system, developer, user, assistant.",
                param=f"messages[{i}].role",
            )
        out.append({"role": role, "content": _text_of(message, i)})
    return out


def _check_supported(body: SamplingFields) -> None:
    if body.n not in (None, 1):
        raise InvalidRequest("n > 1 is not supported yet", param="n")
    if body.logprobs:
        raise InvalidRequest("logprobs are not supported yet", param="logprobs")
    if isinstance(body, ChatRequest) and body.tools:
        raise InvalidRequest("tools are not supported by this server", param="tools")


def _prepare(p: Platform, who: Principal, body: SamplingFields, prompt: list[dict[str, str]] | str) -> Prepared:
    require(who, "infer")
    _check_supported(body)
    with p.db.tenant(who.tenant_id) as s:
        ref = models.get_model(s, body.model)
        adapter = AdapterSpec(ref.adapter.sha256, p.adapter_dir(ref.adapter)) if ref.adapter else None
    base = ref.base
    if isinstance(prompt, str):
        prompt_ids = p.engine.text_prompt(base.id, base.ref, prompt)
    else:
        prompt_ids = p.engine.chat_prompt(base.id, base.ref, prompt)
    context = p.engine.base(base.id, base.ref).context
    requested = getattr(body, "max_completion_tokens", None) or body.max_tokens
    limit = p.settings.max_output_tokens
    if requested is not None and requested > limit:
        param = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) else "max_tokens"
        raise InvalidRequest(f"{param} is too large: {requested}. This server allows at most {limit}.", param=param)
    max_tokens = requested or max(1, min(limit, context - len(prompt_ids)))
    try:
        p.engine.check_fits(base.id, base.ref, prompt_ids, max_tokens)
    except PromptTooLong as exc:
        raise InvalidRequest(str(exc), param="messages", code="context_length_exceeded") from exc
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > 4:
        raise InvalidRequest("at most 4 stop sequences are allowed", param="stop")
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        stop=[s for s in stop if s],
        seed=body.seed,
    )
    return Prepared(ref.id, base.id, base.ref, adapter, prompt_ids, params)


def _usage(usage: Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
    }


def _run(p: Platform, job: Prepared, usage: Usage, should_stop: Any = lambda: False) -> Iterator[Delta]:
    return p.engine.generate(
        job.base_id, job.base_ref, job.adapter, job.prompt_ids, job.params, usage, should_stop=should_stop
    )


async def _stream_deltas(p: Platform, job: Prepared, usage: Usage) -> AsyncIterator[Delta]:
    """Run generation in a worker thread; a client that goes away stops it at the next token."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Delta | BaseException | None] = asyncio.Queue()
    stop = threading.Event()

    def produce() -> None:
        try:
            for delta in _run(p, job, usage, stop.is_set):
                loop.call_soon_threadsafe(queue.put_nowait, delta)
        except BaseException as exc:  # delivered to the stream as an error chunk
            loop.call_soon_threadsafe(queue.put_nowait, exc)
        finally:
            loop.call_soon_threadsafe(queue.put_nowait, None)

    producer = loop.run_in_executor(None, produce)
    try:
        while (item := await queue.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        await asyncio.shield(producer)


def _sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


def _error_event(exc: BaseException) -> bytes:
    return _sse(
        {"error": {"message": f"generation failed: {exc}", "type": "server_error", "param": None, "code": None}}
    )


@router.post("/chat/completions", response_model=None)
async def chat_completions(
    body: ChatRequest, who: Principal = Depends(principal), p: Platform = Depends(platform)
) -> dict | StreamingResponse:
    job = await run_in_threadpool(_prepare, p, who, body, _messages(body))
    completion_id, created = new_id("chatcmpl-"), int(time.time())
    fingerprint = f"fp_adaptery_{job.base_id}"[:64]

    def chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
        return {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": job.model_id,
            "system_fingerprint": fingerprint,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }

    usage = Usage()
    if body.stream:
        include_usage = bool((body.stream_options or {}).get("include_usage"))

        async def events() -> AsyncIterator[bytes]:
            yield _sse(chunk({"role": "assistant", "content": ""}, None))
            try:
                async for delta in _stream_deltas(p, job, usage):
                    if delta.text:
                        yield _sse(chunk({"content": delta.text}, None))
                    if delta.finish_reason:
                        yield _sse(chunk({}, delta.finish_reason))
            except Exception as exc:
                yield _error_event(exc)
                return
            if include_usage:
                yield _sse({**chunk({}, None), "choices": [], "usage": _usage(usage)})
            yield _sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    text, finish = [], "stop"
    async for delta in _stream_deltas(p, job, usage):
        text.append(delta.text)
        finish = delta.finish_reason or finish
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": job.model_id,
        "system_fingerprint": fingerprint,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "".join(text), "refusal": None, "annotations": []},
                "logprobs": None,
                "finish_reason": finish,
            }
        ],
        "usage": _usage(usage),
    }


@router.post("/completions", response_model=None)
async def completions(
    body: CompletionRequest, who: Principal = Depends(principal), p: Platform = Depends(platform)
) -> dict | StreamingResponse:
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if len(prompts) != 1:
        raise InvalidRequest("exactly one prompt per request is supported", param="prompt")
    job = await run_in_threadpool(_prepare, p, who, body, prompts[0])
    completion_id, created = new_id("cmpl-"), int(time.time())

    def choice(text: str, finish: str | None) -> dict[str, Any]:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}

    def body_of(choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": completion_id,
            "object": "text_completion",
            "created": created,
            "model": job.model_id,
            "choices": choices,
        }

    usage = Usage()
    if body.stream:

        async def events() -> AsyncIterator[bytes]:
            try:
                async for delta in _stream_deltas(p, job, usage):
                    if delta.text or delta.finish_reason:
                        yield _sse(body_of([choice(delta.text, delta.finish_reason)]))
            except Exception as exc:
                yield _error_event(exc)
                return
            yield _sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    text, finish = [], "stop"
    async for delta in _stream_deltas(p, job, usage):
        text.append(delta.text)
        finish = delta.finish_reason or finish
    return {**body_of([choice("".join(text), finish)]), "usage": _usage(usage)}
