"""The control plane's side of the agent protocol: answers agents' requests on NATS, writes to the database.

It runs its own asyncio loop in a thread; each request is handled in a worker thread (the queue's
database calls are blocking), so a slow request never holds up the others. One agent cannot crowd out the
others: the NATS callback only sorts each request (no work, no waiting), each agent has a token bucket
(`agent_requests_per_second`, `agent_request_burst`) and a bound on its requests being worked on
(`agent_requests_in_flight`), the work queue as a whole is bounded, and what is over is shed: answered with a
retryable "slow down" while that costs little, else dropped (the agent's request times out and it asks again).
The subscription's pending limits are set so a flood is shed by the client rather than the connection
dying, and refusals are logged at most once per interval. A reply goes only to the asking agent's own inbox
(`protocol.inbox_prefix`): an agent cannot make the control plane publish for it on another subject.

An agent acts for the job leased to it, and for nothing else: every request about blobs (uploads, checkpoints,
the final adapter, downloads) is refused first unless the job is leased to the asking agent, under the attempt the
request names (an older attempt of the same agent id is refused, finally, as heartbeats and finishes are), and its
blobs are then looked up and stored in that job's tenant only. So no answer depends on what another tenant holds
(an agent naming another tenant's job and a hash is refused the same whether that tenant has the blob or not).

An agent enrolled by certificate moves artifacts over HTTPS, never the bus: it asks for a presigned URL
(`transfer`, `auth/transfers.py`), granted under exactly these checks, which are made again when the URL is used
(`transfer_source`); the bus's download, upload and adapter verbs are refused to it. They remain for agents that
sign in with a password, which run on the platform's loopback only (the embedded agent, which may run where no
HTTP server listens, as in the tests that drive a `Platform` directly).

Inference on agents goes the same way: a request dispatched to an agent (`open_stream`) is the only thing that
lets that agent fetch an adapter's blobs, only those the request names, and only from the request's tenant,
until its stream is closed. Announcements feed the router (`services/inference_router.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
from nats.aio.msg import Msg

from adaptery.auth.transfers import Grant, TransferSigner, is_sha256
from adaptery.messaging import protocol
from adaptery.messaging.protocol import InferRequest
from adaptery.services import faults
from adaptery.services.base_files import BaseFiles, BaseUnavailable
from adaptery.services.evaluation_queue import EvaluationQueue
from adaptery.services.inference_router import InferenceRouter, InvalidAnnouncement
from adaptery.services.queue import JobQueue
from adaptery.storage.blobs import BlobStore

log = logging.getLogger("adaptery.control")
# An enrolled agent in another NATS account (a tenant's, an island's) reaches us through a service import, and the
# server rewrites its reply subject to a one-time `_R_.…` of the importing account: answering there goes back
# through that import only, never onto a subject of ours.
SERVICE_IMPORT_REPLY = "_R_."
_UPLOAD_ID = re.compile(r"^[0-9a-f]{32}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


MAX_QUEUED = 256  # requests of all agents queued or being worked on; beyond, shed
PENDING_MSGS_LIMIT = 20_000  # the subscription's buffer in the client; a flood past it is dropped there
PENDING_BYTES_LIMIT = 256 * 1024 * 1024
# Every infer stream of this process shares one subscription (`_on_stream` hands a message on without waiting): a
# message dropped there breaks its stream (a gap), so its buffer is the client's default, for all of them at once.
STREAM_PENDING_MSGS_LIMIT = 512 * 1024
STREAM_PENDING_BYTES_LIMIT = 256 * 1024 * 1024
SHED_REPLIES_PER_SECOND = 5.0  # "slow down" answers to one agent; the rest of its excess is dropped unanswered


class RequestRefused(Exception):
    pass


class TokenBucket:
    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate, self.burst, self.tokens, self.at = rate, burst, burst, now

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


class RateLimitedLog:
    """A warning per key at most every `every` seconds, with how many were left out since."""

    def __init__(self, logger: logging.Logger, every: float = 10.0) -> None:
        self.logger, self.every = logger, every
        self._last: dict[str, float] = {}
        self._skipped: dict[str, int] = {}
        self._lock = threading.Lock()

    def warning(self, key: str, message: str, *args: object) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._last.get(key, -self.every) < self.every:
                self._skipped[key] = self._skipped.get(key, 0) + 1
                return
            self._last[key] = now
            skipped = self._skipped.pop(key, 0)
            if len(self._last) > 10_000:  # keys are agent ids; forget the oldest rather than grow
                for old in sorted(self._last, key=self._last.__getitem__)[:5_000]:
                    self._last.pop(old, None)
        self.logger.warning(message + (f" (and {skipped} more like it)" if skipped else ""), *args)


@dataclass
class _AgentBudget:
    bucket: TokenBucket
    shed_replies: TokenBucket
    in_flight: int = 0


@dataclass(frozen=True)
class TransferSource:
    """Where a presigned URL's bytes are: a blob in a tenant's store, or a file of a base model."""

    tenant_id: str | None = None
    path: Path | None = None


@dataclass
class RemoteStream:
    """An infer request dispatched to an agent: its stream's raw messages go to `deliver`, called on `loop` (the
    reader's), until `close`; while open, the agent may fetch the adapter blobs it names from its tenant."""

    agent_id: str
    request_id: str
    tenant_id: str
    blobs: frozenset[str]
    deliver: Callable[[bytes], None]
    loop: asyncio.AbstractEventLoop


