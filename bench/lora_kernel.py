"""Micro-benchmark of the engine's inner pieces, each against the alternative it replaced, in one run.

On the shapes of `bench/engine.py`'s model (width 1024, intermediate 2752, GQA 16/4 heads of 64, 8 layers,
rank-16 adapters on all seven projections):

1. decode: one row per adapter, 32 distinct adapters, every site of every layer through the fused kernel:
   ms per step and the bandwidth it reaches (the floor is reading each adapter's weights once; one site's adapters
   read again and again, so they may stay in a large L3); the same from memory as the engine meets it (22 adapters,
   the sites in the engine's order, bound once, a 1 GiB read before each step); and 32 rows over 8 adapters (4 rows
   each: a few popular adapters);
2. prefill chunks: 8-128 rows of one adapter (a random count each call, a random adapter and layer: cold
   weights, as in the engine), all four sites of a layer: the kernel's tiles against the matmul path
   (`x @ A.T`, one `addmm_` per projection) used without tiles;
Each kernel figure beside the portable build (no AVX-512 or AVX2: one row at a time), where the CPU has tiles;
3. decode attention, 32 sequences over 96 and 192 positions: SDPA against matmul -> masked softmax -> matmul;
4. the safety checks' cost per decode step (32 sites x layers, 32 rows, C replaced by a no-op so only Python is
   timed): every check on every call (`site`) against the engine's `SiteTable` (its table checked once, the
   per-call arguments each call) and against no check at all (the bare call).

    .venv/bin/python bench/lora_kernel.py [--json out.json] [--checks-only]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch
import torch.nn.functional as F

from adaptery.engine import lora_kernel

SITES = {"qkv": (1024, [1024, 256, 256]), "o": (1024, [1024]), "gate_up": (1024, [2752, 2752]), "down": (2752, [1024])}
LAYERS, SLOTS, RANK = 8, 32, 16
DTYPES = {"float32": (torch.float32, torch.float32), "bfloat16": (torch.bfloat16, torch.bfloat16),
          "float32, bf16 adapters": (torch.float32, torch.bfloat16)}  # fmt: skip


def timed(fn, repeats: int) -> float:
    """Median seconds of `repeats` calls, after two warm-up calls."""
    fn()
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def site_buffers(d_in: int, outs: list[int], weights: torch.dtype) -> tuple:
    shrink = (torch.randn(LAYERS, SLOTS, RANK, len(outs), d_in) * 0.02).to(weights)
    expand = (torch.randn(LAYERS, SLOTS, RANK, sum(outs)) * 0.02).to(weights)
    offsets = torch.tensor([0, *torch.tensor(outs).cumsum(0).tolist()], dtype=torch.int64)
    return shrink, expand, offsets


def site_tables(shrink: torch.Tensor, expand: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, S) addresses of each layer's slots, as `SlotBuffers` keeps them."""
    return (torch.stack([lora_kernel.addresses(shrink[layer]) for layer in range(LAYERS)]),
            torch.stack([lora_kernel.addresses(expand[layer]) for layer in range(LAYERS)]))  # fmt: skip


class NoOp:
    """A library whose kernel does nothing: what is left to time is the Python around the call."""

    def lora_site(self, *args) -> None:  # noqa: ANN002
        pass


def checks() -> dict:
    """ms per decode step (every site of every layer) spent in Python around the kernel call."""
    ranks = torch.full((SLOTS,), RANK, dtype=torch.int32)
    slots = torch.arange(SLOTS, dtype=torch.int32)
    sites = []
    for d_in, outs in SITES.values():
        shrink, expand, offsets = site_buffers(d_in, outs, torch.float32)
        shrink_at, expand_at = site_tables(shrink, expand)
        table = lora_kernel.SiteTable(ranks, shrink_at, expand_at, offsets, RANK, torch.float32)
        sites.append((torch.randn(SLOTS, d_in), torch.zeros(SLOTS, sum(outs)), shrink_at, expand_at, offsets, table,
                      (shrink, expand)))  # fmt: skip
    library = NoOp()

    def per_call() -> None:
        for x, out, shrink_at, expand_at, offsets, _, _ in sites:
            for layer in range(LAYERS):
                lora_kernel.site(library, x, out, slots, ranks, shrink_at[layer], expand_at[layer], offsets, RANK,
                                 torch.float32)  # fmt: skip

    def table() -> None:
        for x, out, _, _, _, site_table, _ in sites:
            for layer in range(LAYERS):
                site_table.run(library, layer, x, out, slots)

    def bare() -> None:  # the same arguments, no check
        for x, out, shrink_at, expand_at, offsets, _, _ in sites:
            for layer in range(LAYERS):
                library.lora_site(SLOTS, x.data_ptr(), x.stride(0), out.data_ptr(), out.stride(0), slots.data_ptr(),
                                  ranks.data_ptr(), shrink_at[layer].data_ptr(), expand_at[layer].data_ptr(), RANK,
                                  offsets.shape[0] - 1, x.shape[1], offsets.data_ptr(), 0, 0, 1)  # fmt: skip

    return {f"{name}_ms_per_step": timed(fn, 200) * 1e3 for name, fn in
            (("per_call", per_call), ("site_table", table), ("bare", bare))}  # fmt: skip


