"""Adapters for the native path: reading PEFT directories, the tiered cache, and per-segment LoRA.

Tiers: *active* (numbered slots the step reads: with the fused kernel, addresses of the adapter's own
tensors, nothing copied; pinned while a request uses it) -> *memory* (prepared tensors in an LRU under a
byte budget) -> *disk* (the materialised PEFT directory). Loading and preparing run on a loader thread,
never on the step loop.

In a step, tokens are sorted by adapter slot (base-model tokens first), so each adapter's tokens
form one segment. With the fused C kernel (`lora_kernel`, built on first use), one call per
projection site computes every adapter row's shrink and expand (q/k/v share one concatenated A,
gate/up too), in the model's dtype with fp32 accumulation, adapters stored in that dtype (bf16 halves
the bytes each distinct adapter streams per step). Without it (no compiler, or ADAPTERY_LORA_KERNEL=0)
the PyTorch path runs in fp32: one `F.grouped_mm` (prefill) or padded `bmm` (decode) pair per site,
whatever the number of adapters, ranks below the batch's largest zero-padded. DoRA is a
per-output-feature magnitude scale on top of either.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import mmap
import re
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from adaptery.engine import lora_kernel
from adaptery.engine.native import MODULE_SITE, SITES, NativeLlama

log = logging.getLogger("adaptery.engine")
_KEY = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.(lora_A\.weight|lora_B\.weight|lora_magnitude_vector)$")
# adapter_config.json options the native path does not implement: any non-default value routes the
# adapter through PEFT instead (still correct, one request at a time).
_UNSUPPORTED_OPTIONS = (
    "modules_to_save",
    "layer_replication",
    "trainable_token_indices",
    "alora_invocation_tokens",
    "target_parameters",
    "rank_pattern",
    "alpha_pattern",
    "use_qalora",
    "use_bdlora",
    "lora_bias",
    "fan_in_fan_out",
)


class AdapterRejected(ValueError):
    """The adapter cannot be served (rank above the limit, wrong shapes): a 400 for the client."""


@dataclass(frozen=True)
class AdapterInfo:
    peft_type: str
    rank: int
    native: bool
    path_reason: str  # how it is served, for /api/admin/engine and logs


def inspect_adapter(path: Path, max_rank: int, supported_modules: set[str] | None = None) -> AdapterInfo:
    """Read adapter_config.json and decide how the adapter is served; AdapterRejected when it cannot be."""
    try:
        config = json.loads((Path(path) / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise AdapterRejected(f"the adapter has no readable adapter_config.json: {exc}") from exc
    peft_type = str(config.get("peft_type", "LORA")).upper()
    rank = int(config.get("r") or 0)
    ranks = [rank, *[int(v) for v in (config.get("rank_pattern") or {}).values()]]
    if max(ranks) > max_rank:
        raise AdapterRejected(
            f"adapter rank {max(ranks)} is above this server's maximum LoRA rank of {max_rank} "
            "(setting ADAPTERY_MAX_LORA_RANK)"
        )
    if peft_type != "LORA":
        return AdapterInfo(peft_type, rank, False, f"{peft_type} through PEFT (one request at a time)")
    odd = [name for name in _UNSUPPORTED_OPTIONS if config.get(name) not in (None, False, {}, [], "")]
    targets = config.get("target_modules")
    target_names = {targets} if isinstance(targets, str) else set(targets or [])
    if supported_modules is not None and not target_names <= supported_modules:
        odd.append(f"target_modules {sorted(target_names - supported_modules)}")
    if odd:
        return AdapterInfo(peft_type, rank, False, f"LoRA with {', '.join(odd)} through PEFT (one request at a time)")
    method = "DoRA" if config.get("use_dora") else ("rsLoRA" if config.get("use_rslora") else "LoRA")
    return AdapterInfo(peft_type, rank, True, f"{method} native (segmented multi-adapter batches)")


@dataclass
class PreparedAdapter:
    """An adapter laid out for the slot buffers, per site: A (L, r, P, d_in) and B (L, r, d_out_total).

    P projections share a site (q/k/v: 3, gate/up: 2); B's columns are the fused output's columns, and
    projection j's columns are fed by the shrink rows of projection j (the kernel and the PyTorch
    path's block-diagonal slot layout both follow this). The LoRA scaling is folded into B.
    """

    key: str
    rank: int
    shrink: dict[str, torch.Tensor]
    expand: dict[str, torch.Tensor]
    magnitude: dict[str, torch.Tensor] | None  # DoRA: per site (L, d_out_total) scale, None for plain LoRA
    nbytes: int = 0
    load_seconds: float = 0.0


def prepare_adapter(
    key: str, path: Path, model: NativeLlama, max_rank: int, dtype: torch.dtype = torch.float32
) -> PreparedAdapter:
    """Read a PEFT LoRA directory straight into its final per-site tensors (`dtype`), shapes checked."""
    info = inspect_adapter(path, max_rank)
    if not info.native:
        raise AdapterRejected(f"adapter is not servable natively: {info.path_reason}")
    config = json.loads((Path(path) / "adapter_config.json").read_text(encoding="utf-8"))
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise AdapterRejected("the adapter has no safetensors weights")
    rank = info.rank
    alpha = float(config.get("lora_alpha", rank))
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    layers = len(model.layers)
    # Installed single-threaded: the loader thread runs beside the engine's step, and torch's parallel fills and
    # copies would contend with it for the cores (and wait on them when the machine is busy). The adapter's own
    # tensors are read from the file's mapping straight into their place, converted to the served dtype on the way
    # (bf16 held as its bits): with the C library one pass each (`convert_weights`: B transposed and scaled too),
    # else with numpy. Left uninitialised (memory the allocator kept is reused as it is, not zeroed by the kernel
    # first), then only the projections the adapter does not train are zeroed.
    staged = dtype if dtype in (torch.float32, torch.bfloat16) else torch.float32
    # the engine's own library (looking it up again costs ~0.6 ms); for bf16 without one, loaded here (numpy takes
    # five passes to round)
    library = model.kernel or (lora_kernel.load() if staged == torch.bfloat16 else None)
    held = np.uint16 if staged == torch.bfloat16 else np.float32
    shrink = {site: np.empty((layers, rank, len(mods), model.site_in[site]), held) for site, mods in SITES.items()}
    expand = {site: np.empty((layers, rank, sum(model.site_out[site])), held) for site in SITES}
    found: dict[str, dict[tuple[int, str], np.ndarray]] = {"lora_A.weight": {}, "lora_B.weight": {},
                                                              "lora_magnitude_vector": {}}  # fmt: skip
    for file in files:
        for name, array in read_safetensors(file).items():
            match = _KEY.search(name)
            if match is None or match.group(2) not in MODULE_SITE or int(match.group(1)) >= layers:
                raise AdapterRejected(f"unexpected tensor {name!r} for this base model")
            found[match.group(3)][(int(match.group(1)), match.group(2))] = array
    found_a, found_b, found_m = found["lora_A.weight"], found["lora_B.weight"], found["lora_magnitude_vector"]
    if not found_a or found_a.keys() != found_b.keys():
        raise AdapterRejected("the adapter's lora_A and lora_B tensors do not pair up")
    for (layer, module), a in found_a.items():
        site, index = MODULE_SITE[module]
        b = found_b[(layer, module)]
        d_in, d_out = model.site_in[site], model.site_out[site][index]
        if a.shape != (rank, d_in) or b.shape != (d_out, rank):
            raise AdapterRejected(
                f"layer {layer} {module}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit the base "
                f"model ({rank}x{d_in} / {d_out}x{rank})"
            )
        start = sum(model.site_out[site][:index])
        if library is not None:
            lora_kernel.convert_weights(library, *_source(a), shrink[site][layer, :, index])
            source, bf16 = _source(b)
            lora_kernel.convert_weights(library, source.T, bf16, expand[site][layer, :, start : start + d_out], scaling)
        else:
            shrink[site][layer, :, index] = _as_held(a, staged)
            expand[site][layer, :, start : start + d_out] = _held(_as_float32(b).T * np.float32(scaling), staged)
    for layer in range(layers):
        for module, (site, index) in MODULE_SITE.items():
            if (layer, module) not in found_a:  # not trained: a zero update
                start = sum(model.site_out[site][:index])
                shrink[site][layer, :, index] = 0
                expand[site][layer, :, start : start + model.site_out[site][index]] = 0
    magnitude = None
    if found_m:
        magnitude = {site: torch.ones(layers, sum(model.site_out[site])) for site in SITES}
        for (layer, module), m in found_m.items():
            site, index = MODULE_SITE[module]
            weight = model.base_weight(site, index, layer)
            a, b = (torch.tensor(_as_float32(side[(layer, module)])) for side in (found_a, found_b))
            norm = (weight + scaling * (b @ a)).norm(p=2, dim=1)  # PEFT's DoRA weight norm, per output feature
            start = sum(model.site_out[site][:index])
            magnitude[site][layer, start : start + weight.shape[0]] = torch.tensor(_as_float32(m)) / norm
    shrink_t = {site: _to_torch(array, staged, dtype) for site, array in shrink.items()}
    expand_t = {site: _to_torch(array, staged, dtype) for site, array in expand.items()}
    nbytes = sum(t.numel() * t.element_size() for t in [*shrink_t.values(), *expand_t.values()])
    return PreparedAdapter(key, rank, shrink_t, expand_t, magnitude, nbytes)


# safetensors' dtypes an adapter's weights may have, as numpy holds them (bf16 as its bits)
_SAFETENSORS_DTYPES = {"F32": np.dtype("<f4"), "BF16": np.dtype("<u2"), "F16": np.dtype("<f2"), "F64": np.dtype("<f8")}
_MAX_HEADER = 100_000_000  # bytes, as the safetensors library bounds it


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file as a read-only numpy view of the file's mapping (bf16 as uint16 bits).

    The format is an 8-byte little-endian header length, a JSON header naming each tensor's dtype, shape and byte
    range, then the bytes. Read here rather than through `safe_open(...).get_tensor`, which cost ~15 µs a tensor
    (a torch tensor, its storage sliced twice, then its numpy view): ~1.7 ms of a rank-16 adapter's 112 tensors,
    a third of its load. Every bound is checked before a view is made, and numpy's own `frombuffer` cannot reach
    outside the mapping whatever the header says; anything malformed is an AdapterRejected naming the file."""

    def bad(why: str) -> AdapterRejected:
        return AdapterRejected(f"{Path(path).name} is not a valid safetensors file: {why}")

    with open(path, "rb") as handle:
        try:
            mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        except (ValueError, OSError) as exc:  # an empty file cannot be mapped
            raise bad(str(exc)) from exc
    if len(mapped) < 8:
        raise bad("shorter than its header length")
    length = int.from_bytes(mapped[:8], "little")
    if length > min(_MAX_HEADER, len(mapped) - 8):
        raise bad(f"a header of {length} bytes in a file of {len(mapped)}")
    try:
        header = json.loads(mapped[8 : 8 + length])
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad(f"the header is not JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise bad("the header is not a JSON object")
    data, size = 8 + length, len(mapped) - 8 - length
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict) or entry.get("dtype") not in _SAFETENSORS_DTYPES:
            dtype = entry.get("dtype") if isinstance(entry, dict) else entry
            raise bad(f"tensor {name!r} has dtype {dtype!r} (an adapter's weights are F32, BF16, F16 or F64)")
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape):
            raise bad(f"tensor {name!r} has shape {shape!r}")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(n) is int for n in offsets)
                or not 0 <= offsets[0] <= offsets[1] <= size):  # fmt: skip
            raise bad(f"tensor {name!r} has byte range {offsets!r} outside the {size} bytes of data")
        dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
        count = math.prod(shape)
        if count * dtype.itemsize != offsets[1] - offsets[0]:
            raise bad(f"tensor {name!r}: shape {shape} of {entry['dtype']} is not {offsets[1] - offsets[0]} bytes")
        tensors[name] = np.frombuffer(mapped, dtype, count, data + offsets[0]).reshape(shape)
    return tensors


