"""Which infer agent serves a request: live agent state from announcements, and LoRA-affinity scoring.

Policy (after the Kubernetes Gateway API inference extension's LoRA-affinity scorer): an agent where the
adapter is resident (active, in memory or in its local cache) scores 1.0; one with room for another adapter
(fewer cached than its capacity) 0.8; one already loading it 0.6; one that would have to evict 0. The score is
weighed equally against load, the requests this control plane has in flight on the agent over its batch size:
a popular adapter stays where it is resident until that agent is busier than a cold start elsewhere costs.
Among equal scores the choice is random, so idle agents share a stream of base-model requests.

An agent is alive while it announces: one silent for `missed` of its own announcement intervals is lost, and so
is one whose stream broke (until it announces again). An agent serves a base it announces, for any tenant if it
is platform-wide, or only for its own tenant if it was enrolled with a tenant scope (`scopes`, from the agents
table). Plain data in, a choice out: no NATS, no database (`tests/unit/test_inference_router.py`).

An announcement is checked (`Announcement`: types, bounded non-negative numbers, finite tokens/s, bounded lists
and strings) before it is kept; a bad one is refused with what is wrong and the agent's previous state stays.
An agent that accepted a request and sent no token within the first-token deadline is `penalise`d: lost until it
announces again, like one whose stream broke.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

ACTIVE, FREE_SLOT, LOADING, EVICTS = 1.0, 0.8, 0.6, 0.0
AFFINITY_WEIGHT = 0.5
Policy = Literal["affinity", "random"]

_Count = Annotated[int, Field(ge=0, le=10**15)]
_Name = Annotated[str, Field(min_length=1, max_length=256)]
_Keys = Annotated[list[Annotated[str, Field(max_length=256)]], Field(max_length=10_000)]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False, frozen=True)


class AnnouncedBase(_Strict):
    path: Annotated[str, Field(max_length=4096)] | None = None
    kv_capacity_tokens: Annotated[int, Field(ge=0, le=10**12)] | None = None
    max_batch: Annotated[int, Field(ge=1, le=1_000_000)] = 1


class AnnouncedAdapters(_Strict):
    active: _Keys = []
    memory: _Keys = []
    disk: _Keys = []
    loading: _Keys = []
    capacity: Annotated[int, Field(ge=0, le=1_000_000)] | None = None


class AnnouncedMemory(_Strict):
    total_bytes: _Count | None = None
    available_bytes: _Count | None = None


class Announcement(_Strict):
    """What an infer agent says of itself (`agent/inference.py`'s `announcement`); anything else is dropped."""

    every: Annotated[float, Field(gt=0, le=300)] | None = None
    roles: Annotated[list[Literal["train", "infer"]], Field(max_length=2)] = []
    device: Annotated[str, Field(max_length=64)] | None = None
    memory: AnnouncedMemory | None = None
    bases: Annotated[dict[_Name, AnnouncedBase], Field(max_length=64)] = {}
    adapters: AnnouncedAdapters = AnnouncedAdapters()
    running: Annotated[int, Field(ge=0, le=1_000_000)] = 0
    waiting: Annotated[int, Field(ge=0, le=1_000_000)] = 0
    tokens_per_second: Annotated[float, Field(ge=0, le=1e9)] = 0.0
    served: _Count = 0
    adapter_hits: _Count = 0
    adapter_misses: _Count = 0


class InvalidAnnouncement(ValueError):
    pass


def check_announcement(body: object) -> dict[str, Any]:
    """The announcement as plain data, or InvalidAnnouncement naming the first few fields that are wrong."""
    try:
        return Announcement.model_validate(body).model_dump()
    except ValidationError as exc:
        problems = [
            f"{'.'.join(str(part) for part in error['loc']) or 'body'}: {error['msg']}" for error in exc.errors()[:5]
        ]
        raise InvalidAnnouncement("invalid announcement: " + "; ".join(problems)) from None


@dataclass
class LiveAgent:
    agent_id: str
    announcement: dict[str, Any]
    seen_at: float
    every: float  # the agent's own announcement interval
    in_flight: int = 0  # requests dispatched here by this control plane and not yet ended
    dispatched_adapters: set[str] = field(default_factory=set)  # sent here since its last announcement
    broken: bool = False  # a stream from it broke; it is lost until it announces again

    def lost(self, now: float, missed: int) -> bool:
        return self.broken or now - self.seen_at > missed * self.every

    def tier(self, name: str) -> set[str]:
        return set((self.announcement.get("adapters") or {}).get(name) or [])

    def resident(self) -> set[str]:
        return self.tier("active") | self.tier("memory") | self.tier("disk")

    def affinity(self, adapter_key: str | None) -> float:
        if adapter_key is None:
            return ACTIVE  # a base-model request is equally at home on every agent serving the base
        if adapter_key in self.resident():
            return ACTIVE
        loading = self.tier("loading") | self.dispatched_adapters
        capacity = (self.announcement.get("adapters") or {}).get("capacity")
        if capacity is None or len(self.resident() | loading) < capacity:
            return FREE_SLOT if adapter_key not in loading else LOADING
        return LOADING if adapter_key in loading else EVICTS

    def load(self, base_id: str) -> float:
        base = (self.announcement.get("bases") or {}).get(base_id) or {}
        return min(1.0, self.in_flight / max(1, int(base.get("max_batch") or 1)))

    def score(self, base_id: str, adapter_key: str | None) -> float:
        return AFFINITY_WEIGHT * self.affinity(adapter_key) + (1 - AFFINITY_WEIGHT) * (1 - self.load(base_id))


class InferenceRouter:
    def __init__(
        self,
        *,
        missed: int = 3,
        policy: Policy = "affinity",
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.missed = missed
        self.policy = policy
        self.rng = rng or random.Random()
        self.clock = clock
        self.scopes: dict[str, str | None] = {}  # enrolled, unrevoked agent -> the tenant it may serve (None: all)
        self._agents: dict[str, LiveAgent] = {}
        self._lock = threading.Lock()

    def announce(self, agent_id: str, body: object, default_every: float) -> None:
        """Keep an agent's announcement; InvalidAnnouncement (and the previous one kept) if it is not one."""
        body = check_announcement(body)
        every = float(body["every"]) if body["every"] is not None else default_every
        with self._lock:
            agent = self._agents.get(agent_id)
            if agent is None:
                self._agents[agent_id] = LiveAgent(agent_id, body, self.clock(), every)
                return
            agent.announcement, agent.seen_at, agent.every, agent.broken = body, self.clock(), every, False
            agent.dispatched_adapters.clear()

    def mark_broken(self, agent_id: str) -> None:
        with self._lock:
            if agent_id in self._agents:
                self._agents[agent_id].broken = True

    penalise = mark_broken  # an agent that took a request and sent no token in time: not chosen until it announces

    def is_lost(self, agent_id: str) -> bool:
        with self._lock:
            agent = self._agents.get(agent_id)
            return agent is None or agent.lost(self.clock(), self.missed)

    def _eligible(self, base_id: str, tenant_id: str, needed_tokens: int, exclude: Iterable[str]) -> list[LiveAgent]:
        """(Under the lock) live agents announcing `base_id`, room for `needed_tokens`, that may serve `tenant_id`."""
        now, excluded = self.clock(), set(exclude)
        found = []
        for agent in self._agents.values():
            if agent.agent_id in excluded or agent.agent_id not in self.scopes or agent.lost(now, self.missed):
                continue
            scope = self.scopes[agent.agent_id]
            if scope is not None and scope != tenant_id:
                continue
            base = (agent.announcement.get("bases") or {}).get(base_id)
            if base is None:
                continue
            capacity = base.get("kv_capacity_tokens")
            if capacity is not None and needed_tokens > capacity:
                continue
            found.append(agent)
        return found

    def pick(
        self,
        base_id: str,
        adapter_key: str | None,
        *,
        tenant_id: str,
        needed_tokens: int = 0,
        exclude: Iterable[str] = (),
    ) -> str | None:
        """The agent to send the request to, counted as in flight there until `finished`; None: no agent serves it."""
        with self._lock:
            candidates = self._eligible(base_id, tenant_id, needed_tokens, exclude)
            if not candidates:
                return None
            if self.policy == "random":
                chosen = self.rng.choice(candidates)
            else:
                scores = [(agent.score(base_id, adapter_key), agent) for agent in candidates]
                best = max(score for score, _ in scores)
                chosen = self.rng.choice([agent for score, agent in scores if score >= best - 1e-9])
            chosen.in_flight += 1
            if adapter_key is not None and adapter_key not in chosen.resident():
                chosen.dispatched_adapters.add(adapter_key)
            return chosen.agent_id

    def finished(self, agent_id: str) -> None:
        with self._lock:
            agent = self._agents.get(agent_id)
            if agent is not None:
                agent.in_flight = max(0, agent.in_flight - 1)

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Each agent that ever announced: its last announcement, when, and whether it is lost now."""
        with self._lock:
            now = self.clock()
            return {
                agent.agent_id: {
                    **agent.announcement,
                    "announced_at": agent.seen_at,
                    "in_flight": agent.in_flight,
                    "lost": agent.lost(now, self.missed),
                }
                for agent in self._agents.values()
            }
