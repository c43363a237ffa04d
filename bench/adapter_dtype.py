"""Adapters held in bf16 on a float32 engine: what it gains, and what the rounding does to outputs.

The fused LoRA kernel reads each distinct adapter's A and B every step, so with many adapters in a batch the
step streams their bytes; bf16 halves them (`ADAPTERY_ENGINE_ADAPTER_DTYPE`, `auto` = bf16 wherever the fused kernel
serves). Measured in one run, on bench/engine.py's model and workload (random Llama width 1024, 8 layers, 32
distinct rank-16 adapters on all seven projections, round-robin so every step holds many of them):

1. throughput, base only / 32 mixed adapters held in fp32 / the same held in bf16: the sides alternate round by
   round, each figure the median of the rounds;
2. cold load of one adapter (read + prepare) into each dtype, p50/p99;
3. the rounding's effect: every request decoded greedily by both engines (fp32-held and bf16-held adapters, the
   same weights before rounding); how many sequences come out identical, how many tokens agree before the first
   difference, and at each first difference how close the fp32 engine's two best tokens were (the log-probability
   margin between them): a flip where the margin is tiny is a near-tie that any rounding may turn, a flip at a
   wide margin would be an error of the adapter path.

A random-initialised model's next-token distributions are much flatter than a trained model's (near-ties far more
common), so the identical-sequence share here is a floor, not what a trained model sees; the margins say why.

    .venv/bin/python bench/adapter_dtype.py --quick     # smoke run (4 layers, 32 requests, one round)
    .venv/bin/python bench/adapter_dtype.py             # the measurement
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine import build_model, cold_load, make_adapters, new_engine, run_engine, with_adapters, workload  # noqa: E402

from adaptery.engine import lora_kernel  # noqa: E402
from adaptery.engine.sampling import SamplingParams  # noqa: E402


def greedy(engine, prompts: list[list[int]], keyed: list[tuple[str, Path]], tokens: int) -> list[list[tuple]]:  # noqa: ANN001
    """Each prompt decoded greedily with its adapter: per token (id, logprob, margin to the runner-up)."""
    outputs: list[list[tuple]] = [[] for _ in prompts]

    def consume(i: int, request) -> None:  # noqa: ANN001
        while (event := request.events.get(timeout=600)).finish is None:
            top = event.logprob.top
            margin = top[0][1] - top[1][1] if len(top) > 1 else float("inf")
            outputs[i].append((event.token, event.logprob.logprob, margin))

    params = SamplingParams(max_tokens=tokens, temperature=0.0, logprobs=True, top_logprobs=2)
    threads = []
    for i, prompt in enumerate(prompts):
        key, path = keyed[i % len(keyed)]
        request = engine.submit(prompt, params, key, path)
        threads.append(threading.Thread(target=consume, args=(i, request)))
        threads[-1].start()
    for thread in threads:
        thread.join()
    return outputs


def compare(reference: list[list[tuple]], other: list[list[tuple]]) -> dict:
    identical, agreed, total, flip_margins, logprob_diffs = 0, 0, 0, [], []
    for ref, out in zip(reference, other, strict=True):
        total += len(ref)
        same = next((i for i, (a, b) in enumerate(zip(ref, out, strict=True)) if a[0] != b[0]), len(ref))
        agreed += same
        identical += same == len(ref)
        logprob_diffs += [abs(a[1] - b[1]) for a, b in zip(ref[:same], out[:same], strict=True)]
        if same < len(ref):
            flip_margins.append(ref[same][2])
    margins = [t[2] for seq in reference for t in seq]
    return {
        "sequences": len(reference),
        "identical_sequences": identical,
        "tokens_before_first_difference": f"{agreed}/{total}",
        "chosen_logprob_abs_diff_max": max(logprob_diffs, default=0.0),
        "chosen_logprob_abs_diff_mean": statistics.fmean(logprob_diffs) if logprob_diffs else 0.0,
        "margin_at_flips": sorted(round(m, 4) for m in flip_margins),
        "margin_median_all_tokens": statistics.median(margins) if margins else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--greedy-tokens", type=int, default=48)
    args = parser.parse_args()
    if args.quick:
        args.layers, args.requests, args.rounds = 4, 32, 1
    if lora_kernel.load() is None:
        raise SystemExit("the fused LoRA kernel cannot be built here; bf16-held adapters need it")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    hf = build_model(args.width, args.layers, args.vocab)
    dtype = torch.float32
    results: dict = {"config": vars(args), "threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as root:
        distinct = make_adapters(hf, Path(root), 32, args.rank)
        keyed = [(f"d-{i}", p) for i, p in enumerate(distinct)]
        engines = {
            "base": new_engine(hf, dtype, 32, args.rank),
            "fp32_adapters": new_engine(hf, dtype, 32, args.rank, adapter_dtype=torch.float32),
            "bf16_adapters": new_engine(hf, dtype, 32, args.rank, adapter_dtype=torch.bfloat16),
        }
        reqs = workload(args.requests, 200.0, (8, 128), (8, 128), args.vocab, seed=1)
        mixed = with_adapters(reqs, [i % 32 for i in range(len(reqs))])
        warm = with_adapters(reqs[:32], list(range(32)))
        for name, engine in engines.items():  # kernels, caches and every adapter loaded before any clock runs
            run_engine(engine, reqs[:8] if name == "base" else warm, keyed)
        runs: dict[str, list[float]] = {name: [] for name in engines}
        for round_ in range(args.rounds):
            order = list(engines) if round_ % 2 == 0 else list(reversed(engines))
            for name in order:
                run = run_engine(engines[name], reqs if name == "base" else mixed, keyed)
                runs[name].append(run["tokens_per_s"])
                print(f"round {round_ + 1} {name}: {run['tokens_per_s']:.1f} tok/s", file=sys.stderr)
        median = {name: statistics.median(values) for name, values in runs.items()}
        results["tokens_per_s"] = {name: round(v, 1) for name, v in median.items()}
        results["rounds_tokens_per_s"] = {name: [round(v, 1) for v in values] for name, values in runs.items()}
        results["mixed_over_base"] = {
            "fp32_adapters": round(median["fp32_adapters"] / median["base"], 3),
            "bf16_adapters": round(median["bf16_adapters"] / median["base"], 3),
        }
        results["cold_load"] = {
            held: cold_load(hf, dtype, distinct, args.rank, getattr(torch, held)) for held in ("float32", "bfloat16")
        }
        prompts = [r.prompt for r in reqs[:64]]
        reference = greedy(engines["fp32_adapters"], prompts, keyed, args.greedy_tokens)
        rounded = greedy(engines["bf16_adapters"], prompts, keyed, args.greedy_tokens)
        results["greedy_bf16_vs_fp32_adapters"] = compare(reference, rounded)
        for engine in engines.values():
            engine.stop()
    print(json.dumps(results, indent=2))
    print(markdown(results))


def markdown(results: dict) -> str:
    tps, ratio, g = results["tokens_per_s"], results["mixed_over_base"], results["greedy_bf16_vs_fp32_adapters"]
    lines = [
        "| fp32 engine | output tokens/s | ÷ base |",
        "| --- | --- | --- |",
        f"| base only | {tps['base']} | 1.000 |",
        f"| 32 mixed adapters held in fp32 | {tps['fp32_adapters']} | {ratio['fp32_adapters']} |",
        f"| 32 mixed adapters held in bf16 | {tps['bf16_adapters']} | {ratio['bf16_adapters']} |",
        "",
        "| cold load, p50 / p99 ms | fp32-held | bf16-held |",
        "| --- | --- | --- |",
        "| read + prepare one adapter | {:.1f} / {:.1f} | {:.1f} / {:.1f} |".format(
            *(results["cold_load"][d][f"cold_load_{q}_ms"] for d in ("float32", "bfloat16") for q in ("p50", "p99"))
        ),
        "",
        "| greedy, bf16-held vs fp32-held adapters | |",
        "| --- | --- |",
        f"| identical sequences | {g['identical_sequences']}/{g['sequences']} |",
        f"| tokens before the first difference | {g['tokens_before_first_difference']} |",
        f"| chosen token's logprob, mean / max abs difference | {g['chosen_logprob_abs_diff_mean']:.2e} / "
        f"{g['chosen_logprob_abs_diff_max']:.2e} |",
        f"| fp32 top-1 − top-2 logprob margin at each flip | {g['margin_at_flips']} |",
        f"| the same margin, median over all tokens | {g['margin_median_all_tokens']:.3f} |",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
