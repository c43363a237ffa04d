"""A small fused multi-LoRA kernel in C, compiled on first use with the system compiler, via ctypes.

One call per projection site and layer: for every adapter row of the step, the shrink (x @ A, q/k/v or
gate/up sharing one concatenated A) and the expand (u @ B, written straight into the fused base
output) run together, accumulating in fp32, with the rows split across the cores by OpenMP. Adapter
weights may be fp32 or bf16 (bf16 halves the bytes each distinct adapter streams per step, the
limit with many adapters; ENGINE-NOTES). Rows of the same adapter are adjacent (the step sorts them),
so each thread reads an adapter's weights once per run of its rows and keeps them in L2.

The same library holds the engine's decode attention (`paged_decode`, paged_attention.c): one query token per
sequence, keys and values read in place from the paged KV cache's blocks, grouped-query heads, fp32 sums; it saves
the gathered copy of every decode's context each layer (SDPA plus index_select 35.6 ms of a 186 ms step, against
22.5 of 169 for it: bench/step_profile.py, one thread, fp32, batch 32, width 1024, 8 layers). And the step's
elementwise chains, fused (step_ops.c): the residual add with the RMSNorm after it (`add_rms_norm`), the rotary
embedding in place (`rotary`) and the MLP's SiLU times up (`silu_mul`).

No torch headers are needed (the library takes raw pointers), so compiling takes about a second.
When no compiler is present or the build fails, `load()` returns None and `lora.LoraBatch` uses its
pure-PyTorch path (`grouped_mm` / `bmm`), which is tested against PEFT the same way.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import hmac
import itertools
import logging
import os
import shutil
import subprocess
import tempfile
import threading
import weakref
from pathlib import Path

import numpy as np
import torch

from adaptery.settings import KernelSettings

log = logging.getLogger("adaptery.engine")

# packaged beside this module; one library holds them all (the others use lora_kernel.c's helpers and headers)
SOURCE_FILES = ("lora_kernel.c", "step_ops.c", "paged_attention.c")
SOURCE = "\n".join(Path(__file__).with_name(name).read_text(encoding="utf-8") for name in SOURCE_FILES)

# -Wall -Werror: a warning in the kernel fails its build (and so falls back to PyTorch) rather than running
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11", "-Wall", "-Werror", "-lm"]
# The build for CPUs without AVX-512 or AVX2: the same library with the vectoriser's loops (tests compare the two here).
PORTABLE_FLAGS = [*FLAGS, "-mno-avx512f", "-mno-avx2", "-mno-fma"]
_lock = threading.Lock()
_loaded: dict[str, object] = {}
_memfds: list[int] = []  # the anonymous files the loaded libraries were read from, held open for the process


def _cache_dir() -> Path:
    return KernelSettings().kernel_cache


@functools.cache
def _cpu_key() -> str:
    try:  # -march=native: a library built on another CPU may not run here
        lines = Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines()
        return next((line for line in lines if line.startswith("flags")), "")
    except OSError:
        return ""


def _compiler(settings: KernelSettings | None = None) -> str:
    compiler = (settings or KernelSettings()).c_compiler or shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        raise RuntimeError("no C compiler (gcc) on this machine")
    return compiler


@functools.lru_cache(maxsize=8)
def _compiler_version(compiler: str) -> str:
    """The compiler's own account of its version: a new compiler builds a new library, never reuses an old one."""
    try:
        result = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unknown ({exc})"
    return f"{result.returncode}\n{result.stdout}"


def build_command(compiler: str, flags: list[str], source: Path, output: Path) -> list[str]:
    return [compiler, *flags, str(source), "-o", str(output)]


def _hash_file(target: Path) -> Path:
    return target.with_name(target.name + ".sha256")


def _build(target: Path, flags: list[str], compiler: str) -> None:
    """Compile SOURCE into `target`, recording the library's own sha256 beside it (`<target>.sha256`)."""
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        source = Path(tmp) / "lora_kernel.c"
        source.write_text(SOURCE, encoding="utf-8")
        built = Path(tmp) / target.name
        result = subprocess.run(build_command(compiler, flags, source, built), capture_output=True, text=True,
                                timeout=120)  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {result.stderr.strip()[-2000:]}")
        recorded = Path(tmp) / "built.sha256"
        recorded.write_text(hashlib.sha256(built.read_bytes()).hexdigest(), encoding="ascii")
        # each file atomic: a concurrent process sees a whole library or none; one that reads the pair between
        # the two renames finds them disagree and builds its own
        os.replace(recorded, _hash_file(target))
        os.replace(built, target)


