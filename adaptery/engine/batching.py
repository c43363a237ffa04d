"""Continuous batching over the native model: one engine thread per base model.

Every step the thread takes new requests, drops cancelled ones (a client that went away frees its
slot and KV blocks at the next step), admits waiting requests while KV blocks, batch slots and
their adapters allow, then runs ONE forward pass over all running sequences: single-token decodes
plus chunks of prompts being prefilled (at most `max_step_tokens` tokens per step, decodes first,
so a long prompt never stalls the others). Tokens are sorted by adapter so LoRA runs per segment.
When the KV cache runs out the most recently admitted sequence is preempted: its blocks are freed
and it waits at the head of the queue, to be recomputed (prompt + what it generated) later. No
request is dropped.

Requests carry an opaque fairness key (the server passes the tenant; the engine knows nothing else of it), and
no key can stall another. Admission is round-robin across keys, the key with the fewest running sequences first,
FIFO within a key. When a key has work that could run while another key holds more than its fair share of the
batch (max_batch / keys with work), the over-share key's most recently admitted sequences are preempted, as for
KV pressure, only as many as the under-share keys can use beyond the free slots, so the waiting key runs at the
next step. A key alone is never preempted for fairness. Measured before: 160 sequences of one tenant (10 × n=16,
1000 tokens) held a 32-slot batch and another tenant's 8-token request waited 299 s behind them in arrival order.

A request's adapter starts loading (on the store's loader thread) the moment the
request is submitted, so loading overlaps the steps that run while it queues; the engine keeps no
state per registered adapter, only per adapter in memory or in use.

Nothing a request contains may wedge the thread. `submit` refuses a prompt with no tokens (it would
hold a batch slot with nothing to compute, and the loop would spin on it: 32 empty prompts once filled
the batch until a restart) or with ids outside the vocabulary, so every running sequence has at least
one token to compute each step. A request still in the engine `request_timeout` seconds after it was
submitted, queued or running, is ended with finish "timeout" and its slot and KV blocks freed; a
sampling error ends only the request it belongs to.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from adaptery.engine import lora_kernel as fused_kernel
from adaptery.engine.constraints import Grammars
from adaptery.engine.kvcache import PagedKVCache
from adaptery.engine.lora import AdapterLoad, AdapterStore, LoraBatch, PreparedAdapter, SlotBuffers
from adaptery.engine.metrics import EngineMetrics
from adaptery.engine.native import NativeLlama, StepBatch
from adaptery.engine.sampling import SamplingParams, TokenLogprob, sample

log = logging.getLogger("adaptery.engine")


@dataclass
class Event:
    token: int | None = None
    logprob: TokenLogprob | None = None
    finish: str | None = None  # "stop" | "length" | "error" | "timeout"
    error: str | None = None


def deadline_message(timeout: float) -> str:
    return f"the request was still in the engine at its deadline of {timeout:g} s and was ended"


class Request:
    """The caller's handle: events arrive on `events`; `cancel()` frees the slot at the next step."""

    def __init__(self, engine: BatchEngine) -> None:
        self.events: queue.Queue[Event] = queue.Queue()
        self.cancelled = False
        self._engine = engine

    def cancel(self) -> None:
        self.cancelled = True
        self._engine.wake()


@dataclass
class Sequence:
    request: Request
    tokens: list[int]
    prompt_len: int
    params: SamplingParams
    adapter_key: str | None
    adapter_path: Path | None
    generator: torch.Generator | None
    submitted: float
    deadline: float  # perf_counter() time past which the request is ended
    fairness_key: str = ""  # opaque (the tenant): the batch is shared fairly between keys
    adapter: PreparedAdapter | None = None  # acquired (pinned) from the store while set
    load: AdapterLoad | None = None  # the adapter's load this request waits on
    table: list[int] = field(default_factory=list)
    cached: int = 0
    order: int = 0
    counts: dict[int, int] = field(default_factory=dict)
    first_token_at: float | None = None
    last_token_at: float | None = None
    matcher: Any = None  # the constraint's grammar state (`constraints.Grammars.matcher`), when it has one

    @property
    def generated(self) -> int:
        return len(self.tokens) - self.prompt_len