def decode(library, activations: torch.dtype, weights: torch.dtype, rows_per_adapter: int = 1) -> dict:
    ranks = torch.full((SLOTS,), RANK, dtype=torch.int32)
    slots = torch.arange(SLOTS, dtype=torch.int32) // rows_per_adapter  # adjacent rows share an adapter
    seconds = nbytes = 0.0
    for d_in, outs in SITES.values():
        shrink, expand, offsets = site_buffers(d_in, outs, weights)
        x = torch.randn(SLOTS, d_in).to(activations)
        out = torch.zeros(SLOTS, sum(outs), dtype=activations)

        table = lora_kernel.SiteTable(ranks, *site_tables(shrink, expand), offsets, RANK, weights)

        def step() -> None:
            for layer in range(LAYERS):
                table.run(library, layer, x, out, slots)  # noqa: B023

        seconds += timed(step, 7)
        nbytes += (shrink.numel() + expand.numel()) * shrink.element_size() / rows_per_adapter
    return {"step_ms": seconds * 1e3, "gb_per_s": nbytes / seconds / 1e9}


def decode_from_memory(library, activations: torch.dtype, weights: torch.dtype, adapters: int = 22) -> dict:
    """A decode step as the engine meets it: `adapters` distinct adapters (a mixed step has ~19-22), every site of
    every layer in the engine's order, and a 1 GiB read before each step, as the base model's weights pass through
    the caches between two sites (the step's own adapters never stay in this CPU's cache from one step to the
    next). Median of 9 steps."""
    ranks = torch.full((SLOTS,), RANK, dtype=torch.int32)
    slots = torch.arange(adapters, dtype=torch.int32)
    sites, nbytes = [], 0
    for d_in, outs in SITES.values():
        shrink, expand, offsets = site_buffers(d_in, outs, weights)
        table = lora_kernel.SiteTable(ranks, *site_tables(shrink, expand), offsets, RANK, weights)
        sites.append((table.bind(library, slots, 0, activations, d_in), torch.randn(adapters, d_in).to(activations),
                      torch.zeros(adapters, sum(outs), dtype=activations), (shrink, expand)))  # fmt: skip
        nbytes += (shrink[:, :adapters].numel() + expand[:, :adapters].numel()) * shrink.element_size()
    flush = torch.ones(256 << 20)
    times = []
    for _ in range(9):
        flush.sum()
        start = time.perf_counter()
        for layer in range(LAYERS):
            for bound, x, out, _ in sites:
                bound(layer, x, out)
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    return {"step_ms": seconds * 1e3, "gb_per_s": nbytes / seconds / 1e9}


def prefill(libraries: dict, activations: torch.dtype, weights: torch.dtype, calls: int = 40) -> dict:
    """One layer's four sites for a chunk of random length, each kernel build and matmuls (same draws)."""
    ranks = torch.full((SLOTS,), RANK, dtype=torch.int32)
    buffers = {name: site_buffers(d_in, outs, weights) for name, (d_in, outs) in SITES.items()}
    at = {name: [(lora_kernel.addresses(s[layer]), lora_kernel.addresses(e[layer])) for layer in range(LAYERS)]
          for name, (s, e, _) in buffers.items()}  # fmt: skip
    xs = {name: torch.randn(256, d_in).to(activations) for name, (d_in, _) in SITES.items()}
    outs_ = {name: torch.zeros(256, sum(outs), dtype=activations) for name, (_, outs) in SITES.items()}
    draws = [(random.randint(8, 128), random.randrange(LAYERS), random.randrange(SLOTS)) for _ in range(calls)]
    matmul_weights = {name: (s.to(activations), e.to(activations)) for name, (s, e, _) in buffers.items()}

    def kernel(library) -> None:  # noqa: ANN001
        for count, layer, slot in draws:
            slots = torch.full((256,), -1, dtype=torch.int32)
            slots[:count] = slot
            for name, (_, _, offsets) in buffers.items():
                a, b = at[name][layer]
                lora_kernel.site(library, xs[name], outs_[name], slots, ranks, a, b, offsets, RANK, weights)

    def matmuls() -> None:
        for count, layer, slot in draws:
            for name, (shrink, expand) in matmul_weights.items():
                bounds = buffers[name][2].tolist()
                parts = len(bounds) - 1
                u = xs[name][:count] @ shrink[layer, slot].reshape(RANK * parts, -1).T
                for part in range(parts):
                    lo, hi = bounds[part], bounds[part + 1]
                    outs_[name][:count, lo:hi].addmm_(u[:, part::parts], expand[layer, slot, :, lo:hi])

    timings = {f"prefill_{build}_ms_per_layer": timed(lambda lib=lib: kernel(lib), 3) / calls * 1e3
               for build, lib in libraries.items()}  # fmt: skip
    return timings | {"prefill_matmul_ms_per_layer": timed(matmuls, 3) / calls * 1e3}


