"""Where a request's tokens are generated: the embedded engine, or an infer agent over NATS.

`Inference.generate` (the engine's own signature, as an async iterator on the HTTP server's event loop) chooses
per request: the router's agent for the base if there is one (`services/inference_router.py`), else the embedded
engine, as before agents could serve. The prompt was tokenised and checked against limits by the caller either
way, so usage and limits do not depend on where the tokens came from. An agent's stream is relayed on the event
loop itself (no thread per request); the embedded engine's reader blocks, so it has a thread.

A request on an agent streams back with sequence numbers (`messaging/streams.py`). An agent that goes silent
(no message, keepalives included, for `idle_seconds`, or lost to the router) or whose stream has a gap is lost:
before the first token the request is sent elsewhere (another agent, at last the embedded engine) and the caller
never knows; after it, the request fails with GenerationFailed, which the API turns into an error event. The
request is cancelled on the agent whenever it ends early (the client went away): its slot is freed at once.

An agent whose engine is down (its vLLM server died, say) ends the request with `"retryable": true`, which it
says only when it streamed nothing: that is an agent lost too (retried elsewhere, the agent not chosen until it
announces again); once a token was delivered the request fails as any other.

Keepalives prove an agent is there, not that it works: one that sends no token within `first_token_seconds`
(`inference_first_token_seconds`) is lost the same way (retried elsewhere, unseen by the client, and not chosen
until it announces again), and a stream with no token for `stall_seconds` (the engine's request timeout) after
the first one ends with an error.

The agent's word is not taken for usage: each delta says how many tokens are behind it, the control plane adds
them up (`messaging.streams.StreamAccount`) and bills that sum with the prompt it tokenised itself; the end
marker's usage is ignored. A stream that claims the impossible (more tokens than max_tokens, more text than its
tokens can hold, a negative or non-integer count) is a protocol error: the offending delta is not delivered, the
request is cancelled on the agent, the agent is marked broken, and the request goes elsewhere before the first
token or ends with AgentProtocolError (an error event; 502 when not streamed) after it. An overrun is not cut
to max_tokens with finish_reason "length": an honest engine stops there itself, and without the token ids the
text cannot be cut at a token boundary, so an overrun proves the agent wrong and the answer is not trusted.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from functools import partial
from typing import Any

from adaptery.engine.generation import AdapterSpec, Delta, GenerationFailed, GenerationTimedOut, InferenceEngine, Usage
from adaptery.engine.sampling import SamplingParams
from adaptery.engine.stopping import WAKE, listening_on_loop
from adaptery.messaging import protocol
from adaptery.messaging.protocol import InferRequest
from adaptery.messaging.streams import StreamAccount, StreamBroken, StreamInvalid, StreamReassembly
from adaptery.services.control_plane import ControlPlane
from adaptery.services.inference_router import InferenceRouter

log = logging.getLogger("adaptery.inference")
# What an agent needs of an adapter: its weights (safetensors only) and config; the prompt is formatted here.
_AGENT_FILES = ("adapter_config.json", ".safetensors")


class AgentLost(RuntimeError):
    """The agent stopped answering, or its stream broke."""


class AgentMisbehaved(AgentLost):
    """The agent's stream broke the protocol (`messaging.streams.StreamAccount`): more tokens than max_tokens,
    more bytes than its tokens can hold, a malformed count."""


class AgentProtocolError(GenerationFailed):
    """An answer already under way ended because its agent broke the protocol (the API says 502)."""


class AgentBackend:
    """One request on one agent, as deltas; AgentLost when the agent goes away.

    It runs on the HTTP server's event loop: the control plane's NATS loop hands the stream's messages to it (all
    those of one message from the agent, which carries a step's deltas of all its requests from this process, in
    one wake-up of this loop), and no thread waits on a request. A thread per request, as before, cost the server
    two thread wake-ups per message (the NATS loop's, then the thread's own hand-off to the event loop) and a
    thread's start.
    """

    def __init__(
        self,
        control: ControlPlane,
        router: InferenceRouter,
        idle_seconds: float,
        max_bytes_per_token: int,
        first_token_seconds: float = 30.0,
        stall_seconds: float = 600.0,
    ) -> None:
        self.control = control
        self.router = router
        self.idle_seconds = idle_seconds
        self.first_token_seconds = first_token_seconds
        self.stall_seconds = stall_seconds
        self.max_bytes_per_token = max_bytes_per_token

    async def generate_on(
        self,
        agent_id: str,
        base_id: str,
        adapter: AdapterSpec | None,
        prompt_ids: list[int],
        params: SamplingParams,
        usage: Usage,
        should_stop: Callable[[], bool],
        tenant_id: str,
        streamed: bool = True,
    ) -> AsyncIterator[Delta]:
        files = None
        if adapter is not None:
            files = {name: sha for name, sha in (adapter.files or {}).items() if name.endswith(_AGENT_FILES)}
        request = InferRequest(
            request_id=self.control.new_request_id(),
            base_id=base_id,
            prompt_ids=list(prompt_ids),
            params=dataclasses.asdict(params),
            adapter_key=adapter.key if adapter is not None else None,
            adapter_files=files,
            fairness_key=tenant_id,
            streamed=streamed,
            batched=True,
        )
        usage.prompt_tokens, usage.completion_tokens = len(prompt_ids), 0
        items: asyncio.Queue[Any] = asyncio.Queue()
        try:
            stream = await self.control.open_stream(agent_id, tenant_id, request, items.put_nowait)
        except Exception as exc:  # the bus is down or restarting: nothing was sent, so it may go elsewhere
            self.router.finished(agent_id)
            raise AgentLost(f"agent {agent_id} was lost: the request could not be sent ({exc})") from exc
        relay = _Relay(self, agent_id, params, usage)
        try:
            with listening_on_loop(should_stop, items, self._check_seconds()):
                while not relay.ended:
                    if should_stop():
                        return
                    relay.check_progress()
                    raw = await items.get()
                    if raw is WAKE:
                        relay.quiet()
                    elif (delta := relay.accept(raw)) is not None:
                        yield delta
        except AgentLost:
            self.router.mark_broken(agent_id)
            raise
        finally:
            if not relay.ended:
                self.control.cancel_stream(stream)
            self.control.close_stream(stream)
            self.router.finished(agent_id)

    def _check_seconds(self) -> float:
        """How often the relay looks at the agent's deadlines while its stream is quiet (a stop wakes it)."""
        return min(1.0, self.idle_seconds / 4, self.first_token_seconds / 4, self.stall_seconds / 4)


