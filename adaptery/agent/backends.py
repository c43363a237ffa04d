"""Where an agent's training runs: on this machine (`LocalBackend`), or handed to Slurm (`adaptery.agent.slurm`).

A backend starts the training of one attempt from its spec and returns a handle the agent supervises as it would a
child process: `stdout` yields the trainer's event lines (adaptery/training/runner.py has the protocol), `poll()`
and `wait()` give its exit code, `terminate()` asks it to stop (it reports "cancelled"), `kill()` ends it and every
process it started. The signal files (CANCEL, PAUSE) are written into the job's output directory, which the training
reads wherever it runs.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

from adaptery.messaging.protocol import Assignment
from adaptery.process import die_with_parent

RUNNER = ("-m", "adaptery.training.runner")
LAUNCHER = ("-m", "adaptery.training.launch")


class TrainingRun(Protocol):
    stdout: Iterable[bytes]
    ending: str | None  # how it ended when something outside stopped it (a scheduler's time limit), else None

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int: ...

    def terminate(self) -> None: ...

    def kill(self) -> None: ...


class Backend(Protocol):
    name: str

    def refusal(self, assignment: Assignment) -> str | None:
        """Why this backend cannot run the job (more processes than it has), or None."""

    def start(self, assignment: Assignment, spec_path: Path, job_dir: Path, stderr_path: Path) -> TrainingRun: ...

    def forget_orphans(self, agent_id: str) -> int:
        """End what an earlier run of this agent left training (it died without ending it); how many."""

    def capabilities(self) -> dict[str, Any] | None:
        """What the device its jobs train on has (protocol: a lease request's `capabilities`), or None: unknown."""


def requirements(assignment: Assignment) -> tuple[int, int]:
    """(processes, nodes) the job asks for."""
    return int(assignment.arguments.get("processes") or 1), int(assignment.arguments.get("nodes") or 1)


def training_module(processes: int) -> tuple[str, ...]:
    """One process runs the runner itself; several run it under the launcher (torch's elastic agent)."""
    return RUNNER if processes == 1 else LAUNCHER


def local_capabilities() -> dict[str, Any]:
    """This machine's training device: CUDA with the first GPU's memory, or the CPU with the machine's memory."""
    import torch

    if torch.cuda.is_available():
        memory = torch.cuda.get_device_properties(0).total_memory
        return {"accelerator": "cuda", "memory_gb": round(memory / 2**30, 1)}
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {"accelerator": "cpu", "memory_gb": round(memory / 2**30, 1)}


def local_capacity() -> tuple[int, str]:
    """How many training processes this machine can hold: its GPUs, or else its usable CPUs."""
    import torch  # imported only when a job asks for more than one process

    from adaptery.training.runner import usable_cpus

    if torch.cuda.is_available():
        return torch.cuda.device_count(), "GPU"
    return usable_cpus(), "CPU"


class LocalProcess:
    """The training child on this machine, leader of its own process group: with several processes, `kill` ends
    the launcher and its ranks together (a SIGTERM goes to the launcher alone, which stops its ranks in step)."""

    ending = None

    def __init__(self, process: subprocess.Popen) -> None:
        self.process = process
        self.stdout = process.stdout

    def poll(self) -> int | None:
        return self.process.poll()

    def wait(self, timeout: float | None = None) -> int:
        return self.process.wait(timeout)

    def terminate(self) -> None:
        self.process.terminate()

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)


class LocalBackend:
    name = "local"

    def __init__(self) -> None:
        self._capabilities: dict[str, Any] | None = None

    def capabilities(self) -> dict[str, Any]:
        if self._capabilities is None:  # measured once: torch is imported only here, at the first lease
            self._capabilities = local_capabilities()
        return self._capabilities

    def refusal(self, assignment: Assignment) -> str | None:
        processes, nodes = requirements(assignment)
        if nodes > 1:
            return f"the job asks for {nodes} nodes; this agent runs jobs on its own machine (use a Slurm agent)"
        if processes == 1:
            return None
        capacity, unit = local_capacity()
        if processes > capacity:
            return f"the job asks for {processes} processes but this agent has {capacity} {unit}{'s' * (capacity > 1)}"
        return None

    def forget_orphans(self, agent_id: str) -> int:
        return 0  # a local child dies with its agent (PR_SET_PDEATHSIG), and its ranks with it

    def start(self, assignment: Assignment, spec_path: Path, job_dir: Path, stderr_path: Path) -> TrainingRun:
        processes, _ = requirements(assignment)
        env: dict[str, Any] = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        with stderr_path.open("ab") as stderr:
            process = subprocess.Popen(
                [sys.executable, *training_module(processes), str(spec_path)],
                stdout=subprocess.PIPE,
                stderr=stderr,
                stdin=subprocess.DEVNULL,
                env=env,
                # If the agent dies, so does its training: a requeued job is never trained twice at once.
                preexec_fn=die_with_parent,
                start_new_session=True,
            )
        return LocalProcess(process)