class BatchEngine:
    def __init__(
        self,
        name: str,
        model: NativeLlama,
        eos_ids: set[int],
        *,
        max_rank: int,
        kv_cache_bytes: int,
        adapter_cache_bytes: int,
        max_batch: int = 32,
        max_step_tokens: int = 256,
        metrics: EngineMetrics | None = None,
        lora_kernel: bool | None = None,
        adapter_dtype: torch.dtype | None = None,
        request_timeout: float | None = None,
        grammars: Grammars | None = None,
    ) -> None:
        self.name = name
        self.model = model
        self.grammars = grammars  # for requests with a constraint; None: the engine refuses them
        self.eos_ids = eos_ids
        self.max_batch = max_batch
        self.max_step_tokens = max(max_step_tokens, max_batch + 1)
        self.request_timeout = request_timeout  # seconds from submission; None: no deadline
        self.metrics = metrics or EngineMetrics()
        self.cache = PagedKVCache(
            len(model.layers), model.kv_heads, model.head_dim, model.dtype, kv_cache_bytes, block_size=16
        )
        # the fused C kernel unless disabled (False) or it cannot be built here (then the PyTorch path)
        kernel = fused_kernel.load() if lora_kernel is not False else None
        if lora_kernel and kernel is None:
            raise RuntimeError("the fused LoRA kernel was required but cannot be built on this machine")
        self.slots = SlotBuffers(model, max_batch, max_rank, kernel, adapter_dtype)
        self.lora_path = "fused C kernel" if kernel is not None else "PyTorch grouped_mm/bmm"
        self.store = AdapterStore(model, max_rank, adapter_cache_bytes, self.metrics, self.slots.dtype)
        self.store.on_ready.append(self.wake)
        self.users: dict[str, int] = {}  # running sequences per active adapter
        self.incoming: deque[Sequence] = deque()
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.steps = 0
        self._order = itertools.count()
        self._cond = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name=f"adaptery-engine-{name}", daemon=True)
        self._thread.start()

    # -- the caller's side -------------------------------------------------------------------------

    def submit(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        adapter_key: str | None,
        adapter_path: Path | None,
        fairness_key: str = "",
    ) -> Request:
        """Queue a generation; ValueError for a prompt the model cannot run (no tokens, ids outside its vocabulary).
        Requests of one `fairness_key` share the batch fairly with other keys' (see the module docstring)."""
        if not prompt_ids:
            raise ValueError("the prompt is empty: there is no token to continue from")
        if min(prompt_ids) < 0 or max(prompt_ids) >= self.model.vocab:
            raise ValueError(f"the prompt has token ids outside the model's vocabulary of {self.model.vocab}")
        if params.constraint is not None and self.grammars is None:
            raise ValueError("this engine was built without grammars: constrained output is not available")
        matcher = self.grammars.matcher(params.constraint) if params.constraint is not None else None
        request = Request(self)
        generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        now = time.perf_counter()
        sequence = Sequence(
            request,
            list(prompt_ids),
            len(prompt_ids),
            params,
            adapter_key,
            adapter_path,
            generator,
            now,
            now + self.request_timeout if self.request_timeout is not None else float("inf"),
            fairness_key,
            matcher=matcher,
        )
        if adapter_key is not None:
            sequence.load = self.store.prefetch(adapter_key, adapter_path)  # load while the request queues
        with self._cond:
            self.incoming.append(sequence)
            self._cond.notify()
        return request

    def wake(self) -> None:
        with self._cond:
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join(timeout=10)
        self.store.close()

    def describe(self) -> dict:
        with self.store.lock:
            memory = [
                {
                    "key": key,
                    "rank": a.rank,
                    "bytes": a.nbytes,
                    "dora": a.magnitude is not None,
                    "pinned": key in self.store.pinned,
                }
                for key, a in self.store.memory.items()
            ]
            loading = list(self.store.loading)
            on_disk = sorted(self.store.seen_on_disk - set(self.store.memory) - set(loading))
        return {
            "running": len(self.running),
            "waiting": len(self.waiting) + len(self.incoming),
            "steps": self.steps,
            "max_batch": self.max_batch,
            "max_step_tokens": self.max_step_tokens,
            "kv_cache": {
                "block_size": self.cache.block_size,
                "blocks_total": self.cache.num_blocks,
                "blocks_used": self.cache.used_blocks,
                "bytes": self.cache.bytes,
            },
            "adapters": {
                "lora_path": self.lora_path,
                "dtype": str(self.slots.dtype).removeprefix("torch."),
                "active": list(self.slots.keys),
                "memory": memory,
                "memory_bytes": sum(a["bytes"] for a in memory),
                "memory_budget_bytes": self.store.budget,
                "loading": loading,
                "disk": on_disk,
            },
        }

    # -- the engine thread -------------------------------------------------------------------------

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._cond:
                while not self._stopped and not self.incoming and not self._runnable():
                    self._cond.wait(timeout=0.5)
                if self._stopped:
                    break
                self.waiting.extend(self.incoming)
                self.incoming.clear()
            try:
                with torch.inference_mode():
                    self.step()
            except Exception as exc:  # a bug must not leave callers hanging: fail what is running
                log.exception("engine step failed")
                for sequence in [*self.running, *self.waiting]:
                    self._finish(sequence, "error", error=str(exc))
                self.waiting.clear()
        for sequence in [*self.running, *self.waiting, *self.incoming]:
            sequence.request.events.put(Event(finish="error", error="the engine stopped"))

    def _runnable(self) -> bool:
        if self.running:
            return True
        # waiting requests whose adapter is still loading do not spin the loop; the loader wakes us, and the
        # loop's timed wait notices one whose deadline passed meanwhile
        now = time.perf_counter()
        return any(s.request.cancelled or s.adapter_key is None or s.adapter is not None or s.deadline <= now or
                   s.load is None or s.load.done() for s in self.waiting)  # fmt: skip

    def step(self) -> None:
        self._drop_cancelled()
        self._end_overdue()
        self._make_room_for_other_keys()
        self._admit()
        scheduled = self._schedule()
        self._publish_gauges()
        if not scheduled:
            return
        batch, lora, completing = self._build(scheduled)
        logits = self.model.forward(batch, self.cache, lora)
        self.steps += 1
        for sequence, count in scheduled:
            sequence.cached += count
        self._sample(completing, logits)

    def _publish_gauges(self) -> None:
        m = self.metrics
        m.queue_depth.labels(self.name).set(len(self.waiting))
        m.running.labels(self.name).set(len(self.running))
        m.kv_blocks_used.labels(self.name).set(self.cache.used_blocks)
        m.kv_blocks_total.labels(self.name).set(self.cache.num_blocks)
        m.adapters.labels("active").set(len(self.slots.keys))
        m.adapters.labels("memory").set(len(self.store.memory))

    def _drop_cancelled(self) -> None:
        for sequence in [s for s in self.running if s.request.cancelled]:
            self._finish(sequence, "cancelled")
        for sequence in [s for s in self.waiting if s.request.cancelled]:
            self.waiting.remove(sequence)
            self._finish(sequence, "cancelled")

    def _end_overdue(self) -> None:
        now = time.perf_counter()
        for sequence in [s for s in [*self.running, *self.waiting] if s.deadline <= now]:
            if sequence in self.waiting:
                self.waiting.remove(sequence)
            self._finish(sequence, "timeout", error=deadline_message(self.request_timeout))

    def _admit(self) -> None:
        admitted: list[Sequence] = []
        for sequence in self._fair_order(admitted):
            if len(self.running) + len(admitted) >= self.max_batch:
                break
            if sequence.adapter_key is not None and sequence.adapter is None:
                if sequence.load is not None and sequence.load.done() and sequence.load.error is not None:
                    self.waiting.remove(sequence)  # every request that waited on the failed load hears of it
                    sequence.request.events.put(
                        Event(finish="error", error=f"the adapter could not be loaded: {sequence.load.error}")
                    )
                    self.metrics.requests.labels(self.name, "native", "error").inc()
                    continue
                got = self.store.acquire(sequence.adapter_key, sequence.adapter_path)  # pinned if in memory
                if isinstance(got, AdapterLoad):
                    sequence.load = got
                    continue  # loading off this thread; others go ahead meanwhile
                sequence.adapter, sequence.load = got, None
            # admit while the whole current context fits, keeping one block per running sequence spare
            need = self.cache.blocks_for(len(sequence.tokens) + 1)
            spare = len(self.running) + len(admitted)
            if need + spare > len(self.cache.free):
                break
            if sequence.adapter is not None:
                if self.users.get(sequence.adapter_key, 0) == 0:
                    self.slots.activate(sequence.adapter)
                self.users[sequence.adapter_key] = self.users.get(sequence.adapter_key, 0) + 1
            sequence.order = next(self._order)
            self.waiting.remove(sequence)
            admitted.append(sequence)
        self.running.extend(admitted)

    def _fair_order(self, admitted: list[Sequence]) -> Iterator[Sequence]:
        """The waiting sequences in admission order: each next one from the key with the fewest running (and
        `admitted`, which the caller fills as it goes) sequences, ties to the key waiting longest; FIFO within a key."""
        queues: dict[str, deque[Sequence]] = {}
        for sequence in self.waiting:
            queues.setdefault(sequence.fairness_key, deque()).append(sequence)
        position = {id(sequence): i for i, sequence in enumerate(self.waiting)}
        while queues:
            running = Counter(s.fairness_key for s in itertools.chain(self.running, admitted))
            key = min(queues, key=lambda k: (running[k], position[id(queues[k][0])]))
            yield queues[key].popleft()
            if not queues[key]:
                del queues[key]

    def _make_room_for_other_keys(self) -> None:
        """Preempt the most recently admitted sequences of keys over their fair share of the batch, as many as
        keys under it could admit now beyond the free slots (0 with a single key: no churn)."""
        running = Counter(s.fairness_key for s in self.running)
        ready = Counter(s.fairness_key for s in self.waiting if self._adapter_ready(s))
        keys = set(running) | set(ready)
        if len(keys) < 2 or not ready:
            return
        share = max(1, self.max_batch // len(keys))
        wanted = sum(min(ready[k], share - running[k]) for k in ready if running[k] < share)
        for _ in range(wanted - (self.max_batch - len(self.running))):
            key, held = running.most_common(1)[0]
            if held <= share:
                return
            self._preempt(max((s for s in self.running if s.fairness_key == key), key=lambda s: s.order))
            running[key] -= 1

    def _adapter_ready(self, sequence: Sequence) -> bool:
        # a request whose adapter is still loading cannot take a slot: preempting for it would only churn
        if sequence.adapter_key is None or sequence.adapter is not None:
            return True
        with self.store.lock:
            return sequence.adapter_key in self.store.memory

    def _release_adapter(self, sequence: Sequence) -> None:
        key = sequence.adapter_key
        if key is None or sequence.adapter is None:
            return
        self.users[key] -= 1
        if self.users[key] == 0:
            del self.users[key]
            self.slots.deactivate(key)

    def _preempt(self, victim: Sequence) -> None:
        self.cache.release(victim.table)
        victim.cached = 0
        self.running.remove(victim)
        self._release_adapter(victim)
        self.waiting.appendleft(victim)  # first in line; recomputed from prompt + generated tokens
        self.metrics.preemptions.labels(self.name).inc()

    def _schedule(self) -> list[tuple[Sequence, int]]:
        self.running.sort(key=lambda s: s.order)
        decodes = sum(1 for s in self.running if len(s.tokens) - s.cached == 1)
        prefill_budget = self.max_step_tokens - decodes
        scheduled: list[tuple[Sequence, int]] = []
        for sequence in list(self.running):
            if sequence not in self.running:  # preempted below for an earlier sequence
                continue
            remaining = len(sequence.tokens) - sequence.cached
            count = 1 if remaining == 1 else min(remaining, prefill_budget)
            if count <= 0:
                continue
            while not self.cache.grow(sequence.table, sequence.cached + count):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is sequence:
                    break
            if sequence not in self.running:
                break
            if remaining > 1:
                prefill_budget -= count
            scheduled.append((sequence, count))
        return scheduled

    def _build(
        self, scheduled: list[tuple[Sequence, int]]
    ) -> tuple[StepBatch, LoraBatch | None, list[tuple[Sequence, int]]]:
        def slot(item: tuple[Sequence, int]) -> int:
            key = item[0].adapter_key
            return -1 if key is None else self.slots.index[key]

        ordered = sorted(scheduled, key=slot)
        tokens, positions, writes = [], [], []
        decode_rows, decode_contexts, prefill, completing = [], [], [], []
        row = 0
        counts = [0] * len(self.slots.keys)
        base_tokens = 0
        token_slots: list[int] = []
        for item in ordered:
            sequence, count = item
            start = sequence.cached
            tokens.extend(sequence.tokens[start : start + count])
            positions.extend(range(start, start + count))
            writes.append(self.cache.positions(sequence.table, start, start + count))
            context = self.cache.positions(sequence.table, 0, start + count)
            if count == 1:
                decode_rows.append(row)
                decode_contexts.append(context)
            else:
                prefill.append((row, count, context))
            index = slot(item)
            if index < 0:
                base_tokens += count
            else:
                counts[index] += count
                token_slots.extend([index] * count)
            if start + count == len(sequence.tokens):
                completing.append((sequence, row + count - 1))
            row += count
        if decode_contexts:
            longest = max(c.shape[0] for c in decode_contexts)
            context = torch.zeros(len(decode_contexts), longest, dtype=torch.long)
            mask = torch.ones(len(decode_contexts), longest, dtype=torch.bool)
            for i, c in enumerate(decode_contexts):
                context[i, : c.shape[0]] = c
                mask[i, : c.shape[0]] = False
        else:
            context = torch.zeros(0, 0, dtype=torch.long)
            mask = torch.zeros(0, 0, dtype=torch.bool)
        batch = StepBatch(
            tokens=torch.tensor(tokens, dtype=torch.long),
            positions=torch.tensor(positions, dtype=torch.long),
            write_slots=torch.cat(writes),
            decode_rows=torch.tensor(decode_rows, dtype=torch.long),
            decode_context=context,
            decode_mask=mask,
            prefill=prefill,
            logit_rows=torch.tensor([r for _, r in completing], dtype=torch.long),
        )
        lora = None
        if base_tokens < row:
            lora = LoraBatch(self.slots, base_tokens, counts, torch.tensor(token_slots, dtype=torch.int32))
        return batch, lora, completing

    def _sample(self, completing: list[tuple[Sequence, int]], logits: torch.Tensor) -> None:
        now = time.perf_counter()
        constrained = [(s.matcher, i) for i, (s, _) in enumerate(completing) if s.matcher is not None]
        if constrained:  # only these rows pay for a mask
            self.grammars.mask(logits, constrained)
        greedy = logits.argmax(dim=-1).tolist()
        for i, (sequence, _) in enumerate(completing):
            params = sequence.params
            penalized = sequence.counts and (params.presence_penalty or params.frequency_penalty)
            try:
                if params.temperature <= 0 and not params.logprobs and not penalized:
                    token, logprob = greedy[i], None
                else:
                    token, logprob = sample(logits[i], params, sequence.generator, sequence.counts)
            except Exception as exc:  # this request's options: the others in the batch go on
                log.exception("sampling failed for one request")
                self._finish(sequence, "error", error=f"sampling failed: {exc}")
                continue
            if sequence.first_token_at is None:
                sequence.first_token_at = now
                self.metrics.ttft.labels(self.name).observe(now - sequence.submitted)
            sequence.last_token_at = now
            if token in self.eos_ids:
                self._finish(sequence, "stop")
                continue
            sequence.tokens.append(token)
            sequence.counts[token] = sequence.counts.get(token, 0) + 1
            sequence.request.events.put(Event(token=token, logprob=logprob))
            if sequence.matcher is not None and (not sequence.matcher.consume_token(token) or
                                                 sequence.matcher.is_stopped()):  # fmt: skip
                self._finish(sequence, "stop")  # the grammar is complete: nothing else may follow
            elif sequence.generated >= params.max_tokens or len(sequence.tokens) >= self.model.cos.shape[0]:
                self._finish(sequence, "length")

    def _finish(self, sequence: Sequence, reason: str, error: str | None = None) -> None:
        if sequence in self.running:
            self.running.remove(sequence)
            self._release_adapter(sequence)
        self.cache.release(sequence.table)
        if sequence.adapter is not None:
            self.store.release(sequence.adapter_key)
            sequence.adapter = None
        m = self.metrics
        m.requests.labels(self.name, "native", reason).inc()
        m.prompt_tokens.labels(self.name).inc(sequence.prompt_len)
        m.completion_tokens.labels(self.name).inc(sequence.generated)
        if sequence.generated > 1 and sequence.first_token_at and sequence.last_token_at:
            m.tpot.labels(self.name).observe(
                (sequence.last_token_at - sequence.first_token_at) / (sequence.generated - 1)
            )
        if reason != "cancelled":
            sequence.request.events.put(Event(finish=reason, error=error))
