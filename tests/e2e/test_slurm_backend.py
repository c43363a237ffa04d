"""The Slurm backend against a real Slurm: a one-node cluster (munged, slurmctld, slurmd from Debian's slurm-wlm,
installed by scripts/ensure-slurm.sh) started by this module in a temp dir, as root. Where it cannot start, the tests
skip with the reason.

The agent is the real one with a scripted link (the control plane is not what is tested here); the training is the
real runner on the demo model, submitted with sbatch, followed through squeue and its events file.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from adaptery.agent.slurm import SlurmBackend, batch_script
from adaptery.agent.worker import Agent
from adaptery.messaging.protocol import Assignment, BlobRef
from adaptery.settings import Settings
from tests.conftest import SAMPLE_CHAT
from tests.slurm_cluster import start_cluster, stop_cluster


@pytest.fixture(scope="module")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("slurm")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SLURM_CONF", str(root / "slurm.conf"))  # every Slurm command this process starts reads it
        patch.setenv("ADAPTERY_TRAIN_THREADS", "1")
        try:
            reason = start_cluster(root)
            if reason is not None:
                pytest.skip(f"no test Slurm: {reason}")
            yield root
        finally:
            stop_cluster(root)


class Link:
    """The control plane's side, scripted: heartbeats answer `verdicts` in turn (then "continue"); downloads are
    the sample chat file; uploads are kept by name."""

    agent_id = "agent-slurm"

    def __init__(self, verdicts: list[str] | None = None) -> None:
        self.verdicts = list(verdicts or [])
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.nudged = threading.Event()
        self.lock = threading.Lock()

    def job_call(self, job_id: str, verb: str, body: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            self.calls.append((verb, body))
            if verb == "heartbeat":
                return {"verdict": self.verdicts.pop(0) if self.verdicts else "continue"}
        return {}

    def download(self, job_id: str, sha256: str, size: int, target: Path, attempt: int | None = None) -> Path:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(SAMPLE_CHAT, target)
        return target

    def upload(self, job_id: str, path: Path, attempt: int | None = None) -> str:
        return path.name

    def upload_dir(self, job_id: str, directory: Path, attempt: int | None = None) -> dict[str, str]:
        return {path.name: path.name for path in directory.iterdir() if path.is_file()}

    def of(self, verb: str) -> list[dict[str, Any]]:
        with self.lock:
            return [body for called, body in self.calls if called == verb]

    def events(self) -> list[dict[str, Any]]:
        return [event for body in self.of("events") for event in body["events"]]


def assignment(demo_model_dir: Path, **arguments: Any) -> Assignment:
    return Assignment(
        job_id="ftjob-slurm",
        tenant_id="tenant",
        attempt=1,
        base_model="base",
        base_model_ref=str(demo_model_dir),
        training_file=BlobRef("a" * 64, SAMPLE_CHAT.stat().st_size),
        validation_file=None,
        arguments={"n_epochs": 2, "batch_size": 2, "learning_rate": 2e-3, "lora_r": 4, "lora_alpha": 8,
                   "lora_dropout": 0.0, **arguments},
    )  # fmt: skip


def agent(link: Link, tmp_path: Path, **settings: Any) -> Agent:
    backend = SlurmBackend(Settings(slurm_partition="debug", slurm_poll_seconds=0.5, **settings), link.agent_id)
    return Agent(
        link,  # type: ignore[arg-type]
        tmp_path / "work",  # shared with the compute node: the same machine
        name="slurm-test",
        heartbeat_seconds=0.5,
        poll_seconds=0.1,
        models_dir=tmp_path / "models",
        backend=backend,
    )


def squeue_state(job_id: str) -> str:
    return subprocess.run(
        ["squeue", "--noheader", "--jobs", job_id, "--format=%T"], capture_output=True, text=True
    ).stdout.strip()


def slurm_job_id(name: str = "adaptery-ftjob-slurm") -> str:
    while True:
        found = subprocess.run(
            ["squeue", "--noheader", "--name", name, "--format=%i"], capture_output=True, text=True
        ).stdout.split()
        if found:
            return found[0]
        time.sleep(0.2)


def test_a_job_of_two_processes_trains_through_slurm_and_reports_as_a_local_one(slurm, demo_model_dir, tmp_path):
    link = Link()
    agent(link, tmp_path).run_job(assignment(demo_model_dir, processes=2))
    (finish,) = link.of("finish")
    assert finish["state"] == "succeeded", finish
    assert finish["result"]["steps"] == 6 and "adapter_model.safetensors" in finish["files"]
    steps = [event["step"] for event in link.events() if event["type"] == "metrics"]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert "2 processes (ddp)" in next(e["message"] for e in link.events() if e.get("phase") == "first_step")
    assert [body["step"] for body in link.of("checkpoint")] == [3, 6]  # uploaded as they appeared


def test_a_job_cancelled_or_paused_while_still_in_the_queue_is_scancelled(slurm, demo_model_dir, tmp_path):
    for verdict, state in (("cancel", "cancelled"), ("pause", "paused")):
        link = Link(verdicts=["continue", verdict])
        started = time.monotonic()
        agent(link, tmp_path, slurm_extra_options=["--hold"]).run_job(assignment(demo_model_dir))  # never starts
        assert time.monotonic() - started < 30
        assert [body["state"] for body in link.of("finish")] == [state]
        assert not subprocess.run(["squeue", "--noheader"], capture_output=True, text=True).stdout.strip()


def test_a_restarted_agent_cancels_the_slurm_jobs_its_earlier_run_left_behind(slurm, demo_model_dir, tmp_path):
    ours, theirs = (
        SlurmBackend(Settings(slurm_extra_options=["--hold"]), agent_id) for agent_id in ("agent-a", "agent-b")
    )
    for index, backend in enumerate((ours, ours, theirs)):
        job_dir = tmp_path / str(index)
        job_dir.mkdir()
        (job_dir / "spec.json").write_text(json.dumps({"output_dir": str(job_dir / "adapter")}))
        backend.start(assignment(demo_model_dir), job_dir / "spec.json", job_dir, job_dir / "stderr.log")
    assert ours.forget_orphans("agent-a") == 2
    left = subprocess.run(["squeue", "--noheader", "--format=%k"], capture_output=True, text=True).stdout.split()
    assert left == ["adaptery-agent=agent-b"]
    assert theirs.forget_orphans("agent-b") == 1


def test_a_requeued_job_resumes_from_its_last_checkpoint(slurm, demo_model_dir, tmp_path):
    link = Link()
    runner = agent(link, tmp_path)
    job = assignment(demo_model_dir, n_epochs=4)  # 12 steps
    job = Assignment(**{**job.__dict__, "checkpoint_every_steps": 2})
    done = threading.Thread(target=runner.run_job, args=(job,))
    done.start()
    try:
        job_id = slurm_job_id()
        while not link.of("checkpoint") and done.is_alive():
            time.sleep(0.2)
        # What Slurm does when the job's node fails: kill it, and queue it again (eligible at once here).
        subprocess.run(["scontrol", "requeue", job_id], check=True)
        while squeue_state(job_id) != "PENDING":  # Slurm delays a requeued job's start by two minutes
            time.sleep(0.2)
        # Not "now": slurmd refuses a run launched within the (wall-clock) second its predecessor was killed in ("Job
        # credential revoked"), and Slurm then fails the job; Slurm's own delay is there for that. A pending job's
        # old run was killed before now, so two seconds on is safe.
        subprocess.run(["scontrol", "update", f"jobid={job_id}", "StartTime=now+2"], check=True)
    finally:
        done.join(timeout=240)
    (finish,) = link.of("finish")
    assert finish["state"] == "succeeded" and finish["result"]["steps"] == 12
    messages = [event["message"] for event in link.events() if event["type"] == "message"]
    resumed = [message for message in messages if "resuming at step" in message]
    assert resumed, messages
    step = int(resumed[0].rsplit(" ", 1)[1])
    first_checkpoint = link.of("checkpoint")[0]["step"]
    assert step >= first_checkpoint  # from a checkpoint, not from the start
    metrics = [event["step"] for event in link.events() if event["type"] == "metrics"]
    assert metrics[-1] == 12 and metrics.count(12) == 1


def test_a_job_over_several_nodes_meets_through_srun_and_torchrun_rendezvous(tmp_path):
    # One node here allows no real run across nodes: the script is what Slurm would run on each.
    script = batch_script(
        assignment(Path("/models/base"), processes=8, nodes=2, batch_size=8),
        tmp_path / "spec.json",
        tmp_path,
        Settings(slurm_partition="gpu", slurm_account="lab", slurm_time_limit="02:00:00", slurm_gpus=True,
                 slurm_memory="64G"),
    )  # fmt: skip
    for option in ("--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=4", "--partition=gpu", "--account=lab",
                   "--time=02:00:00", "--mem=64G", "--requeue"):  # fmt: skip
        assert f"#SBATCH {option}\n" in script
    assert "srun --ntasks-per-node=1 --kill-on-bad-exit=1" in script
    assert '-m adaptery.training.launch "$SPEC" --nnodes 2 --rdzv-endpoint "$HEAD:29400" --rdzv-id "$SLURM_JOB_ID"' in (
        script
    )
