"""/v1/chat/completions and /v1/completions, streamed (SSE) or whole."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

from fastapi import APIRouter, Depends
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from adaptery.api.deps import platform, principal
from adaptery.auth.policy import require
from adaptery.auth.principal import Principal
from adaptery.db.ids import new_id
from adaptery.engine.generation import AdapterRejected, AdapterSpec, Delta, PromptTooLong, Usage
from adaptery.engine.sampling import SamplingParams
from adaptery.platform import Platform
from adaptery.services import limits, models
from adaptery.services.errors import InvalidRequest

router = APIRouter(prefix="/v1", tags=["inference"])
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_CHOICES = 16


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
    top_k: int | None = Field(None, ge=-1, description="Sample among the k likeliest tokens; 0 or -1: no limit.")
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    max_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = Field(None, ge=1, le=MAX_CHOICES)


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[dict[str, Any]] | None = None


class CompletionRequest(SamplingFields):
    prompt: str | list[str]
    echo: bool | None = None
    logprobs: int | None = Field(None, ge=0, le=5)


@dataclass
class Prepared:
    model_id: str
    base_id: str
    base_ref: str
    adapter: AdapterSpec | None
    prompt_ids: list[int]
    params: SamplingParams
    n: int = 1
    reservation: limits.Reservation | None = None  # the worst case held against the caller's limits

    def choice_params(self, index: int) -> SamplingParams:
        """Choice i samples with seed + i: the n choices differ, and each is reproducible."""
        if self.params.seed is None or index == 0:
            return self.params
        return replace(self.params, seed=self.params.seed + index)


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
    if isinstance(body, ChatRequest) and body.tools:
        raise InvalidRequest("tools are not supported by this server", param="tools")
    if isinstance(body, ChatRequest) and body.top_logprobs and not body.logprobs:
        raise InvalidRequest("top_logprobs requires logprobs to be true", param="top_logprobs")
    if isinstance(body, CompletionRequest) and body.echo:
        raise InvalidRequest("echo is not supported by this server", param="echo")


def _logprob_params(body: SamplingFields) -> tuple[bool, int]:
    if isinstance(body, ChatRequest):
        return bool(body.logprobs), body.top_logprobs or 0
    if isinstance(body, CompletionRequest) and body.logprobs is not None:
        return True, body.logprobs
    return False, 0


def _prepare(p: Platform, who: Principal, body: SamplingFields, prompt: list[dict[str, str]] | str) -> Prepared:
    require(who, "infer")
    _check_supported(body)
    with p.db.tenant(who.tenant_id) as s:
        ref = models.get_model(s, body.model, viewer=who)
        adapter = AdapterSpec(ref.adapter.sha256, p.adapter_dir(ref.adapter)) if ref.adapter else None
    if adapter is not None:
        try:
            p.engine.check_adapter(adapter)
        except AdapterRejected as exc:
            raise InvalidRequest(f"The model '{body.model}' cannot be served: {exc}", param="model",
                                 code="adapter_not_supported") from exc  # fmt: skip
    base = ref.base
    if isinstance(prompt, str):
        prompt_ids = p.engine.text_prompt(base.id, base.ref, prompt)
    else:
        prompt_ids = p.engine.chat_prompt(base.id, base.ref, prompt, adapter)
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
    logprobs, top_logprobs = _logprob_params(body)
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        stop=[s for s in stop if s],
        seed=body.seed,
        top_k=max(0, body.top_k or 0),
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
    )
    n = body.n or 1
    held = limits.reserve(p.db, who, prompt_tokens=len(prompt_ids), max_tokens=max_tokens * n, stream=body.stream)
    return Prepared(ref.id, base.id, base.ref, adapter, prompt_ids, params, body.n or 1, held)


def _usage(usages: list[Usage]) -> dict[str, int]:
    prompt = usages[0].prompt_tokens if usages else 0
    completion = sum(u.completion_tokens for u in usages)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _stream_deltas(p: Platform, job: Prepared, usages: list[Usage]) -> AsyncIterator[tuple[int, Delta]]:
    """Run the n choices in worker threads, yielding (choice index, delta) as they come.

    Each choice is one engine request; they join the running batch together. A client that goes
    away stops them all (the engine frees their slots at its next step).
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[int, Delta] | BaseException | None] = asyncio.Queue()
    stop = threading.Event()
    usages.extend(Usage() for _ in range(job.n))

    def produce(index: int) -> None:
        try:
            deltas = p.engine.generate(
                job.base_id, job.base_ref, job.adapter, job.prompt_ids, job.choice_params(index), usages[index],
                should_stop=stop.is_set,
            )  # fmt: skip
            for delta in deltas:
                loop.call_soon_threadsafe(queue.put_nowait, (index, delta))
        except BaseException as exc:  # delivered to the stream as an error chunk
            loop.call_soon_threadsafe(queue.put_nowait, exc)
        finally:
            loop.call_soon_threadsafe(queue.put_nowait, None)

    # Own threads rather than the shared pool: a request mostly waits on the engine, and the pool's
    # few workers would cap how many requests can share a batch.
    threads = [threading.Thread(target=produce, args=(i,), daemon=True) for i in range(job.n)]
    for thread in threads:
        thread.start()
    try:
        running = job.n
        while running:
            item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        stop.set()
        await asyncio.gather(*(asyncio.to_thread(t.join) for t in threads))
        await asyncio.to_thread(limits.settle, p.db, job.reservation, _usage(usages)["total_tokens"])


