"""Who runs this step: the continuous-batching scheduler, on plain lists (no model, no thread, no tensors).

Every step it drops cancelled sequences and those past their deadline (a client that went away frees its slot
and KV blocks at the next step), admits waiting sequences while KV blocks, batch slots and their adapters allow,
then picks this step's work: single-token decodes plus chunks of prompts being prefilled (at most
`max_step_tokens` tokens per step, decodes first, so a long prompt never stalls the others). When the KV cache
runs out the most recently admitted sequence is preempted: its blocks are freed and it waits at the head of the
queue, to be recomputed (prompt + what it generated) later. No sequence is dropped.

Sequences carry an opaque fairness key (the server passes the tenant; the engine knows nothing else of it), and
no key can stall another. Admission is round-robin across keys, the key with the fewest running sequences first,
FIFO within a key. When a key has work that could run while another key holds more than its fair share of the
batch (max_batch / keys with work), the over-share key's most recently admitted sequences are preempted, as for
KV pressure, only as many as the under-share keys can use beyond the free slots, so the waiting key runs at the
next step. A key alone is never preempted for fairness. Measured before: 160 sequences of one tenant (10 × n=16,
1000 tokens) held a 32-slot batch and another tenant's 8-token request waited 299 s behind them in arrival order.

State lives here and only here: `waiting` (a deque, preempted sequences at its head) and `running` (a list, in
admission order). The KV cache is seen as its block allocator (`kvcache.BlockAllocator`); adapters through
`Adapters` (the engine's store and batch slots), only for sequences that name one.
"""

from __future__ import annotations

import itertools
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

from adaptery.engine.kvcache import BlockAllocator


@dataclass(eq=False)  # a sequence is itself, never equal to another with the same tokens
class Sequence:
    tokens: list[int]  # the prompt, then what was generated
    prompt_len: int
    fairness_key: str = ""  # opaque (the tenant): the batch is shared fairly between keys
    adapter_key: str | None = None
    deadline: float = float("inf")  # past it (the clock the caller passes to `plan`), the sequence is ended
    cancelled: bool = False
    adapter: object | None = None  # set by `Adapters.acquire` while the adapter is held (pinned) for it
    table: list[int] = field(default_factory=list)  # its KV blocks
    cached: int = 0  # tokens whose keys and values are in the cache
    order: int = 0  # admission order: the most recent is preempted first

    @property
    def generated(self) -> int:
        return len(self.tokens) - self.prompt_len


class AdapterFailed(Exception):
    """The sequence's adapter cannot be loaded; the message says why."""


class Adapters(Protocol):
    """Where adapters live (the engine's store and batch slots), as the scheduler needs them."""

    def ready(self, sequence: Sequence) -> bool:
        """Its adapter is in memory now (preempting for one still loading would only churn)."""

    def acquire(self, sequence: Sequence) -> bool:
        """Hold its adapter for it and set `sequence.adapter` (True), or leave it loading (False); raises
        AdapterFailed when its load failed."""

    def activate(self, sequence: Sequence) -> None:
        """Its adapter takes a batch slot: the first running sequence that uses it was admitted."""

    def deactivate(self, adapter_key: str) -> None:
        """The last running sequence that used this adapter left the batch."""


@dataclass
class Plan:
    """One step's decisions. `chunks`: (sequence, tokens to compute), 1 for a decode, more for a prefill chunk, in
    admission order. The other lists are sequences that left the scheduler this step, for the caller to tell."""

    chunks: list[tuple[Sequence, int]] = field(default_factory=list)
    cancelled: list[Sequence] = field(default_factory=list)
    overdue: list[Sequence] = field(default_factory=list)
    failed: list[tuple[Sequence, str]] = field(default_factory=list)  # its adapter could not be loaded
    preempted: int = 0


