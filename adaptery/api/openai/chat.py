"""/v1/chat/completions and /v1/completions, streamed (SSE) or whole.

A request is refused before it costs anything: its options first, then its text against what the model's
context could hold (before the chat template or the tokenizer runs), then its tokens (none at all: a 400,
never an engine slot). Once accepted, its reservation against the caller's limits is held and its n choices
start, one task each on the event loop (`_Choices`). Whatever ends the request (the answer, an error, the
client going away mid-stream or while a whole answer is computed) stops the choices within one engine poll,
and the last choice to end settles the reservation: a client that is gone never keeps its concurrency slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.types import Receive, Scope, Send

from adaptery.api.deps import platform, principal
from adaptery.auth.policy import require
from adaptery.auth.principal import Principal
from adaptery.data.chat import arguments_object, canonical_call, canonical_tools, schema_problem, tools_errors
from adaptery.data.chat_template import ChatTemplateError
from adaptery.db.ids import new_id
from adaptery.engine.constraints import JSON_OBJECT_SCHEMA, call_schema, json_grammar, tool_call_grammar
from adaptery.engine.generation import (
    AdapterRejected,
    AdapterSpec,
    Delta,
    GenerationFailed,
    GenerationTimedOut,
    PromptTooLong,
    UnsupportedConstraint,
    Usage,
)
from adaptery.engine.sampling import Constraint, SamplingParams
from adaptery.engine.stopping import StopSignal
from adaptery.engine.tool_calls import ToolFormat, call_id
from adaptery.platform import Platform
from adaptery.services import feedback, limits, model_names, models
from adaptery.services.errors import BadGateway, InvalidRequest, ServerError, TimedOut
from adaptery.services.inference import AgentProtocolError

router = APIRouter(prefix="/v1", tags=["inference"])
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
MAX_CHOICES = 16
VERSION_HEADER = "X-Adaptery-Model-Version"
MAX_STOP_CHARS = 256  # each stop sequence is searched for in the text after every token
MAX_LOGIT_BIAS = 1024  # token ids one request may bias


def _logit_bias(given: dict[str, float] | None, vocab: int) -> dict[int, float]:
    """OpenAI's `logit_bias` (token id as a string -> -100..100), checked against the model's vocabulary."""
    if not given:
        return {}
    if len(given) > MAX_LOGIT_BIAS:
        raise InvalidRequest(f"logit_bias may bias at most {MAX_LOGIT_BIAS} tokens", param="logit_bias")
    bias: dict[int, float] = {}
    for key, value in given.items():
        if not key.isdigit() or int(key) >= vocab:
            raise InvalidRequest(
                f"logit_bias: {key!r} is not a token id of this model (0 to {vocab - 1})", param="logit_bias"
            )
        if not -100 <= value <= 100:
            raise InvalidRequest(
                f"logit_bias: the bias of token {key} must be between -100 and 100", param="logit_bias"
            )
        bias[int(key)] = value
    return bias


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict[str, Any]] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


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
    logit_bias: dict[str, float] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    n: int | None = Field(None, ge=1, le=MAX_CHOICES)


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None


class CompletionRequest(SamplingFields):
    prompt: str | list[str]
    echo: bool | None = None
    logprobs: int | None = Field(None, ge=0, le=5)

    @field_validator("prompt", mode="before")
    @classmethod
    def _text_only(cls, value: Any) -> Any:
        if isinstance(value, list) and not all(isinstance(item, str) for item in value):
            raise ValueError("token-id prompts are not supported; send text")
        return value


@dataclass(frozen=True)
class ToolCalling:
    format: ToolFormat  # the model family's call syntax
    parallel: bool  # parallel_tool_calls: more than one call per answer
    grammar: Constraint | None  # tool_choice required / named: the output must be calls


class _CallReader:
    """One choice's output as content and tool calls, fed as it streams: content is passed on until a call
    starts (text that may begin one is held back), the call text is kept and parsed at the end, so a streamed
    answer's calls are exactly the non-streamed answer's."""

    def __init__(self, calling: ToolCalling | None) -> None:
        self.calling = calling
        self.held = ""
        self.call_text: str | None = None

    def feed(self, text: str) -> str:
        """The content that may be sent now."""
        if self.calling is None:
            return text
        if self.call_text is not None:
            self.call_text += text
            return ""
        text = self.held + text
        start = self.calling.format.call_start(text)
        if start >= 0:
            self.call_text, self.held = text[start:], ""
            return text[:start]
        hold = self.calling.format.may_start_call(text)
        self.held = text[len(text) - hold :]
        return text[: len(text) - hold]

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        """(content still to send, the tool calls) once the output is complete."""
        if self.calling is None:
            return "", []
        if self.call_text is None:
            rest, self.held = self.held, ""
            return rest, []
        content, calls = self.calling.format.parse(self.call_text)
        if not calls:
            return self.call_text, []
        calls = calls if self.calling.parallel else calls[:1]
        made = [{"id": call_id(), "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                for c in calls]  # fmt: skip
        return content, made


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
    tenant_id: str = ""  # the engine shares its batch fairly between tenants
    tools: ToolCalling | None = None  # how to read tool calls in the output; None: it is all content
    answered_by: str | None = None  # a stable name's request: the version (adapter id) routed to answer it
    keeps_completions: bool = False  # the tenant's feedback policy kept answers when the request came (see again)

    def headers(self) -> dict[str, str]:
        """The version that answered a stable name's request (the body's `model` is the name, as asked)."""
        return {VERSION_HEADER: self.answered_by} if self.answered_by else {}

    def choice_params(self, index: int) -> SamplingParams:
        """Choice i samples with seed + i: the n choices differ, and each is reproducible."""
        if self.params.seed is None or index == 0:
            return self.params
        return replace(self.params, seed=self.params.seed + index)


def _unicode(text: str, param: str) -> str:
    """`text`, or a 400 naming `param` when it holds a lone surrogate (JSON's "\\ud800"), which no tokenizer takes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        message = f"{param} is not valid Unicode: a lone surrogate at character {exc.start}"
        raise InvalidRequest(message, param=param) from None
    return text


def _text_of(message: ChatMessage, index: int) -> str:
    if message.content is None:
        return ""
    if isinstance(message.content, str):
        return _unicode(message.content, f"messages[{index}].content")
    parts = []
    for part in message.content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise InvalidRequest(
                f"only text content parts are supported (got type {part.get('type')!r})",
                param=f"messages[{index}].content",
            )
        parts.append(part["text"])
    return _unicode("".join(parts), f"messages[{index}].content")


def _messages(body: ChatRequest) -> list[dict[str, Any]]:
    """The request's messages in the canonical form (`data.chat`), tool calls and results included."""
    out = []
    for i, message in enumerate(body.messages):
        role = _ROLES.get(message.role)
        if role is None:
            raise InvalidRequest(
                f"Invalid value: '{message.role}'. Supported roles: system, developer, user, assistant, tool.",
                param=f"messages[{i}].role",
            )
        turn: dict[str, Any] = {"role": role, "content": _text_of(message, i)}
        if role == "assistant" and message.tool_calls:
            turn["tool_calls"] = [_past_call(call, f"messages[{i}].tool_calls[{j}]")
                                  for j, call in enumerate(message.tool_calls)]  # fmt: skip
        if role == "tool":
            if not message.tool_call_id:
                raise InvalidRequest("a tool message needs the tool_call_id it answers", param=f"messages[{i}]")
            turn["tool_call_id"] = message.tool_call_id
        out.append(turn)
    return out


def _past_call(call: dict[str, Any], param: str) -> dict[str, Any]:
    function = call.get("function")
    if (
        not isinstance(call.get("id"), str)
        or not isinstance(function, dict)
        or not isinstance(function.get("name"), str)
    ):
        raise InvalidRequest("a tool call needs an id and a function with a name and arguments", param=param)
    _, problem = arguments_object(function.get("arguments", "{}"))
    if problem:
        raise InvalidRequest(f"the arguments {problem}", param=f"{param}.function.arguments")
    return canonical_call(call)


def _tool_calling(p: Platform, body: ChatRequest, base: Any, adapter: AdapterSpec | None) -> ToolCalling | None:
    """How the output's tool calls are read and, for required / named, the grammar that forces one."""
    if not body.tools:
        if body.tool_choice not in (None, "none", "auto"):
            raise InvalidRequest("tool_choice needs tools", param="tool_choice")
        return None
    fmt = p.engine.tool_format(base.id, base.ref, adapter)
    if fmt is None:
        raise InvalidRequest(f"The model '{body.model}' has no tool calling: its chat template does not render tools",
                             param="tools", code="tools_not_supported")  # fmt: skip
    choice = body.tool_choice or "auto"
    functions = [tool["function"] for tool in canonical_tools(body.tools)]
    if isinstance(choice, dict):
        function = choice.get("function") if choice.get("type") == "function" else None
        name = function.get("name") if isinstance(function, dict) else None
        chosen = [f for f in functions if f["name"] == name]
        if not chosen:
            raise InvalidRequest(f"tool_choice names {name!r}, which is not in tools", param="tool_choice")
        functions, parallel = chosen, False
    elif choice not in ("none", "auto", "required"):
        raise InvalidRequest(f"Invalid value: {choice!r}. Supported: none, auto, required, or a named function.",
                             param="tool_choice")  # fmt: skip
    else:
        parallel = body.parallel_tool_calls is not False
    if choice == "none":
        return None
    grammar = None
    if choice != "auto":
        grammar = tool_call_grammar(fmt.opener, fmt.closer, [call_schema(f) for f in functions], parallel)
        _check_constraint(p, grammar, "tools")
    return ToolCalling(fmt, body.parallel_tool_calls is not False, grammar)


def _response_format(p: Platform, body: ChatRequest) -> Constraint | None:
    spec = body.response_format
    if spec is None or spec.get("type") == "text":
        return None
    if spec.get("type") == "json_object":
        return json_grammar(JSON_OBJECT_SCHEMA)
    if spec.get("type") != "json_schema":
        raise InvalidRequest(f"Invalid value: {spec.get('type')!r}. Supported: text, json_object, json_schema.",
                             param="response_format.type")  # fmt: skip
    described = spec.get("json_schema")
    schema = described.get("schema", {}) if isinstance(described, dict) else None
    problem = schema_problem(schema) if schema is not None else "is missing"
    if problem:
        raise InvalidRequest(f"response_format.json_schema.schema {problem}", param="response_format.json_schema")
    grammar = json_grammar(schema)
    _check_constraint(p, grammar, "response_format.json_schema")
    return grammar


def _check_constraint(p: Platform, grammar: Constraint, param: str) -> None:
    try:
        p.engine.check_constraint(grammar)
    except UnsupportedConstraint as exc:
        raise InvalidRequest(f"This schema cannot be enforced: {exc}", param=param,
                             code="unsupported_schema") from exc  # fmt: skip


def _completion_prompt(body: CompletionRequest) -> str:
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if len(prompts) != 1:
        raise InvalidRequest("exactly one prompt per request is supported", param="prompt")
    return _unicode(prompts[0], "prompt")


def _check_supported(body: SamplingFields) -> None:
    if isinstance(body, ChatRequest) and body.tools:
        problems, _ = tools_errors(0, body.tools)
        if problems:
            raise InvalidRequest(f"{problems[0].field}: {problems[0].message}", param=problems[0].field)
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


def _prepare(
    p: Platform,
    who: Principal,
    body: ChatRequest | CompletionRequest,
    request_id: str,
    *,
    blind: bool = False,
    caller: limits.CallerLimits | None = None,
) -> Prepared:
    """`request_id`: the completion's id, which picks a stable name's version (its canary split) and records it;
    a `blind` one (an arena side) is not recorded: the name's request counter would name the side before the vote
    (the arena counts its sides at the vote)."""
    require(who, "infer")
    _check_supported(body)
    chat = isinstance(body, ChatRequest)
    tools = canonical_tools(body.tools) if chat and body.tools else None
    prompt = _messages(body) if chat else _completion_prompt(body)
    prompt_param = "messages" if chat else "prompt"
    with p.db.tenant(who.tenant_id) as s:
        # an lm-eval run's calls are the evaluation's, not a person's answers to give feedback on
        keeps = (
            chat and not (caller and caller.evaluation_key) and feedback.get_policy(s, who.tenant_id).keeps_completions
        )
        ref = models.get_model(s, body.model, viewer=who, checkpoints=True)
        answered_by = None
        if ref.name is not None:  # resolved now: a promotion or a rollback reaches the very next request
            ref = replace(ref, adapter=model_names.route(s, ref, request_id, who, record=not blind).adapter)
            answered_by = ref.adapter.id
        adapter = None
        if ref.adapter:
            adapter = AdapterSpec(ref.adapter.sha256, p.adapter_dir(ref.adapter), dict(ref.adapter.manifest))
    if adapter is not None:
        try:
            p.engine.check_adapter(adapter)
        except AdapterRejected as exc:
            raise InvalidRequest(f"The model '{body.model}' cannot be served: {exc}", param="model",
                                 code="adapter_not_supported") from exc  # fmt: skip
    base = ref.base
    calling = _tool_calling(p, body, base, adapter) if chat else None
    constraint = calling.grammar if calling and calling.grammar else (_response_format(p, body) if chat else None)
    try:
        if chat:
            prompt_ids = p.engine.chat_prompt(base.id, base.ref, prompt, adapter, tools)
        else:
            prompt_ids = p.engine.text_prompt(base.id, base.ref, prompt)
    except PromptTooLong as exc:
        raise InvalidRequest(str(exc), param=prompt_param, code="context_length_exceeded") from exc
    except ChatTemplateError as exc:  # the model's template (an imported adapter's, say) failed or ran over budget
        raise InvalidRequest(f"The chat template of '{body.model}' cannot format these messages: {exc}",
                             param=prompt_param, code="invalid_chat_template") from exc  # fmt: skip
    if not prompt_ids:
        empty = "the messages give no tokens with this model's chat template" if chat else "the prompt is empty"
        raise InvalidRequest(f"Nothing to continue from: {empty}. Send some text.", param=prompt_param)
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
        raise InvalidRequest(str(exc), param=prompt_param, code="context_length_exceeded") from exc
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > 4:
        raise InvalidRequest("at most 4 stop sequences are allowed", param="stop")
    if any(len(sequence) > MAX_STOP_CHARS for sequence in stop):
        raise InvalidRequest(f"a stop sequence may be at most {MAX_STOP_CHARS} characters long", param="stop")
    logit_bias = _logit_bias(body.logit_bias, p.engine.base(base.id, base.ref).vocab)
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
        constraint=constraint,
        logit_bias=logit_bias,
    )
    n = body.n or 1
    held = limits.reserve(
        p.db,
        who,
        prompt_tokens=len(prompt_ids),
        max_tokens=max_tokens * n,
        hold_seconds=p.settings.inference_hold_seconds,
        model=answered_by or ref.id,  # the ledger counts a name's usage per version
        prices=p.settings.usage_prices,
        caller=caller,
    )
    return Prepared(
        ref.id, base.id, base.ref, adapter, prompt_ids, params, n, held, who.tenant_id, calling, answered_by, keeps
    )


