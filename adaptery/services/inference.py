"""Where a request's tokens are generated: the embedded engine, or an infer agent over NATS.

One interface (`Backend.generate`, the engine's own signature), two implementations, and `Inference` choosing
between them per request: the router's agent for the base if there is one (`services/inference_router.py`),
else the embedded engine, as before agents could serve. The prompt was tokenised and checked against limits by
the caller either way, so usage and limits do not depend on where the tokens came from.

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

import dataclasses
import logging
import queue
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Protocol

from adaptery.engine.generation import AdapterSpec, Delta, GenerationFailed, GenerationTimedOut, InferenceEngine, Usage
from adaptery.engine.sampling import SamplingParams
from adaptery.engine.stopping import WAKE, listening
from adaptery.messaging import protocol
from adaptery.messaging.protocol import InferRequest
from adaptery.messaging.streams import StreamAccount, StreamBroken, StreamInvalid, StreamReassembly
from adaptery.services.control_plane import ControlPlane, RemoteStream
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


class Backend(Protocol):
    def generate(
        self,
        base_id: str,
        ref: str,
        adapter: AdapterSpec | None,
        prompt_ids: list[int],
        params: SamplingParams,
        usage: Usage,
        should_stop: Callable[[], bool],
        tenant_id: str,
    ) -> Iterator[Delta]: ...


class EmbeddedBackend:
    def __init__(self, engine: InferenceEngine) -> None:
        self.engine = engine

    def generate(
        self,
        base_id: str,
        ref: str,
        adapter: AdapterSpec | None,
        prompt_ids: list[int],
        params: SamplingParams,
        usage: Usage,
        should_stop: Callable[[], bool],
        tenant_id: str,
    ) -> Iterator[Delta]:
        return self.engine.generate(
            base_id, ref, adapter, prompt_ids, params, usage, should_stop=should_stop, fairness_key=tenant_id
        )


class AgentBackend:
    """One request on one agent, as deltas; AgentLost when the agent goes away."""

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

    def generate_on(
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
    ) -> Iterator[Delta]:
        files = None
        if adapter is not None:
            files = {name: sha for name, sha in (adapter.files or {}).items() if name.endswith(_AGENT_FILES)}
        request = InferRequest(
            request_id=uuid.uuid4().hex,
            base_id=base_id,
            prompt_ids=list(prompt_ids),
            params=dataclasses.asdict(params),
            adapter_key=adapter.key if adapter is not None else None,
            adapter_files=files,
            fairness_key=tenant_id,
            streamed=streamed,
        )
        usage.prompt_tokens, usage.completion_tokens = len(prompt_ids), 0
        try:
            stream = self.control.open_stream(agent_id, tenant_id, request)
        except Exception as exc:  # the bus is down or restarting: nothing was sent, so it may go elsewhere
            self.router.finished(agent_id)
            raise AgentLost(f"agent {agent_id} was lost: the request could not be sent ({exc})") from exc
        reassembly = StreamReassembly()
        account = StreamAccount(params.max_tokens, self.max_bytes_per_token, params.top_logprobs, params.logprobs)
        try:
            with listening(should_stop, stream.messages, self._check_seconds()) as timeout:
                yield from self._relay(agent_id, stream, reassembly, account, usage, should_stop, timeout)
        except AgentLost:
            self.router.mark_broken(agent_id)
            raise
        finally:
            if not reassembly.ended:
                self.control.cancel_stream(stream)
            self.control.close_stream(stream)
            self.router.finished(agent_id)

    def _check_seconds(self) -> float:
        """How long the relay waits on a quiet stream before it looks at the agent's deadlines (a stop wakes it)."""
        return min(1.0, self.idle_seconds / 4, self.first_token_seconds / 4, self.stall_seconds / 4)

    def _relay(
        self,
        agent_id: str,
        stream: RemoteStream,
        reassembly: StreamReassembly,
        account: StreamAccount,
        usage: Usage,
        should_stop: Callable[[], bool],
        timeout: float,
    ) -> Iterator[Delta]:
        """The stream's messages as deltas until its end, a stop, or a broken deadline (AgentLost)."""
        heard = progressed = time.monotonic()
        tokens_seen = False
        while not reassembly.ended:
            if should_stop():
                return
            self._check_progress(agent_id, tokens_seen, time.monotonic() - progressed)
            try:
                raw = stream.messages.get(timeout=timeout)
            except queue.Empty:
                raw = WAKE
            if raw is WAKE:
                if time.monotonic() - heard > self.idle_seconds:
                    raise AgentLost(f"agent {agent_id} was lost: nothing from it for {self.idle_seconds:g} s")
                if self.router.is_lost(agent_id):
                    raise AgentLost(f"agent {agent_id} was lost: it stopped announcing itself")
                continue
            heard = time.monotonic()
            try:
                account.received(len(raw))
                message = reassembly.accept(protocol.decode(raw))
                if message is None:
                    continue
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
            elif "text" in message:
                if text or finish:
                    tokens_seen, progressed = True, time.monotonic()
                usage.completion_tokens = account.tokens  # counted here: what the client receives
                yield Delta(text, finish, logprobs=logprobs)

    def _check_progress(self, agent_id: str, tokens_seen: bool, quiet: float) -> None:
        """AgentLost for an agent that took the request and sent only keepalives past the deadline."""
        if not tokens_seen and quiet > self.first_token_seconds:
            self.router.penalise(agent_id)
            raise AgentLost(f"agent {agent_id} sent no token for {self.first_token_seconds:g} s")
        if tokens_seen and quiet > self.stall_seconds:
            self.router.penalise(agent_id)
            raise AgentLost(f"agent {agent_id} sent no token for {self.stall_seconds:g} s")


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
        self.embedded = EmbeddedBackend(engine)
        self.router = router
        self._control = control
        self.idle_seconds = idle_seconds
        self.first_token_seconds = first_token_seconds
        self.stall_seconds = stall_seconds
        self.max_bytes_per_token = max_bytes_per_token
        self.kv_needed = kv_needed

    def generate(
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
    ) -> Iterator[Delta]:
        """`streamed`: whether the client reads the answer as it comes (an agent sends a whole answer's deltas in
        fewer messages)."""
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
                for delta in remote.generate_on(
                    agent_id, base_id, adapter, prompt_ids, params, usage, should_stop, tenant_id, streamed
                ):
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
        yield from self.embedded.generate(base_id, ref, adapter, prompt_ids, params, usage, should_stop, tenant_id)
