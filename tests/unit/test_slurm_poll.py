"""How the Slurm backend decides a job has ended, against a scripted controller (the real one is in
tests/e2e/test_slurm_backend.py): a run that Slurm requeued said "cancelled" and may have written its exit code, and
a busy controller's squeue can list the job as gone for a moment; only the controller's record ends it."""

from __future__ import annotations

from pathlib import Path

import pytest

from adaptery.agent import slurm
from adaptery.agent.slurm import EXIT_CODE_FILE, SlurmError, SlurmJob
from adaptery.training.runner import CANCEL_FILE, EXIT_CANCELLED


class Controller:
    def __init__(self, squeue: str, scontrol: str | None) -> None:
        self.squeue = squeue
        self.scontrol = scontrol
        self.asked: list[str] = []

    def __call__(self, *command: str, timeout: float = 30.0) -> str:
        self.asked.append(command[0])
        if command[0] == "squeue":
            return self.squeue
        if command[0] == "scontrol":
            if self.scontrol is None:
                raise SlurmError("scontrol failed: Invalid job id specified")
            return f"JobId=7 JobName=train JobState={self.scontrol} Restarts=1"
        raise SlurmError(f"{command[0]} failed: no accounting")


def job(tmp_path: Path, controller: Controller, monkeypatch: pytest.MonkeyPatch, exit_code: int | None) -> SlurmJob:
    monkeypatch.setattr(slurm, "_slurm", controller)
    (tmp_path / "out").mkdir()
    if exit_code is not None:
        (tmp_path / EXIT_CODE_FILE).write_text(f"{exit_code}\n")
    return SlurmJob("7", tmp_path, tmp_path / "out", poll_seconds=0.0)


@pytest.mark.parametrize("squeue", ["", "CANCELLED"])
def test_a_requeued_run_that_said_cancelled_is_not_the_end(tmp_path, monkeypatch, squeue) -> None:
    controller = Controller(squeue=squeue, scontrol="PENDING")
    running = job(tmp_path, controller, monkeypatch, EXIT_CANCELLED)
    assert running.poll() is None
    controller.squeue, controller.scontrol = "RUNNING", "RUNNING"
    (tmp_path / EXIT_CODE_FILE).unlink()  # the requeued script's first line
    assert running.poll() is None
    controller.squeue, controller.scontrol = "COMPLETED", "COMPLETED"
    (tmp_path / EXIT_CODE_FILE).write_text("0\n")
    assert running.poll() == 0


def test_a_cancel_this_agent_asked_for_ends_the_job_without_asking_the_controller(tmp_path, monkeypatch) -> None:
    controller = Controller(squeue="", scontrol="PENDING")
    cancelled = job(tmp_path, controller, monkeypatch, EXIT_CANCELLED)
    (tmp_path / "out" / CANCEL_FILE).touch()
    assert cancelled.poll() == EXIT_CANCELLED
    assert "scontrol" not in controller.asked


def test_a_job_the_controller_has_forgotten_has_ended(tmp_path, monkeypatch) -> None:
    forgotten = job(tmp_path, Controller(squeue="", scontrol=None), monkeypatch, EXIT_CANCELLED)
    assert forgotten.poll() == slurm.EXIT_KILLED_BY_SLURM  # stopped by Slurm, not by this agent: not a cancel
    assert forgotten.ending == "the job ended in Slurm state unknown"


def test_a_job_cancelled_in_slurm_by_someone_else_ends_cancelled(tmp_path, monkeypatch) -> None:
    stopped = job(tmp_path, Controller(squeue="CANCELLED", scontrol="CANCELLED"), monkeypatch, None)
    assert stopped.poll() == slurm.EXIT_KILLED_BY_SLURM
    assert stopped.ending == "the job was cancelled in Slurm"


