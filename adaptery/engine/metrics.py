"""The engine's Prometheus metrics, in a registry of its own (one per engine, so tests can build many)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class EngineMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "adaptery_engine_requests", "Generation requests finished, by base model, path and outcome",
            ["base", "path", "outcome"], registry=r,
        )  # fmt: skip
        self.prompt_tokens = Counter("adaptery_engine_prompt_tokens", "Prompt tokens processed", ["base"], registry=r)
        self.completion_tokens = Counter("adaptery_engine_completion_tokens", "Tokens generated", ["base"], registry=r)
        self.ttft = Histogram(
            "adaptery_engine_time_to_first_token_seconds", "Time from submission to the first token", ["base"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.tpot = Histogram(
            "adaptery_engine_time_per_output_token_seconds", "Mean time between output tokens of a request", ["base"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.queue_depth = Gauge("adaptery_engine_queue_depth", "Requests waiting for admission", ["base"], registry=r)
        self.running = Gauge("adaptery_engine_running", "Requests in the running batch", ["base"], registry=r)
        self.kv_blocks_used = Gauge("adaptery_engine_kv_blocks_used", "KV-cache blocks in use", ["base"], registry=r)
        self.kv_blocks_total = Gauge("adaptery_engine_kv_blocks_total", "KV-cache blocks in all", ["base"], registry=r)
        self.preemptions = Counter(
            "adaptery_engine_preemptions", "Sequences preempted (recomputed later)", ["base"], registry=r
        )
        self.adapter_cache = Counter(
            "adaptery_engine_adapter_cache", "Adapter lookups by outcome (hit: in memory, miss: loaded from disk)",
            ["outcome"], registry=r,
        )  # fmt: skip
        self.adapter_load_seconds = Histogram(
            "adaptery_engine_adapter_load_seconds", "Time to load and prepare an adapter from disk",
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.adapters = Gauge(
            "adaptery_engine_adapters", "Adapters by tier (active: in the batch buffers, memory: prepared in RAM)",
            ["tier"], registry=r,
        )  # fmt: skip
