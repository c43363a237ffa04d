"""The scheduler alone, on plain lists: no model, no thread, no tensors. A "step" here is what the engine does
with a plan: the chunks are computed, and each sequence whose context is then complete gets one more token."""

from __future__ import annotations

from adaptery.engine.kvcache import BlockAllocator
from adaptery.engine.scheduler import AdapterFailed, Scheduler, Sequence


def seq(name: str, prompt: int = 4, key: str = "", **fields: object) -> Sequence:
    sequence = Sequence(tokens=list(range(prompt)), prompt_len=prompt, fairness_key=key, **fields)
    sequence.name = name  # for the assertions' messages
    return sequence


def names(sequences) -> list[str]:
    return [s.name for s in sequences]


def scheduler(max_batch: int = 4, blocks: int = 64, block_size: int = 4, **kwargs: object) -> Scheduler:
    return Scheduler(BlockAllocator(blocks, block_size), max_batch=max_batch, max_step_tokens=64, **kwargs)


def step(sched: Scheduler, now: float = 0.0):
    plan = sched.plan(now)
    sched.computed(plan.chunks)
    for sequence, _ in plan.chunks:
        if sequence.cached == len(sequence.tokens):
            sequence.tokens.append(0)  # "sampled"
    return plan


def test_admission_is_fifo_and_stops_at_the_batch_size():
    sched = scheduler(max_batch=3)
    for name in "abcde":
        sched.add(seq(name))
    plan = step(sched)
    assert names(sched.running) == ["a", "b", "c"] and names(sched.waiting) == ["d", "e"]
    assert [(s.name, count) for s, count in plan.chunks] == [("a", 4), ("b", 4), ("c", 4)]  # whole prompts
    plan = step(sched)
    assert [(s.name, count) for s, count in plan.chunks] == [("a", 1), ("b", 1), ("c", 1)]  # then decodes


def test_decodes_go_first_and_a_long_prompt_is_cut_into_chunks():
    sched = Scheduler(BlockAllocator(64, 4), max_batch=2, max_step_tokens=8)
    sched.add(seq("short", prompt=2))
    step(sched)
    sched.add(seq("long", prompt=20))
    chunks = [[(s.name, count) for s, count in step(sched).chunks] for _ in range(3)]
    assert chunks == [[("short", 1), ("long", 7)], [("short", 1), ("long", 7)], [("short", 1), ("long", 6)]]


def test_two_keys_take_turns_however_they_arrived():
    sched = scheduler(max_batch=4)
    for name in ("a1", "a2", "a3", "a4"):
        sched.add(seq(name, key="a"))
    for name in ("b1", "b2"):
        sched.add(seq(name, key="b"))
    step(sched)
    assert names(sched.running) == ["a1", "b1", "a2", "b2"]  # round-robin, FIFO within a key
    assert names(sched.waiting) == ["a3", "a4"]


def test_a_key_over_its_share_gives_a_slot_to_a_key_that_waits():
    sched = scheduler(max_batch=4)
    for i in range(6):
        sched.add(seq(f"b{i}", key="b"))
    step(sched)
    assert names(sched.running) == ["b0", "b1", "b2", "b3"]
    sched.add(seq("a", key="a"))
    plan = step(sched)
    assert plan.preempted == 1  # one slot for the one waiting request, not b's whole share
    assert names(sched.running) == ["b0", "b1", "b2", "a"]
    assert names(sched.waiting) == ["b3", "b4", "b5"]  # the preempted one first in line, to be recomputed
    assert sched.waiting[0].cached == 0 and sched.waiting[0].table == []


def test_a_key_alone_is_never_preempted_for_fairness():
    sched = scheduler(max_batch=2)
    for i in range(4):
        sched.add(seq(f"b{i}", key="b"))
    plans = [step(sched) for _ in range(3)]
    assert sum(p.preempted for p in plans) == 0 and names(sched.running) == ["b0", "b1"]


