"""An infer agent: the engine `serve` embeds, hosted on another machine, fed over NATS.

The control plane publishes `InferRequest`s (token ids already counted against the caller's limits, sampling
parameters, the adapter by hash) on `adaptery.infer.<agent>`; each is served on its own thread and streamed back
on `adaptery.stream.<agent>.<request>` in sequence, ending with an end marker (`messaging/streams.py` reassembles
it), or, for a control plane whose requests say `batched`, in batches of the messages of all its streams that the
link's sender finds waiting (`protocol.stream_batch_subject`: one message an engine step, not one a request);
each delta says how many tokens are behind it, which the control plane counts and bills (it trusts no total from
here, and refuses a stream that claims more than max_tokens or more text than its tokens hold). A
cancellation (the client went away) stops the request within one engine poll, so its batch slot is free at
once. What the agent can do and how loaded it is goes to the control plane as an announcement every
`announce_seconds`, and within ANNOUNCE_POLL_SECONDS of a change in its load or resident adapters: the router
(`services/inference_router.py`) places requests by it.

Adapters reach the agent on demand: the first request naming one downloads its blobs (safetensors and its
config only), each verified by sha256 against the request, into a cache of at most `max_adapters` adapters
(least recently used out first; never one a request is using), sealed at rest under the agent's key with the
plaintext the engine loads only in the agent's private scratch (`agent/vault.py`).
"""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from adaptery.agent.link import AgentLink, LinkDown
from adaptery.agent.vault import AgentVault
from adaptery.engine.generation import AdapterSpec, EngineUnavailable, GenerationTimedOut, InferenceEngine, Usage
from adaptery.engine.sampling import SamplingParams
from adaptery.engine.stopping import StopSignal
from adaptery.messaging import protocol
from adaptery.messaging.protocol import InferRequest, RemoteError
from adaptery.storage.modes import private_dir

log = logging.getLogger("adaptery.agent.infer")
ANNOUNCE_POLL_SECONDS = 0.1
TOKENS_PER_SECOND_WINDOW = 10.0
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_TOKEN = re.compile(r"^[A-Za-z0-9_-]+$")  # one token of a subject, and a batch line's key
_ADAPTER_FILE = re.compile(r"^(adapter_config\.json|[A-Za-z0-9_.-]+\.safetensors)$")


@dataclass
class _Stream:
    """One request's outgoing stream: sequence numbers under a lock, when it last sent (for keepalives), and the
    deltas held back to go out together.

    Every message costs the control plane, NATS and the agent itself about the same whatever it carries, and the
    engine produces one token per request per step. So a delta is sent at once only when no delta went out for
    `coalesce_seconds` (the first one always), or when it finishes the choice; the deltas that come sooner wait
    and leave as one message (their texts and logprobs joined, their token counts added), at the latest when the
    window has passed (`flush_due`, from the host's ticker) or before anything else is sent. Order and counts
    are exactly those of the deltas: only the number of messages changes. 0 sends every delta alone.
    """

    link: AgentLink
    subject: str
    coalesce_seconds: float = 0.0
    batch: tuple[str, str] | None = None  # (batch subject, key): sent with the other streams of its control plane
    seq: int = 0
    last_sent: float = field(default_factory=time.monotonic)
    last_delta: float = float("-inf")
    lock: threading.Lock = field(default_factory=threading.Lock)
    cancelled: StopSignal = field(default_factory=StopSignal)
    # (text, finish_reason, logprobs, tokens) of the deltas not sent yet
    held: list[tuple[str, str | None, list[dict[str, Any]] | None, int]] = field(default_factory=list)

    def send(self, body: dict[str, Any]) -> None:
        with self.lock:
            self._release_held()
            self._publish(body)

    def delta(self, text: str, finish_reason: str | None, logprobs: list[dict[str, Any]] | None, tokens: int) -> bool:
        """Send the delta, or hold it to go out with the next ones; True when it (and what was held) was sent."""
        with self.lock:
            now = time.monotonic()
            self.held.append((text, finish_reason, logprobs, tokens))
            if finish_reason is None and now - self.last_delta < self.coalesce_seconds:
                return False
            self._release_held()
            return True

    def flush_due(self, now: float) -> bool:
        """Send what is held once its window has passed; True while something is still held."""
        with self.lock:
            if self.held and now - self.last_delta >= self.coalesce_seconds:
                self._release_held()
            return bool(self.held)

    def keepalive(self, now: float) -> None:
        if now - self.last_sent >= protocol.STREAM_KEEPALIVE_SECONDS:
            self.send({})

    def _release_held(self) -> None:
        if not self.held:
            return
        logprobs = [entry for _, _, entries, _ in self.held for entry in entries or ()]
        body = {
            "text": "".join(text for text, _, _, _ in self.held),
            "finish_reason": self.held[-1][1],  # only a choice's last delta finishes it
            "logprobs": logprobs if any(entries is not None for _, _, entries, _ in self.held) else None,
            "tokens": sum(tokens for _, _, _, tokens in self.held),
        }
        self._publish(body)  # LinkDown: they stay held, for the next try (a lost message would pass unseen)
        self.held = []
        self.last_delta = self.last_sent

    def _publish(self, body: dict[str, Any]) -> None:
        self.link.publish(self.subject, {"seq": self.seq, **body}, batch=self.batch)
        self.seq += 1
        self.last_sent = time.monotonic()