def _read_verified(target: Path) -> bytes | None:
    """The cached library's bytes if they hash to what its build recorded, else None (missing, stale, altered)."""
    try:
        expected = _hash_file(target).read_text(encoding="ascii").strip()
        data = target.read_bytes()
    except OSError:
        return None
    return data if hmac.compare_digest(hashlib.sha256(data).hexdigest(), expected) else None


def _dlopen(data: bytes, name: str) -> ctypes.CDLL:
    """Load exactly the bytes that were verified: from an anonymous memory file where the OS has one (so the cache
    file cannot be swapped between the check and the load), else from a private copy."""
    if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        _memfds.append(fd)  # kept open: a reused descriptor number would name another library to dlopen
        return ctypes.CDLL(f"/proc/self/fd/{fd}")
    with tempfile.TemporaryDirectory() as tmp:  # mode 0700, ours alone
        copy = Path(tmp) / name
        copy.write_bytes(data)
        return ctypes.CDLL(str(copy))


def load(portable: bool = False) -> ctypes.CDLL | None:
    """The compiled kernel, or None (logged once) when it cannot be built; ADAPTERY_LORA_KERNEL=0 disables it.
    `portable` builds it without AVX-512 or AVX2, as it runs on CPUs that lack both.

    The cached library is named by a hash of the source, the flags, the compiler and its version, and this CPU's
    flags; it is loaded only if its bytes hash to what its build recorded, else it is rebuilt (never loaded)."""
    settings = KernelSettings()
    if not settings.lora_kernel:
        return None
    flags = PORTABLE_FLAGS if portable else FLAGS
    with _lock:
        try:
            compiler = _compiler(settings)
            key = "\0".join([SOURCE, *flags, compiler, _compiler_version(compiler), _cpu_key()])
        except Exception as exc:
            if f"no compiler {portable}" not in _loaded:
                log.warning("the fused LoRA kernel is unavailable, using the PyTorch path: %s", exc)
            _loaded[f"no compiler {portable}"] = None
            return None
        digest = hashlib.sha256(key.encode()).hexdigest()[:32]
        if digest in _loaded:
            return _loaded[digest]  # type: ignore[return-value]
        target = _cache_dir() / f"lora_kernel-{digest}.so"
        library = None
        try:
            data = _read_verified(target)
            if data is None:
                if target.exists():
                    log.warning("cached kernel %s does not match the hash its build recorded: rebuilding", target)
                _build(target, flags, compiler)
                data = _read_verified(target)
                if data is None:
                    raise RuntimeError(f"{target} changed between its build and its load")
            library = _dlopen(data, target.name)
            fn = library.lora_site
            i64, ptr = ctypes.c_int64, ctypes.c_void_p
            fn.argtypes = [i64, ptr, i64, ptr, i64, ptr, ptr, ptr, ptr, i64, i64, i64, ptr, ctypes.c_int, ctypes.c_int,
                           ctypes.c_int]  # fmt: skip
            fn.restype = None
            library.lora_site_bound.argtypes = [ctypes.POINTER(BoundSiteArgs), i64, ptr, i64, ptr, i64]
            library.lora_site_bound.restype = None
            library.lora_tile_rows.argtypes, library.lora_tile_rows.restype = [], ctypes.c_int
            library.paged_decode.argtypes = [i64, ptr, i64, ptr, ptr, ptr, i64, ptr, i64, i64, i64, i64,
                                             ctypes.c_float, ptr, ctypes.c_int, ctypes.c_int]  # fmt: skip
            library.paged_decode.restype = None
            library.add_rms_norm.argtypes = [i64, ptr, i64, ptr, i64, ptr, ptr, i64, i64, ctypes.c_float, ctypes.c_int,
                                             ctypes.c_int]  # fmt: skip
            library.add_rms_norm.restype = None
            library.rotary.argtypes = [i64, ptr, i64, i64, i64, ptr, ptr, i64, ctypes.c_int, ctypes.c_int]
            library.rotary.restype = None
            library.silu_mul.argtypes = [i64, ptr, i64, ptr, i64, ptr, i64, ctypes.c_int, ctypes.c_int]
            library.silu_mul.restype = None
            library.convert_weights.argtypes = [i64, i64, ptr, i64, i64, ctypes.c_int, ptr, i64, ctypes.c_int,
                                                ctypes.c_int, ctypes.c_float]  # fmt: skip
            library.convert_weights.restype = None
        except Exception as exc:  # no compiler, a failed build, a library that does not load: PyTorch path
            log.warning("the fused LoRA kernel is unavailable, using the PyTorch path: %s", exc)
            library = None
        _loaded[digest] = library
        return library


