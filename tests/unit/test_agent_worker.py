"""The agent's loop against a control plane that fails: its training ends with its job, and a fault that may pass
is asked again rather than a trained adapter thrown away.

The link is a fake that answers from a script; the training child is a real process (a few lines of Python in
place of the trainer), so the test sees whether it is really gone.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest

from adaptery.agent import backends, worker
from adaptery.agent.worker import Agent
from adaptery.messaging.protocol import Assignment, BlobRef, RemoteError

METRICS = json.dumps({"type": "metrics", "step": 1, "total_steps": 2, "train_loss": 1.0})
RESULT = json.dumps({"type": "result", "steps": 2, "train_loss": 0.5, "trained_tokens": 10})
TRAINS_ON = f"import time; print({METRICS!r}, flush=True); time.sleep(300)"
SUCCEEDS = f"print({METRICS!r}, flush=True); print({RESULT!r}, flush=True)"


class ScriptedLink:
    """Answers `job_call(verb)` and `upload_dir` from `script[verb]` in order (an exception is raised), then {}."""

    agent_id = "agent-1"

    def __init__(self, **script: list[Any]) -> None:
        self.script = script
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.download_attempts: list[int | None] = []
        self.nudged = threading.Event()

    def _answer(self, verb: str, body: dict[str, Any]) -> Any:
        self.calls.append((verb, body))
        pending = self.script.get(verb) or []
        answer = pending.pop(0) if pending else {}
        if isinstance(answer, BaseException):
            raise answer
        return answer

    def job_call(self, job_id: str, verb: str, body: dict[str, Any]) -> dict[str, Any]:
        return self._answer(verb, body)

    def upload_dir(self, job_id: str, directory: Path, attempt: int | None = None) -> dict[str, str]:
        return self._answer("upload", {"attempt": attempt}) or {"adapter_model.safetensors": "0" * 64}

    def download(self, job_id: str, sha256: str, size: int, target: Path, attempt: int | None = None) -> Path:
        self.download_attempts.append(attempt)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text('{"messages": []}\n')
        return target

    def verbs(self) -> list[str]:
        return [verb for verb, _ in self.calls if verb != "heartbeat"]


@dataclass
class Trainers:
    code: str = SUCCEEDS  # what each training child runs instead of the trainer
    started: list[subprocess.Popen] = field(default_factory=list)


@pytest.fixture
def trainers(monkeypatch) -> Trainers:
    trainers = Trainers()
    popen = subprocess.Popen

    def start(args: list[str], **kwargs: Any) -> subprocess.Popen:
        child = popen([sys.executable, "-c", trainers.code], **kwargs)
        trainers.started.append(child)
        return child

    monkeypatch.setattr(backends.subprocess, "Popen", start)
    monkeypatch.setattr(worker, "RETRY_FIRST_SECONDS", 0.01)
    return trainers


def agent_for(link: ScriptedLink, tmp_path: Path) -> Agent:
    return Agent(
        link,  # type: ignore[arg-type]
        tmp_path / "work",
        name="test",
        heartbeat_seconds=60,
        poll_seconds=1,
        models_dir=tmp_path / "models",
    )


def assignment(tmp_path: Path) -> Assignment:
    return Assignment(
        job_id="ftjob-1",
        tenant_id="tenant",
        attempt=1,
        base_model="base",
        base_model_ref=str(tmp_path),  # a directory: used as it is, nothing built
        training_file=BlobRef("a" * 64, 17),
        validation_file=None,
        arguments={},
    )


def test_the_training_process_ends_and_is_reaped_whatever_ends_its_job(tmp_path, trainers):
    trainers.code = TRAINS_ON
    link = ScriptedLink(events=[RuntimeError("the link broke in a way nobody foresaw")])
    with pytest.raises(RuntimeError, match="nobody foresaw"):
        agent_for(link, tmp_path).run_job(assignment(tmp_path))
    (child,) = trainers.started
    assert child.returncode is not None  # waited for by the agent: no zombie left behind
    assert not psutil.pid_exists(child.pid)
    assert not (tmp_path / "work" / "jobs" / "ftjob-1").exists()


def test_an_error_reply_to_the_trainers_events_does_not_end_the_job(tmp_path, trainers):
    link = ScriptedLink(events=[RemoteError("control plane error: database is locked", retryable=True)])
    agent_for(link, tmp_path).run_job(assignment(tmp_path))
    assert link.verbs() == ["events", "upload", "finish"]
    assert link.calls[-1][1]["state"] == "succeeded"
    # Its blobs travel under its attempt's lease too, so an older attempt of this agent id is refused them.
    assert link.download_attempts == [1] and [body["attempt"] for _, body in link.calls] == [1, 1, 1]
    assert not psutil.pid_exists(trainers.started[0].pid)


def test_a_transient_fault_at_the_end_is_asked_again_and_the_adapter_kept(tmp_path, trainers):
    locked = RemoteError("control plane error: database is locked", retryable=True)
    link = ScriptedLink(upload=[locked], finish=[locked, locked, {"model": "ft:base:t::ftjob-1"}])
    agent_for(link, tmp_path).run_job(assignment(tmp_path))
    assert link.verbs() == ["events", "upload", "upload", "finish", "finish", "finish"]
    assert all(body["state"] == "succeeded" for verb, body in link.calls if verb == "finish")


def test_a_refusal_is_final_and_retries_are_bounded(tmp_path, trainers, monkeypatch):
    refused = RemoteError("job ftjob-1 is not leased to you", retryable=False)
    link = ScriptedLink(finish=[refused, {"model": "never asked for"}])
    agent_for(link, tmp_path).run_job(assignment(tmp_path))
    assert link.verbs().count("finish") == 1

    monkeypatch.setattr(worker, "RETRY_FOR_SECONDS", 0.2)
    down = RemoteError("control plane error: the database is restarting", retryable=True)
    link = ScriptedLink(finish=[down] * 1000)
    agent_for(link, tmp_path).run_job(assignment(tmp_path))  # gives up: the lease expires, the job is requeued
    assert 2 <= link.verbs().count("finish") < 20


class FullDiskLink(ScriptedLink):
    def download(self, job_id: str, sha256: str, size: int, target: Path, attempt: int | None = None) -> Path:
        raise OSError(28, "No space left on device")


def test_a_full_disk_while_the_job_is_put_together_gives_it_back_but_a_refusal_still_fails_it(tmp_path, trainers):
    link = FullDiskLink()
    agent_for(link, tmp_path).run_job(assignment(tmp_path))
    assert link.verbs() == ["finish"] and not trainers.started
    body = link.calls[-1][1]
    assert body["state"] == "released" and body["fault"] is True and body["attempt"] == 1
    assert "No space left on device" in body["message"]

    def refuses(job_id: str, sha256: str, size: int, target: Path, attempt: int | None = None) -> Path:
        raise RemoteError(f"blob {sha256} is not this job's", retryable=False)

    link = ScriptedLink()
    link.download = refuses  # type: ignore[method-assign]
    with pytest.raises(RemoteError, match="not this job's"):  # Agent.run reports the job failed with it
        agent_for(link, tmp_path).run_job(assignment(tmp_path))
    assert link.verbs() == [] and not trainers.started


class RecordingLink(ScriptedLink):
    """Writes each blob where the agent asks, and notes where and under what directory modes."""

    def __init__(self, **script: list[Any]) -> None:
        super().__init__(**script)
        self.targets: list[tuple[Path, int]] = []

    def download(self, job_id: str, sha256: str, size: int, target: Path, attempt: int | None = None) -> Path:
        path = super().download(job_id, sha256, size, target, attempt)
        job_dir = next(p for p in target.parents if p.name.startswith("attempt-"))
        self.targets.append((target, job_dir.stat().st_mode & 0o777))
        return path


@pytest.mark.parametrize("outcome", [SUCCEEDS, "import sys; sys.exit(1)"])
def test_a_jobs_workspace_is_private_while_it_runs_and_wiped_when_it_ends(tmp_path, trainers, outcome):
    trainers.code = outcome
    link = RecordingLink()
    agent_for(link, tmp_path).run_job(assignment(tmp_path))
    assert link.targets and all(mode == 0o700 for _, mode in link.targets)  # its dataset lay in its own 0700 dir
    assert not any(target.exists() for target, _ in link.targets)
    left = [p for p in (tmp_path / "work").rglob("*") if p.is_file()]
    assert left == []  # no dataset, checkpoint or adapter of the tenant stays on the agent