def attention(dtype: torch.dtype, positions: int) -> dict:
    b, kv_heads, group, head_dim = 32, 4, 4, 64
    # the engine's layout: the cache gathered per position, (b, t, kv heads, hd), viewed as (b, kv heads, t, hd)
    keys = torch.randn(b, positions, kv_heads, head_dim).to(dtype).transpose(1, 2)
    values = torch.randn(b, positions, kv_heads, head_dim).to(dtype).transpose(1, 2)
    lengths = torch.randint(16, positions + 1, (b,))
    masked = torch.arange(positions)[None, :] >= lengths[:, None]
    q = torch.randn(b, kv_heads * group, head_dim).to(dtype)
    scale = head_dim**-0.5

    def sdpa() -> torch.Tensor:
        return F.scaled_dot_product_attention(
            q.view(b, -1, 1, head_dim), keys, values, attn_mask=~masked.view(b, 1, 1, -1), scale=scale, enable_gqa=True
        )

    def matmul() -> torch.Tensor:
        scores = torch.matmul(q.view(b, kv_heads, group, head_dim), keys.transpose(2, 3)).float() * scale
        scores.masked_fill_(masked.view(b, 1, 1, -1), float("-inf"))
        return torch.matmul(torch.softmax(scores, dim=-1).to(dtype), values)

    torch.testing.assert_close(sdpa().view(b, -1).float(), matmul().reshape(b, -1).float(), atol=3e-2, rtol=3e-2)
    return {"sdpa_ms": timed(sdpa, 20) * 1e3, "matmul_ms": timed(matmul, 20) * 1e3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--checks-only", action="store_true", help="only 4. (seconds, not minutes)")
    args = parser.parse_args()
    torch.manual_seed(0)
    random.seed(0)
    torch.set_grad_enabled(False)
    library = lora_kernel.load()
    if library is None:
        raise SystemExit("the fused kernel does not build here (no C compiler?)")
    libraries = {"kernel": library}
    if lora_kernel.tiled(library) and (portable := lora_kernel.load(portable=True)) is not None:
        libraries["portable"] = portable
    results: dict = {"tiled": lora_kernel.tiled(library), "threads": torch.get_num_threads(), "kernel": {},
                     "attention": {}}  # fmt: skip
    for name, (activations, weights) in {} if args.checks_only else DTYPES.items():
        figures = {}
        for build, lib in libraries.items():
            for rows in (1, 4):
                figures |= {f"decode{rows}_{build}_{k}": v for k, v in decode(lib, activations, weights, rows).items()}
            figures |= {f"memory_{build}_{k}": v for k, v in decode_from_memory(lib, activations, weights).items()}
        results["kernel"][name] = figures | prefill(libraries, activations, weights)
    results["checks"] = checks()
    for name in () if args.checks_only else ("float32", "bfloat16"):
        for positions in (96, 192):
            results["attention"][f"{name}, {positions} positions"] = attention(getattr(torch, name), positions)
    print(json.dumps(results, indent=2))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=2)
    print(
        f"\nkernel: {'tiles' if results['tiled'] else 'rows'}"
        + (", beside the portable build" if len(libraries) > 1 else "")
    )
    print("\n| dtype (activations, adapters) | build | decode step, 32 adapters x 8 layers | bandwidth "
          "| 22 adapters from memory | bandwidth | 32 rows over 8 adapters | prefill chunk a layer "
          "| matmuls |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, r in results["kernel"].items():
        for build in libraries:
            decode1, decode4 = r[f"decode1_{build}_step_ms"], r[f"decode4_{build}_step_ms"]
            print(f"| {name} | {build} | {decode1:.1f} ms | {r[f'decode1_{build}_gb_per_s']:.0f} GB/s "
                  f"| {r[f'memory_{build}_step_ms']:.1f} ms | {r[f'memory_{build}_gb_per_s']:.0f} GB/s "
                  f"| {decode4:.1f} ms | {r[f'prefill_{build}_ms_per_layer']:.2f} ms "
                  f"| {r['prefill_matmul_ms_per_layer']:.2f} ms |")  # fmt: skip
    print("\n| decode attention, 32 sequences | SDPA | matmul, softmax, matmul | engine uses |")
    print("| --- | --- | --- | --- |")
    for name, r in results["attention"].items():
        used = "SDPA" if name.startswith("float32") else "matmul"
        print(f"| {name} | {r['sdpa_ms']:.2f} ms | {r['matmul_ms']:.2f} ms | {used} |")
    c = results["checks"]
    print(f"\n| Python around the kernel, a decode step ({len(SITES) * LAYERS} calls) | every check per call "
          "| SiteTable (engine) | no check |")  # fmt: skip
    print("| --- | --- | --- | --- |")
    print(f"| ms per step | {c['per_call_ms_per_step']:.3f} | {c['site_table_ms_per_step']:.3f} "
          f"| {c['bare_ms_per_step']:.3f} |")  # fmt: skip


if __name__ == "__main__":
    main()
