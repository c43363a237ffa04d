"""Continuous batching over the native model: one engine thread per base model.

The engine is split by responsibility (STYLE.md): `scheduler.Scheduler` decides who runs each step (admission,
fairness between keys, preemption, prefill chunks; its docstring has the policy); `BatchEngine` owns the thread
and the model runner: each step it asks the scheduler for a plan, builds one batch from it (tokens sorted by
adapter so LoRA runs per segment), runs ONE forward pass over all running sequences, and samples. `start()`
starts the thread; without it a caller (a test) may call `step()` itself.

A request's adapter starts loading (on the store's loader thread) the moment the
request is submitted, so loading overlaps the steps that run while it queues; the engine keeps no
state per registered adapter, only per adapter in memory or in use.

Nothing a request contains may wedge the thread. `submit` refuses a prompt with no tokens (it would
hold a batch slot with nothing to compute, and the loop would spin on it: 32 empty prompts once filled
the batch until a restart) or with ids outside the vocabulary, so every running sequence has at least
one token to compute each step. A request still in the engine `request_timeout` seconds after it was
submitted, queued or running, is ended with finish "timeout" and its slot and KV blocks freed; a
sampling error ends only the request it belongs to.

Shape defaults (a step's token budget `max_step_tokens` 256, `max_batch` 32, KV blocks of 16 positions) stay as
they were after bench/step_shape.py (issue 18; fp32, width 1024, 8 layers, 48 saturating requests, two alternating
rounds, load 10-16 on 2 cores): budgets 128 and 512 tok/s 52/30 and 34/54 against 39/38, batch 48 40/36, blocks of
32 34/35: nothing beat the defaults in both rounds, and blocks of 32 lost in both. Decode attention reads the blocks in
place (`lora_kernel.paged_decode`), so the block size no longer sets a gather's padding.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from adaptery.engine import lora_kernel as fused_kernel
from adaptery.engine.constraints import Grammars
from adaptery.engine.kvcache import PagedKVCache
from adaptery.engine.lora import AdapterLoad, AdapterStore, LoraBatch, SlotBuffers
from adaptery.engine.metrics import EngineMetrics
from adaptery.engine.native import NativeLlama, StepBatch
from adaptery.engine.sampling import SamplingParams, TokenLogprob, apply_logit_bias, sample
from adaptery.engine.scheduler import AdapterFailed, Scheduler, Sequence

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

    def __init__(self, engine: BatchEngine, generation: Generation) -> None:
        self.events: queue.Queue[Event] = queue.Queue()
        self._engine = engine
        self._generation = generation

    @property
    def cancelled(self) -> bool:
        return self._generation.cancelled

    def cancel(self) -> None:
        self._generation.cancelled = True
        self._engine.wake()


@dataclass(eq=False, kw_only=True)
class Generation(Sequence):
    """A scheduled sequence with what the model runner and the sampler need besides."""

    params: SamplingParams
    adapter_path: Path | None = None
    generator: torch.Generator | None = None
    submitted: float = 0.0
    request: Request | None = None  # set right after: the handle names its generation
    load: AdapterLoad | None = None  # the adapter's load this request waits on
    counts: dict[int, int] = field(default_factory=dict)
    first_token_at: float | None = None
    last_token_at: float | None = None
    matcher: Any = None  # the constraint's grammar state (`constraints.Grammars.matcher`), when it has one


class _EngineAdapters:
    """The scheduler's view of the engine's adapters: the store holds (pins) them, the batch slots activate them."""

    def __init__(self, store: AdapterStore, slots: SlotBuffers) -> None:
        self.store = store
        self.slots = slots

    def ready(self, sequence: Generation) -> bool:
        with self.store.lock:
            return sequence.adapter_key in self.store.memory

    def acquire(self, sequence: Generation) -> bool:
        if sequence.load is not None and sequence.load.done() and sequence.load.error is not None:
            raise AdapterFailed(f"the adapter could not be loaded: {sequence.load.error}")
        got = self.store.acquire(sequence.adapter_key, sequence.adapter_path)  # pinned if in memory
        if isinstance(got, AdapterLoad):
            sequence.load = got
            return False
        sequence.adapter, sequence.load = got, None
        return True

    def activate(self, sequence: Generation) -> None:
        self.slots.activate(sequence.adapter)

    def deactivate(self, adapter_key: str) -> None:
        self.slots.deactivate(adapter_key)


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
        block_size: int = 16,
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
        self.request_timeout = request_timeout  # seconds from submission; None: no deadline
        self.metrics = metrics or EngineMetrics()
        self.cache = PagedKVCache(
            len(model.layers), model.kv_heads, model.head_dim, model.dtype, kv_cache_bytes, block_size=block_size
        )
        # the fused C kernel unless disabled (False) or it cannot be built here (then the PyTorch path)
        kernel = fused_kernel.load() if lora_kernel is not False else None
        if lora_kernel and kernel is None:
            raise RuntimeError("the fused LoRA kernel was required but cannot be built on this machine")
        self.slots = SlotBuffers(model, max_batch, max_rank, kernel, adapter_dtype)
        # decode attention from the paged cache and the fused elementwise ops in C whenever the library builds
        # (lora_kernel=False is about LoRA)
        model.kernel = kernel if kernel is not None else fused_kernel.load()
        self.lora_path = "fused C kernel" if kernel is not None else "PyTorch grouped_mm/bmm"
        self.store = AdapterStore(model, max_rank, adapter_cache_bytes, self.metrics, self.slots.dtype)
        self.store.on_ready.append(self.wake)
        self.scheduler = Scheduler(
            self.cache,
            max_batch=max_batch,
            max_step_tokens=max_step_tokens,
            adapters=_EngineAdapters(self.store, self.slots),
        )
        self.incoming: deque[Generation] = deque()  # submitted, not yet handed to the scheduler (the thread's lock)
        self.steps = 0
        self._cond = threading.Condition()
        self._stopped = False
        self._thread: threading.Thread | None = None

    @property
    def max_step_tokens(self) -> int:
        return self.scheduler.max_step_tokens

    @property
    def waiting(self) -> deque[Sequence]:
        return self.scheduler.waiting

    @property
    def running(self) -> list[Sequence]:
        return self.scheduler.running

    def start(self) -> BatchEngine:
        """Start the engine thread (once); returns the engine."""
        if self._thread is not None:
            raise RuntimeError(f"engine {self.name} was already started")
        self._thread = threading.Thread(target=self._loop, name=f"adaptery-engine-{self.name}", daemon=True)
        self._thread.start()
        return self

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
        Requests of one `fairness_key` share the batch fairly with other keys' (see scheduler.py)."""
        if not prompt_ids:
            raise ValueError("the prompt is empty: there is no token to continue from")
        if min(prompt_ids) < 0 or max(prompt_ids) >= self.model.vocab:
            raise ValueError(f"the prompt has token ids outside the model's vocabulary of {self.model.vocab}")
        if params.constraint is not None and self.grammars is None:
            raise ValueError("this engine was built without grammars: constrained output is not available")
        matcher = self.grammars.matcher(params.constraint) if params.constraint is not None else None
        now = time.perf_counter()
        generation = Generation(
            tokens=list(prompt_ids),
            prompt_len=len(prompt_ids),
            fairness_key=fairness_key,
            adapter_key=adapter_key,
            deadline=now + self.request_timeout if self.request_timeout is not None else float("inf"),
            params=params,
            adapter_path=adapter_path,
            generator=torch.Generator().manual_seed(params.seed) if params.seed is not None else None,
            submitted=now,
            matcher=matcher,
        )
        generation.request = request = Request(self, generation)
        if adapter_key is not None:
            generation.load = self.store.prefetch(adapter_key, adapter_path)  # load while the request queues
        with self._cond:
            self.incoming.append(generation)
            self._cond.notify()
        return request

    def wake(self) -> None:
        with self._cond:
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout=10)
        else:  # never started: nobody else will tell the callers
            self._end_all("the engine stopped")
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
            "step": self.model.step_paths(),
            "kv_cache": {
                "block_size": self.cache.block_size,
                "blocks_total": self.cache.num_blocks,
                "blocks_used": self.cache.used_blocks,
                "bytes": self.cache.bytes,
                "decode_attention": "C, from the paged blocks in place"
                if self.model.kernel is not None
                else "PyTorch, gathered blocks and SDPA",
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
            try:
                with torch.inference_mode():
                    self.step()
            except Exception as exc:  # a bug must not leave callers hanging: fail what is running
                log.exception("engine step failed")
                for sequence in [*self.running, *self.waiting]:
                    self._finish(sequence, "error", error=str(exc))
        self._end_all("the engine stopped")

    def _end_all(self, error: str) -> None:
        with self._cond:
            left = [*self.running, *self.waiting, *self.incoming]
            self.incoming.clear()
        for sequence in left:
            sequence.request.events.put(Event(finish="error", error=error))

    def _runnable(self) -> bool:
        if self.running:
            return True
        # waiting requests whose adapter is still loading do not spin the loop; the loader wakes us, and the
        # loop's timed wait notices one whose deadline passed meanwhile
        now = time.perf_counter()
        return any(s.cancelled or s.adapter_key is None or s.adapter is not None or s.deadline <= now or
                   s.load is None or s.load.done() for s in self.waiting)  # fmt: skip

    def step(self) -> None:
        """One step: hand the submitted requests to the scheduler, ask it for a plan, run the plan's batch."""
        with self._cond:
            for generation in self.incoming:
                self.scheduler.add(generation)
            self.incoming.clear()
        plan = self.scheduler.plan(time.perf_counter())
        for sequence in plan.cancelled:
            self._report(sequence, "cancelled")
        for sequence in plan.overdue:
            self._report(sequence, "timeout", error=deadline_message(self.request_timeout))
        for sequence, error in plan.failed:
            sequence.request.events.put(Event(finish="error", error=error))
            self.metrics.requests.labels(self.name, "native", "error").inc()
        if plan.preempted:
            self.metrics.preemptions.labels(self.name).inc(plan.preempted)
        self._publish_gauges()
        if not plan.chunks:
            return
        batch, lora, completing = self._build(plan.chunks)
        logits = self.model.forward(batch, self.cache, lora)
        self.steps += 1
        self.scheduler.computed(plan.chunks)
        self._sample(completing, logits)

    def _publish_gauges(self) -> None:
        metrics = self.metrics
        metrics.queue_depth.labels(self.name).set(len(self.waiting))
        metrics.running.labels(self.name).set(len(self.running))
        metrics.kv_blocks_used.labels(self.name).set(self.cache.used_blocks)
        metrics.kv_blocks_total.labels(self.name).set(self.cache.num_blocks)
        metrics.adapters.labels("active").set(len(self.slots.keys))
        metrics.adapters.labels("memory").set(len(self.store.memory))

    def _build(
        self, scheduled: list[tuple[Sequence, int]]
    ) -> tuple[StepBatch, LoraBatch | None, list[tuple[Sequence, int]]]:
        def slot(item: tuple[Sequence, int]) -> int:
            key = item[0].adapter_key
            return -1 if key is None else self.slots.index[key]

        ordered = sorted(scheduled, key=slot)
        block_size = self.cache.block_size
        tokens, positions, writes = [], [], []
        decode_rows, decode_tables, decode_lengths, prefill, completing = [], [], [], [], []
        row = 0
        counts = [0] * len(self.slots.keys)
        base_tokens = 0
        token_slots: list[int] = []
        for item in ordered:
            sequence, count = item
            start, table = sequence.cached, sequence.table
            tokens.extend(sequence.tokens[start : start + count])
            positions.extend(range(start, start + count))
            # plain integers per sequence, one tensor per step: a decode costs no tensor operation of its own
            writes.extend(table[p // block_size] * block_size + p % block_size for p in range(start, start + count))
            if count == 1:
                decode_rows.append(row)
                decode_tables.append(table[: -(-(start + 1) // block_size)])
                decode_lengths.append(start + 1)
            else:
                prefill.append((row, count, self.cache.positions(table, 0, start + count)))
            index = slot(item)
            if index < 0:
                base_tokens += count
            else:
                counts[index] += count
                token_slots.extend([index] * count)
            if start + count == len(sequence.tokens):
                completing.append((sequence, row + count - 1))
            row += count
        longest = max((len(t) for t in decode_tables), default=0)
        blocks = torch.tensor([t + [0] * (longest - len(t)) for t in decode_tables], dtype=torch.long)
        mask = torch.arange(longest * block_size) >= torch.tensor(decode_lengths, dtype=torch.long)[:, None]
        batch = StepBatch(
            tokens=torch.tensor(tokens, dtype=torch.long),
            positions=torch.tensor(positions, dtype=torch.long),
            write_slots=torch.tensor(writes, dtype=torch.long),
            decode_rows=torch.tensor(decode_rows, dtype=torch.long),
            decode_blocks=blocks.view(len(decode_tables), longest),
            decode_mask=mask,
            decode_lengths=torch.tensor(decode_lengths, dtype=torch.long),
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
        for i, (sequence, _) in enumerate(completing):
            apply_logit_bias(logits[i], sequence.params)
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

    def _finish(self, sequence: Generation, reason: str, error: str | None = None) -> None:
        self.scheduler.finish(sequence)
        self._report(sequence, reason, error)

    def _report(self, sequence: Generation, reason: str, error: str | None = None) -> None:
        """A sequence the scheduler let go: unpin its adapter, count it, tell its caller (unless it cancelled)."""
        if sequence.adapter is not None:
            self.store.release(sequence.adapter_key)
            sequence.adapter = None
        metrics = self.metrics
        metrics.requests.labels(self.name, "native", reason).inc()
        metrics.prompt_tokens.labels(self.name).inc(sequence.prompt_len)
        metrics.completion_tokens.labels(self.name).inc(sequence.generated)
        if sequence.generated > 1 and sequence.first_token_at and sequence.last_token_at:
            metrics.tpot.labels(self.name).observe(
                (sequence.last_token_at - sequence.first_token_at) / (sequence.generated - 1)
            )
        if reason != "cancelled":
            sequence.request.events.put(Event(finish=reason, error=error))
