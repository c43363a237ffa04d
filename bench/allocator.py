"""What the serving process's allocator is worth (issue 18, process set-up): the engine on glibc's malloc against
the one `adaptery serve` preloads (adaptery/engine/process_setup.py: tcmalloc, else jemalloc), in the same run.

Each side runs in a child process of its own (an allocator is chosen when a process starts), on bench/engine.py's
model and workload: base-only and 32 mixed adapters, the engine saturated, plus the cold load of an adapter. The
children alternate, round after round (system, preloaded, preloaded, system, ...), so a slow spell of a shared
machine falls on both; each figure is the median of the rounds.

    .venv/bin/python bench/allocator.py --quick      # 4 layers, 2 rounds (a smoke run, ~3 min)
    .venv/bin/python bench/allocator.py              # 8 layers, 4 rounds
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def child(args: argparse.Namespace) -> None:
    import torch

    sys.path.insert(0, str(HERE))
    from engine import build_model, make_adapters, new_engine, run_engine, with_adapters, workload

    from adaptery.engine.lora import prepare_adapter
    from adaptery.engine.native import NativeLlama
    from adaptery.engine.process_setup import loaded_allocator

    torch.set_num_threads(os.cpu_count() or 2)
    root = Path(tempfile.mkdtemp(prefix="adaptery-bench-alloc-"))
    hf = build_model(args.width, args.layers, args.vocab)
    distinct = make_adapters(hf, root, 32, args.rank)
    keyed = [(f"d-{i}", p) for i, p in enumerate(distinct)]
    reqs = workload(args.requests, 200.0, (8, 128), (8, 128), args.vocab, seed=1)
    mixed = with_adapters(reqs, [i % 32 for i in range(len(reqs))])
    engine = new_engine(hf, torch.float32, 32, args.rank)
    run_engine(engine, mixed[:32], keyed)  # warm-up: kernels, adapter slots
    base = run_engine(engine, reqs, keyed)
    mixed_run = run_engine(engine, mixed, keyed)
    engine.stop()
    native = NativeLlama(hf, torch.float32, 64)
    loads = []
    for i in range(24):
        t = time.perf_counter()
        prepare_adapter("cold", distinct[i % 32], native, args.rank, torch.float32)
        loads.append(time.perf_counter() - t)
    print(json.dumps({
        "allocator": loaded_allocator(),
        "base_tokens_per_s": base["tokens_per_s"],
        "mixed32_tokens_per_s": mixed_run["tokens_per_s"],
        "base_tpot_p50_ms": base["tpot_p50_ms"],
        "cold_load_p50_ms": statistics.median(loads) * 1e3,
    }))  # fmt: skip


def run_side(preload: str | None, args: argparse.Namespace) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    if preload:
        env["LD_PRELOAD"] = preload
    command = [sys.executable, __file__, "--child", "--layers", str(args.layers), "--requests", str(args.requests),
               "--width", str(args.width)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--requests", type=int, default=None)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()
    args.layers = args.layers or (4 if args.quick else 8)
    args.requests = args.requests or (48 if args.quick else 128)
    if args.child:
        child(args)
        return
    sys.path.insert(0, str(HERE.parent))
    from adaptery.engine.process_setup import plan

    chosen = plan("auto", {})
    if chosen.library is None:
        sys.exit(f"no allocator to compare with: {chosen.reason}")
    rounds = args.rounds or (2 if args.quick else 4)
    runs: dict[str, list[dict]] = {"system": [], chosen.allocator: []}
    load_start = os.getloadavg()
    for round_ in range(rounds):
        order = [("system", None), (chosen.allocator, chosen.library)]
        for name, preload in order if round_ % 2 == 0 else order[::-1]:
            result = run_side(preload, args)
            assert result["allocator"] == name, result  # the child really ran on it
            runs[name].append(result)
            print(f"round {round_}: {name}", {k: round(v, 1) for k, v in result.items() if isinstance(v, float)},
                  flush=True)  # fmt: skip

    def median(name: str, key: str) -> float:
        return statistics.median(run[key] for run in runs[name])

    keys = ("base_tokens_per_s", "mixed32_tokens_per_s", "cold_load_p50_ms")
    summary = {name: {key: median(name, key) for key in keys} for name in runs}
    ratios = {key: summary[chosen.allocator][key] / summary["system"][key] for key in keys}
    out = {
        "model": {"width": args.width, "layers": args.layers, "vocab": args.vocab, "dtype": "float32"},
        "requests": args.requests,
        "rounds": rounds,
        "load_average": {"start": load_start, "end": os.getloadavg()},
        "medians": summary,
        f"{chosen.allocator}_over_system": ratios,
        "runs": runs,
    }
    print(json.dumps(out, indent=2))
    print(f"\n| fp32, {args.layers} layers, median of {rounds} | system malloc | {chosen.allocator} | ratio |")
    print("| --- | --- | --- | --- |")
    for key in keys:
        print(f"| {key} | {summary['system'][key]:.1f} | {summary[chosen.allocator][key]:.1f} | {ratios[key]:.3f} |")


if __name__ == "__main__":
    main()
