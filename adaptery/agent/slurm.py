"""The Slurm backend: `adaptery agent --backend slurm` on a cluster's login node hands each leased job to Slurm.

The agent stays where it is (leasing, heartbeating, relaying, uploading); the training runs on the compute nodes
that `sbatch` allocates for the job's requirements (nodes, one task per node holding its share of the processes,
GPUs or CPUs, memory, time limit; partition and account from the settings). The agent's work dir must be on the
cluster's shared filesystem: the batch script runs the same training child as a local agent would (the runner, or
the launcher for several processes, under `srun` + torch's c10d rendezvous across nodes), appending its events to
``events.jsonl`` in the job's directory, which the agent follows as it reads a local child's stdout. Its stderr goes
to the job's ``stderr.log``, and the runner's exit code to ``exit-code``.

- State: `squeue` while the job is queued or running; once it has left the queue, the exit code the script wrote,
  else (the job was killed: time limit, out of memory, node failure, scancel) `sacct`, or `scontrol show job` where
  the cluster keeps no accounting, for how it ended.
- Cancel and pause: the CANCEL / PAUSE files in the job's output directory, read after every step, as locally; a job
  still waiting in the queue is `scancel`led at once (and reported cancelled or paused as the runner would).
  Stopping the agent sends SIGTERM (`scancel --signal=TERM`); `kill` is a plain `scancel`. A restarted agent cancels
  the jobs its earlier run left (each names its agent in its comment).
- A node failure: the job is submitted `--requeue`, and a requeued script resumes from the last checkpoint the
  runner reported in ``events.jsonl`` (``python -m adaptery.agent.slurm resume-spec``), so the job continues there.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from adaptery.agent.backends import TrainingRun, requirements, training_module
from adaptery.messaging.protocol import Assignment
from adaptery.settings import Settings
from adaptery.training.runner import CANCEL_FILE, EXIT_CANCELLED, EXIT_PAUSED, PAUSE_FILE

EVENTS_FILE = "events.jsonl"
EXIT_CODE_FILE = "exit-code"
SCRIPT_FILE = "train.sbatch"
RDZV_PORT = 29400  # torch's c10d rendezvous on the job's first node
FOLLOW_SECONDS = 0.2
# Slurm's final states that mean the job was stopped from outside (no exit code of the runner's).
ENDED_FROM_OUTSIDE = {
    "TIMEOUT": "Slurm stopped the job at its time limit",
    "OUT_OF_MEMORY": "Slurm stopped the job: out of memory",
    "NODE_FAIL": "the job's node failed",
    "CANCELLED": "the job was cancelled in Slurm",
    "PREEMPTED": "the job was preempted by Slurm",
    "BOOT_FAIL": "the job's node failed to boot",
    "DEADLINE": "the job passed its deadline",
}
FINAL_STATES = {*ENDED_FROM_OUTSIDE, "COMPLETED", "FAILED", "SPECIAL_EXIT"}
EXIT_KILLED_BY_SLURM = 137
AGENT_COMMENT = "adaptery-agent="

log = logging.getLogger("adaptery.agent.slurm")


class SlurmError(RuntimeError):
    """A Slurm command failed (the message has its stderr)."""


def _slurm(*command: str, timeout: float = 30.0) -> str:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SlurmError(f"{command[0]} failed: {exc}") from exc
    if done.returncode != 0:
        raise SlurmError(f"{command[0]} failed: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout.strip()


def batch_script(
    assignment: Assignment, spec_path: Path, job_dir: Path, settings: Settings, agent_id: str = "agent"
) -> str:
    processes, nodes = requirements(assignment)
    per_node = processes // nodes
    options = [
        f"--job-name=adaptery-{assignment.job_id}",
        f"--nodes={nodes}",
        "--ntasks-per-node=1",  # one runner or launcher per node; it starts the node's processes itself
        f"--cpus-per-task={per_node * settings.slurm_cpus_per_process}",
        f"--chdir={job_dir}",
        f"--output={job_dir / 'slurm.out'}",
        f"--error={job_dir / 'stderr.log'}",
        "--open-mode=append",  # a requeued run adds to the logs
        "--requeue",
        f"--comment={AGENT_COMMENT}{agent_id}",  # whose job it is, for `forget_orphans`
    ]
    if settings.slurm_gpus:
        options.append(f"--gpus-per-node={per_node}")
    for flag, value in (
        ("--partition", settings.slurm_partition),
        ("--account", settings.slurm_account),
        ("--time", settings.slurm_time_limit),
        ("--mem", settings.slurm_memory),
    ):
        if value:
            options.append(f"{flag}={value}")
    options += settings.slurm_extra_options
    spec = shlex.quote(str(spec_path))
    events = shlex.quote(str(job_dir / EVENTS_FILE))
    python = shlex.quote(settings.slurm_python or sys.executable)
    command = " ".join([python, *training_module(processes), '"$SPEC"'])
    if nodes > 1:
        # One launcher per node; they meet at the first node through torch's c10d rendezvous.
        command = (
            'HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)\n'
            "srun --ntasks-per-node=1 --kill-on-bad-exit=1 "
            f'{command} --nnodes {nodes} --rdzv-endpoint "$HEAD:{RDZV_PORT}" --rdzv-id "$SLURM_JOB_ID"'
        )
    lines = [
        "#!/bin/bash",
        *(f"#SBATCH {option}" for option in options),
        "export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1",
        f"rm -f {shlex.quote(str(job_dir / EXIT_CODE_FILE))}  # a requeued run's own",
        f"SPEC={spec}",
        'if [ "${SLURM_RESTART_COUNT:-0}" -gt 0 ]; then',
        "    # Requeued (a node failed): continue from the last checkpoint the runner reported.",
        f"    SPEC=$({python} -m adaptery.agent.slurm resume-spec {spec} {events})",
        "fi",
        f"{command} >> {events}",
        f"echo $? > {shlex.quote(str(job_dir / EXIT_CODE_FILE))}",
    ]
    return "\n".join(lines) + "\n"


class SlurmJob:
    """A submitted job, supervised as a child process: `stdout` follows its events file."""

    def __init__(self, job_id: str, job_dir: Path, output_dir: Path, poll_seconds: float) -> None:
        self.job_id = job_id
        self.job_dir = job_dir
        self.output_dir = output_dir
        self.poll_seconds = poll_seconds
        self.returncode: int | None = None
        self.ending: str | None = None  # how Slurm ended it, when not by the runner's own exit
        self.stopped_in_queue: dict[str, Any] | None = None  # the event the runner would have written
        self._state = "PENDING"
        self._checked = 0.0
        self.terminated = False  # this agent asked the job to stop (SIGTERM)
        self.stdout = self._follow()

    def _follow(self) -> Iterator[bytes]:
        """The events file's lines as they are appended. A "cancelled" line is held until the job has left the queue:
        Slurm stops a run it requeues (preemption, `scontrol requeue`) with SIGTERM, and the requeued run goes on.
        At the end it is passed on only if this agent asked for the stop; else Slurm stopped the job (time limit,
        preemption, or a requeued run that never started: slurmd refuses a run launched within the second its
        predecessor was killed in, "Job credential revoked", and Slurm fails the job), and the job failed as
        `ending` says, rather than being reported cancelled when no one cancelled it."""
        path = self.job_dir / EVENTS_FILE
        offset = 0
        partial = b""
        held: bytes | None = None
        while True:
            ended = self.poll() is not None  # read once more after the end: the last lines may be new
            if path.exists():
                with path.open("rb") as events:
                    events.seek(offset)
                    data = events.read()
                offset += len(data)
                *lines, partial = (partial + data).split(b"\n")
                for line in lines:
                    if line.strip():
                        held = None  # a later line: the run that said "cancelled" was requeued
                    if b'"type": "cancelled"' in line:
                        held = line + b"\n"
                    else:
                        yield line + b"\n"
            if ended:
                if held is not None and self._stop_asked():
                    yield held  # else the stop was Slurm's (time limit, preemption, a requeue that never ran): the
                    # job's end is how Slurm ended it (`ending`), not a cancel no one asked for
                if self.stopped_in_queue is not None:
                    yield (json.dumps(self.stopped_in_queue) + "\n").encode()
                return
            time.sleep(FOLLOW_SECONDS)

    def poll(self) -> int | None:
        if self.returncode is not None:
            return self.returncode
        now = time.monotonic()
        if now - self._checked < self.poll_seconds:
            return None
        self._checked = now
        try:
            # Every state: by default squeue hides some a job passes through on its way back to the queue (REQUEUED).
            state = _slurm("squeue", "--noheader", "--states=all", "--jobs", self.job_id, "--format=%T")
        except SlurmError as exc:
            if "Invalid job id" not in str(exc):
                return None  # the controller away for a moment: ask again later
            state = ""  # an id the controller has forgotten: the job has left the queue
        log.debug("slurm job %s: squeue says %r", self.job_id, state)
        if state and state.split()[0] not in FINAL_STATES:
            self._state = state.split()[0]
            if self._state == "PENDING" and self.stopped_in_queue is None:
                # Waiting in the queue, the job would not read the files: it leaves the queue, and says so as the
                # runner would (a paused job continues from the checkpoint it had).
                if (self.output_dir / CANCEL_FILE).exists():
                    self.stopped_in_queue = {"type": "cancelled"}
                elif (self.output_dir / PAUSE_FILE).exists():
                    self.stopped_in_queue = {"type": "paused", "step": None}
                if self.stopped_in_queue is not None:
                    self.kill()
            return None
        if self._requeued():
            return None
        self.returncode = self._final_code(state.split()[0] if state else "")
        log.debug("slurm job %s: ended with %s (%s)", self.job_id, self.returncode, self.ending)
        return self.returncode

    def _requeued(self) -> bool:
        """Whether a run that seems to have ended was in fact requeued. Slurm stops a run it requeues with SIGTERM,
        so the runner wrote "cancelled" (and maybe its exit code) though no one asked: a stop this agent did not ask
        for is only the end once the controller's own record of the job (scontrol) says it is over. (A guard: with
        --states=all squeue was not seen to list a requeued job as gone; the end once blamed on that was a requeued
        run Slurm refused to start, "Job credential revoked", which is a real end: see `_follow`.)"""
        written = self.job_dir / EXIT_CODE_FILE
        code = written.read_text().strip() if written.exists() else ""
        if self._stop_asked() or code not in ("", str(EXIT_CANCELLED), str(EXIT_PAUSED)):
            return False
        try:
            shown = _slurm("scontrol", "show", "job", "--oneliner", self.job_id)
        except SlurmError:
            return False  # the controller has forgotten the job: it is over
        fields = dict(part.split("=", 1) for part in shown.split() if "=" in part)
        state = fields.get("JobState", "")
        if state and state not in FINAL_STATES:
            log.info("slurm job %s: stopped by Slurm and %s again (requeued), not ended", self.job_id, state)
            return True
        return False

    def _stop_asked(self) -> bool:
        """Whether this agent asked the job to stop (so a "cancelled" or "paused" from its runner is the job's word)."""
        return (
            self.terminated
            or self.stopped_in_queue is not None
            or (self.output_dir / CANCEL_FILE).exists()
            or (self.output_dir / PAUSE_FILE).exists()
        )

    def _final_code(self, state: str) -> int:
        if self.stopped_in_queue is not None:
            return EXIT_CANCELLED if self.stopped_in_queue["type"] == "cancelled" else EXIT_PAUSED
        written = self.job_dir / EXIT_CODE_FILE
        if written.exists() and written.read_text().strip().lstrip("-").isdigit():
            code = int(written.read_text().strip())
            if code not in (EXIT_CANCELLED, EXIT_PAUSED) or self._stop_asked():
                return code
            # The runner stopped at Slurm's SIGTERM, not at this agent's word: how Slurm ended the job says why.
        state = state or self._final_state()
        self.ending = ENDED_FROM_OUTSIDE.get(state, f"the job ended in Slurm state {state or 'unknown'}")
        return EXIT_KILLED_BY_SLURM

    def _final_state(self) -> str:
        try:
            states = _slurm(
                "sacct", "--noheader", "--parsable2", "--allocations", "--jobs", self.job_id, "--format=State"
            )
            if states:
                return states.split()[0].rstrip("+")
        except SlurmError:
            pass  # no accounting on this cluster
        try:
            shown = _slurm("scontrol", "show", "job", "--oneliner", self.job_id)
        except SlurmError:
            return ""
        fields = dict(part.split("=", 1) for part in shown.split() if "=" in part)
        return fields.get("JobState", "")

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"slurm job {self.job_id}", timeout)
            time.sleep(self.poll_seconds)
        return self.returncode  # type: ignore[return-value]

    def terminate(self) -> None:
        """SIGTERM to the batch script and its steps: the runner stops after the step it is in."""
        self.terminated = True
        with contextlib.suppress(SlurmError):  # already gone
            _slurm("scancel", "--signal=TERM", "--full", self.job_id)

    def kill(self) -> None:
        with contextlib.suppress(SlurmError):  # already gone
            _slurm("scancel", self.job_id)