def test_a_full_kv_cache_preempts_the_latest_admitted_which_is_recomputed_later():
    blocks = BlockAllocator(6, 4)  # 24 positions
    sched = Scheduler(blocks, max_batch=4, max_step_tokens=64)
    first, second = seq("first", prompt=6), seq("second", prompt=6)
    sched.add(first)
    sched.add(second)
    step(sched)  # 2 blocks each, 2 free
    preempted = 0
    while not preempted:  # both grow until the pool cannot hold both
        preempted = step(sched).preempted
    assert preempted == 1 and names(sched.running) == ["first"] and names(sched.waiting) == ["second"]
    assert second.cached == 0 and second.table == [] and blocks.used_blocks == len(first.table)
    generated = second.generated
    sched.finish(first)
    assert blocks.used_blocks == 0
    plan = step(sched)
    assert [(s.name, count) for s, count in plan.chunks] == [("second", 6 + generated)]  # prompt + its own tokens


def test_a_cancelled_sequence_frees_its_slot_and_blocks_for_the_next():
    blocks = BlockAllocator(64, 4)
    sched = Scheduler(blocks, max_batch=1, max_step_tokens=64)
    running, queued = seq("running", prompt=9), seq("queued", prompt=3)
    sched.add(running)
    sched.add(queued)
    step(sched)
    assert names(sched.running) == ["running"] and blocks.used_blocks == 3
    running.cancelled = True
    plan = step(sched)
    assert names(plan.cancelled) == ["running"] and running.table == []
    assert names(sched.running) == ["queued"] and blocks.used_blocks == 1
    assert [(s.name, count) for s, count in plan.chunks] == [("queued", 3)]


def test_a_sequence_past_its_deadline_is_ended_queued_or_running():
    sched = scheduler(max_batch=1)
    running, queued = seq("running", deadline=10.0), seq("queued", deadline=10.0)
    sched.add(running)
    sched.add(queued)
    step(sched, now=1.0)
    plan = step(sched, now=10.0)
    assert names(plan.overdue) == ["running", "queued"] and not sched.running and not sched.waiting
    assert sched.blocks.used_blocks == 0


class Adapters:
    """The engine's adapter store and slots, as plain state: `loaded` adapters are ready, `failed` ones fail."""

    def __init__(self, loaded: set[str], failed: set[str] = frozenset()) -> None:
        self.loaded, self.failed = loaded, failed
        self.active: list[str] = []

    def ready(self, sequence: Sequence) -> bool:
        return sequence.adapter_key in self.loaded

    def acquire(self, sequence: Sequence) -> bool:
        if sequence.adapter_key in self.failed:
            raise AdapterFailed(f"{sequence.adapter_key} is broken")
        if sequence.adapter_key not in self.loaded:
            return False
        sequence.adapter = sequence.adapter_key
        return True

    def activate(self, sequence: Sequence) -> None:
        self.active.append(sequence.adapter_key)

    def deactivate(self, adapter_key: str) -> None:
        self.active.remove(adapter_key)


def test_a_loading_adapter_waits_without_holding_others_up_and_a_failed_one_is_reported():
    adapters = Adapters(loaded={"ready"}, failed={"broken"})
    sched = scheduler(max_batch=4, adapters=adapters)
    for name, adapter in (("loading", "slow"), ("broken", "broken"), ("one", "ready"), ("two", "ready")):
        sched.add(seq(name, adapter_key=adapter))
    plan = step(sched)
    assert names(sched.running) == ["one", "two"] and names(sched.waiting) == ["loading"]
    assert [(s.name, error) for s, error in plan.failed] == [("broken", "broken is broken")]
    assert adapters.active == ["ready"]  # one slot for the adapter both use
    adapters.loaded.add("slow")
    step(sched)
    assert names(sched.running) == ["one", "two", "loading"] and adapters.active == ["ready", "slow"]
    sched.finish(sched.running[0])
    assert adapters.active == ["ready", "slow"]  # "two" still uses it
    sched.finish(sched.running[0])
    assert adapters.active == ["slow"]
