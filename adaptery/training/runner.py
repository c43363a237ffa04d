"""Child-process entry point of a fine-tuning job: ``python -m adaptery.training.runner SPEC.json``.

SPEC.json is a `TrainingSpec` (adaptery/training/spec.py). Protocol (what the agent that starts
this process reads):

- stdout carries only events, one JSON object per line, flushed as they happen; everything else
  (library logs, progress bars, tracebacks) goes to stderr. Non-finite numbers are written as null.
- ``{"type": "message", "message": str, "level": "info"|"warning"}``: progress for people. A message
  that starts a phase of the run also carries ``"phase"``: ``starting`` (the process, importing
  libraries), ``loading_base``, ``preparing_data``, ``first_step`` (the trainer is set up; the
  first step runs), ``saving`` (the final adapter); training itself shows as metrics events.
- ``{"type": "metrics", "step": int, "total_steps": int, "epoch": float, "train_loss": float,
  "learning_rate": float, "grad_norm": float|null, "tokens_per_second": float}`` after every
  optimisation step; a step that was evaluated also carries ``"eval_loss"`` (and the same value as
  ``"valid_loss"``, OpenAI's name); DPO steps add ``"reward_accuracy"`` and ``"reward_margin"``.
- ``{"type": "checkpoint", "step": int, "epoch": float, "path": str, "metrics": {"train_loss":
  float|null, "eval_loss": float|null}}`` once the directory ``path`` (``<checkpoint_dir>/
  checkpoint-<step>``) is complete and fsynced: a servable PEFT adapter (adapter_model.safetensors,
  adapter_config.json, tokenizer and chat template) plus the state to resume from (optimizer.pt,
  scheduler.pt, rng_state.pth — all loaded with ``torch.load(weights_only=True)`` — and
  trainer_state.json). Written every ``checkpoint_every_steps`` steps and at the end of every epoch
  (after that epoch's evaluation). The directory alone is enough to resume on another machine:
  set ``resume_from`` to it in a new spec with the same files and hyperparameters. Checkpoints are
  never deleted by the runner; the agent owns ``checkpoint_dir``.
- ``{"type": "result", "output_dir", "steps", "train_loss", "trained_tokens", "seconds",
  "eval_loss", "stopped_early", "useful_token_ratio", "peft_type", "rank"}`` and exit code 0 on
  success; the adapter (safetensors) and tokenizer are in ``output_dir``.
- ``{"type": "cancelled"}`` and exit code 3 when a file named CANCEL appears in the spec's output
  directory or the process gets SIGTERM/SIGINT (checked after every step; nothing is saved).
- a file named PAUSE in the output directory: a checkpoint is saved and reported (``checkpoint``
  event), then ``{"type": "paused", "step": int}`` and exit code 4.
- ``{"type": "error", "message": ...}`` and exit code 1 on any failure.

A job of several processes (``hyperparameters.processes`` > 1) runs this module once per process, started as one
torch.distributed group by `adaptery.training.launch` (which speaks the same protocol to the agent). Rank 0 writes
the events; the others write none. Cancel and pause are decided by the whole group at the same step (any rank's
flag is every rank's), and all ranks leave together, so the launcher never mistakes one's exit for a crash.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import traceback
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import IO, Any

from pydantic import ValidationError

from adaptery.settings import Settings
from adaptery.training.spec import TrainingSpec

EXIT_OK, EXIT_ERROR, EXIT_CANCELLED, EXIT_PAUSED = 0, 1, 3, 4
# A rank whose collective failed because a peer went away: a consequence, so the launcher looks for the cause.
EXIT_PEER_LOST = 5
# A muted rank's error message, on a line of its stderr (training/launch.py relays it).
ERROR_MARK = "adaptery-error: "
CANCEL_FILE = "CANCEL"
PAUSE_FILE = "PAUSE"


def _claim_stdout() -> IO[str]:
    """Keep the real stdout for events and point fd 1 (and sys.stdout) at stderr, so a stray
    print() in any library, even from C code, cannot corrupt the event stream."""
    sys.stdout.flush()
    events = os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding="utf-8", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    sys.stdout = sys.stderr
    return events


def _json_safe(value: Any) -> Any:
    # JSON has no NaN/Infinity (a diverged loss); null keeps every line parseable.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(item) for item in value]
    if isinstance(value, Path):
        return str(value)
    return value


class _Emitter:
    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream

    def __call__(self, event: dict[str, Any]) -> None:
        self.stream.write(json.dumps(_json_safe(event), allow_nan=False) + "\n")
        self.stream.flush()


class _StopFlag:
    """True once SIGTERM/SIGINT arrived or the CANCEL file exists; polled after each step."""

    def __init__(self, output_dir: Path) -> None:
        self.cancel_file = output_dir / CANCEL_FILE
        self.signalled = False
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum: int, frame: object) -> None:
        self.signalled = True

    def __call__(self) -> bool:
        return self.signalled or self.cancel_file.exists()


def _thread_count(processes: int = 1) -> int:
    """Torch threads for each training process: `Settings.train_threads`, else all usable CPUs but one, shared
    among the job's processes on this machine.

    The spare CPU is for the platform itself (API server, agent). Torch's many small parallel ops
    each wait for their slowest thread, so if any thread competes for a core every op stalls:
    measured on 2 cores, the demo fine-tune took ~2 s on 1 thread but 45-80 s on 2 threads while
    another process was busy.
    """
    configured = Settings().train_threads
    if configured:
        return configured
    # Affinity, not cpu_count: a container or taskset may allow fewer CPUs than the machine has.
    return max(1, (usable_cpus() - 1) // processes)


def usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class _SpecError(ValueError):
    pass


def _read_spec(path: str) -> TrainingSpec:
    try:
        return TrainingSpec.model_validate_json(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise _SpecError(f"cannot read training spec {path}: {exc.strerror or exc}") from exc
    except ValidationError as exc:
        raise _SpecError(f"invalid training spec {path}: {exc}") from exc


def _error_message(exc: Exception) -> str:
    # Our own errors (DatasetError, ModelNotAvailable, spec problems) are written for people and
    # pass through verbatim; anything else keeps its type name so it can be recognised.
    # (This module runs as __main__, so its own errors carry that module name.)
    if type(exc).__module__.split(".")[0] in ("adaptery", "__main__"):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


class _GroupFlag:
    """A flag the whole process group agrees on, asked at the same points by every rank: true for all once true for
    one (a rank that saw the CANCEL file, or got SIGTERM, a step before another must not leave it waiting)."""

    def __init__(self, local: Callable[[], bool], device: Any) -> None:
        self.local = local
        self.device = device

    def __call__(self) -> bool:
        import torch
        import torch.distributed as dist

        flag = torch.tensor([1 if self.local() else 0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


class _Group:
    """This process's place in a job of several processes (started by `adaptery.training.launch`)."""

    def __init__(self) -> None:
        import torch
        import torch.distributed as dist

        if not dist.is_torchelastic_launched():
            raise _SpecError("a job of several processes runs through `python -m adaptery.training.launch SPEC.json`")
        from adaptery.process import die_with_parent

        die_with_parent()  # the launcher gone (killed with its agent), its ranks go too
        cuda = torch.cuda.is_available()
        local_rank = dist.get_node_local_rank()
        if cuda:
            torch.cuda.set_device(local_rank)
        # gloo on CPUs, nccl between GPUs; the Trainer (accelerate) uses the group it finds.
        dist.init_process_group("nccl" if cuda else "gloo")
        self.rank = dist.get_rank()
        self.device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")

    def flag(self, local: Callable[[], bool]) -> _GroupFlag:
        return _GroupFlag(local, self.device)

    @staticmethod
    def leave() -> None:
        """Wait for every rank (so none is stopped while it still writes), then close the group."""
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()


