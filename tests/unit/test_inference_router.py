"""The router on plain data: LoRA affinity (active 1.0, free slot 0.8, loading 0.6, else 0) weighed against
load, agents lost after missed announcements or a broken stream, tenant scopes, and KV capacity."""

from __future__ import annotations

import random

import pytest

from adaptery.services.inference_router import EVICTS, FREE_SLOT, LOADING, InferenceRouter

BASE = "adaptery-demo"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def announcement(*, resident=(), loading=(), capacity=4, max_batch=32, kv=4096, bases=(BASE,)) -> dict:
    return {
        "every": 1.0,
        "bases": {b: {"kv_capacity_tokens": kv, "max_batch": max_batch} for b in bases},
        "adapters": {
            "active": list(resident),
            "memory": [],
            "disk": [],
            "loading": list(loading),
            "capacity": capacity,
        },
        "running": 0,
        "waiting": 0,
    }


def router_with(clock: Clock | None = None, **agents: dict) -> InferenceRouter:
    router = InferenceRouter(missed=3, rng=random.Random(0), clock=clock or Clock())
    router.scopes = {name: None for name in agents}
    for name, body in agents.items():
        router.announce(name, body, default_every=1.0)
    return router


def test_an_adapter_goes_to_the_agent_where_it_is_resident():
    router = router_with(a=announcement(), b=announcement(resident=["x"]))
    assert {router.pick(BASE, "x", tenant_id="t") for _ in range(5)} == {"b"}


def test_affinity_scores_resident_over_free_slot_over_loading_over_eviction():
    router = router_with(a=announcement(resident=["x"]))
    agent = router._agents["a"]
    assert agent.affinity("x") == 1.0
    assert agent.affinity("y") == FREE_SLOT
    full = router_with(a=announcement(resident=["p", "q", "r"], loading=["y"], capacity=4))._agents["a"]
    assert full.affinity("y") == LOADING
    assert full.affinity("z") == EVICTS


def test_a_request_dispatched_counts_as_loading_there_until_the_next_announcement():
    # a has room for one more adapter; b would have to evict one
    router = router_with(
        a=announcement(resident=["p", "q", "r"], capacity=4), b=announcement(resident=["s"], capacity=1)
    )
    assert router.pick(BASE, "new", tenant_id="t") == "a"
    assert router._agents["a"].affinity("new") == LOADING
    assert router.pick(BASE, "new", tenant_id="t") == "a"  # the second request follows the first, loading there


def test_an_adapter_stays_with_its_holder_until_load_outweighs_a_cold_start_elsewhere():
    router = router_with(a=announcement(resident=["x"], max_batch=32), b=announcement(max_batch=32))
    picks = [router.pick(BASE, "x", tenant_id="t") for _ in range(8)]  # none finishes: a fills up
    # 0.5 * 1.0 + 0.5 * (1 - k/32) beats b's 0.5 * 0.8 + 0.5 while k < 6.4
    assert picks == ["a"] * 7 + ["b"]
    for _ in range(7):
        router.finished("a")
    assert router.pick(BASE, "x", tenant_id="t") == "a"


def test_base_model_requests_are_shared_between_idle_agents():
    router = router_with(a=announcement(), b=announcement())
    picks = [router.pick(BASE, None, tenant_id="t") for _ in range(8)]
    assert picks.count("a") == picks.count("b") == 4


def test_an_agent_is_lost_after_missed_announcements_and_back_when_it_announces():
    clock = Clock()
    router = router_with(clock, a=announcement())
    clock.now += 2.9
    assert router.pick(BASE, None, tenant_id="t") == "a"
    clock.now += 0.2
    assert router.is_lost("a") and router.pick(BASE, None, tenant_id="t") is None
    router.announce("a", announcement(), default_every=1.0)
    assert router.pick(BASE, None, tenant_id="t") == "a"


def test_a_broken_stream_makes_an_agent_lost_until_it_announces():
    router = router_with(a=announcement(), b=announcement())
    router.mark_broken("a")
    assert {router.pick(BASE, None, tenant_id="t") for _ in range(4)} == {"b"}
    assert router.snapshot()["a"]["lost"]


def test_a_tenant_scoped_agent_serves_only_its_tenant_and_a_revoked_one_nobody():
    router = router_with(a=announcement(), b=announcement())
    router.scopes = {"a": "lab", "b": None}
    assert {router.pick(BASE, None, tenant_id="other") for _ in range(6)} == {"b"}
    router.scopes = {"a": "lab"}  # b revoked
    assert router.pick(BASE, None, tenant_id="other") is None
    assert router.pick(BASE, None, tenant_id="lab") == "a"


def test_only_agents_with_the_base_and_room_in_their_kv_cache_are_chosen():
    router = router_with(a=announcement(bases=("other",)), b=announcement(kv=128), c=announcement(kv=4096))
    assert router.pick(BASE, None, tenant_id="t", needed_tokens=1000) == "c"
    assert router.pick(BASE, None, tenant_id="t", needed_tokens=1000, exclude=["c"]) is None


@pytest.mark.parametrize("policy", ["random"])
def test_random_placement_ignores_affinity(policy):
    router = router_with(a=announcement(resident=["x"]), b=announcement())
    router.policy = policy
    picks = {router.pick(BASE, "x", tenant_id="t") for _ in range(20)}
    assert picks == {"a", "b"}


@pytest.mark.parametrize(
    ("body", "wrong"),
    [
        (
            {"bases": {"x": {"kv_capacity_tokens": "x", "max_batch": "y"}}, "running": "a", "waiting": [1]},
            "bases.x.kv_capacity_tokens",
        ),
        ({"adapters": "zz"}, "adapters"),
        ({"running": -1e9}, "running"),
        ({"tokens_per_second": 1e308}, "tokens_per_second"),
        ({"tokens_per_second": float("nan")}, "tokens_per_second"),
        ({"adapters": {"active": ["k"] * 20_000}}, "adapters.active"),
        ({"bases": {"b" * 1000: {"max_batch": 1}}}, "bases"),
        ({"bases": {BASE: {"max_batch": 0}}}, "bases"),
        (["not", "an", "object"], "body"),
    ],
)
def test_a_malformed_announcement_is_refused_and_the_previous_state_kept(body, wrong):
    from adaptery.services.inference_router import InvalidAnnouncement

    router = router_with(a=announcement(resident=["x"]))
    with pytest.raises(InvalidAnnouncement, match=f"invalid announcement: {wrong}"):
        router.announce("a", body, default_every=1.0)
    assert router.pick(BASE, "x", tenant_id="t") == "a"  # routing still works on what it said before
    snapshot = router.snapshot()["a"]
    assert snapshot["adapters"]["active"] == ["x"] and snapshot["running"] == 0
