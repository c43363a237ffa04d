"""A job of several processes: ``python -m adaptery.training.launch SPEC.json [--nnodes N --rdzv-endpoint HOST:PORT
--rdzv-id ID]``.

torch's elastic launcher (what ``torchrun`` runs) starts `hyperparameters.processes` runners (per node: processes /
nodes) as one torch.distributed group: gloo between CPUs, nccl between GPUs, DDP unless the spec asks for FSDP. The
agent reads this process as it reads one runner (adaptery/training/runner.py has the protocol): rank 0 inherits
this process's stdout and writes the events there; the other ranks write none. Each rank's stderr goes to its own
file under ``<output_dir>-ranks/``.

The ranks leave together (they agree on cancel and pause at the same step and wait for each other at the end), so
the exit code is the runner's. When one rank fails, the launcher stops the others at once and this process reports
the cause: the rank that failed first (one killed by a signal, or one whose own code raised, rather than the peers
that then lost it), how it ended and the tail of its stderr, as an error event and exit code 1 (unless it is rank 0,
whose own error event has said it in words).

On several nodes (Slurm: ``srun`` starts this once per node) the ranks meet through torch's c10d rendezvous at
``--rdzv-endpoint`` (the first node); alone it is the standalone rendezvous on a free local port.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import uuid
from pathlib import Path
from typing import Any

from adaptery.training.runner import (
    CANCEL_FILE,
    ERROR_MARK,
    EXIT_CANCELLED,
    EXIT_ERROR,
    EXIT_OK,
    EXIT_PAUSED,
    EXIT_PEER_LOST,
    _read_spec,
    _SpecError,
)

STDERR_TAIL_CHARS = 800
MONITOR_SECONDS = 0.1  # how often the launcher looks at its ranks: a crash stops the others within this
# How the launcher stops the other ranks once one failed: SIGTERM, then SIGKILL for one that lingers.
STOPPED_BY_LAUNCHER = (-signal.SIGTERM, -signal.SIGKILL)


def emit(event: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def rank_logs(output_dir: Path) -> Path:
    return output_dir.with_name(output_dir.name + "-ranks")


def describe_end(exitcode: int) -> str:
    if exitcode < 0:
        name = signal.Signals(-exitcode).name
        return f"stopped by {name}" + (" (killed: out of memory?)" if exitcode == -signal.SIGKILL else "")
    return f"exited with code {exitcode}"


def first_cause(failures: dict[int, Any]) -> tuple[int, Any]:
    """The failure that started it: a rank killed by a signal (out of memory: SIGKILL), then one whose own code
    failed, before one whose peer vanished (EXIT_PEER_LOST) or that the launcher stopped (SIGTERM); earliest, then
    lowest rank."""

    def weight(item: tuple[int, Any]) -> tuple[int, float, int]:
        rank, failure = item
        code = failure.exitcode
        kind = 2 if code in (EXIT_PEER_LOST, -signal.SIGTERM) else (0 if code < 0 else 1)
        return kind, failure.timestamp, rank

    return min(failures.items(), key=weight)


def stderr_tail(log_dir: Path, local_rank: int) -> str:
    # torch's layout: <log_dir>/<run id>/attempt_<n>/<local rank>/stderr.log
    found = sorted(log_dir.glob(f"*/attempt_*/{local_rank}/stderr.log"), key=lambda path: path.stat().st_mtime)
    text = found[-1].read_text(errors="replace").strip() if found else ""
    return text[-STDERR_TAIL_CHARS:]


def spoke(log_dir: Path, local_rank: int) -> bool:
    """Whether a rank wrote an error event (its stderr holds the marked line; `runner._Reporter`)."""
    return any(line.startswith(ERROR_MARK) for line in stderr_tail(log_dir, local_rank).splitlines())


def failed_group(
    failures: dict[int, Any], log_dir: Path, processes: int, rank0_here: bool = True
) -> tuple[int, str | None]:
    """How a group that did not end well ended: its exit code, and the error event to write, unless rank 0 has
    written its own. `rank0_here`: this launcher's local rank 0 is the group's rank 0 (one node)."""
    ends = {failure.exitcode for failure in failures.values()}
    stops = ends & {EXIT_CANCELLED, EXIT_PAUSED}
    if len(stops) == 1 and ends - stops <= set(STOPPED_BY_LAUNCHER):
        return stops.pop(), None  # the group stopped together, as asked; rank 0 has said so
    rank, failure = first_cause(failures)
    if rank0_here and spoke(log_dir, 0):
        # Rank 0 reported its own failure (every rank reads the same spec and data, so a peer that raised first
        # raised the same), even if the launcher stopped it after it spoke: one error event, rank 0's
        return EXIT_ERROR, None
    own = failures.get(0)
    if own is not None and own.exitcode == EXIT_ERROR and failure.exitcode >= 0:
        # Rank 0's own code failed (its error event, written for people, has said what went wrong) and no rank was
        # killed first: every rank reads the same spec and data, so a peer that raised a moment earlier raised the same.
        return EXIT_ERROR, None
    tail = stderr_tail(log_dir, failure.local_rank)
    if failure.exitcode == EXIT_ERROR:
        # Its own code failed and it said so in words (every rank reads the same data: the words one process gives)
        said = [line[len(ERROR_MARK) :] for line in tail.splitlines() if line.startswith(ERROR_MARK)]
        if said:
            try:
                return EXIT_ERROR, str(json.loads(said[-1]))
            except json.JSONDecodeError:
                pass  # cut by the tail: the plain description below
    message = f"training process {rank} of {processes} {describe_end(failure.exitcode)}"
    return EXIT_ERROR, f"{message}: {tail}" if tail else message


def launch(spec_path: str, *, nnodes: int = 1, rdzv_endpoint: str | None = None, rdzv_id: str | None = None) -> int:
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, SignalException, Std
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    spec = _read_spec(spec_path)
    hp = spec.hyperparameters
    if hp.nodes != nnodes:
        raise _SpecError(f"the spec asks for {hp.nodes} node(s) but {nnodes} were given")
    if nnodes == 1 and (spec.output_dir / CANCEL_FILE).exists():  # cancelled while queued
        emit({"type": "cancelled"})
        return EXIT_CANCELLED
    per_node = hp.processes // nnodes
    log_dir = rank_logs(spec.output_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    config = LaunchConfig(
        min_nodes=nnodes,
        max_nodes=nnodes,
        nproc_per_node=per_node,
        run_id=rdzv_id or uuid.uuid4().hex,
        rdzv_backend="c10d",
        rdzv_endpoint=rdzv_endpoint or "localhost:0",
        max_restarts=0,  # a failed attempt is the agent's to retry, from its last checkpoint
        monitor_interval=MONITOR_SECONDS,
        logs_specs=DefaultLogsSpecs(log_dir=str(log_dir), redirects=Std.ERR),
    )
    try:
        elastic_launch(config, sys.executable)("-m", "adaptery.training.runner", str(spec_path))
    except SignalException:
        # Asked to stop (the agent cancelling, or shutting down): the launcher has passed the signal on and waited
        # for its ranks, which stopped together at a step; rank 0 has reported it.
        return EXIT_CANCELLED
    except ChildFailedError as exc:
        code, message = failed_group(exc.failures, log_dir, hp.processes, rank0_here=nnodes == 1)
        if message is not None:
            emit({"type": "error", "message": message})
        return code
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m adaptery.training.launch")
    parser.add_argument("spec")
    parser.add_argument("--nnodes", type=int, default=1)
    parser.add_argument("--rdzv-endpoint", default=None)
    parser.add_argument("--rdzv-id", default=None)
    args = parser.parse_args(argv)
    try:
        return launch(args.spec, nnodes=args.nnodes, rdzv_endpoint=args.rdzv_endpoint, rdzv_id=args.rdzv_id)
    except Exception as exc:  # the agent hears every failure as an error event
        emit({"type": "error", "message": f"launching the training processes failed: {exc}"})
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