def tiled(library: ctypes.CDLL) -> bool:
    """Whether the library does several rows of one adapter at once (the AVX-512 and AVX2 builds): then prefill chunks
    run through it too; otherwise each row reads its adapter's weights again and long runs go to matmuls."""
    return library.lora_tile_rows() > 1


def addresses(stacked: torch.Tensor) -> torch.Tensor:
    """(len(stacked),) int64: the address of each stacked[i] (a contiguous tensor), as `site` takes them."""
    if not isinstance(stacked, torch.Tensor):
        raise TypeError(f"stacked must be a torch.Tensor, not {type(stacked).__name__}")
    if stacked.dim() < 1 or stacked.device.type != "cpu" or not stacked.is_contiguous():
        raise ValueError(f"stacked must be a contiguous CPU tensor of at least one dimension, not {stacked.dim()}-d "
                         f"on {stacked.device} with strides {stacked.stride()}")  # fmt: skip
    step = stacked.stride(0) * stacked.element_size()
    return stacked.data_ptr() + torch.arange(stacked.shape[0], dtype=torch.int64) * step


_FLOATS = (torch.float32, torch.bfloat16)


def _tensor(name: str, value: object, dtype: torch.dtype | tuple[torch.dtype, ...], dim: int) -> torch.Tensor:
    """`value` as a CPU tensor of `dim` dimensions in (one of) `dtype`, rows unit-stride; else TypeError/ValueError."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, not {type(value).__name__}")
    dtypes = dtype if isinstance(dtype, tuple) else (dtype,)
    if value.dtype not in dtypes:
        raise TypeError(f"{name} must be {' or '.join(map(str, dtypes))}, not {value.dtype}")
    if not value.is_cpu:
        raise ValueError(f"{name} must be on the CPU, not {value.device}")
    if value.dim() != dim:
        raise ValueError(f"{name} must have {dim} dimension(s), not shape {tuple(value.shape)}")
    if value.numel() and value.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous along its last dimension, not strides {value.stride()}")
    return value


class BoundSiteArgs(ctypes.Structure):
    """lora_kernel.c's `lora_bound_site`: a step's arguments to one site that stay the same for its L calls."""

    _fields_ = [(name, ctypes.c_int64) for name in
                ("n", "count", "layers", "shrink_rs", "expand_rs", "max_rank", "parts", "d_in")] + [
        ("slot", ctypes.c_void_p), ("rank", ctypes.c_void_p), ("shrink", ctypes.c_void_p),
        ("expand", ctypes.c_void_p), ("off", ctypes.c_void_p),
        ("bf16", ctypes.c_int32), ("wbf16", ctypes.c_int32), ("threads", ctypes.c_int32),
    ]  # fmt: skip


class SiteTable:
    """One projection site's slot table, as `lora_site` reads it: per layer and slot the address of the slot's
    shrink rows (ranks[s], P, d_in) and expand rows (ranks[s], d_out); ranks (S,) int32, offsets (P + 1,) int64.

    Its shapes, dtypes and bounds hold until one of its tensors changes, so they are checked when it is made and
    again on the first call after torch counts a write to any of them (each tensor's version counter, its address
    and shape: `SlotBuffers` writes a slot in place when an adapter moves in), not on each of the L x 4 calls of a
    step, which cost ~0.6 ms a decode step (bench/lora_kernel.py, "checks"). The per-call arguments (x, out and
    the step's slots) are checked on every call, the slots' bounds once per slots tensor and version. Inference
    tensors (made under `torch.inference_mode`) count no writes, so a table or slots made of them is checked on
    every call: the engine makes its tables and slots outside it. Writes that torch does not count (through
    `.numpy()` or ctypes) are the caller's to avoid, like the addresses' liveness.
    """

    def __init__(
        self,
        ranks: torch.Tensor,
        shrink: torch.Tensor,
        expand: torch.Tensor,
        offsets: torch.Tensor,
        max_rank: int,
        weights: torch.dtype,
    ) -> None:
        self.ranks, self.shrink, self.expand, self.offsets = ranks, shrink, expand, offsets
        self.max_rank, self.weights = max_rank, weights
        self._checked: tuple | None = None
        self._slots: tuple | None = None  # (weak reference, version, address, rows) of the slots last checked
        self.check()

    def _state(self) -> tuple:
        ranks, shrink, expand, offsets = self.ranks, self.shrink, self.expand, self.offsets
        versions = (ranks._version, shrink._version, expand._version, offsets._version)
        places = (ranks.data_ptr(), shrink.data_ptr(), expand.data_ptr(), offsets.data_ptr())
        return versions, places, ranks.shape, shrink.shape, expand.shape, offsets.shape

    def check(self) -> None:
        """Every shape, dtype, index and bound of the table `lora_site` relies on, with real exceptions (not
        asserts, which `python -O` strips)."""
        if self.weights not in _FLOATS:
            raise TypeError(f"weights must be torch.float32 or torch.bfloat16, not {self.weights!r}")
        if isinstance(self.max_rank, bool) or not isinstance(self.max_rank, int) or self.max_rank < 1:
            raise ValueError(f"max_rank must be a positive int, not {self.max_rank!r}")
        _tensor("ranks", self.ranks, torch.int32, 1)
        _tensor("shrink", self.shrink, torch.int64, 2)
        _tensor("expand", self.expand, torch.int64, 2)
        _tensor("offsets", self.offsets, torch.int64, 1)
        count = self.ranks.shape[0]
        if self.shrink.shape[1] != count or self.expand.shape[1] != count or self.shrink.shape != self.expand.shape:
            raise ValueError(f"shrink ({self.shrink.shape[-1]}) and expand ({self.expand.shape[-1]}) need one "
                             f"address per slot ({count}), for each of the same layers")  # fmt: skip
        if self.offsets.shape[0] < 2:
            raise ValueError("offsets must hold at least [0, d_out]")
        bounds = self.offsets.tolist()
        if bounds[0] != 0 or any(hi < lo for lo, hi in itertools.pairwise(bounds)):
            raise ValueError(f"offsets must start at 0 and never decrease, not {bounds}")
        rank_values = self.ranks.numpy()
        # a negative rank reads as a huge unsigned one
        if count and int(rank_values.view(np.uint32).max()) > self.max_rank:
            raise ValueError(f"ranks must lie in [0, max_rank={self.max_rank}], not "
                             f"{rank_values.min()}..{rank_values.max()}")  # fmt: skip
        # a slot with rank > 0 is read through its addresses, in every layer: none may be null
        if count and (np.minimum(self.shrink.numpy(), self.expand.numpy()) == 0)[:, rank_values > 0].any():
            raise ValueError("a slot in use has no shrink/expand address")
        self.layers, self.count, self.d_out, self.parts = self.shrink.shape[0], count, bounds[-1], len(bounds) - 1
        # an inference tensor (made under torch.inference_mode) counts no writes: such a table is checked every call
        tracked = not any(t.is_inference() for t in (self.ranks, self.shrink, self.expand, self.offsets))
        self._checked = self._state() if tracked else None

    def _check_slots(self, slots: object, rows: int) -> None:
        seen = self._slots  # the same slots tensor, unwritten since its check: the step's other calls
        if seen is not None and seen[0]() is slots and seen[1:] == (slots._version, slots.data_ptr(), rows):
            return
        _tensor("slots", slots, torch.int32, 1)
        if slots.shape[0] != rows:
            raise ValueError(f"slots has {slots.shape[0]} entries for {rows} rows of x")
        if rows and int(slots.numpy().max()) >= self.count:  # negative slots: rows the kernel skips
            raise ValueError(f"slot index {int(slots.numpy().max())} is out of range for {self.count} slots")
        if not slots.is_inference():  # one that counts its writes is not checked again until written
            self._slots = (weakref.ref(slots), slots._version, slots.data_ptr(), rows)

    def run(self, library: ctypes.CDLL, layer: int, x: torch.Tensor, out: torch.Tensor, slots: torch.Tensor) -> None:
        """out += LoRA(x) row by row with layer `layer`'s adapters. x (n, d_in) and out (n, d_out) share a dtype;
        slots (n,) int32, each below the table's slot count (negative: a row without adapter). The tensors the
        addresses point at are the caller's to keep alive. Anything else is a TypeError or ValueError raised
        before C sees a pointer."""
        if self._checked is None or self._state() != self._checked:
            self._checked = None  # stays unchecked if the check fails: the next call checks again
            self.check()
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self.layers:
            raise ValueError(f"layer must be an int in [0, {self.layers}), not {layer!r}")
        _tensor("x", x, _FLOATS, 2)
        _tensor("out", out, x.dtype, 2)
        n, d_in = x.shape
        self._check_slots(slots, n)
        if out.shape != (n, self.d_out):
            raise ValueError(f"out must be ({n}, {self.d_out}) for x {tuple(x.shape)} and offsets "
                             f"{self.offsets.tolist()}, not {tuple(out.shape)}")  # fmt: skip
        if d_in < 1 or (n > 1 and (x.stride(0) < d_in or out.stride(0) < self.d_out)):
            raise ValueError(f"x and out rows must not overlap: strides {x.stride()} / {out.stride()}")
        if n == 0:
            return
        library.lora_site(
            n, x.data_ptr(), x.stride(0), out.data_ptr(), out.stride(0), slots.data_ptr(), self.ranks.data_ptr(),
            self.shrink[layer].data_ptr(), self.expand[layer].data_ptr(), self.max_rank, self.parts, d_in,
            self.offsets.data_ptr(), int(x.dtype == torch.bfloat16), int(self.weights == torch.bfloat16),
            torch.get_num_threads(),
        )  # fmt: skip

    def bind(self, library: ctypes.CDLL, slots: torch.Tensor, skip: int, dtype: torch.dtype, d_in: int) -> BoundSite:
        """This table and one step's slots, checked now, for calls that each pass only the layer, x and out
        (`BoundSite`): x (skip + n, d_in) and out (skip + n, d_out) of `dtype`, their first `skip` rows (the step's
        base rows) left alone, slots (n,) for the rest. The table and the slots must count their writes (not be
        inference tensors): one written after binding is refused at the next call, never read by C."""
        if self._checked is None or self._state() != self._checked:
            self._checked = None  # stays unchecked if the check fails
            self.check()
        _tensor("slots", slots, torch.int32, 1)
        if self._checked is None or slots.is_inference():
            raise ValueError("bind needs a table and slots that count their writes (not made under inference_mode)")
        if isinstance(skip, bool) or not isinstance(skip, int) or skip < 0:
            raise ValueError(f"skip must be a non-negative int, not {skip!r}")
        if isinstance(d_in, bool) or not isinstance(d_in, int) or d_in < 1:
            raise ValueError(f"d_in must be a positive int, not {d_in!r}")
        if dtype not in _FLOATS:
            raise TypeError(f"x and out must be torch.float32 or torch.bfloat16, not {dtype}")
        self._check_slots(slots, slots.shape[0])
        return BoundSite(self, library, slots, skip, dtype, d_in)


class BoundSite:
    """A `SiteTable` bound to one step (`SiteTable.bind`). The table, the slots, their bounds and the thread count
    are checked and packed once; each of the step's L calls (one a layer) checks what it brings — the layer, x and
    out (type, dtype, device, shape, strides) — and that neither the table nor the slots were written since, then
    passes C six arguments instead of sixteen. Python a call: 3.0 µs against `SiteTable.run`'s 7.8 (no-op library);
    in the engine (bench/engine.py's mixed decode step, 32 calls) the sites' time fell from 7.1-7.6 to 6.5-6.8 ms,
    of which C's own ~5.5."""

    def __init__(
        self, table: SiteTable, library: ctypes.CDLL, slots: torch.Tensor, skip: int, dtype: torch.dtype, d_in: int
    ) -> None:
        self._tensors = (table.ranks, table.shrink, table.expand, table.offsets, slots)  # held: C reads them
        self._versions = self._written()
        self._call = library.lora_site_bound
        self.layers, self.skip, self.dtype, self.d_in, self.d_out = table.layers, skip, dtype, d_in, table.d_out
        self.rows = skip + slots.shape[0]
        self._x_shape, self._out_shape = (self.rows, d_in), (self.rows, table.d_out)
        self._args = BoundSiteArgs(
            slots.shape[0], table.count, table.layers, table.shrink.stride(0), table.expand.stride(0), table.max_rank,
            table.parts, d_in, slots.data_ptr(), table.ranks.data_ptr(), table.shrink.data_ptr(),
            table.expand.data_ptr(), table.offsets.data_ptr(), int(dtype == torch.bfloat16),
            int(table.weights == torch.bfloat16), torch.get_num_threads(),
        )  # fmt: skip
        self._ref = ctypes.byref(self._args)
        self._size = 2 if dtype == torch.bfloat16 else 4

    def _written(self) -> tuple[int, ...]:
        return tuple(t._version for t in self._tensors)

    def __call__(self, layer: int, x: torch.Tensor, out: torch.Tensor) -> None:
        """out[skip:] += LoRA(x[skip:]) with layer `layer`'s adapters; anything else a TypeError or ValueError raised
        before C sees a pointer."""
        if self._written() != self._versions:
            raise ValueError("the site table or the slots were written after binding: bind again")
        if type(layer) is not int or not 0 <= layer < self.layers:
            raise ValueError(f"layer must be an int in [0, {self.layers}), not {layer!r}")
        if not isinstance(x, torch.Tensor) or not isinstance(out, torch.Tensor):
            raise TypeError(f"x and out must be torch.Tensor, not {type(x).__name__} and {type(out).__name__}")
        if x.dtype != self.dtype or out.dtype != self.dtype:
            raise TypeError(f"x and out must be {self.dtype} (as bound), not {x.dtype} and {out.dtype}")
        if not (x.is_cpu and out.is_cpu):
            raise ValueError(f"x and out must be on the CPU, not {x.device} and {out.device}")
        if x.shape != self._x_shape or out.shape != self._out_shape:
            raise ValueError(f"x must be {self._x_shape} and out {self._out_shape} as bound, not {tuple(x.shape)} and "
                             f"{tuple(out.shape)}")  # fmt: skip
        xs, os_ = x.stride(0), out.stride(0)
        if x.stride(1) != 1 or out.stride(1) != 1 or (self.rows > 1 and (xs < self.d_in or os_ < self.d_out)):
            raise ValueError(f"x and out must have unit-stride rows that do not overlap, not strides {x.stride()} / "
                             f"{out.stride()}")  # fmt: skip
        if self.rows > self.skip:
            size = self._size
            self._call(self._ref, layer, x.data_ptr() + self.skip * xs * size, xs,
                       out.data_ptr() + self.skip * os_ * size, os_)  # fmt: skip


def site(
    library: ctypes.CDLL,
    x: torch.Tensor,
    out: torch.Tensor,
    slots: torch.Tensor,
    ranks: torch.Tensor,
    shrink: torch.Tensor,
    expand: torch.Tensor,
    offsets: torch.Tensor,
    max_rank: int,
    weights: torch.dtype,
) -> None:
    """out += LoRA(x) row by row, every check made for this call alone (the engine keeps a `SiteTable` per site).
    x (n, d_in) and out (n, d_out) share a dtype; slots (n,) int32, ranks (S,) int32 (each <= max_rank), offsets
    (P + 1,) int64. shrink and expand (S,) int64: per slot, the address of its contiguous shrink rows (ranks[s],
    P, d_in) and expand rows (ranks[s], d_out) in `weights` (fp32 or bf16: bf16 adapters may serve an fp32
    model). The caller keeps those tensors alive for the call. Anything else is a TypeError or ValueError raised
    before C sees a pointer."""
    _tensor("shrink", shrink, torch.int64, 1)
    _tensor("expand", expand, torch.int64, 1)
    SiteTable(ranks, shrink[None], expand[None], offsets, max_rank, weights).run(library, 0, x, out, slots)


def paged_decode(
    library: ctypes.CDLL,
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    blocks: torch.Tensor,
    lengths: torch.Tensor,
    block_size: int,
    scale: float,
) -> torch.Tensor:
    """Decode attention read straight from a paged cache: one query token per sequence, grouped-query heads.
    q (b, heads, hd), heads adjacent (any row stride); keys and values: one layer's pool (blocks x block_size,
    kv_heads, hd), contiguous, q's dtype (fp32 or bf16); blocks (b, max_blocks) int64 block ids, each sequence's
    first ceil(length / block_size) used (the rest may be anything in range); lengths (b,) int64, each in
    [1, max_blocks x block_size]. Returns softmax(q k^T x scale) v, (b, heads, hd) in q's dtype, accumulated in
    fp32. Anything else is a TypeError or ValueError raised before C sees a pointer."""
    _tensor("q", q, _FLOATS, 3)
    _tensor("keys", keys, q.dtype, 3)
    _tensor("values", values, q.dtype, 3)
    _tensor("blocks", blocks, torch.int64, 2)
    _tensor("lengths", lengths, torch.int64, 1)
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, not {block_size!r}")
    b, heads, hd = q.shape
    tokens, kv_heads, _ = keys.shape
    if values.shape != keys.shape or not keys.is_contiguous() or not values.is_contiguous():
        raise ValueError(f"keys {tuple(keys.shape)} and values {tuple(values.shape)} must be contiguous pools of one "
                         "shape")  # fmt: skip
    if keys.shape[2] != hd or kv_heads < 1 or heads % kv_heads or tokens % block_size:
        raise ValueError(f"q {tuple(q.shape)} does not fit the pool {tuple(keys.shape)} with blocks of {block_size}: "
                         "heads must be a multiple of kv_heads, head sizes equal, whole blocks")  # fmt: skip
    if b and (q.stride(1) != hd or q.stride(0) < heads * hd):
        raise ValueError(f"q's heads must be adjacent rows of {hd}, not strides {q.stride()}")
    if blocks.shape[0] != b or lengths.shape[0] != b or not blocks.is_contiguous():
        raise ValueError(f"blocks {tuple(blocks.shape)} (contiguous) and lengths {tuple(lengths.shape)} need one row "
                         f"per query ({b})")  # fmt: skip
    if b:
        table, context = blocks.numpy(), lengths.numpy()
        if table.size == 0 or table.min() < 0 or table.max() >= tokens // block_size:
            raise ValueError(f"block ids must lie in [0, {tokens // block_size})")
        if context.min() < 1 or context.max() > blocks.shape[1] * block_size:
            raise ValueError(f"lengths must lie in [1, {blocks.shape[1] * block_size}], not "
                             f"{context.min()}..{context.max()}")  # fmt: skip
    out = torch.empty(b, heads, hd, dtype=q.dtype)
    if b:
        library.paged_decode(
            b, q.data_ptr(), q.stride(0), keys.data_ptr(), values.data_ptr(), blocks.data_ptr(), blocks.shape[1],
            lengths.data_ptr(), block_size, kv_heads, heads // kv_heads, hd, scale, out.data_ptr(),
            int(q.dtype == torch.bfloat16), torch.get_num_threads(),
        )  # fmt: skip
    return out


def add_rms_norm(
    library: ctypes.CDLL, x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> torch.Tensor:
    """x += delta in place (when delta is given), then RMSNorm(x) * weight, as `native._rms` computes it: x (n, d)
    and delta (n, d) with unit-stride rows, weight (d,) contiguous, all one dtype (fp32 or bf16). Returns a new
    (n, d) tensor. Anything else is a TypeError or ValueError raised before C sees a pointer."""
    _tensor("x", x, _FLOATS, 2)
    n, d = x.shape
    _tensor("weight", weight, x.dtype, 1)
    if weight.shape[0] != d or d < 1:
        raise ValueError(f"weight {tuple(weight.shape)} does not fit rows of {d}")
    if n > 1 and x.stride(0) < d:
        raise ValueError(f"x's rows must not overlap: strides {x.stride()}")
    if delta is not None:
        _tensor("delta", delta, x.dtype, 2)
        if delta.shape != x.shape:
            raise ValueError(f"delta {tuple(delta.shape)} must have x's shape {tuple(x.shape)}")
    out = torch.empty(n, d, dtype=x.dtype)
    if n:
        library.add_rms_norm(
            n, x.data_ptr(), x.stride(0), None if delta is None else delta.data_ptr(),
            0 if delta is None else delta.stride(0), weight.data_ptr(), out.data_ptr(), d, d, eps,
            int(x.dtype == torch.bfloat16), torch.get_num_threads(),
        )  # fmt: skip
    return out


def rotary(library: ctypes.CDLL, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate x in place as `native._rotate` does (x * cos + rotate_half(x) * sin): x (n, heads, hd), heads adjacent
    (any row stride), hd even; cos and sin (n, hd) with unit-stride rows, one row stride between them, x's dtype."""
    _tensor("x", x, _FLOATS, 3)
    n, heads, hd = x.shape
    _tensor("cos", cos, x.dtype, 2)
    _tensor("sin", sin, x.dtype, 2)
    if hd % 2 or cos.shape != (n, hd) or sin.shape != (n, hd) or cos.stride() != sin.stride():
        raise ValueError(f"cos {tuple(cos.shape)} and sin {tuple(sin.shape)} (one stride) must be ({n}, {hd}) for x "
                         f"{tuple(x.shape)}, with an even head size")  # fmt: skip
    if n and (x.stride(1) != hd or x.stride(0) < heads * hd):
        raise ValueError(f"x's heads must be adjacent rows of {hd}, not strides {x.stride()}")
    if n:
        library.rotary(
            n, x.data_ptr(), x.stride(0), heads, hd, cos.data_ptr(), sin.data_ptr(), cos.stride(0),
            int(x.dtype == torch.bfloat16), torch.get_num_threads(),
        )  # fmt: skip


def silu_mul(library: ctypes.CDLL, gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for fused gate/up rows (n, 2 x width): the first half of each row is the gate, the second the
    up projection (unit-stride rows, fp32 or bf16). Returns a new (n, width) tensor, computed as F.silu(gate) * up
    (in bf16 the SiLU rounded before the product); the exponential is a polynomial within 2 ulp of libm's."""
    _tensor("gate_up", gate_up, _FLOATS, 2)
    n, both = gate_up.shape
    if both % 2:
        raise ValueError(f"gate_up's rows must hold two halves, not {both} columns")
    width = both // 2
    if n > 1 and gate_up.stride(0) < both:
        raise ValueError(f"gate_up's rows must not overlap: strides {gate_up.stride()}")
    out = torch.empty(n, width, dtype=gate_up.dtype)
    if n and width:
        start, rows = gate_up.data_ptr(), gate_up.stride(0)
        library.silu_mul(
            n, start, rows, start + width * gate_up.element_size(), rows, out.data_ptr(), width,
            int(gate_up.dtype == torch.bfloat16), torch.get_num_threads(),
        )  # fmt: skip
    return out


def convert_weights(
    library: ctypes.CDLL, source: np.ndarray, source_bf16: bool, target: np.ndarray, scale: float | None = None
) -> None:
    """`target` = `source` (times `scale`), in one pass on the calling thread: 2-D arrays of one shape, the source in
    any layout (a transposed view too), float32 or bf16 bits (uint16, `source_bf16`); the target's rows contiguous,
    float32, or uint16 for bf16 rounded to nearest even as torch rounds."""
    for name, array in (("source", source), ("target", target)):  # a few microseconds: ~112 calls an adapter
        if type(array) is not np.ndarray or array.ndim != 2 or array.dtype.char not in "fH":
            raise TypeError(f"{name} must be a 2-D float32 or uint16 (bf16) numpy array")
        if array.strides[0] % array.itemsize or array.strides[1] % array.itemsize:
            raise ValueError(f"{name}'s strides must be whole elements")
    if source.shape != target.shape:
        raise ValueError(f"source {source.shape} and target {target.shape} differ")
    if (source.dtype.char == "H") != source_bf16:
        raise TypeError("a bf16 source is held as uint16 bits, a float32 one as float32")
    if target.shape[1] > 1 and target.strides[1] != target.itemsize:
        raise ValueError("the target's rows must be contiguous")
    if not target.flags.writeable:
        raise ValueError("the target is read-only")
    if target.size:
        rs, cs = (stride // source.itemsize for stride in source.strides)
        library.convert_weights(
            target.shape[0], target.shape[1], source.ctypes.data, rs, cs, int(source_bf16), target.ctypes.data,
            target.strides[0] // target.itemsize, int(target.dtype == np.uint16), int(scale is not None),
            1.0 if scale is None else scale,
        )  # fmt: skip