def _usage(usages: list[Usage]) -> dict[str, int]:
    prompt = usages[0].prompt_tokens if usages else 0
    completion = sum(u.completion_tokens for u in usages)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


_PRODUCING: set[asyncio.Task[None]] = set()


class _Choices:
    """A request's n choices running in the engine, one task each on the event loop, and the reservation they hold.

    `stop()` may be called from anywhere, any number of times, and never waits, so it runs even in a task being
    cancelled: the choices see it at once and end, freeing their batch slots. The last choice to end settles the
    reservation, before it reports its end, so whoever reads `deltas()` to the end finds the ledger settled, and
    nobody needs to for the slot to be given back (the tasks are the request's own, not the response's).
    """

    def __init__(
        self, p: Platform, job: Prepared, *, streamed: bool, on_answer: Callable[[list[str]], None] | None = None
    ) -> None:
        self.n = job.n
        self.streamed = streamed
        self.usages = [Usage() for _ in range(job.n)]
        self.texts: list[list[str]] = [[] for _ in range(job.n)]
        self._on_answer = on_answer
        self._queue: asyncio.Queue[tuple[int, Delta] | BaseException | None] = asyncio.Queue()
        self._stop = StopSignal()  # wakes the choices where they wait, not polled
        self._running = job.n
        self._failed = False
        loop = asyncio.get_running_loop()
        for index in range(job.n):
            task = loop.create_task(self._produce(p, job, index))
            _PRODUCING.add(task)  # the loop holds tasks weakly: a choice must outlive a response nobody reads
            task.add_done_callback(_PRODUCING.discard)

    def stop(self) -> None:
        self._stop.set()

    async def _produce(self, p: Platform, job: Prepared, index: int) -> None:
        try:
            deltas = p.inference.generate(  # the embedded engine, or an infer agent serving the base
                job.base_id, job.base_ref, job.adapter, job.prompt_ids, job.choice_params(index), self.usages[index],
                should_stop=self._stop, tenant_id=job.tenant_id, streamed=self.streamed,
            )  # fmt: skip
            async with contextlib.aclosing(deltas):
                async for delta in deltas:
                    self.texts[index].append(delta.text)
                    self._queue.put_nowait((index, delta))
        except asyncio.CancelledError:  # the server is stopping: the choice is settled as failed
            self._failed = True
            self._queue.put_nowait(GenerationFailed("the server is stopping"))
            raise
        except Exception as exc:  # delivered to the reader: an error chunk, or an error response
            self._failed = True
            self._queue.put_nowait(exc)
        finally:
            self._running -= 1
            if self._running == 0:
                try:
                    await run_in_threadpool(self._end, p, job)
                except Exception as exc:
                    self._queue.put_nowait(exc)
            self._queue.put_nowait(None)

    def _end(self, p: Platform, job: Prepared) -> None:
        """On the thread pool, once for the request (one hand-off, not two): settle the reservation, then give a
        complete answer (every choice ended well, none stopped) to `on_answer`."""
        used = _usage(self.usages)
        limits.settle(
            p.db, job.reservation, prompt_tokens=used["prompt_tokens"], completion_tokens=used["completion_tokens"],
            failed=self._failed,
        )  # fmt: skip
        if self._on_answer is not None and not self._failed and not self._stop.is_set():
            self._on_answer(["".join(text) for text in self.texts])

    async def deltas(self) -> AsyncIterator[tuple[int, Delta]]:
        """(choice index, delta) as they come; the first error stops the other choices and is raised once all
        have ended."""
        failure: BaseException | None = None
        try:
            running = self.n
            while running:
                item = await self._queue.get()
                if item is None:
                    running -= 1
                elif isinstance(item, BaseException):
                    failure = failure or item
                    self.stop()
                elif failure is None:
                    yield item
        finally:
            self.stop()  # a reader that leaves early (an error, a cancelled task) leaves nobody to read them
        if failure is not None:
            raise failure