class Scheduler:
    def __init__(
        self, blocks: BlockAllocator, *, max_batch: int, max_step_tokens: int, adapters: Adapters | None = None
    ) -> None:
        self.blocks = blocks
        self.max_batch = max_batch
        self.max_step_tokens = max(max_step_tokens, max_batch + 1)  # room for every decode and a prefill token
        self.adapters = adapters
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.users: dict[str, int] = {}  # running sequences per active adapter
        self._order = itertools.count()

    def add(self, sequence: Sequence) -> None:
        if sequence.adapter_key is not None and self.adapters is None:
            raise ValueError("this scheduler has no adapters: a sequence may not name one")
        self.waiting.append(sequence)

    def plan(self, now: float) -> Plan:
        """Decide this step: drop cancelled and overdue sequences, make room for keys under their share, admit,
        and pick each running sequence's tokens for this step (preempting when the KV cache is full)."""
        plan = Plan()
        for sequence in [s for s in [*self.running, *self.waiting] if s.cancelled]:
            self.finish(sequence)
            plan.cancelled.append(sequence)
        for sequence in [s for s in [*self.running, *self.waiting] if s.deadline <= now]:
            self.finish(sequence)
            plan.overdue.append(sequence)
        plan.preempted += self._make_room_for_other_keys()
        self._admit(plan)
        plan.chunks = self._chunks(plan)
        return plan

    def computed(self, chunks: list[tuple[Sequence, int]]) -> None:
        """The step ran: the chunks' keys and values are in the cache."""
        for sequence, count in chunks:
            sequence.cached += count

    def finish(self, sequence: Sequence) -> None:
        """Take `sequence` out (finished, cancelled or failed): its batch slot, adapter slot and KV blocks free."""
        if sequence in self.running:
            self.running.remove(sequence)
            self._release_adapter(sequence)
        elif sequence in self.waiting:
            self.waiting.remove(sequence)
        self.blocks.release(sequence.table)

    # -- admission ----------------------------------------------------------------------------------

    def _admit(self, plan: Plan) -> None:
        admitted: list[Sequence] = []
        for sequence in self._fair_order(admitted):
            if len(self.running) + len(admitted) >= self.max_batch:
                break
            if sequence.adapter_key is not None and sequence.adapter is None:
                try:
                    if not self.adapters.acquire(sequence):
                        continue  # loading off this thread; others go ahead meanwhile
                except AdapterFailed as exc:
                    self.waiting.remove(sequence)  # every sequence that waited on the failed load hears of it
                    plan.failed.append((sequence, str(exc)))
                    continue
            # admit while the whole current context fits, keeping one block per running sequence spare
            need = self.blocks.blocks_for(len(sequence.tokens) + 1)
            spare = len(self.running) + len(admitted)
            if need + spare > len(self.blocks.free):
                break
            if sequence.adapter is not None:
                if self.users.get(sequence.adapter_key, 0) == 0:
                    self.adapters.activate(sequence)
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

    def _ready(self, sequence: Sequence) -> bool:
        return sequence.adapter_key is None or sequence.adapter is not None or self.adapters.ready(sequence)

    def _make_room_for_other_keys(self) -> int:
        """Preempt the most recently admitted sequences of keys over their fair share of the batch, as many as
        keys under it could admit now beyond the free slots (0 with a single key: no churn). Returns how many."""
        running = Counter(s.fairness_key for s in self.running)
        ready = Counter(s.fairness_key for s in self.waiting if self._ready(s))
        keys = set(running) | set(ready)
        if len(keys) < 2 or not ready:
            return 0
        share = max(1, self.max_batch // len(keys))
        wanted = sum(min(ready[k], share - running[k]) for k in ready if running[k] < share)
        preempted = 0
        for _ in range(wanted - (self.max_batch - len(self.running))):
            key, held = running.most_common(1)[0]
            if held <= share:
                break
            self._preempt(max((s for s in self.running if s.fairness_key == key), key=lambda s: s.order))
            running[key] -= 1
            preempted += 1
        return preempted

    # -- this step's work ---------------------------------------------------------------------------

    def _chunks(self, plan: Plan) -> list[tuple[Sequence, int]]:
        self.running.sort(key=lambda s: s.order)
        decodes = sum(1 for s in self.running if len(s.tokens) - s.cached == 1)
        prefill_budget = self.max_step_tokens - decodes
        chunks: list[tuple[Sequence, int]] = []
        for sequence in list(self.running):
            if sequence not in self.running:  # preempted below for an earlier sequence
                continue
            remaining = len(sequence.tokens) - sequence.cached
            count = 1 if remaining == 1 else min(remaining, prefill_budget)
            if count <= 0:
                continue
            while not self.blocks.grow(sequence.table, sequence.cached + count):
                victim = self.running[-1]
                self._preempt(victim)
                plan.preempted += 1
                if victim is sequence:
                    break
            if sequence not in self.running:
                break
            if remaining > 1:
                prefill_budget -= count
            chunks.append((sequence, count))
        return chunks

    def _preempt(self, victim: Sequence) -> None:
        self.blocks.release(victim.table)
        victim.cached = 0
        self.running.remove(victim)
        self._release_adapter(victim)
        self.waiting.appendleft(victim)  # first in line; recomputed from prompt + generated tokens

    def _release_adapter(self, sequence: Sequence) -> None:
        key = sequence.adapter_key
        if key is None or sequence.adapter is None:
            return
        self.users[key] -= 1
        if self.users[key] == 0:
            del self.users[key]
            self.adapters.deactivate(key)