def _peer_lost(exc: Exception) -> bool:
    import torch.distributed as dist

    # gloo reports a vanished peer as a RuntimeError naming the connection.
    return isinstance(exc, dist.DistNetworkError) or "by peer" in str(exc)


def _run(spec_path: str, emit: _Reporter) -> int:
    spec = _read_spec(spec_path)
    processes = spec.hyperparameters.processes
    should_stop = _StopFlag(spec.output_dir)
    if processes == 1 and should_stop():  # cancelled while queued: skip the slow imports altogether
        emit({"type": "cancelled"})
        return EXIT_CANCELLED

    # The imports below take seconds: say so, so the job shows a sign of life from its first moment.
    emit({"type": "message", "level": "info", "message": "Starting the training process", "phase": "starting"})
    import torch
    from transformers.utils import logging as transformers_logging

    from adaptery.training.trainer import TrainingCancelled, TrainingPaused, train

    should_pause: Callable[[], bool] = (spec.output_dir / PAUSE_FILE).exists
    group = _Group() if processes > 1 else None
    if group is not None:
        should_stop, should_pause = group.flag(should_stop), group.flag(should_pause)
        emit.muted, emit.grouped = group.rank != 0, True
    torch.set_num_threads(_thread_count(processes // spec.hyperparameters.nodes))
    # Progress bars redraw with carriage returns, which only garble a captured stderr log.
    transformers_logging.disable_progress_bar()
    try:
        result = train(spec, emit, should_stop, should_pause)
        event, code = {"type": "result", **asdict(result)}, EXIT_OK
    except TrainingCancelled:
        event, code = {"type": "cancelled"}, EXIT_CANCELLED
    except TrainingPaused as paused:
        event, code = {"type": "paused", "step": paused.step}, EXIT_PAUSED
    except Exception as exc:
        if group is not None and _peer_lost(exc):
            traceback.print_exc(file=sys.stderr)
            return EXIT_PEER_LOST
        raise
    if group is not None:
        group.leave()
    emit(event)
    return code


class _Reporter:
    """Passes events on, until it is muted: a rank other than 0 says nothing (rank 0 reports for the group; a rank's
    own failure reaches the agent through the launcher, with its stderr)."""

    def __init__(self, emit: Callable[[dict[str, Any]], None]) -> None:
        self.emit = emit
        self.muted = False
        self.grouped = False

    def __call__(self, event: dict[str, Any]) -> None:
        if not self.muted:
            self.emit(event)
        if self.grouped and event.get("type") == "error":
            # A muted rank's own words, for the launcher to relay when it failed first; rank 0's, so the launcher
            # knows it has spoken even when it was stopped after (its events bypass the launcher)
            print(ERROR_MARK + json.dumps(event["message"]), file=sys.stderr, flush=True)


def run(spec_path: str, emit: Callable[[dict[str, Any]], None]) -> int:
    """Run one job, reporting it through `emit`; returns the process exit code."""
    # Base models must already be local. The hub libraries read these once, when first imported,
    # which is why they are set before anything imports transformers.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # DPO tokenises with `datasets`
    reporter = _Reporter(emit)
    try:
        return _run(spec_path, reporter)
    except Exception as exc:  # every failure must reach the agent as an error event
        traceback.print_exc(file=sys.stderr)
        reporter({"type": "error", "message": _error_message(exc)})
        return EXIT_ERROR


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    emit = _Emitter(_claim_stdout())
    if len(args) != 1:
        emit({"type": "error", "message": "usage: python -m adaptery.training.runner SPEC.json"})
        return EXIT_ERROR
    return run(args[0], emit)


if __name__ == "__main__":
    sys.exit(main())
