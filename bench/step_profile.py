"""Where a saturated engine step spends its time, profiled on the engine thread (issue 18).

bench/engine.py's model (width 1024, 8 layers, vocab 8192, fp32, batch 32) serves the saturated base-model workload;
after `--skip` steps, torch.profiler records `--steps` calls of the model's forward on the engine thread itself
(the thread that runs them, not the main thread that submits). The C decode attention is a row of its own
(lora_kernel.paged_decode, self time: its Python checks and the C call). Prints the operators by self CPU time,
with each one's share of the profiled steps' wall time, and the load average.

    .venv/bin/python bench/step_profile.py --steps 20
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from adaptery.engine import lora_kernel
from adaptery.engine.batching import BatchEngine
from adaptery.engine.native import NativeLlama
from bench.engine import build_model, workload
from bench.step_ab import run


class ProfiledForward:
    """The model's forward, profiled from call `skip` for `steps` calls (on whichever thread calls it)."""

    def __init__(self, forward, skip: int, steps: int) -> None:  # noqa: ANN001
        self.forward, self.skip, self.steps = forward, skip, steps
        self.calls, self.profiler, self.wall, self.decode_only = 0, None, 0.0, 0

    def __call__(self, batch, cache, lora):  # noqa: ANN001, ANN204
        self.calls += 1
        if self.calls == self.skip + 1:
            self.profiler = profile(activities=[ProfilerActivity.CPU])
            self.profiler.__enter__()
        if self.skip < self.calls <= self.skip + self.steps:
            start = time.perf_counter()
            logits = self.forward(batch, cache, lora)
            self.wall += time.perf_counter() - start
            self.decode_only += int(batch.decode_rows.numel() == batch.tokens.numel())
            if self.calls == self.skip + self.steps:
                self.profiler.__exit__(None, None, None)
            return logits
        return self.forward(batch, cache, lora)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip", type=int, default=40, help="steps before profiling (prefills done, batch full)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads (0: torch's default); on a loaded "
        "machine 1 shows each operator's own cost, not the waits of a parallel region for a core",
    )
    parser.add_argument(
        "--without-c",
        action="store_true",
        help="the step without the C library (decode attention gathering each sequence's blocks, then SDPA; PyTorch's "
        "elementwise operators)",
    )
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    if args.threads:
        torch.set_num_threads(args.threads)
    hf = build_model(1024, 8, 8192)
    model = NativeLlama(hf, torch.float32, 1024)
    engine = BatchEngine("profile", model, set(), max_rank=16, kv_cache_bytes=256 << 20, adapter_cache_bytes=1 << 30,
                         max_batch=32, max_step_tokens=256).start()  # fmt: skip
    if args.without_c:
        model.kernel = None
    run(engine, workload(8, 1000.0, (8, 32), (4, 8), 8192, seed=1))
    paged_decode = lora_kernel.paged_decode

    def named_paged_decode(*call_args, **kwargs):  # noqa: ANN002, ANN003, ANN202 - the C kernel as a profiler row
        with record_function("lora_kernel.paged_decode"):
            return paged_decode(*call_args, **kwargs)

    lora_kernel.paged_decode = named_paged_decode
    profiled = ProfiledForward(model.forward, args.skip, args.steps)
    model.forward = profiled
    run(engine, workload(64, 1000.0, (8, 128), (64, 128), 8192, seed=0))
    engine.stop()
    if profiled.profiler is None or profiled.calls < args.skip + args.steps:
        raise SystemExit(f"only {profiled.calls} steps ran; lower --skip or --steps")
    events = profiled.profiler.key_averages()
    wall_us = profiled.wall * 1e6
    print(f"{args.steps} steps ({profiled.decode_only} decode-only), {profiled.wall / args.steps * 1e3:.1f} ms/step "
          f"wall, load average {os.getloadavg()}")  # fmt: skip
    print("| operator | calls/step | self ms/step | share of wall |")
    print("| --- | --- | --- | --- |")
    for event in sorted(events, key=lambda e: -e.self_cpu_time_total)[: args.rows]:
        print(f"| {event.key} | {event.count / args.steps:.0f} | {event.self_cpu_time_total / 1e3 / args.steps:.2f} | "
              f"{event.self_cpu_time_total / wall_us:.1%} |")  # fmt: skip


if __name__ == "__main__":
    main()