class _ChoicesStream(StreamingResponse):
    """The choices as server-sent events. However the response ends (sent in full, failed, or the client gone,
    noticed by Starlette as a disconnect or a failed send, or the task cancelled) the choices are stopped."""

    def __init__(self, events: AsyncIterator[bytes], choices: _Choices, headers: dict[str, str]) -> None:
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache", **headers})
        self.choices = choices

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.choices.stop()


async def _stop_when_gone(request: Request, choices: _Choices) -> None:
    # the body was read already, so the next message the server delivers is the client's disconnect
    while (await request.receive())["type"] != "http.disconnect":
        pass
    choices.stop()


def _sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


def _error_event(exc: BaseException) -> bytes:
    code = "timeout" if isinstance(exc, GenerationTimedOut) else None
    return _sse(
        {"error": {"message": f"generation failed: {exc}", "type": "server_error", "param": None, "code": code}}
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


async def _collect(choices: _Choices, request: Request) -> list[_Choice]:
    """The whole answer; a client that disconnects meanwhile stops the choices (nobody is left to read them)."""
    answers = [_Choice([], []) for _ in range(choices.n)]
    watch = asyncio.create_task(_stop_when_gone(request, choices))
    try:
        async for index, delta in choices.deltas():
            answers[index].text.append(delta.text)
            answers[index].logprobs.extend(delta.logprobs or [])
            answers[index].finish = delta.finish_reason or answers[index].finish
    except GenerationTimedOut as exc:
        raise TimedOut(f"generation failed: {exc}", code="timeout") from exc
    except AgentProtocolError as exc:
        raise BadGateway(f"generation failed: {exc}", code="agent_protocol_error") from exc
    except GenerationFailed as exc:
        raise ServerError(f"generation failed: {exc}") from exc
    finally:
        watch.cancel()
    return answers


# Called once every choice of a chat completion has ended well: (completion id, model id, each choice's text).
AnswerHook = Callable[[str, str, list[str]], None]


@router.post("/chat/completions", response_model=None)
async def chat_completions(
    body: ChatRequest,
    request: Request,
    response: Response,
    who: Principal = Depends(principal),
    p: Platform = Depends(platform),
) -> dict | StreamingResponse:
    def keep(completion_id: str, model_id: str, texts: list[str]) -> None:  # when the tenant's policy keeps them
        key = p.keyring.data_key(who.tenant_id)
        feedback.keep_completion(p.db, key, who, completion_id, model=model_id, messages=_messages(body), answers=texts)

    return await answer_chat(p, who, body, request, response=response, on_answer=keep, by_policy=True)


async def answer_chat(
    p: Platform,
    who: Principal,
    body: ChatRequest,
    request: Request,
    *,
    response: Response | None = None,
    on_answer: AnswerHook | None = None,
    by_policy: bool = False,
    shown_model: str | None = None,
) -> dict | StreamingResponse:
    """A chat completion, whole or streamed. `shown_model` replaces the model's id in the answer (the arena's
    blind sides: then no header names the version either); `on_answer` runs, off the event loop, once the answer is
    complete, with the model that answered (a stable name's version); `by_policy`: only when the tenant's feedback
    policy kept completions when the request came (read with its model; the hook reads it again at the end)."""
    completion_id, created = new_id("chatcmpl-"), int(time.time())
    caller = getattr(request.state, "caller_limits", None)  # as `principal` read them
    job = await run_in_threadpool(
        partial(_prepare, blind=shown_model is not None, caller=caller), p, who, body, completion_id
    )
    answered = job.answered_by or job.model_id  # a canary's feedback is counted for the version that answered
    wanted = on_answer is not None and (job.keeps_completions or not by_policy)
    hook = partial(on_answer, completion_id, answered) if wanted else None
    choices = _Choices(p, job, streamed=bool(body.stream), on_answer=hook)
    fingerprint = f"fp_adaptery_{job.base_id}"[:64]
    wants_logprobs = job.params.logprobs
    model_label = shown_model or job.model_id

    def chunk(index: int, delta: dict[str, Any], finish: str | None, logprobs: Any = None) -> dict[str, Any]:
        return {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model_label,
            "system_fingerprint": fingerprint,
            "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}],
        }

    if body.stream:
        include_usage = bool((body.stream_options or {}).get("include_usage"))

        readers = [_CallReader(job.tools) for _ in range(job.n)]

        async def events() -> AsyncIterator[bytes]:
            for index in range(job.n):
                yield _sse(chunk(index, {"role": "assistant", "content": ""}, None))
            try:
                async for index, delta in choices.deltas():
                    logprobs = {"content": delta.logprobs, "refusal": None} if delta.logprobs else None
                    content = readers[index].feed(delta.text)
                    if content or logprobs:
                        yield _sse(chunk(index, {"content": content}, None, logprobs))
                    if delta.finish_reason:
                        rest, calls = readers[index].finish()
                        if rest:
                            yield _sse(chunk(index, {"content": rest}, None))
                        for position, call in enumerate(calls):  # as OpenAI streams them: id and name, then arguments
                            opening = {**call, "function": {"name": call["function"]["name"], "arguments": ""}}
                            yield _sse(chunk(index, {"tool_calls": [{"index": position, **opening}]}, None))
                            arguments = {"index": position, "function": {"arguments": call["function"]["arguments"]}}
                            yield _sse(chunk(index, {"tool_calls": [arguments]}, None))
                        yield _sse(chunk(index, {}, _finish_reason(delta.finish_reason, calls)))
            except Exception as exc:
                yield _error_event(exc)
                return
            if include_usage:
                yield _sse({**chunk(0, {}, None), "choices": [], "usage": _usage(choices.usages)})
            yield _sse("[DONE]")

        return _ChoicesStream(events(), choices, job.headers() if shown_model is None else {})

    answers = await _collect(choices, request)
    if response is not None and shown_model is None:
        response.headers.update(job.headers())
    messages = [_message(job.tools, "".join(c.text)) for c in answers]
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model_label,
        "system_fingerprint": fingerprint,
        "choices": [
            {
                "index": index,
                "message": message,
                "logprobs": {"content": c.logprobs, "refusal": None} if wants_logprobs else None,
                "finish_reason": _finish_reason(c.finish, message.get("tool_calls")),
            }
            for index, (c, message) in enumerate(zip(answers, messages, strict=True))
        ],
        "usage": _usage(choices.usages),
    }


