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
    assert forgotten.poll() == EXIT_CANCELLED


def test_a_job_cancelled_in_slurm_by_someone_else_ends_cancelled(tmp_path, monkeypatch) -> None:
    stopped = job(tmp_path, Controller(squeue="CANCELLED", scontrol="CANCELLED"), monkeypatch, None)
    assert stopped.poll() == slurm.EXIT_KILLED_BY_SLURM
    assert stopped.ending == "the job was cancelled in Slurm"