def _source(array: np.ndarray) -> tuple[np.ndarray, bool]:
    """A file's tensor as `convert_weights` reads it: fp32 and bf16 (as its bits) viewed where they lie in the file's
    mapping, float16 and float64 converted to fp32; and whether it is bf16."""
    if array.dtype == np.uint16:
        return array, True
    return _as_float32(array), False


def _as_float32(array: np.ndarray) -> np.ndarray:
    """A file's tensor (bf16 as its uint16 bits) as float32, without torch's (multi-threaded) conversion kernels."""
    if array.dtype == np.uint16:
        return (array.astype(np.uint32) << 16).view(np.float32)
    return array if array.dtype == np.float32 else array.astype(np.float32)


def _held(array: np.ndarray, staged: torch.dtype) -> np.ndarray:
    """A float32 array as the prepared tensors hold it, where no C library converts it: itself (fp32), or its bf16
    bits (uint16), rounded to nearest even as torch rounds (NaN-free weights assumed checked upstream)."""
    if staged == torch.float32:
        return array
    bits = np.ascontiguousarray(array).view(np.uint32)
    rounded = (bits >> 16) & 1
    rounded += 0x7FFF
    rounded += bits
    rounded >>= 16
    return rounded.astype(np.uint16)


def _as_held(array: np.ndarray, staged: torch.dtype) -> np.ndarray:
    """A file's tensor as `_held` gives it; bf16 into bf16 as it is."""
    if staged == torch.bfloat16 and array.dtype == np.uint16:
        return array
    return _held(_as_float32(array), staged)


