"""The engine's adapter store (issue 15 item 1): get-or-load-and-pin is one step, and a load is shared by every
request that waits for it, its failure included. Plain objects and threads; a fake loader blocks on events."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from engine_helpers import collect
from transformers import Qwen2Config, Qwen2ForCausalLM

from adaptery.engine import lora
from adaptery.engine.batching import BatchEngine
from adaptery.engine.lora import AdapterLoad, AdapterStore, PreparedAdapter
from adaptery.engine.native import NativeLlama
from adaptery.engine.sampling import SamplingParams

WAIT = 30  # seconds: only a hang would reach it


class FakeLoader:
    """Stands in for `prepare_adapter`: each key's load blocks until `release(key)`, then returns an adapter of
    `nbytes` or raises for a key in `broken`; `calls` counts the loads begun."""

    def __init__(self, nbytes: int = 60, broken: tuple[str, ...] = ()) -> None:
        self.nbytes, self.broken = nbytes, set(broken)
        self.gates: dict[str, threading.Event] = {}
        self.started: dict[str, threading.Event] = {}
        self.calls: dict[str, int] = {}
        self.lock = threading.Lock()

    def _gate(self, table: dict[str, threading.Event], key: str) -> threading.Event:
        with self.lock:
            return table.setdefault(key, threading.Event())

    def release(self, key: str) -> None:
        self._gate(self.gates, key).set()

    def __call__(self, key, path, model, max_rank, dtype):  # noqa: ANN001, ANN204 - prepare_adapter's signature
        with self.lock:
            self.calls[key] = self.calls.get(key, 0) + 1
        self._gate(self.started, key).set()
        assert self._gate(self.gates, key).wait(WAIT)
        if key in self.broken:
            raise lora.AdapterRejected(f"{key} is broken")
        return PreparedAdapter(key, 1, {}, {}, None, self.nbytes)


@pytest.fixture
def loader(monkeypatch: pytest.MonkeyPatch) -> FakeLoader:
    fake = FakeLoader(broken=("broken",))
    monkeypatch.setattr(lora, "prepare_adapter", fake)
    return fake


def _loaded(store: AdapterStore, loader: FakeLoader, key: str) -> PreparedAdapter:
    """Acquire `key`, letting its load finish: the adapter, pinned."""
    got = store.acquire(key, Path(key))
    if isinstance(got, AdapterLoad):
        loader.release(key)
        assert got.wait(WAIT) and got.error is None
        got = store.acquire(key, Path(key))
    assert isinstance(got, PreparedAdapter)
    return got


def _counted(store: AdapterStore) -> bool:
    return store.memory_bytes == sum(a.nbytes for a in store.memory.values())


def test_an_acquired_adapter_is_pinned_at_once_so_a_load_finishing_cannot_evict_it(loader):
    """Budget for one adapter: `a` is handed out, then `b`'s load finishes and evicts. Before, `request` handed `a`
    out unpinned and `pin` came in a second call: the loader's eviction in between dropped `a` (and its bytes)
    while a request used it."""
    store = AdapterStore(None, 16, budget_bytes=100)
    try:
        a = _loaded(store, loader, "a")
        assert store.pinned == {"a": 1}
        b_load = store.acquire("b", Path("b"))
        assert isinstance(b_load, AdapterLoad)
        loader.release("b")
        assert b_load.wait(WAIT) and b_load.error is None
        assert store.memory.get("a") is a and "a" in store.pinned  # still held, still counted
        assert _counted(store) and store.memory_bytes >= a.nbytes
        store.release("a")  # the last holder lets go: now it may go, and the budget is kept
        assert "a" not in store.pinned and store.memory_bytes <= store.budget and _counted(store)
        with pytest.raises(RuntimeError, match="released more often"):
            store.release("a")
    finally:
        store.close()


def test_acquire_and_release_are_symmetric_under_concurrent_loads(loader):
    """Two threads acquire and release `a` while `b`..`k` load and evict: `a` is in memory and counted whenever
    anyone holds it, and nothing stays pinned after."""
    store = AdapterStore(None, 16, budget_bytes=130)
    try:
        _loaded(store, loader, "a")
        store.release("a")
        for key in "bcdefghijk":
            loader.release(key)
        problems: list[str] = []

        def user() -> None:
            for _ in range(200):
                got = store.acquire("a", Path("a"))
                if isinstance(got, AdapterLoad):  # evicted while nobody held it: load it again
                    assert got.wait(WAIT)
                    continue
                with store.lock:
                    if store.memory.get("a") is not got or not _counted(store):
                        problems.append("an acquired adapter left memory or the byte count")
                store.release("a")

        def other_loads() -> None:
            for key in "bcdefghijk":
                got = store.acquire(key, Path(key))
                if isinstance(got, AdapterLoad):
                    assert got.wait(WAIT)
                    got = store.acquire(key, Path(key))
                if isinstance(got, PreparedAdapter):
                    store.release(key)

        loader.release("a")
        threads = [threading.Thread(target=user), threading.Thread(target=user), threading.Thread(target=other_loads)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(WAIT)
        assert not problems and store.pinned == {} and _counted(store)
    finally:
        store.close()


def test_a_failed_load_reaches_every_waiter_and_a_later_request_loads_again(loader):
    store = AdapterStore(None, 16, budget_bytes=1000)
    try:
        first = store.prefetch("broken", Path("broken"))
        second = store.acquire("broken", Path("broken"))
        assert isinstance(first, AdapterLoad) and second is first  # one load, shared
        assert store.loading == {"broken": first}
        loader.release("broken")
        assert first.wait(WAIT)
        assert first.error == second.error == "broken is broken" and loader.calls["broken"] == 1
        assert "broken" not in store.loading and "broken" not in store.memory
        # no negative cache: a request after the failure tries again (the files may have been fixed)
        again = store.acquire("broken", Path("broken"))
        assert isinstance(again, AdapterLoad) and again is not first and not again.done()
        assert again.wait(WAIT) and loader.calls["broken"] == 2
    finally:
        store.close()


def test_every_request_waiting_on_a_failed_load_is_told_and_it_is_loaded_once(loader):
    """Through the engine: three requests queue for an adapter whose one load fails. Before, the first request
    took the failure and the others each began another load (the fake's count said 2-3)."""
    config = Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)  # fmt: skip
    torch.manual_seed(0)
    model = NativeLlama(Qwen2ForCausalLM(config).eval(), torch.float32, 128)
    engine = BatchEngine("t", model, set(), max_rank=8, kv_cache_bytes=1 << 20, adapter_cache_bytes=1 << 20,
                         lora_kernel=False).start()  # fmt: skip
    try:
        params = SamplingParams(max_tokens=2, temperature=0.0)
        requests = [engine.submit([5, 17, 42], params, "broken", Path("broken")) for _ in range(3)]
        assert loader._gate(loader.started, "broken").wait(WAIT)
        loader.release("broken")
        for request in requests:
            with pytest.raises(RuntimeError, match="could not be loaded: broken is broken"):
                collect(request, timeout=WAIT)
        assert loader.calls == {"broken": 1}
        assert collect(engine.submit([5, 17, 42], params, None, None), timeout=WAIT)  # the engine still serves
    finally:
        engine.stop()