class AdapterCache:
    """Downloaded adapters by content hash, at most `capacity`, least recently used evicted first. Each is kept
    sealed under the agent's key in `directory` (`agent/vault.py`) and, while cached, as a plaintext copy in the
    vault's private scratch for the engine to load; eviction removes both."""

    def __init__(self, directory: Path, capacity: int, vault: AgentVault) -> None:
        self.directory = directory
        self.capacity = capacity
        self.vault = vault
        self.entries: OrderedDict[str, Path] = OrderedDict()  # key -> its plaintext directory
        self.in_use: dict[str, int] = {}
        self.downloading: set[str] = set()
        self.lock = threading.Lock()
        self._ready = threading.Condition(self.lock)
        shutil.rmtree(directory, ignore_errors=True)  # what a previous run left is not trusted
        private_dir(directory)

    def acquire(self, link: AgentLink, request: InferRequest) -> tuple[AdapterSpec, bool]:
        """The adapter of `request`, downloaded if needed, held until `release`; and whether it was a hit."""
        key, files = request.adapter_key or "", request.adapter_files or {}
        if not _SHA256.match(key):
            raise ValueError("adapter_key must be a sha256")
        if not files or any(not _ADAPTER_FILE.match(n) or not _SHA256.match(h) for n, h in files.items()):
            raise ValueError("an adapter is served from safetensors and adapter_config.json only")
        with self.lock:
            while key in self.downloading:  # another request is fetching it: wait for that one
                self._ready.wait()
            hit = key in self.entries
            if hit:
                self.entries.move_to_end(key)
            else:
                self.downloading.add(key)
            self.in_use[key] = self.in_use.get(key, 0) + 1
        if not hit:
            plain = self.vault.plain_dir("adapters", key)
            try:
                for name, sha256 in sorted(files.items()):
                    # fetched into the private scratch (verified by hash), then sealed at rest
                    link.download_adapter(request.request_id, sha256, plain / name)
                    self.vault.seal(plain / name, self.directory / key / name)
            except BaseException:
                self._forget(key)
                self.release(key)
                raise
            finally:
                with self.lock:
                    self.downloading.discard(key)
                    self._ready.notify_all()
            with self.lock:
                self.entries[key] = plain
                self._evict()
        return AdapterSpec(key, self.entries[key]), hit

    def _forget(self, key: str) -> None:
        self.vault.wipe(self.vault.scratch / "adapters" / key)
        shutil.rmtree(self.directory / key, ignore_errors=True)

    def release(self, key: str) -> None:
        with self.lock:
            count = self.in_use.get(key, 0) - 1
            if count <= 0:
                self.in_use.pop(key, None)
            else:
                self.in_use[key] = count
            self._evict()

    def _evict(self) -> None:
        for key in list(self.entries):
            if len(self.entries) <= self.capacity:
                return
            if key not in self.in_use:
                self.entries.pop(key)
                self._forget(key)

    def keys(self) -> tuple[list[str], list[str]]:
        with self.lock:
            return list(self.entries), sorted(self.downloading)