def _to_torch(array: np.ndarray, staged: torch.dtype, dtype: torch.dtype) -> torch.Tensor:
    """The held array as a tensor of `dtype` (no copy when it is held in that dtype)."""
    if staged == torch.bfloat16:
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array) if dtype == torch.float32 else torch.from_numpy(array).to(dtype)


class SlotBuffers:
    """The active tier: adapters numbered by slot, kept compact (slots 0..n-1).

    With the fused kernel (`kernel` set) nothing is copied: per site and layer a table holds each slot's
    addresses into its adapter's own prepared tensors (held here while active), so activating an adapter or
    moving one into a freed slot writes a few pointers, where copying was ~9 MB (fp32, rank 16, width 1024,
    8 layers) each way. The PyTorch path needs the adapters stacked: fp32 buffers (L, S, R, P, d_in) for A
    and a block-diagonal B (L, S, R, P, d_out_total) so one matmul pair serves a fused site.
    """

    def __init__(
        self,
        model: NativeLlama,
        slots: int,
        max_rank: int,
        kernel: object | None = None,
        adapter_dtype: torch.dtype | None = None,
    ) -> None:
        with torch.inference_mode(False):  # tensors that count their writes, so the kernel's tables are checked once
            self._make(model, slots, max_rank, kernel, adapter_dtype)

    def _make(
        self, model: NativeLlama, slots: int, max_rank: int, kernel: object | None, adapter_dtype: torch.dtype | None
    ) -> None:
        layers = len(model.layers)
        self.model = model
        self.max_rank = max_rank
        self.kernel = kernel
        if kernel is None:  # the PyTorch path computes in fp32
            self.dtype = torch.float32
        elif adapter_dtype is not None:  # bf16 adapters for an fp32 model: half the bytes, a rounding's cost
            self.dtype = adapter_dtype
        else:
            self.dtype = model.dtype if model.dtype in (torch.float32, torch.bfloat16) else torch.float32
        self.slots = slots
        if kernel is not None:  # per site: (L, S) addresses of each slot's shrink and expand rows in a layer
            self.shrink_at = {site: torch.zeros(layers, slots, dtype=torch.int64) for site in SITES}
            self.expand_at = {site: torch.zeros(layers, slots, dtype=torch.int64) for site in SITES}
        else:
            self.shrink = {
                site: torch.zeros(layers, slots, max_rank, len(mods), model.site_in[site])
                for site, mods in SITES.items()
            }
            self.expand = {
                site: torch.zeros(layers, slots, max_rank, len(mods), sum(model.site_out[site]))
                for site, mods in SITES.items()
            }
        self.offsets = {
            site: torch.tensor([0, *itertools.accumulate(model.site_out[site])], dtype=torch.int64) for site in SITES
        }
        self.ranks = torch.zeros(slots, dtype=torch.int32)
        if kernel is not None:  # checked once, and again after each slot write (SiteTable), not per call
            self.tables = {
                site: lora_kernel.SiteTable(
                    self.ranks, self.shrink_at[site], self.expand_at[site], self.offsets[site], max_rank, self.dtype
                )
                for site in SITES
            }
        self.magnitude = {site: torch.ones(layers, slots, sum(model.site_out[site])) for site in SITES}
        self.keys: list[str] = []
        self.index: dict[str, int] = {}
        self.adapters: list[PreparedAdapter] = []

    def slot_of(self, key: str) -> int | None:
        return self.index.get(key)

    @property
    def rank(self) -> int:
        return max((a.rank for a in self.adapters), default=0)

    @property
    def any_dora(self) -> bool:
        return any(a.magnitude is not None for a in self.adapters)

    def _write(self, slot: int, adapter: PreparedAdapter) -> None:
        r = adapter.rank
        self.ranks[slot] = r
        for site in SITES:
            if self.kernel is not None:
                for table, weights in ((self.shrink_at, adapter.shrink[site]), (self.expand_at, adapter.expand[site])):
                    if weights.dtype != self.dtype:
                        raise ValueError(f"adapter tensors must be {self.dtype}, not {weights.dtype}")
                    table[site][:, slot] = lora_kernel.addresses(weights)  # per layer
            else:
                self.shrink[site][:, slot, :r] = adapter.shrink[site]
                self.shrink[site][:, slot, r:].zero_()  # the PyTorch path pads ranks with zeros
                self.expand[site][:, slot].zero_()
                bounds = self.offsets[site].tolist()
                for part, (lo, hi) in enumerate(itertools.pairwise(bounds)):
                    self.expand[site][:, slot, :r, part, lo:hi] = adapter.expand[site][:, :, lo:hi]
            if adapter.magnitude is None:
                self.magnitude[site][:, slot] = 1.0
            else:
                self.magnitude[site][:, slot] = adapter.magnitude[site]

    def activate(self, adapter: PreparedAdapter) -> int:
        slot = len(self.keys)
        if slot >= self.slots:
            raise RuntimeError("no free adapter slot")  # the scheduler never admits more adapters than slots
        self._write(slot, adapter)
        self.keys.append(adapter.key)
        self.index[adapter.key] = slot
        self.adapters.append(adapter)
        return slot

    def deactivate(self, key: str) -> dict[int, int]:
        """Free `key`'s slot, moving the last slot into the hole; returns {old slot: new slot} moves."""
        slot = self.index.pop(key)
        last = len(self.keys) - 1
        moves = {}
        if slot != last:
            self._write(slot, self.adapters[last])
            self.keys[slot], self.adapters[slot] = self.keys[last], self.adapters[last]
            self.index[self.keys[slot]] = slot
            moves[last] = slot
        self.keys.pop()
        self.adapters.pop()
        return moves