class _Relay:
    """One agent's stream, message by message: the deltas it carries, its protocol and its deadlines checked."""

    def __init__(self, backend: AgentBackend, agent_id: str, params: SamplingParams, usage: Usage) -> None:
        self.backend, self.agent_id, self.usage = backend, agent_id, usage
        self.reassembly = StreamReassembly()
        self.account = StreamAccount(
            params.max_tokens, backend.max_bytes_per_token, params.top_logprobs, params.logprobs
        )
        self.heard = self.progressed = time.monotonic()
        self.tokens_seen = False

    @property
    def ended(self) -> bool:
        return self.reassembly.ended

    def quiet(self) -> None:
        """Nothing came for a while: AgentLost if the agent has been silent too long or the router lost it."""
        backend, agent_id = self.backend, self.agent_id
        if time.monotonic() - self.heard > backend.idle_seconds:
            raise AgentLost(f"agent {agent_id} was lost: nothing from it for {backend.idle_seconds:g} s")
        if backend.router.is_lost(agent_id):
            raise AgentLost(f"agent {agent_id} was lost: it stopped announcing itself")

    def check_progress(self) -> None:
        """AgentLost for an agent that took the request and sent only keepalives past the deadline."""
        backend, quiet = self.backend, time.monotonic() - self.progressed
        limit = backend.stall_seconds if self.tokens_seen else backend.first_token_seconds
        if quiet > limit:
            backend.router.penalise(self.agent_id)
            raise AgentLost(f"agent {self.agent_id} sent no token for {limit:g} s")

    def accept(self, raw: bytes) -> Delta | None:
        """The delta a message carries (None for a keepalive, an out-of-order message held back, the end)."""
        agent_id, account = self.agent_id, self.account
        self.heard = time.monotonic()
        try:
            account.received(len(raw))
            message = self.reassembly.accept(protocol.decode(raw))
            if message is None:
                return None
            if message.get("end"):
                account.end(message)
            elif "text" in message:
                text, finish, logprobs = account.delta(message)
        except StreamInvalid as exc:
            raise AgentMisbehaved(f"agent {agent_id} broke the stream protocol: {exc}") from exc
        except (StreamBroken, ValueError) as exc:
            raise AgentLost(f"the stream from agent {agent_id} was lost: {exc}") from exc
        if message.get("end"):
            if message.get("error") and message.get("retryable"):  # its engine is down: go elsewhere
                raise AgentLost(f"agent {agent_id} could not serve the request: {message['error']}")
            if message.get("error"):
                error = GenerationTimedOut if message.get("timeout") else GenerationFailed
                raise error(str(message["error"]))
            return None
        if "text" not in message:
            return None
        if text or finish:
            self.tokens_seen, self.progressed = True, time.monotonic()
        self.usage.completion_tokens = account.tokens  # counted here: what the client receives
        return Delta(text, finish, logprobs=logprobs)