class InferenceHost:
    def __init__(
        self,
        link: AgentLink,
        engine: InferenceEngine,
        bases: dict[str, str],
        cache_dir: Path,
        *,
        vault: AgentVault,
        roles: list[str],
        max_adapters: int,
        announce_seconds: float,
        coalesce_seconds: float = 0.0,
    ) -> None:
        self.link = link
        self.engine = engine
        self.bases = dict(bases)  # base id -> local path
        self.roles = roles
        self.announce_seconds = announce_seconds
        self.coalesce_seconds = coalesce_seconds
        self.adapters = AdapterCache(cache_dir, max_adapters, vault)
        self.streams: dict[str, _Stream] = {}
        self.streams_lock = threading.Lock()
        self.served = 0
        self.adapter_hits = 0
        self.adapter_misses = 0
        self._tokens: deque[tuple[float, int]] = deque()
        self._stopping = threading.Event()
        self._changed = threading.Event()
        self._held = threading.Event()  # some stream holds deltas back: the ticker sends them when due
        self._threads: list[threading.Thread] = []

    @property
    def agent_id(self) -> str:
        return self.link.agent_id

    def start(self) -> None:
        for base_id, path in self.bases.items():
            self.engine.base(base_id, path)  # loaded before the first announcement says it is served here
        self.link.subscribe(protocol.infer_subject(self.agent_id), self._on_request)
        self.link.subscribe(protocol.infer_cancel_subject(self.agent_id), self._on_cancel)
        for name, target in (("announce", self._announce_loop), ("ticker", self._ticker_loop)):
            thread = threading.Thread(target=target, name=f"adaptery-infer-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        log.info("infer agent %s serves %s", self.agent_id, ", ".join(self.bases))

    def stop(self) -> None:
        self._stopping.set()
        with self.streams_lock:
            for stream in self.streams.values():
                stream.cancelled.set()
        for thread in self._threads:
            thread.join(timeout=5)

    # --- requests (the link's loop hands them over; each is served on a thread of its own) -------------

    def _on_request(self, data: bytes) -> None:
        try:
            request = InferRequest.from_json(protocol.decode(data))
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("an infer request was malformed: %s", exc)
            return
        stream = self._stream_for(request)
        with self.streams_lock:
            if request.request_id in self.streams:
                return  # the same request twice: it is already being served
            self.streams[request.request_id] = stream
        threading.Thread(target=self._serve, args=(request, stream), name="adaptery-infer", daemon=True).start()

    def _stream_for(self, request: InferRequest) -> _Stream:
        """The request's outgoing stream: deltas held for this agent's window, or, for an answer the client reads
        whole, for up to `WHOLE_ANSWER_COALESCE_SECONDS` (a message a second rather than a token)."""
        coalesce = self.coalesce_seconds
        if not request.streamed:
            coalesce = max(coalesce, protocol.WHOLE_ANSWER_COALESCE_SECONDS)
        subject = protocol.stream_subject(self.agent_id, request.request_id)
        instance, _, key = request.request_id.rpartition(".")
        batch = None
        if request.batched and _TOKEN.match(instance) and _TOKEN.match(key):
            batch = (protocol.stream_batch_subject(self.agent_id, instance), key)
        return _Stream(self.link, subject, coalesce, batch)

    def _on_cancel(self, data: bytes) -> None:
        try:
            request_id = protocol.decode(data).get("request_id")
        except ValueError:
            return
        with self.streams_lock:
            stream = self.streams.get(str(request_id))
        if stream is not None:
            stream.cancelled.set()

    def _serve(self, request: InferRequest, stream: _Stream) -> None:
        usage = Usage(prompt_tokens=len(request.prompt_ids))
        adapter: AdapterSpec | None = None
        end: dict[str, Any] = {"end": True}
        sent_tokens = 0
        sent_text = False
        try:
            if request.base_id not in self.bases:
                raise ValueError(f"base model {request.base_id} is not served by this agent")
            hit = None
            if request.adapter_key is not None:
                adapter, hit = self.adapters.acquire(self.link, request)
                self._count_adapter(hit)
            stream.send({"accepted": True, "adapter_hit": hit})  # the next poll announces it: not during prefill
            params = SamplingParams(**request.params)
            deltas = self.engine.generate(
                request.base_id, self.bases[request.base_id], adapter, request.prompt_ids, params, usage,
                should_stop=stream.cancelled, fairness_key=request.fairness_key, streamed=request.streamed,
            )  # fmt: skip
            for delta in deltas:
                tokens = usage.completion_tokens - sent_tokens  # the control plane adds these up and bills them
                if not stream.delta(delta.text, delta.finish_reason, delta.logprobs, tokens):
                    self._held.set()
                self._count_tokens(tokens)
                sent_tokens, sent_text = usage.completion_tokens, sent_text or bool(delta.text)
        except GenerationTimedOut as exc:
            end.update(error=str(exc), timeout=True)
        except (LinkDown, RemoteError) as exc:
            end.update(error=f"the adapter could not be fetched: {exc}")
        except Exception as exc:  # the request's own failure: reported on its stream, the agent goes on
            log.warning("request %s failed: %s", request.request_id, exc)
            end.update(error=str(exc) or type(exc).__name__)
            if isinstance(exc, EngineUnavailable) and not sent_tokens and not sent_text:
                end["retryable"] = True  # the engine is down, nothing was streamed: the control plane goes elsewhere
        finally:
            if adapter is not None:
                self.adapters.release(adapter.key)
            with self.streams_lock:
                self.streams.pop(request.request_id, None)
            self.served += 1
            self._changed.set()
        end["usage"] = {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens}
        try:
            stream.send(end)
        except LinkDown:
            log.info("request %s ended while the link was down", request.request_id)

    def _count_adapter(self, hit: bool) -> None:
        if hit:
            self.adapter_hits += 1
        else:
            self.adapter_misses += 1

    def _count_tokens(self, tokens: int) -> None:
        now = time.monotonic()
        self._tokens.append((now, tokens))
        while self._tokens and self._tokens[0][0] < now - TOKENS_PER_SECOND_WINDOW:
            self._tokens.popleft()

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        recent = [n for t, n in list(self._tokens) if t >= now - TOKENS_PER_SECOND_WINDOW]
        return round(sum(recent) / TOKENS_PER_SECOND_WINDOW, 2)

    # --- keepalives and announcements --------------------------------------------------------------

    def _ticker_loop(self) -> None:
        """Held deltas out once their window has passed, keepalives on quiet streams."""
        while not self._stopping.is_set():
            if self._held.wait(protocol.STREAM_KEEPALIVE_SECONDS / 2):
                self._stopping.wait(self.coalesce_seconds / 2)  # more deltas come into the window meanwhile
            self._held.clear()
            with self.streams_lock:
                streams = list(self.streams.values())
            now = time.monotonic()
            for stream in streams:
                with contextlib.suppress(LinkDown):  # the link is back soon, or the request is lost anyway
                    if stream.flush_due(now):
                        self._held.set()
                    stream.keepalive(now)

    def announcement(self) -> dict[str, Any]:
        """What this agent can do and how loaded it is (`services.inference_router` reads it)."""
        described = self.engine.describe()
        bases: dict[str, Any] = {}
        running = waiting = 0
        active: set[str] = set()
        memory: set[str] = set()
        loading: set[str] = set()
        for base_id, info in described["bases"].items():
            kv = info.get("kv_cache") or {}
            bases[base_id] = {
                "path": info["path"],
                "kv_capacity_tokens": kv.get("blocks_total", 0) * kv.get("block_size", 0) or None,
                "max_batch": info.get("max_batch", self.engine.max_batch),
            }
            running += info.get("running", 0)
            waiting += info.get("waiting", 0)
            tiers = info.get("adapters") or {}
            active.update(tiers.get("active", []))
            memory.update(a["key"] for a in tiers.get("memory", []))
            loading.update(tiers.get("loading", []))
        cached, downloading = self.adapters.keys()
        with self.streams_lock:
            in_flight = len(self.streams)
        ram = psutil.virtual_memory()
        return {
            "every": self.announce_seconds,
            "roles": self.roles,
            "device": described["device"],
            "memory": {"total_bytes": ram.total, "available_bytes": ram.available},
            "bases": bases,
            "adapters": {
                "active": sorted(active),
                "memory": sorted(memory - active),
                "disk": sorted(set(cached) - memory - active),
                "loading": sorted(loading | set(downloading)),
                "capacity": self.adapters.capacity,
            },
            "running": running,
            "waiting": max(waiting, in_flight - running),
            "tokens_per_second": self.tokens_per_second(),
            "served": self.served,
            "adapter_hits": self.adapter_hits,
            "adapter_misses": self.adapter_misses,
        }

    def _announce_loop(self) -> None:
        last_sent = 0.0
        last_summary: Any = None
        while not self._stopping.is_set():
            self._changed.wait(ANNOUNCE_POLL_SECONDS)
            self._changed.clear()
            try:
                body = self.announcement()
            except Exception:  # noqa: BLE001 - a base being loaded, say: the next poll will do
                log.debug("describing the engine failed", exc_info=True)
                continue
            summary = (sorted(body["bases"]), body["running"], body["waiting"], body["adapters"], body["served"])
            now = time.monotonic()
            if summary == last_summary and now - last_sent < self.announce_seconds:
                continue
            try:
                self.link.call(protocol.agent_subject(self.agent_id, protocol.ANNOUNCE_VERB), body)
            except (LinkDown, RemoteError) as exc:
                log.info("announcement not delivered: %s", exc)
                continue
            last_sent, last_summary = now, summary