def _sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


def _error_event(exc: BaseException) -> bytes:
    return _sse(
        {"error": {"message": f"generation failed: {exc}", "type": "server_error", "param": None, "code": None}}
    )


def _legacy_logprobs(entries: list[dict[str, Any]], offset: int) -> dict[str, Any]:
    """/v1/completions' logprobs shape from the chat-format entries."""
    offsets = []
    for entry in entries:
        offsets.append(offset)
        offset += len(entry["token"])
    return {
        "tokens": [e["token"] for e in entries],
        "token_logprobs": [e["logprob"] for e in entries],
        "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
        "text_offset": offsets,
    }


@dataclass
class _Choice:
    text: list[str]
    logprobs: list[dict[str, Any]]
    finish: str = "stop"


async def _collect(p: Platform, job: Prepared, usages: list[Usage]) -> list[_Choice]:
    choices = [_Choice([], []) for _ in range(job.n)]
    async for index, delta in _stream_deltas(p, job, usages):
        choices[index].text.append(delta.text)
        choices[index].logprobs.extend(delta.logprobs or [])
        choices[index].finish = delta.finish_reason or choices[index].finish
    return choices


@router.post("/chat/completions", response_model=None)
async def chat_completions(
    body: ChatRequest, who: Principal = Depends(principal), p: Platform = Depends(platform)
) -> dict | StreamingResponse:
    job = await run_in_threadpool(_prepare, p, who, body, _messages(body))
    completion_id, created = new_id("chatcmpl-"), int(time.time())
    fingerprint = f"fp_adaptery_{job.base_id}"[:64]
    wants_logprobs = job.params.logprobs

    def chunk(index: int, delta: dict[str, Any], finish: str | None, logprobs: Any = None) -> dict[str, Any]:
        return {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": job.model_id,
            "system_fingerprint": fingerprint,
            "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}],
        }

    usages: list[Usage] = []
    if body.stream:
        include_usage = bool((body.stream_options or {}).get("include_usage"))

        async def events() -> AsyncIterator[bytes]:
            for index in range(job.n):
                yield _sse(chunk(index, {"role": "assistant", "content": ""}, None))
            try:
                async for index, delta in _stream_deltas(p, job, usages):
                    logprobs = {"content": delta.logprobs, "refusal": None} if delta.logprobs else None
                    if delta.text or logprobs:
                        yield _sse(chunk(index, {"content": delta.text}, None, logprobs))
                    if delta.finish_reason:
                        yield _sse(chunk(index, {}, delta.finish_reason))
            except Exception as exc:
                yield _error_event(exc)
                return
            if include_usage:
                yield _sse({**chunk(0, {}, None), "choices": [], "usage": _usage(usages)})
            yield _sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    choices = await _collect(p, job, usages)
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": job.model_id,
        "system_fingerprint": fingerprint,
        "choices": [
            {
                "index": index,
                "message": {"role": "assistant", "content": "".join(c.text), "refusal": None, "annotations": []},
                "logprobs": {"content": c.logprobs, "refusal": None} if wants_logprobs else None,
                "finish_reason": c.finish,
            }
            for index, c in enumerate(choices)
        ],
        "usage": _usage(usages),
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
    wants_logprobs = job.params.logprobs

    def choice(index: int, text: str, finish: str | None, logprobs: Any = None) -> dict[str, Any]:
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}

    def body_of(choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": completion_id,
            "object": "text_completion",
            "created": created,
            "model": job.model_id,
            "choices": choices,
        }

    usages: list[Usage] = []
    if body.stream:

        async def events() -> AsyncIterator[bytes]:
            offsets = [0] * job.n
            try:
                async for index, delta in _stream_deltas(p, job, usages):
                    logprobs = _legacy_logprobs(delta.logprobs or [], offsets[index]) if wants_logprobs else None
                    offsets[index] += len(delta.text)
                    if delta.text or delta.finish_reason:
                        yield _sse(body_of([choice(index, delta.text, delta.finish_reason, logprobs)]))
            except Exception as exc:
                yield _error_event(exc)
                return
            yield _sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    choices = await _collect(p, job, usages)
    return {
        **body_of(
            [
                choice(index, "".join(c.text), c.finish, _legacy_logprobs(c.logprobs, 0) if wants_logprobs else None)
                for index, c in enumerate(choices)
            ]
        ),
        "usage": _usage(usages),
    }
