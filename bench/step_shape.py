"""The engine's shape knobs by measurement (issue 18): prefill chunk budget (`max_step_tokens`), batch size
(`max_batch`) and KV block size, each swept around the default while the others hold, in one process.

Every configuration is an engine over the same weights (bench/engine.py's model: width 1024, 8 layers, vocab 8192,
fp32) running the same saturated base-model workload (`--requests` requests of 8-128 prompt and output tokens, all
arriving at once); the configurations take turns, round after round, the order reversed every other round, so a
load change on this shared machine falls on all of them. Per configuration: output tokens/s (median of rounds and
each round), TTFT p50 and TPOT p50, and whether its greedy tokens equal the default's. Prints JSON, then a
markdown table.

    .venv/bin/python bench/step_shape.py --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import torch

from adaptery.engine.batching import BatchEngine
from adaptery.engine.native import NativeLlama
from bench.engine import build_model, workload
from bench.step_ab import run

DEFAULT = {"max_step_tokens": 256, "max_batch": 32, "block_size": 16}


def configurations(step_tokens: list[int], batches: list[int], block_sizes: list[int]) -> list[dict]:
    """The default first, then each knob's other values with the other two at their defaults."""
    configs = [dict(DEFAULT)]
    for knob, values in (("max_step_tokens", step_tokens), ("max_batch", batches), ("block_size", block_sizes)):
        configs += [{**DEFAULT, knob: value} for value in values if value != DEFAULT[knob]]
    return configs


def label(config: dict) -> str:
    return f"step {config['max_step_tokens']}, batch {config['max_batch']}, block {config['block_size']}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--step-tokens", default="128,256,512", help="max_step_tokens values")
    parser.add_argument("--batches", default="16,32,48", help="max_batch values")
    parser.add_argument("--block-sizes", default="8,16,32", help="KV block sizes")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--layers", type=int, default=8)
    args = parser.parse_args()

    def values(text: str) -> list[int]:
        return [int(v) for v in text.split(",")]

    torch.set_grad_enabled(False)
    hf = build_model(1024, args.layers, 8192)
    configs = configurations(values(args.step_tokens), values(args.batches), values(args.block_sizes))
    engines = [
        BatchEngine(
            "shape",
            NativeLlama(hf, torch.float32, 1024),
            set(),
            max_rank=16,
            kv_cache_bytes=256 << 20,
            adapter_cache_bytes=1 << 30,
            **config,
        ).start()  # fmt: skip
        for config in configs
    ]
    reqs = workload(args.requests, 1000.0, (8, 128), (8, 128), 8192, seed=0)
    warm = workload(8, 1000.0, (8, 32), (4, 8), 8192, seed=1)
    for engine in engines:
        run(engine, warm)
    results: list[list[dict]] = [[] for _ in configs]
    outputs: list[list[list[int]]] = [[] for _ in configs]
    load = [os.getloadavg()[0]]
    for round_ in range(args.rounds):
        order = list(range(len(configs)))
        for i in order if round_ % 2 == 0 else order[::-1]:
            result, outputs[i] = run(engines[i], reqs)
            results[i].append(result)
            print(f"round {round_ + 1} {label(configs[i]):>34}: {result['tokens_per_s']:6.1f} tok/s, "
                  f"{result['step_ms']:6.1f} ms/step, load {os.getloadavg()[0]:.2f}", flush=True)  # fmt: skip
        load.append(os.getloadavg()[0])
    for engine in engines:
        engine.stop()
    rows = [
        {
            **config,
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs),
            "tokens_per_s_rounds": [round(r["tokens_per_s"], 1) for r in runs],
            "ttft_p50_ms": statistics.median(r["ttft_p50_ms"] for r in runs),
            "tpot_p50_ms": statistics.median(r["tpot_p50_ms"] for r in runs),
            "same_tokens_as_default": outputs[i] == outputs[0],
        }
        for i, (config, runs) in enumerate(zip(configs, results, strict=True))
    ]
    print(json.dumps({"rows": rows, "load_average": load}, indent=1))
    print("\n| configuration | tok/s (rounds) | TTFT p50 ms | TPOT p50 ms | default's tokens |")
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        print(f"| {label(row)} | {row['tokens_per_s']:.1f} ({', '.join(map(str, row['tokens_per_s_rounds']))}) | "
              f"{row['ttft_p50_ms']:.0f} | {row['tpot_p50_ms']:.1f} | {row['same_tokens_as_default']} |")  # fmt: skip


if __name__ == "__main__":
    main()