class Timeline:
    """squeue's answers one poll at a time, each after appending that moment's lines to the events file."""

    def __init__(self, events: Path, moments: list[tuple[str, list[str]]], scontrol: str) -> None:
        self.events = events
        self.moments = list(moments)
        self.scontrol = scontrol

    def __call__(self, *command: str, timeout: float = 30.0) -> str:
        if command[0] == "squeue":
            state, lines = self.moments.pop(0) if len(self.moments) > 1 else self.moments[0]
            with self.events.open("a") as events:
                events.writelines(line + "\n" for line in lines)
            return state
        if command[0] == "scontrol":
            return self.scontrol
        raise SlurmError(f"{command[0]} failed: no accounting")


METRICS = '{"type": "metrics", "step": 4, "train_loss": 7.3}'
CHECKPOINT = '{"type": "checkpoint", "step": 3, "path": "/work/ckpt/checkpoint-3"}'
CANCELLED = '{"type": "cancelled"}'
# What the agent saw in the e2e requeue test's failing runs under load (squeue every 0.5 s; events and exit-code file
# as the batch script left them): `scontrol requeue` SIGTERMed the run, which said "cancelled" (its bash died with it:
# no exit code); the test set the requeued job's StartTime=now, so it was launched within the second the old run was
# killed in, and slurmd refused it ("Job 1 already killed, do not launch batch job"; slurmctld: "Killing
# non-startable batch JobId=1: Job credential revoked"), so the job really ended, FAILED. It was reported cancelled.
REFUSED_REQUEUE = [
    ("RUNNING", [METRICS, CHECKPOINT]),
    ("RUNNING", [CANCELLED]),
    ("COMPLETING", []),
    ("FAILED", []),
]
REFUSED_RECORD = (
    "JobId=1 JobName=adaptery-ftjob-slurm JobState=FAILED Reason=NonZeroExitCode Dependency=(null) Requeue=1 "
    "Restarts=1 BatchFlag=1 Reboot=0 ExitCode=1:0 RunTime=00:00:00"
)


def followed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, moments: list[tuple[str, list[str]]]) -> SlurmJob:
    monkeypatch.setattr(slurm, "FOLLOW_SECONDS", 0.0)
    monkeypatch.setattr(slurm, "_slurm", Timeline(tmp_path / slurm.EVENTS_FILE, moments, REFUSED_RECORD))
    (tmp_path / "out").mkdir()
    return SlurmJob("1", tmp_path, tmp_path / "out", poll_seconds=0.0)


def test_a_requeued_run_slurm_refused_to_start_fails_the_job_with_slurms_word_not_as_cancelled(
    tmp_path, monkeypatch
) -> None:
    requeued = followed(tmp_path, monkeypatch, REFUSED_REQUEUE)
    lines = [line.decode().strip() for line in requeued.stdout]
    assert lines == [METRICS, CHECKPOINT]  # no one asked for the stop: its "cancelled" is not the job's end
    assert requeued.poll() == slurm.EXIT_KILLED_BY_SLURM
    assert requeued.ending == "the job ended in Slurm state FAILED"


def test_a_run_stopped_by_slurm_that_wrote_its_cancelled_exit_code_fails_with_slurms_word(
    tmp_path, monkeypatch
) -> None:
    timed_out = followed(tmp_path, monkeypatch, [("RUNNING", [METRICS, CANCELLED]), ("TIMEOUT", [])])
    (tmp_path / EXIT_CODE_FILE).write_text(f"{EXIT_CANCELLED}\n")
    assert [line.decode().strip() for line in timed_out.stdout] == [METRICS]
    assert timed_out.poll() == slurm.EXIT_KILLED_BY_SLURM
    assert timed_out.ending == "Slurm stopped the job at its time limit"


def test_a_cancel_this_agent_asked_for_is_passed_on_at_the_end(tmp_path, monkeypatch) -> None:
    cancelled = followed(tmp_path, monkeypatch, [("RUNNING", [METRICS, CANCELLED]), ("COMPLETED", [])])
    (tmp_path / "out" / CANCEL_FILE).touch()
    (tmp_path / EXIT_CODE_FILE).write_text(f"{EXIT_CANCELLED}\n")
    assert [line.decode().strip() for line in cancelled.stdout] == [METRICS, CANCELLED]
    assert cancelled.poll() == EXIT_CANCELLED and cancelled.ending is None
