"""A/B of the engine step against an earlier commit's, in one process, alternating (issue 18).

On a shared machine two runs minutes apart are not comparable; this loads the engine's step code (kvcache.py,
native.py, batching.py) as it was at `--baseline` next to the working tree's, builds both engines on the same
weights (bench/engine.py's model: width 1024, 8 layers, vocab 8192, fp32, batch 32), and runs the same saturated
base-model workload through each in turn, round after round, the order flipping every round. Per run: output
tokens/s, engine steps and mean step time; at the end, whether both produced the same tokens (greedy, so they must),
and the load average of the machine.

    .venv/bin/python bench/step_ab.py --baseline HEAD~1 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import torch

from adaptery.engine.batching import BatchEngine
from adaptery.engine.sampling import SamplingParams
from bench.engine import Req, build_model, summary, workload

ROOT = Path(__file__).resolve().parent.parent
STEP_MODULES = ("kvcache", "native", "batching")  # in import order: each imports the ones before it


def load_baseline(rev: str) -> types.ModuleType:
    """The `batching` module of `rev`, importing that commit's `native` and `kvcache` (the rest is today's)."""
    saved = {name: sys.modules[f"adaptery.engine.{name}"] for name in STEP_MODULES}
    loaded = {}
    try:
        for name in STEP_MODULES:
            path = f"adaptery/engine/{name}.py"
            source = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=ROOT, check=True, capture_output=True).stdout
            module = types.ModuleType(f"adaptery.engine.{name}")
            module.__file__ = f"{rev}:{path}"
            sys.modules[module.__name__] = module  # dataclasses look their module up while the class is made
            exec(compile(source, module.__file__, "exec"), module.__dict__)  # noqa: S102 - our own repository's code
            loaded[name] = module
    finally:
        sys.modules.update({f"adaptery.engine.{name}": module for name, module in saved.items()})
    return loaded["batching"]


def make_engine(batching: types.ModuleType, hf: torch.nn.Module) -> BatchEngine:
    """An engine of `batching`'s version over `hf`, with the model class of the same version."""
    return batching.BatchEngine(
        "ab", batching.NativeLlama(hf, torch.float32, 1024), set(), max_rank=16, kv_cache_bytes=512 << 20,
        adapter_cache_bytes=1 << 30, max_batch=32, max_step_tokens=256,
    ).start()  # fmt: skip


def run(engine: BatchEngine, reqs: list[Req]) -> tuple[dict, list[list[int]]]:
    """Submit at the arrival times; the summary (with steps and mean step time) and every request's tokens."""
    records: list[dict] = [{} for _ in reqs]
    outputs: list[list[int]] = [[] for _ in reqs]
    threads = []

    def consume(i: int, request, submitted: float) -> None:  # noqa: ANN001
        times = []
        while (event := request.events.get(timeout=600)).finish is None:
            times.append(time.perf_counter())
            outputs[i].append(event.token)
        assert event.finish == "length", event
        records[i] = {"submitted": submitted, "times": times}

    steps = engine.steps
    start = time.perf_counter()
    for i, req in enumerate(reqs):
        delay = start + req.arrival - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        submitted = time.perf_counter()
        request = engine.submit(req.prompt, SamplingParams(max_tokens=req.output, temperature=0.0), None, None)
        thread = threading.Thread(target=consume, args=(i, request, submitted))
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join()
    result = summary(records, start)
    result["steps"] = engine.steps - steps
    result["step_ms"] = result["seconds"] / result["steps"] * 1e3
    return result, outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", default="HEAD", help="the commit whose engine step is side A")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads (0: torch's default); on a loaded "
        "machine 1 keeps a parallel region from waiting on a core another process holds",
    )
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    if args.threads:
        torch.set_num_threads(args.threads)
    hf = build_model(1024, args.layers, 8192)
    sides = {
        f"baseline {args.baseline}": make_engine(load_baseline(args.baseline), hf),
        "working tree": make_engine(sys.modules["adaptery.engine.batching"], hf),
    }
    reqs = workload(args.requests, 1000.0, (8, 128), (8, 128), 8192, seed=0)
    warm = workload(8, 1000.0, (8, 32), (4, 8), 8192, seed=1)
    for engine in sides.values():
        run(engine, warm)
    outputs: dict[str, list[list[int]]] = {}
    results: dict[str, list[dict]] = {name: [] for name in sides}
    print(f"load average at start: {os.getloadavg()}")
    for round_ in range(args.rounds):
        order = list(sides) if round_ % 2 == 0 else list(sides)[::-1]
        for name in order:
            result, outputs[name] = run(sides[name], reqs)
            results[name].append(result)
            print(
                f"round {round_ + 1} {name:>20}: {result['tokens_per_s']:6.1f} tok/s, {result['steps']} steps, "
                f"{result['step_ms']:6.1f} ms/step, load {os.getloadavg()[0]:.2f}",
                flush=True,
            )
    ratios = [b["tokens_per_s"] / a["tokens_per_s"] for a, b in zip(*results.values(), strict=True)]
    print(
        f"working tree / baseline, per round: {[round(r, 3) for r in ratios]}, median {statistics.median(ratios):.3f}"
    )
    first, second = outputs.values()
    same = sum(a == b for a, b in zip(first, second, strict=True))
    print(f"identical greedy outputs: {same} of {len(reqs)} requests")
    for engine in sides.values():
        engine.stop()


if __name__ == "__main__":
    main()