class SlurmBackend:
    name = "slurm"

    def __init__(self, settings: Settings, agent_id: str = "agent") -> None:
        self.settings = settings
        self.agent_id = agent_id  # named in each job's comment, so a restarted agent finds what it left

    def refusal(self, assignment: Assignment) -> str | None:
        return None  # Slurm itself refuses what the partition cannot hold (sbatch's error fails the job)

    def capabilities(self) -> None:
        return None  # the partition's nodes, not this machine, train: unknown here, so it takes unconstrained jobs

    def forget_orphans(self, agent_id: str) -> int:
        """Cancel the Slurm jobs an earlier run of this agent left behind (it died without ending them): their
        leases have lapsed and the jobs go to other attempts, which must not train beside them."""
        listed = _slurm("squeue", "--noheader", "--format=%i %k")
        orphans = [
            line.split()[0] for line in listed.splitlines() if line.split()[1:] == [f"{AGENT_COMMENT}{agent_id}"]
        ]
        if orphans:
            _slurm("scancel", *orphans)
        return len(orphans)

    def start(self, assignment: Assignment, spec_path: Path, job_dir: Path, stderr_path: Path) -> TrainingRun:
        script = job_dir / SCRIPT_FILE
        script.write_text(batch_script(assignment, spec_path, job_dir, self.settings, self.agent_id))
        job_id = _slurm("sbatch", "--parsable", str(script)).split(";")[0]
        output_dir = Path(json.loads(spec_path.read_text())["output_dir"])
        return SlurmJob(job_id, job_dir, output_dir, self.settings.slurm_poll_seconds)


def resume_spec(spec_path: Path, events_path: Path) -> Path:
    """A spec that resumes `spec_path` from the last checkpoint reported in `events_path` (the spec itself when
    there is none yet); written beside it, its path returned."""
    spec = json.loads(spec_path.read_text())
    last = None
    if events_path.exists():
        for line in events_path.read_text(errors="replace").splitlines():
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            if event.get("type") == "checkpoint" and Path(str(event.get("path"))).is_dir():
                last = event["path"]
    if last is None:
        return spec_path
    spec["resume_from"] = last
    spec.pop("init_adapter", None)  # its weights are in the checkpoint now
    resumed = spec_path.with_name(f"spec-resume-{Path(last).name}.json")
    resumed.write_text(json.dumps(spec, indent=2))
    return resumed


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 3 or args[0] != "resume-spec":
        print("usage: python -m adaptery.agent.slurm resume-spec SPEC.json EVENTS.jsonl", file=sys.stderr)
        return 2
    print(resume_spec(Path(args[1]), Path(args[2])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