def _hand_over(loop: asyncio.AbstractEventLoop, messages: list[tuple[Callable[[bytes], None], bytes]]) -> None:
    """Messages to their readers on `loop`: one wake-up of that loop for all of them."""
    with contextlib.suppress(RuntimeError):  # the reader's loop is closed: nobody is left to read
        loop.call_soon_threadsafe(_deliver_all, messages)


def _deliver_all(messages: list[tuple[Callable[[bytes], None], bytes]]) -> None:
    for deliver, data in messages:
        try:
            deliver(data)
        except Exception:  # one reader's failure is not the others'
            log.exception("a stream's reader failed to take a message")


class ControlPlane:
    def __init__(
        self,
        job_queue: JobQueue,
        blobs: BlobStore,
        staging_dir: Path,
        *,
        url: str,
        user: str | None,
        password: str | None,
        max_upload_bytes: int,
        agent_scope: dict[str, str | None] | None = None,
        router: InferenceRouter | None = None,
        announce_seconds: float = 2.0,
        requests_per_second: float = 200.0,
        request_burst: int = 400,
        requests_in_flight: int = 4,
        evaluations: EvaluationQueue | None = None,
        transfers: TransferSigner | None = None,
        base_files: BaseFiles | None = None,
    ) -> None:
        self.queue = job_queue
        self.evaluations = evaluations
        self.transfers = transfers
        self.base_files = base_files
        self.blobs = blobs
        self.staging_dir = staging_dir
        self.url = url
        self.user = user
        self.password = password
        self.max_upload_bytes = max_upload_bytes
        self.agent_scope = agent_scope if agent_scope is not None else {}  # agent id -> tenant it may serve
        self.router = router or InferenceRouter()
        self.announce_seconds = announce_seconds  # an agent that does not say how often it announces: this often
        self._streams: dict[tuple[str, str], RemoteStream] = {}
        # This process's streams arrive on one subscription (`_on_stream`), named by this instance: subscribing per
        # request cost a SUB and an UNSUB on the bus, a subscription's queue and task here, and interest to
        # propagate through the accounts before the agent's first message could pass.
        self.instance = uuid.uuid4().hex[:16]
        self._streams_lock = threading.Lock()
        self.not_training: set[str] = set()  # agents enrolled without the train role: they lease nothing
        self.not_inferring: set[str] = set()  # agents enrolled without the infer role: they serve nothing
        self.certified: set[str] = set()  # agents enrolled by certificate: artifacts over HTTPS only
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="adaptery-control", daemon=True)
        self._workers = ThreadPoolExecutor(max_workers=8, thread_name_prefix="adaptery-control")
        self._nc: nats.NATS | None = None
        self.requests_per_second = requests_per_second
        self.request_burst = request_burst
        self.requests_in_flight = requests_in_flight
        self._budgets: dict[str, _AgentBudget] = {}  # only touched on the loop's thread
        self._queued = 0  # requests of all agents queued or being worked on (on the loop's thread)
        self._tasks: set[asyncio.Task[None]] = set()
        self.shed = 0  # requests refused or dropped for being over a bound (for tests and metrics)
        self.refusal_log = RateLimitedLog(log)

    def start(self) -> None:
        self.staging_dir.mkdir(parents=True, exist_ok=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._connect(), self._loop).result(timeout=30)

    async def _connect(self) -> None:
        self._nc = await nats.connect(
            self.url,
            user=self.user,
            password=self.password,
            name="adaptery-control",
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
            error_cb=self._on_nats_error,
        )
        await self._nc.subscribe(
            protocol.CONTROL_SUBSCRIPTION,
            queue=protocol.CONTROL_QUEUE_GROUP,
            cb=self._on_request,
            pending_msgs_limit=PENDING_MSGS_LIMIT,
            pending_bytes_limit=PENDING_BYTES_LIMIT,
        )
        await self._nc.subscribe(
            protocol.stream_subject("*", f"{self.instance}.*"),
            cb=self._on_stream,
            pending_msgs_limit=STREAM_PENDING_MSGS_LIMIT,
            pending_bytes_limit=STREAM_PENDING_BYTES_LIMIT,
        )

    async def _on_stream(self, msg: Msg) -> None:
        """A message of one of this process's streams, or a batch of them (`protocol.stream_batch_subject`), to their
        readers, one hand-off to each reader's loop; one of no open stream (it ended) is dropped. The subject names
        the agent that sent it, as the broker's account imports allow only that agent to: a batch's lines reach only
        that agent's streams."""
        agent_id, _, request_id = msg.subject[len(protocol.STREAM_PREFIX) + 1 :].partition(".")
        if not request_id.endswith("." + protocol.STREAM_BATCH):
            if (stream := self._streams.get((agent_id, request_id))) is not None:
                _hand_over(stream.loop, [(stream.deliver, msg.data)])
            return
        readers: dict[asyncio.AbstractEventLoop, list[tuple[Callable[[bytes], None], bytes]]] = {}
        for key, data in protocol.unpack_stream_batch(msg.data):
            if (stream := self._streams.get((agent_id, f"{self.instance}.{key}"))) is not None:
                readers.setdefault(stream.loop, []).append((stream.deliver, data))
        for loop, messages in readers.items():
            _hand_over(loop, messages)

    async def _on_nats_error(self, exc: Exception) -> None:
        # A slow consumer is reported once per dropped message: one line per interval is enough.
        self.refusal_log.warning(f"nats:{type(exc).__name__}", "control connection: %s", exc)

    def notify(self, agent_id: str, job_id: str, action: str) -> None:
        """Tell an agent at once that its job was cancelled or paused (best effort: heartbeats say it too)."""
        if self._nc is None:
            return
        body = protocol.encode({"job_id": job_id, "action": action})
        asyncio.run_coroutine_threadsafe(self._nc.publish(protocol.notify_subject(agent_id), body), self._loop)

    # --- inference on agents ------------------------------------------------------------------------

    def new_request_id(self) -> str:
        """An infer request's id: this instance's streams are the ones `_on_stream` receives."""
        return f"{self.instance}.{uuid.uuid4().hex}"

    async def open_stream(
        self, agent_id: str, tenant_id: str, request: InferRequest, deliver: Callable[[bytes], None]
    ) -> RemoteStream:
        """Register the request's stream, then send it to the agent (so no message can be missed). Awaited on any
        event loop (the HTTP server's): the caller's loop is free meanwhile. `deliver` gets each raw message on that
        loop, in order; it must not block. The request's id is one of `new_request_id`'s; a request that says
        `batched` may have its messages come in batches."""
        if self._nc is None:
            raise RuntimeError("the control plane is not connected")
        blobs = frozenset((request.adapter_files or {}).values())
        stream = RemoteStream(agent_id, request.request_id, tenant_id, blobs, deliver, asyncio.get_running_loop())
        with self._streams_lock:
            self._streams[(agent_id, request.request_id)] = stream

        body = protocol.encode(request.to_json())
        try:
            send = self._nc.publish(protocol.infer_subject(agent_id), body)
            sent = asyncio.wrap_future(asyncio.run_coroutine_threadsafe(send, self._loop))
            await asyncio.wait_for(sent, timeout=protocol.REQUEST_SECONDS)
        except BaseException:
            self.close_stream(stream)
            raise
        return stream

    def cancel_stream(self, stream: RemoteStream) -> None:
        """Tell the agent to stop the request now (its batch slot is freed within one engine poll)."""
        if self._nc is not None:
            body = protocol.encode({"request_id": stream.request_id})
            subject = protocol.infer_cancel_subject(stream.agent_id)
            asyncio.run_coroutine_threadsafe(self._nc.publish(subject, body), self._loop)

    def close_stream(self, stream: RemoteStream) -> None:
        with self._streams_lock:
            self._streams.pop((stream.agent_id, stream.request_id), None)

    def stop(self) -> None:
        if self._nc is not None:
            try:
                asyncio.run_coroutine_threadsafe(self._nc.drain(), self._loop).result(timeout=10)
            except Exception:  # noqa: BLE001 - the server may already be gone
                log.debug("draining the control connection failed", exc_info=True)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._workers.shutdown(wait=False, cancel_futures=True)

    async def _on_request(self, msg: Msg) -> None:
        """Sort a request, on the loop, without waiting: shed it, or queue it for a worker."""
        if not msg.reply:
            return
        agent_id = msg.subject[len(protocol.PREFIX) + 1 :].split(".", 1)[0]
        if not msg.reply.startswith((protocol.inbox_prefix(agent_id) + ".", SERVICE_IMPORT_REPLY)):
            # An agent naming another subject for the answer would have us publish where it may not.
            self.shed += 1
            warn = self.refusal_log.warning
            warn(f"reply:{agent_id}", "agent %s asked for a reply on %r: dropped", agent_id, msg.reply)
            return
        now = time.monotonic()
        budget = self._budgets.get(agent_id)
        if budget is None:
            if len(self._budgets) > 100_000:  # only enrolled agents can publish here; this is a backstop
                self._budgets.clear()
            budget = _AgentBudget(
                TokenBucket(self.requests_per_second, self.request_burst, now),
                TokenBucket(SHED_REPLIES_PER_SECOND, SHED_REPLIES_PER_SECOND, now),
            )
            self._budgets[agent_id] = budget
        if budget.in_flight >= self.requests_in_flight or self._queued >= MAX_QUEUED or not budget.bucket.take(now):
            self.shed += 1
            self.refusal_log.warning(f"shed:{agent_id}", "agent %s asks too fast: requests shed", agent_id)
            if budget.shed_replies.take(now):
                data, headers = protocol.error_reply("slow down: too many requests, ask again later", retryable=True)
                await self._nc.publish(msg.reply, data, headers=headers)
            return
        budget.in_flight += 1
        self._queued += 1
        task = self._loop.create_task(self._work(msg, budget))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _work(self, msg: Msg, budget: _AgentBudget) -> None:
        try:
            try:
                data, headers = await self._loop.run_in_executor(self._workers, self._handle, msg)
            except Exception as exc:  # noqa: BLE001 - the agent gets the cause, the control plane carries on
                data, headers = self._error_reply(msg.subject, exc)
            await self._nc.publish(msg.reply, data, headers=headers)
        finally:
            budget.in_flight -= 1
            self._queued -= 1

    @staticmethod
    def _error_reply(subject: str, exc: Exception) -> tuple[bytes, dict[str, str]]:
        """A refusal is final; anything else (a locked database, a restart, a fault of ours) is worth retrying."""
        if isinstance(exc, RequestRefused) or faults.is_refusal(exc):
            return protocol.error_reply(str(exc), retryable=False)
        if faults.is_transient(exc):
            log.warning("agent request %s failed for now: %s", subject, exc)
        else:
            log.exception("agent request %s failed", subject)
        return protocol.error_reply(f"control plane error: {exc}", retryable=True)

    # --- handlers (in a worker thread) ------------------------------------------------------------

    def _handle(self, msg: Msg) -> tuple[bytes, dict[str, str] | None]:
        try:
            agent_id, job_id, verb = protocol.parse_subject(msg.subject)
        except ValueError as exc:
            raise RequestRefused(str(exc)) from exc
        if verb in ("upload", "download", protocol.ADAPTER_VERB) and agent_id in self.certified:
            raise RequestRefused("artifacts travel over HTTPS: ask for a transfer URL (the 'transfer' request)")
        if verb == protocol.TRANSFER_VERB:
            return protocol.encode(self._transfer(agent_id, self._body(msg))), None
        if verb == protocol.BASE_VERB:
            return protocol.encode(self._base(agent_id, self._body(msg))), None
        if verb == "upload":
            if job_id is not None and protocol.is_evaluation(job_id):
                raise RequestRefused("an evaluation uploads nothing: its result is in its finish")
            return protocol.encode(self._upload(agent_id, job_id, msg)), None
        if verb == "download":
            return self._download(agent_id, job_id, self._body(msg)), None
        if verb == protocol.ADAPTER_VERB:
            return self._adapter_blob(agent_id, self._body(msg)), None
        body = self._body(msg)
        if verb == protocol.ANNOUNCE_VERB:
            if agent_id not in self.agent_scope:
                raise RequestRefused("only an enrolled agent may announce itself")
            if agent_id in self.not_inferring:
                raise RequestRefused("this agent was enrolled without the infer role")
            try:
                self.router.announce(agent_id, body, self.announce_seconds)
            except InvalidAnnouncement as exc:
                raise RequestRefused(str(exc)) from exc
            return protocol.encode({}), None
        if verb == "lease":
            return protocol.encode(self._lease(agent_id, body)), None
        if job_id is None:
            raise RequestRefused(f"unknown request '{verb}'")
        if protocol.is_evaluation(job_id):
            return protocol.encode(self._evaluation_request(agent_id, job_id, verb, body)), None
        handler = {
            "heartbeat": self._heartbeat,
            "events": self._events,
            "checkpoint": self._checkpoint,
            "finish": self._finish,
        }.get(verb)
        if handler is None:
            raise RequestRefused(f"unknown request '{verb}'")
        return protocol.encode(handler(agent_id, job_id, body)), None

    @staticmethod
    def _body(msg: Msg) -> dict[str, Any]:
        try:
            return protocol.decode(msg.data)
        except ValueError as exc:  # json's errors included: asking again with the same body cannot help
            raise RequestRefused(f"invalid request body: {exc}") from exc

    def _lease(self, agent_id: str, body: dict[str, Any]) -> dict[str, Any]:
        self.queue.seen(agent_id, idle=True)
        if agent_id in self.not_training:
            return {"assignment": None}
        assignment = self.queue.lease(
            agent_id, tenant_scope=self.agent_scope.get(agent_id), capabilities=body.get("capabilities")
        )
        if assignment is not None:
            return {"assignment": assignment.to_json()}
        kinds = body.get("kinds")
        if self.evaluations is not None and isinstance(kinds, list) and protocol.EVALUATION_KIND in kinds:
            evaluation = self.evaluations.lease(agent_id, tenant_scope=self.agent_scope.get(agent_id))
            if evaluation is not None:
                return {"assignment": None, "evaluation": evaluation}
        return {"assignment": None}

    def _evaluation_request(self, agent_id: str, evaluation_id: str, verb: str, body: dict[str, Any]) -> dict:
        """An agent's request about the evaluation leased to it: heartbeat, progress events, its end."""
        if self.evaluations is None:
            raise RequestRefused(f"job {evaluation_id} is not leased to you")
        attempt = self._attempt(agent_id, body)
        if verb == "heartbeat":
            return {"verdict": self.evaluations.heartbeat(evaluation_id, agent_id, attempt)}
        if verb == "events":
            events = body.get("events")
            if not isinstance(events, list) or not all(isinstance(e, dict) for e in events):
                raise RequestRefused("events must be a list of objects")
            self.evaluations.report(evaluation_id, agent_id, events, attempt)
            return {}
        if verb == "finish":
            self._leased_tenant(agent_id, evaluation_id, attempt)
            self.evaluations.finish(evaluation_id, agent_id, body)
            return {}
        raise RequestRefused(f"an evaluation has no '{verb}' request")

    def _attempt(self, agent_id: str, body: dict[str, Any]) -> int | None:
        """The attempt whose lease the agent acts under. None only from a password agent that predates attempt
        numbers (fenced by its id alone): an agent enrolled by certificate always names it, or a URL or report it
        sent without one would still hold when the same job comes back to it under a later attempt."""
        attempt = body.get("attempt")
        number = isinstance(attempt, int) and not isinstance(attempt, bool)
        if attempt is not None and not (number and 0 <= attempt < 2**31):  # a huge one is no attempt either
            raise RequestRefused(f"attempt must be the assignment's attempt number, not {repr(attempt)[:40]}")
        if attempt is None and agent_id in self.certified:
            raise RequestRefused("an agent enrolled by certificate names the attempt its lease is under")
        return attempt

    def _header_attempt(self, agent_id: str, headers: dict[str, str]) -> int | None:
        """An upload chunk's attempt, from its header (its body is the bytes)."""
        attempt = headers.get(protocol.ATTEMPT_HEADER)
        if attempt is not None and (not attempt.isascii() or not attempt.isdigit() or len(attempt) > 10):
            raise RequestRefused(f"attempt must be the assignment's attempt number, not {attempt[:40]!r}")
        return self._attempt(agent_id, {"attempt": None if attempt is None else int(attempt)})

    def _heartbeat(self, agent_id: str, job_id: str, body: dict[str, Any]) -> dict[str, Any]:
        return {"verdict": self.queue.heartbeat(job_id, agent_id, self._attempt(agent_id, body))}

    def _events(self, agent_id: str, job_id: str, body: dict[str, Any]) -> dict[str, Any]:
        events = body.get("events")
        if not isinstance(events, list) or not all(isinstance(e, dict) for e in events):
            raise RequestRefused("events must be a list of objects")
        self.queue.report(job_id, agent_id, events, self._attempt(agent_id, body))
        return {}

    def _checkpoint(self, agent_id: str, job_id: str, body: dict[str, Any]) -> dict[str, Any]:
        files = self._manifest(self._leased_tenant(agent_id, job_id, self._attempt(agent_id, body)), body.get("files"))
        try:
            checkpoint_id = self.queue.record_checkpoint(
                job_id,
                agent_id,
                step=int(body["step"]),
                epoch=float(body["epoch"]) if body.get("epoch") is not None else None,
                metrics=dict(body.get("metrics") or {}),
                manifest=files,
                attempt=self._attempt(agent_id, body),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise RequestRefused(f"invalid checkpoint: {exc}") from exc
        return {"checkpoint": checkpoint_id}

    def _finish(self, agent_id: str, job_id: str, body: dict[str, Any]) -> dict[str, Any]:
        state = body.get("state")
        message = str(body.get("message") or "")
        attempt = self._attempt(agent_id, body)
        self.queue.charge_compute(job_id, agent_id, body.get("compute"), attempt)
        if state == "succeeded":
            tenant_id = self._leased_tenant(agent_id, job_id, attempt)
            result = body.get("result") or {}
            if not isinstance(result, dict):
                raise RequestRefused("result must be an object")
            self.queue.check_result(job_id, result)  # trained_tokens is billed: refused unless plausible
            files = self._manifest(tenant_id, body.get("files"))
            with tempfile.TemporaryDirectory(dir=self.staging_dir) as tmp:
                adapter_dir = Path(tmp)
                for name, sha in files.items():
                    self.blobs.copy_to(tenant_id, sha, adapter_dir / name)
                return {"model": self.queue.succeed(job_id, agent_id, adapter_dir, dict(result), attempt)}
        if state == "failed":
            self.queue.fail(job_id, agent_id, message or "training failed", attempt=attempt)
        elif state == "paused":
            self.queue.paused(job_id, agent_id, attempt)
        elif state == "released":
            reason = message or "the agent is shutting down"
            self.queue.release(job_id, agent_id, reason, attempt, fault=bool(body.get("fault")))
        elif state != "cancelled":
            raise RequestRefused(f"unknown final state {state!r}")
        return {}

    def _leased_tenant(self, agent_id: str, job_id: str | None, attempt: int | None) -> str:
        """The tenant of `job_id` if it is leased to this agent under `attempt` (within the agent's tenant scope),
        else refused (the same refusal for another agent's job, another tenant's, an attempt that is over and
        none). `attempt` None: an agent from before attempt numbers, fenced by its id alone."""
        work = self._work_queue(job_id)
        held = work is not None and work.holds(job_id, agent_id, attempt)
        tenant_id = work.tenant_of(job_id) if held else None
        scope = self.agent_scope.get(agent_id)
        if tenant_id is None or (scope is not None and scope != tenant_id):
            raise RequestRefused(f"job {job_id} is not leased to you")
        return tenant_id

    def _work_queue(self, job_id: str | None) -> JobQueue | EvaluationQueue | None:
        if not job_id:
            return None
        return self.evaluations if protocol.is_evaluation(job_id) else self.queue

    def _manifest(self, tenant_id: str, files: object) -> dict[str, str]:
        if not isinstance(files, dict) or not files:
            raise RequestRefused("files must map file names to uploaded sha256 hashes")
        for name, sha in files.items():
            if not isinstance(name, str) or "/" in name or name.startswith(".") or not isinstance(sha, str):
                raise RequestRefused(f"invalid file name {name!r}")
            if not _SHA256.match(sha) or not self.blobs.exists(tenant_id, sha):
                raise RequestRefused(f"{name} was not uploaded (no blob {sha})")
        return dict(files)

    def _download(self, agent_id: str, job_id: str | None, body: dict[str, Any]) -> bytes:
        sha = body.get("sha256")
        offset = body.get("offset", 0)
        if job_id is None or not isinstance(sha, str) or not isinstance(offset, int) or offset < 0:
            raise RequestRefused("a download names a job, a sha256 and an offset")
        attempt = self._attempt(agent_id, body)
        tenant_id = self._leased_tenant(agent_id, job_id, attempt)
        if sha not in self._work_queue(job_id).job_blobs(job_id, agent_id, attempt):
            raise RequestRefused(f"blob {sha} is not part of job {job_id}")
        with self.blobs.open(tenant_id, sha, offset=offset) as source:
            return source.read(protocol.CHUNK_BYTES)

    def _adapter_blob(self, agent_id: str, body: dict[str, Any]) -> bytes:
        """A chunk of a blob the agent's open infer request names, from that request's tenant; the same refusal
        for another agent's request, a blob the request does not name, and a request that has ended."""
        request_id, sha, offset = body.get("request_id"), body.get("sha256"), body.get("offset", 0)
        if not isinstance(request_id, str) or not isinstance(sha, str) or not isinstance(offset, int) or offset < 0:
            raise RequestRefused("an adapter download names a request, a sha256 and an offset")
        with self._streams_lock:
            stream = self._streams.get((agent_id, request_id))
        if stream is None or sha not in stream.blobs or not self._may_serve(agent_id, stream.tenant_id):
            raise RequestRefused(f"blob {sha} is not part of a request sent to you")
        with self.blobs.open(stream.tenant_id, sha, offset=offset) as source:
            return source.read(protocol.CHUNK_BYTES)

    # --- presigned transfers (auth/transfers.py) -----------------------------------------------------

    def _transfer(self, agent_id: str, body: dict[str, Any]) -> dict[str, Any]:
        """A presigned URL for one blob of the work leased to this agent, granted under the checks of `_download`
        and `_adapter_blob` (an upload: of `_upload`)."""
        self._may_transfer(agent_id)
        purpose, work_id, method, sha = body.get("purpose"), body.get("id"), body.get("method"), body.get("sha256")
        if purpose not in ("job", "request") or not isinstance(work_id, str) or method not in ("GET", "PUT"):
            raise RequestRefused("a transfer names its purpose (job or request), its id and a method (GET or PUT)")
        if not is_sha256(sha):
            raise RequestRefused("a transfer names the blob's sha256")
        size = body.get("bytes")
        if method == "PUT":
            if purpose != "job" or protocol.is_evaluation(work_id):
                raise RequestRefused("only a fine-tuning job uploads")
            if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= self.max_upload_bytes:
                raise RequestRefused(f"an upload declares its bytes, at most {self.max_upload_bytes}")
        else:
            size = None
        attempt = self._attempt(agent_id, body) if purpose == "job" else None  # a request is not leased
        source = self._transfer_source(agent_id, purpose, work_id, attempt, method, sha)
        path, grant = self.transfers.grant(
            method=method, sha256=sha, tenant_id=source.tenant_id or "", purpose=purpose, work_id=work_id,
            attempt=attempt, agent_id=agent_id, size=size,
        )  # fmt: skip
        return {"url": path, "expires_at": grant.expires_at}

    def _base(self, agent_id: str, body: dict[str, Any]) -> dict[str, Any]:
        """A base model's files for an enrolled agent to fetch over HTTPS: each with its hash, size and URL."""
        self._may_transfer(agent_id)
        base_id = body.get("base_id")
        if not isinstance(base_id, str) or self.base_files is None:
            raise RequestRefused("a base request names the base model's id")
        try:
            manifest = self.base_files.manifest(base_id)
        except BaseUnavailable as exc:
            raise RequestRefused(str(exc)) from exc
        files = {}
        for name, described in manifest.items():
            path, grant = self.transfers.grant(
                method="GET", sha256=described.sha256, tenant_id="", purpose="base", work_id=base_id,
                attempt=None, agent_id=agent_id, size=None,
            )  # fmt: skip
            files[name] = {"sha256": described.sha256, "bytes": described.bytes, "url": path}
        return {"files": files}

    def _may_transfer(self, agent_id: str) -> None:
        if self.transfers is None:
            raise RequestRefused("this control plane hands out no transfer URLs")
        if agent_id not in self.certified:
            raise RequestRefused("transfer URLs are for agents enrolled by certificate: this one uses the bus")

    def transfer_source(self, grant: Grant) -> TransferSource:
        """What a presigned URL reads or writes, if what it was granted for still holds now: the work still leased
        to its agent (under its attempt), the blob still part of it, the agent not revoked."""
        source = self._transfer_source(
            grant.agent_id, grant.purpose, grant.work_id, grant.attempt, grant.method, grant.sha256
        )
        if (source.tenant_id or "") != grant.tenant_id:
            raise RequestRefused(f"blob {grant.sha256} is not part of work leased to you")
        return source

    def _transfer_source(
        self, agent_id: str, purpose: str, work_id: str, attempt: int | None, method: str, sha: str
    ) -> TransferSource:
        if agent_id not in self.agent_scope or agent_id not in self.certified:
            raise RequestRefused("only an enrolled, unrevoked agent may transfer artifacts")
        if purpose == "base":
            manifest = self.base_files.manifest(work_id) if self.base_files is not None else {}
            found = next((f.path for f in manifest.values() if f.sha256 == sha), None)
            if method != "GET" or found is None:
                raise RequestRefused(f"blob {sha} is not a file of base model {work_id}")
            return TransferSource(path=found)
        if purpose == "request":
            with self._streams_lock:
                stream = self._streams.get((agent_id, work_id))
            if method != "GET" or stream is None or sha not in stream.blobs:
                raise RequestRefused(f"blob {sha} is not part of a request sent to you")
            if not self._may_serve(agent_id, stream.tenant_id):
                raise RequestRefused(f"blob {sha} is not part of a request sent to you")
            return TransferSource(tenant_id=stream.tenant_id)
        tenant_id = self._leased_tenant(agent_id, work_id, attempt)
        if method == "GET" and sha not in self._work_queue(work_id).job_blobs(work_id, agent_id):
            raise RequestRefused(f"blob {sha} is not part of job {work_id}")
        return TransferSource(tenant_id=tenant_id)

    def _may_serve(self, agent_id: str, tenant_id: str) -> bool:
        """An enrolled, unrevoked agent that is platform-wide or scoped to this tenant."""
        return agent_id in self.agent_scope and self.agent_scope[agent_id] in (None, tenant_id)

    def _upload(self, agent_id: str, job_id: str | None, msg: Msg) -> dict[str, Any]:
        headers = msg.headers or {}
        upload_id = headers.get(protocol.UPLOAD_HEADER, "")
        try:
            offset = int(headers.get(protocol.OFFSET_HEADER, "-1"))
        except ValueError:
            offset = -1
        if job_id is None or not _UPLOAD_ID.match(upload_id) or offset < 0:
            raise RequestRefused("an upload chunk carries its upload id and offset")
        attempt = self._header_attempt(agent_id, headers)
        staged = self.staging_dir / f"{agent_id}-{upload_id}.part"
        if offset == 0:
            self._leased_tenant(agent_id, job_id, attempt)
        size = staged.stat().st_size if staged.exists() else 0
        if offset not in (0, size):
            raise RequestRefused(f"upload {upload_id}: expected offset {size}, got {offset}")
        if offset + len(msg.data) > self.max_upload_bytes:
            staged.unlink(missing_ok=True)
            raise RequestRefused(f"upload larger than the limit of {self.max_upload_bytes} bytes")
        with staged.open("r+b" if offset else "wb") as handle:
            handle.seek(offset)
            handle.write(msg.data)
            handle.truncate()
        expected = headers.get(protocol.SHA256_HEADER)
        if not expected:
            return {}
        try:
            # Checked again at the end: the chunks of one upload may name different jobs.
            stored = self.blobs.put_path(self._leased_tenant(agent_id, job_id, attempt), staged)
        finally:
            staged.unlink(missing_ok=True)
        if stored.sha256 != expected:
            raise RequestRefused(f"upload {upload_id} arrived damaged (sha256 {stored.sha256}, expected {expected})")
        return {"sha256": stored.sha256}