class Inference:
    """The backend chat.py calls: an agent serving the base if the router finds one, else the embedded engine."""

    def __init__(
        self,
        engine: InferenceEngine,
        router: InferenceRouter,
        control: Callable[[], ControlPlane | None],
        *,
        idle_seconds: float,
        first_token_seconds: float = 30.0,
        stall_seconds: float = 600.0,
        max_bytes_per_token: int,
        kv_needed: Callable[[list[int], SamplingParams], int] = lambda ids, p: len(ids) + p.max_tokens,
    ) -> None:
        self.engine = engine
        self.router = router
        self._control = control
        self.idle_seconds = idle_seconds
        self.first_token_seconds = first_token_seconds
        self.stall_seconds = stall_seconds
        self.max_bytes_per_token = max_bytes_per_token
        self.kv_needed = kv_needed

    async def generate(
        self,
        base_id: str,
        ref: str,
        adapter: AdapterSpec | None,
        prompt_ids: list[int],
        params: SamplingParams,
        usage: Usage,
        should_stop: Callable[[], bool] = lambda: False,
        tenant_id: str = "",
        streamed: bool = True,
    ) -> AsyncIterator[Delta]:
        """The answer's deltas, on the running event loop. `streamed`: whether the client reads the answer as it
        comes (an agent sends a whole answer's deltas in fewer messages)."""
        control = self._control()
        tried: list[str] = []
        while control is not None:
            agent_id = self.router.pick(
                base_id,
                adapter.key if adapter is not None else None,
                tenant_id=tenant_id,
                needed_tokens=self.kv_needed(prompt_ids, params),
                exclude=tried,
            )
            if agent_id is None:
                break
            remote = AgentBackend(
                control,
                self.router,
                self.idle_seconds,
                self.max_bytes_per_token,
                self.first_token_seconds,
                self.stall_seconds,
            )
            started = False
            try:
                deltas = remote.generate_on(
                    agent_id, base_id, adapter, prompt_ids, params, usage, should_stop, tenant_id, streamed
                )  # fmt: skip
                async with contextlib.aclosing(deltas):
                    async for delta in deltas:
                        started = True
                        yield delta
                return
            except AgentLost as exc:
                if started and isinstance(exc, AgentMisbehaved):
                    raise AgentProtocolError(f"{exc}; the answer is incomplete") from exc
                if started:
                    raise GenerationFailed(f"{exc}; the answer is incomplete") from exc
                log.warning("%s before the first token; sending the request elsewhere", exc)
                tried.append(agent_id)
        deltas = _on_a_thread(
            partial(self.engine.generate, base_id, ref, adapter, prompt_ids, params, usage,
                    should_stop=should_stop, fairness_key=tenant_id)
        )  # fmt: skip
        async with contextlib.aclosing(deltas):
            async for delta in deltas:
                yield delta


async def _on_a_thread(deltas: Callable[[], Iterator[Delta]]) -> AsyncIterator[Delta]:
    """The embedded engine's deltas, read on a thread of their own (the engine's reader blocks; the pool's few
    workers would cap how many requests can share a batch) and handed to the event loop."""
    loop = asyncio.get_running_loop()
    items: asyncio.Queue[Any] = asyncio.Queue()
    post = partial(_deliver, loop, items)

    def read() -> None:
        try:
            for delta in deltas():
                post(delta)
        except BaseException as exc:  # raised to the reader
            post(exc)
        finally:
            post(_END)

    threading.Thread(target=read, name="adaptery-engine-reader", daemon=True).start()
    while (item := await items.get()) is not _END:
        if isinstance(item, BaseException):
            raise item
        yield item


_END: Any = object()  # the embedded engine's reader has no more deltas


def _deliver(loop: asyncio.AbstractEventLoop, items: asyncio.Queue[Any], item: Any) -> None:
    """An item from another thread to a reader on `loop`."""
    with contextlib.suppress(RuntimeError):  # the reader's loop is closed: nobody is left to read
        loop.call_soon_threadsafe(items.put_nowait, item)