@dataclass
class LoraBatch:
    """One step's segments: `base_tokens` rows without adapter, then per active slot a run of rows.

    With the fused kernel, one call per site does every row: decodes (their cost is reading each
    adapter's weights, which the kernel does once) and, where the kernel works in tiles of rows (its
    AVX-512 and AVX2 builds), prefill chunks too. Without tiles a long segment (`kernel_segment_limit` rows or
    more) runs as matmuls instead (one shrink and one `addmm_` per projection into the fused output).
    Matmuls of varying row counts are slow in bf16 here: oneDNN prepares a kernel for each new shape,
    ~4 ms a layer for a prefill chunk of 8-128 rows against ~0.5 ms in the tiled kernel (measured here).
    Otherwise two PyTorch ways to the same sums, picked per step: when every segment is short (decode
    steps), the segments are padded to the longest and run as one batched matmul pair (`bmm`);
    otherwise (prefill chunks) `F.grouped_mm` over the exact segments.
    """

    buffers: SlotBuffers
    base_tokens: int
    counts: list[int]  # tokens per active slot, in slot order
    token_slots: torch.Tensor  # (adapter rows,) int32: per adapter row, its slot
    padded_limit: int = 4
    kernel_segment_limit: int = 8
    rank: int = field(init=False)
    slots: int = field(init=False)

    def __post_init__(self) -> None:
        self.rank = self.buffers.rank
        self.slots = len(self.buffers.keys)
        self.dora = self.token_slots.long() if self.buffers.any_dora else None
        self.kernel = self.buffers.kernel
        self.gather = self.valid = None
        if self.kernel is not None:
            self.long_segments: list[tuple[int, int, int]] = []  # (slot, first row, rows), rows after base
            start = 0
            tiled = lora_kernel.tiled(self.kernel)
            for slot, count in enumerate(self.counts):
                if count >= self.kernel_segment_limit and not tiled:
                    self.long_segments.append((slot, start, count))
                start += count
            with torch.inference_mode(False):  # a tensor that counts its writes: its bounds are checked once a step
                self.kernel_slots = self.token_slots.clone()
                for _, first, count in self.long_segments:
                    self.kernel_slots[first : first + count] = -1
            # each site's table bound to this step's slots at its first call (one a layer follows): checked once
            kernel_rows = len(self.long_segments) < len(self.counts)
            self.bound: dict[str, lora_kernel.BoundSite] | None = {} if kernel_rows else None
            return
        self.offsets = torch.tensor(list(itertools.accumulate(self.counts)), dtype=torch.int32)
        self.longest = max(self.counts, default=0)
        self.padded = 0 < self.longest <= self.padded_limit
        if self.padded and any(c != self.longest for c in self.counts):
            # row index per (slot, position), the pad row (index = total) where a segment is shorter
            total = sum(self.counts)
            index = torch.full((self.slots, self.longest), total, dtype=torch.long)
            start = 0
            for slot, count in enumerate(self.counts):
                index[slot, :count] = torch.arange(start, start + count)
                start += count
            self.gather = index.view(-1)
            self.valid = self.gather < total

    def apply(self, layer: int, site: str, x: torch.Tensor, out: torch.Tensor) -> None:
        """out[adapter rows] += segment-wise LoRA(x); DoRA rows are then scaled by their magnitudes."""
        start, n, r = self.base_tokens, self.slots, self.rank
        if start >= x.shape[0] or n == 0:
            return
        if self.kernel is not None:
            buffers = self.buffers
            if self.bound is not None:  # the rows the kernel does: one C call, checked as bound
                bound = self.bound.get(site)
                if bound is None:
                    bound = buffers.tables[site].bind(self.kernel, self.kernel_slots, start, x.dtype, x.shape[1])
                    self.bound[site] = bound
                bound(layer, x, out)
            if self.long_segments:
                self._long_segments(layer, site, x, out)
            if self.dora is not None:
                out[start:].mul_(buffers.magnitude[site][layer][self.dora].to(out.dtype))
            return
        xl = x[start:].float()
        shrink = self.buffers.shrink[site][layer, :n, :r]
        parts = shrink.shape[2]
        a = shrink.reshape(n, r * parts, shrink.shape[3]).transpose(1, 2)  # (n, d_in, r P)
        b = self.buffers.expand[site][layer, :n, :r].reshape(n, r * parts, -1)  # (n, r P, d_out)
        if self.padded:
            if self.gather is None:
                y = torch.bmm(torch.bmm(xl.view(n, self.longest, -1), a), b).view(-1, b.shape[2])
            else:
                padded = torch.cat([xl, xl.new_zeros(1, xl.shape[1])])[self.gather].view(n, self.longest, -1)
                y = torch.bmm(torch.bmm(padded, a), b).view(-1, b.shape[2])[self.valid]
        else:
            y = F.grouped_mm(F.grouped_mm(xl, a, offs=self.offsets), b, offs=self.offsets)
        target = out[start:]
        target += y.to(out.dtype)
        if self.dora is not None:
            target.mul_(self.buffers.magnitude[site][layer][self.dora].to(out.dtype))

    def _long_segments(self, layer: int, site: str, x: torch.Tensor, out: torch.Tensor) -> None:
        """The segments the untiled kernel leaves to matmuls: one shrink and one `addmm_` a projection."""
        buffers, start = self.buffers, self.base_tokens
        bounds = buffers.offsets[site].tolist()
        parts = len(bounds) - 1
        for slot, first, count in self.long_segments:
            adapter = buffers.adapters[slot]
            rows = slice(start + first, start + first + count)
            a = adapter.shrink[site][layer].reshape(adapter.rank * parts, -1).to(x.dtype)
            u = x[rows] @ a.T  # (rows, rank P), column k P + p
            expand = adapter.expand[site][layer].to(x.dtype)
            for part in range(parts):
                lo, hi = bounds[part], bounds[part + 1]
                out[rows, lo:hi].addmm_(u[:, part::parts], expand[:, lo:hi])


