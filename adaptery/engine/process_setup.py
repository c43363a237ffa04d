"""How a serving process is set up before the engine starts: its memory allocator.

vLLM's CPU documentation tunes its server the same way (tcmalloc preloaded, OpenMP threads bound to cores), and
issue 18 measured what it is worth: untuned, vLLM served the same model at about half its tuned speed. The engine
allocates many short-lived tensors per step; glibc's malloc returns their pages to the kernel and takes them back,
where tcmalloc and jemalloc keep them.

`adaptery serve` and `adaptery agent --roles infer` call `reexec_if_needed` first thing: when the allocator the
settings choose is not loaded yet, the process sets ``LD_PRELOAD`` (an allocator can only be chosen before the
process starts) and replaces itself with the same command line (`os.execv`: the same pid, so supervisors and tests
that hold it see nothing). It happens once: the marker variable stops a second time, and the user's own
``LD_PRELOAD`` entries are kept. Training children inherit the allocator.

OpenMP thread binding, which vLLM's CPU docs also apply (``OMP_PROC_BIND``/``OMP_PLACES``, or its own
``VLLM_CPU_OMP_THREADS_BIND``), is deliberately not: GNU OpenMP (torch's) binds the process's initial thread to the
first core when it starts, and every thread and child process made after that inherits that one core. Measured here:
with ``OMP_PROC_BIND=close OMP_PLACES=cores`` the process, a new thread and a child all ran on ``{0}`` of 2 cores,
and an e2e test whose server trains beside serving took minutes longer. vLLM can bind because its engine is a
process of its own; ours shares the server's process with the API, the agent and its training children.

`describe()` says what the running process got; ``GET /api/admin/engine`` shows it under ``process``.
"""

from __future__ import annotations

import ctypes.util
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MARKER = "_ADAPTERY_PROCESS_SETUP"  # internal, not a setting: the allocator chosen, once the process is set up
# Best first: tcmalloc is what vLLM's CPU docs preload; jemalloc (Debian's libjemalloc2) does the same job.
ALLOCATORS = {
    "tcmalloc": ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4"),
    "jemalloc": ("libjemalloc.so.2",),
}
LIBRARY_DIRS = (
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/usr/lib64",
    "/usr/lib",
    "/usr/local/lib",
    "/opt/homebrew/lib",
)


class SetupError(ValueError):
    """A setting this machine cannot honour (an allocator named that is not installed)."""


@dataclass
class Plan:
    allocator: str  # "tcmalloc", "jemalloc", "system" or a path
    library: str | None  # the file to preload, None for the system allocator
    env: dict[str, str] = field(default_factory=dict)  # what to set before re-executing
    reason: str = ""


def find_allocator(name: str, library_dirs: tuple[str, ...] = LIBRARY_DIRS) -> str | None:
    for file_name in ALLOCATORS[name]:
        for directory in library_dirs:
            candidate = Path(directory) / file_name
            if candidate.is_file():
                return str(candidate)
    found = ctypes.util.find_library(name.removesuffix("_minimal"))
    return found if found and Path(found).is_absolute() and Path(found).is_file() else None


def loaded_allocator(maps: str | None = None) -> str:
    """Which allocator this process runs on, from its memory map: "tcmalloc", "jemalloc" or "system"."""
    if maps is None:
        try:
            maps = Path("/proc/self/maps").read_text(errors="replace")
        except OSError:
            return "unknown"
    for name in ALLOCATORS:
        if f"lib{name}" in maps:
            return name
    return "system"


def plan(choice: str, environ: dict[str, str], library_dirs: tuple[str, ...] = LIBRARY_DIRS) -> Plan:
    """What to change for `choice` ("auto", "tcmalloc", "jemalloc", "system" or a library's path)."""
    if choice == "system":
        chosen = Plan("system", None, reason="the system allocator, as configured")
    elif choice == "auto":
        chosen = Plan("system", None, reason="neither tcmalloc nor jemalloc is installed (Debian: libjemalloc2)")
        for name in ALLOCATORS:
            library = find_allocator(name, library_dirs)
            if library is not None:
                chosen = Plan(name, library, reason=f"{name} found at {library}")
                break
    elif choice in ALLOCATORS:
        library = find_allocator(choice, library_dirs)
        if library is None:
            wanted = " or ".join(ALLOCATORS[choice])
            raise SetupError(f"allocator {choice}: {wanted} is not installed (or set ADAPTERY_ALLOCATOR=auto)")
        chosen = Plan(choice, library, reason=f"{choice} at {library}, as configured")
    else:
        if not Path(choice).is_file():
            raise SetupError(f"allocator {choice}: no such library file")
        chosen = Plan(choice, choice, reason="the configured library")
    preload = [entry for entry in environ.get("LD_PRELOAD", "").replace(":", " ").split() if entry]
    if chosen.library is not None and chosen.library not in preload:
        chosen.env["LD_PRELOAD"] = " ".join([chosen.library, *preload])  # ours first, the user's kept
    return chosen


def reexec_if_needed(choice: str) -> Plan | None:
    """Set the process up as `choice` says, re-executing it once if that needs a fresh start; the plan followed
    (None when this process is already the re-executed one, or the platform is not Linux)."""
    if os.environ.get(MARKER) or not sys.platform.startswith("linux"):
        return None
    chosen = plan(choice, dict(os.environ))
    if not chosen.env:
        return chosen
    os.environ.update(chosen.env)
    os.environ[MARKER] = chosen.allocator
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
    return chosen  # not reached


def describe() -> dict[str, Any]:
    """What this process got: allocator, preload, OpenMP and torch threads, the CPUs it may run on."""
    import torch

    return {
        "allocator": loaded_allocator(),
        "ld_preload": os.environ.get("LD_PRELOAD") or None,
        "set_up_by_adaptery": bool(os.environ.get(MARKER)),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "omp_proc_bind": os.environ.get("OMP_PROC_BIND"),
        "omp_places": os.environ.get("OMP_PLACES"),
        "torch_threads": torch.get_num_threads(),
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
    }