def _message(calling: ToolCalling | None, text: str) -> dict[str, Any]:
    reader = _CallReader(calling)
    content = reader.feed(text)
    rest, calls = reader.finish()
    content += rest
    message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None, "annotations": []}
    if calls:
        message["content"] = content if content.strip() else None
        message["tool_calls"] = calls
    return message


def _finish_reason(finish: str, calls: list[dict[str, Any]] | None) -> str:
    return "tool_calls" if calls and finish == "stop" else finish


@router.post("/completions", response_model=None)
async def completions(
    body: CompletionRequest,
    request: Request,
    response: Response,
    who: Principal = Depends(principal),
    p: Platform = Depends(platform),
) -> dict | StreamingResponse:
    completion_id, created = new_id("cmpl-"), int(time.time())
    caller = getattr(request.state, "caller_limits", None)  # as `principal` read them
    job = await run_in_threadpool(partial(_prepare, caller=caller), p, who, body, completion_id)
    choices = _Choices(p, job, streamed=bool(body.stream))
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

    if body.stream:

        async def events() -> AsyncIterator[bytes]:
            offsets = [0] * job.n
            try:
                async for index, delta in choices.deltas():
                    logprobs = _legacy_logprobs(delta.logprobs or [], offsets[index]) if wants_logprobs else None
                    offsets[index] += len(delta.text)
                    if delta.text or delta.finish_reason:
                        yield _sse(body_of([choice(index, delta.text, delta.finish_reason, logprobs)]))
            except Exception as exc:
                yield _error_event(exc)
                return
            yield _sse("[DONE]")

        return _ChoicesStream(events(), choices, job.headers())

    answers = await _collect(choices, request)
    response.headers.update(job.headers())
    return {
        **body_of(
            [
                choice(index, "".join(c.text), c.finish, _legacy_logprobs(c.logprobs, 0) if wants_logprobs else None)
                for index, c in enumerate(answers)
            ]
        ),
        "usage": _usage(choices.usages),
    }