class AdapterLoad:
    """One load of one adapter from disk, shared by every request that waits for it.

    Settled once (under the store's lock) with `error` None on success or the failure's message; every
    waiter sees the same outcome, so a failure reaches all of them, not only the first to look. A settled
    failure is not cached: the next `acquire` of that adapter starts a fresh load (the files may have
    been fixed or were briefly unreadable), while requests that arrive during a load share it.
    """

    def __init__(self, key: str) -> None:
        self.key = key
        self.error: str | None = None
        self._settled = threading.Event()

    def done(self) -> bool:
        return self._settled.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._settled.wait(timeout)

    def _settle(self, error: str | None) -> None:
        self.error = error
        self._settled.set()


class AdapterStore:
    """The memory tier (LRU under a byte budget) and the loader thread that fills it from disk.

    `acquire` is get-or-load-and-pin in one step under the lock, and `release` its inverse: an adapter
    a request holds is pinned from the moment it is handed out, so the loader's eviction can neither drop
    it nor stop counting its bytes in between. Loads are `AdapterLoad`s kept in `loading` while in flight.
    """

    def __init__(
        self,
        model: NativeLlama,
        max_rank: int,
        budget_bytes: int,
        metrics: object | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.model = model
        self.dtype = dtype
        self._bytes = 0
        self.max_rank = max_rank
        self.budget = budget_bytes
        self.metrics = metrics
        self.memory: OrderedDict[str, PreparedAdapter] = OrderedDict()
        self.pinned: dict[str, int] = {}
        self.loading: dict[str, AdapterLoad] = {}
        self.seen_on_disk: set[str] = set()
        self.lock = threading.Lock()
        self.loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adaptery-adapter-loader")
        self.on_ready: list = []
        self.hits = self.misses = self.loads = 0

    @property
    def memory_bytes(self) -> int:
        return self._bytes

    def prefetch(self, key: str, path: Path) -> AdapterLoad | None:
        """A request for `key` was queued: count a hit or a miss, and start loading it if it is not in memory.

        Returns the load in flight (new or shared), None on a hit. Called when the request arrives (not when
        it is scheduled), so loading overlaps the steps that run meanwhile; O(1) whatever the number of
        adapters registered.
        """
        with self.lock:
            if key in self.memory:
                self.memory.move_to_end(key)
                self.hits += 1
                self._count("hit")
                return None
            self.misses += 1
            self._count("miss")
            return self._start(key, path)

    def acquire(self, key: str, path: Path) -> PreparedAdapter | AdapterLoad:
        """The prepared adapter, pinned, if in memory; else the load in flight for it (started if none is).

        Atomic: the adapter returned is pinned before the lock is released. Each adapter returned is
        `release`d exactly once."""
        with self.lock:
            adapter = self.memory.get(key)
            if adapter is None:
                return self._start(key, path)
            self.memory.move_to_end(key)
            self.pinned[key] = self.pinned.get(key, 0) + 1
            return adapter

    def release(self, key: str) -> None:
        """Undo one `acquire` that returned the adapter; it may be evicted once no request holds it."""
        with self.lock:
            count = self.pinned.get(key, 0)
            if count <= 0:
                raise RuntimeError(f"adapter {key[:12]} released more often than acquired")
            if count == 1:
                del self.pinned[key]
            else:
                self.pinned[key] = count - 1
            self._evict()

    def _start(self, key: str, path: Path) -> AdapterLoad:
        load = self.loading.get(key)
        if load is None:
            self.seen_on_disk.add(key)
            load = self.loading[key] = AdapterLoad(key)
            self.loader.submit(self._load, load, path)
        return load

    def _count(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.adapter_cache.labels(outcome).inc()

    def _load(self, load: AdapterLoad, path: Path) -> None:
        key = load.key
        started = time.perf_counter()
        try:
            adapter = prepare_adapter(key, path, self.model, self.max_rank, self.dtype)
        except Exception as exc:  # delivered to every request waiting on this load
            log.warning("adapter %s failed to load: %s", key[:12], exc)
            with self.lock:
                self.loading.pop(key, None)
                load._settle(str(exc) or type(exc).__name__)
            self._notify()
            return
        adapter.load_seconds = time.perf_counter() - started
        self.loads += 1
        if self.metrics is not None:
            self.metrics.adapter_load_seconds.observe(adapter.load_seconds)
        with self.lock:
            if key in self.memory:
                self._bytes -= self.memory[key].nbytes
            self.memory[key] = adapter
            self._bytes += adapter.nbytes
            self.loading.pop(key, None)
            self._evict(keep=key)  # the requests waiting for it get their chance to acquire it
            load._settle(None)
        self._notify()

    def _notify(self) -> None:
        for callback in self.on_ready:
            callback()

    def _evict(self, keep: str | None = None) -> None:
        """Drop least recently used adapters nobody holds until the budget is kept. `keep`: one just loaded, left
        (over budget, until the next eviction) where held adapters fill the budget, so its waiters can acquire it."""
        if self._bytes <= self.budget:
            return
        for key in list(self.memory):  # least recently used first
            if self._bytes <= self.budget:
                break
            if key in self.pinned or key == keep:
                continue
            self._bytes -= self.memory.pop(key).nbytes

    def close(self) -> None:
        self.loader.shutdown(wait=False, cancel_futures=True)
