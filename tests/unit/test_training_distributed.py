"""A job of several processes (torch.distributed with gloo, one thread each, on this CPU): the trajectory of one
process with the same global batch, an exact resume after the whole group paused, and a rank that dies failing the
job with its own cause.

Each launch starts three Python processes that import torch and transformers (~15 s on 2 cores), so the runs are
few and shared: the uninterrupted two-process run is the reference of both trajectory tests.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file
from training_helpers import demo_spec, of_type, write_spec

from adaptery.agent.worker import Agent
from adaptery.engine.demo_model import FINETUNE_DEFAULTS
from adaptery.messaging.protocol import Assignment, BlobRef
from adaptery.training.methods import ConfigurationError
from adaptery.training.runner import usable_cpus
from adaptery.training.trainer import train
from tests.conftest import SAMPLE_CHAT

LAUNCH = [sys.executable, "-m", "adaptery.training.launch"]
# 6 examples, a global batch of 2: 3 steps an epoch. No dropout, so one process computes what two do.
RUN = {"n_epochs": 2, "batch_size": 2, "lora_dropout": 0.0}
# Two processes sum the same token losses in another order (and pad each half of the batch on its own): measured,
# the losses agree to ~1e-7 relative.
LOSS_TOLERANCE = 1e-4


def same_training(two: torch.Tensor, one: torch.Tensor) -> bool:
    """Weights trained by two processes and by one agree. Not element by element: Adam divides each gradient by
    its own running size, so an element whose true gradient is ~0 moves by up to the learning rate either way on
    1e-7 of summation-order noise (a full run failed allclose(rtol=1e-3) on the final weights, losses equal). So:
    at most 0.1 % of the elements may differ beyond allclose's bounds, and the whole tensor within 1 %."""
    apart = ~torch.isclose(two, one, rtol=1e-3, atol=1e-5)
    return apart.float().mean().item() <= 1e-3 and (two - one).norm().item() <= 1e-2 * one.norm().item() + 1e-6


@pytest.fixture(scope="module", autouse=True)
def one_thread_each() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ADAPTERY_TRAIN_THREADS", "1")  # every rank: 2 processes × 1 thread
        yield
    torch.set_num_threads(threads)


def launch(spec_path: Path) -> tuple[int, list[dict]]:
    done = subprocess.run([*LAUNCH, str(spec_path)], capture_output=True, text=True, timeout=240)
    return done.returncode, [json.loads(line) for line in done.stdout.splitlines()]  # every line is an event


def losses(events: list[dict]) -> list[tuple[int, float]]:
    return [(event["step"], event["train_loss"]) for event in of_type(events, "metrics")]


@pytest.fixture(scope="module")
def two_processes(demo_model_dir: Path, sample_chat: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("two-processes")
    spec = demo_spec(demo_model_dir, sample_chat, root / "adapter", processes=2, **RUN)
    code, events = launch(write_spec(root, spec))
    assert code == 0, events
    return spec, events


def test_two_processes_follow_one_process_with_the_same_global_batch(
    two_processes, demo_model_dir: Path, sample_chat: Path, tmp_path: Path
) -> None:
    spec, events = two_processes
    alone: list[dict] = []
    alone_result = train(demo_spec(demo_model_dir, sample_chat, tmp_path / "adapter", **RUN), alone.append)
    assert [step for step, _ in losses(events)] == [step for step, _ in losses(alone)] == [1, 2, 3, 4, 5, 6]
    assert [loss for _, loss in losses(events)] == pytest.approx(
        [loss for _, loss in losses(alone)], rel=LOSS_TOLERANCE
    )
    result = events[-1]
    assert result["type"] == "result" and result["steps"] == 6
    assert result["trained_tokens"] == alone_result.trained_tokens  # counted over the whole group
    # One report for the group: one start message, one event per step and checkpoint, from rank 0 only.
    assert "2 processes (ddp)" in next(e["message"] for e in events if e.get("phase") == "first_step")
    assert [c["step"] for c in of_type(events, "checkpoint")] == [3, 6]
    checkpoint = Path(of_type(events, "checkpoint")[0]["path"])
    assert (checkpoint / "rng_state_0.pth").is_file() and (checkpoint / "rng_state_1.pth").is_file()
    two = load_file(spec.output_dir / "adapter_model.safetensors")
    one = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    for name in one:  # the same weights, but for elements whose gradient was ~0 (below)
        assert same_training(two[name], one[name]), name


def test_the_group_pauses_together_and_resumes_exactly(
    two_processes, demo_model_dir: Path, sample_chat: Path, tmp_path: Path
) -> None:
    full_spec, full = two_processes
    out = tmp_path / "adapter"
    spec = demo_spec(demo_model_dir, sample_chat, out, processes=2, **RUN)
    out.mkdir()
    (out / "PAUSE").touch()  # seen by both ranks after the first step
    code, paused = launch(write_spec(tmp_path, spec))
    assert code == 4, paused
    assert [event["type"] for event in paused[-2:]] == ["checkpoint", "paused"] and paused[-1]["step"] == 1
    (out / "PAUSE").unlink()
    resumed = spec.model_copy(update={"resume_from": Path(paused[-2]["path"])})
    code, rest = launch(write_spec(tmp_path, resumed, "resume.json"))
    assert code == 0, rest
    assert losses(paused) + losses(rest) == losses(full)  # exactly: data order, optimizer, schedule carried over
    first = load_file(full_spec.output_dir / "adapter_model.safetensors")
    second = load_file(out / "adapter_model.safetensors")
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_a_rank_killed_mid_run_fails_the_job_with_its_cause(
    demo_model_dir: Path, sample_chat: Path, tmp_path: Path
) -> None:
    spec = demo_spec(demo_model_dir, sample_chat, tmp_path / "adapter", processes=2, **{**RUN, "n_epochs": 500})
    launcher = subprocess.Popen(
        [*LAUNCH, str(write_spec(tmp_path, spec))], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    try:
        for line in launcher.stdout:
            if json.loads(line)["type"] == "metrics":
                break
        (rank_one,) = [
            process
            for process in psutil.Process(launcher.pid).children(recursive=True)
            if process.environ().get("RANK") == "1"
        ]
        rank_one.send_signal(signal.SIGKILL)
        rest = [json.loads(line) for line in launcher.stdout]
        assert launcher.wait(timeout=60) == 1
    finally:
        launcher.kill()
    error = rest[-1]
    assert error["type"] == "error"
    assert error["message"].startswith("training process 1 of 2 stopped by SIGKILL (killed: out of memory?)")
    assert not psutil.Process().children(recursive=True)  # no rank left behind


def test_a_bad_file_fails_a_group_with_the_same_message_as_one_process(demo_model_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken.jsonl"
    broken.write_text(SAMPLE_CHAT.read_text() + "{not json\n")
    code, events = launch(write_spec(tmp_path, demo_spec(demo_model_dir, broken, tmp_path / "adapter", processes=2)))
    assert code == 1
    (error,) = of_type(events, "error")  # rank 0's words, not a traceback
    assert error["message"].startswith("line 7: ") and "Traceback" not in error["message"]


def test_fsdp_is_refused_on_a_machine_without_gpus(demo_model_dir: Path, sample_chat: Path, tmp_path: Path) -> None:
    # accelerate shards only across accelerators: on CPUs the job would quietly run as DDP.
    spec = demo_spec(demo_model_dir, sample_chat, tmp_path / "adapter", processes=2, distributed="fsdp", **RUN)
    with pytest.raises(ConfigurationError, match="shards the model across GPUs; this machine has none") as refused:
        train(spec, lambda event: None)
    assert refused.value.param == "hyperparameters.distributed"


class CancellingLink:
    """The control plane's side for one job: it asks the agent to cancel once the first step is reported."""

    agent_id = "agent-1"

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict]] = []
        self.nudged = threading.Event()
        self.stepped = False

    def job_call(self, job_id: str, verb: str, body: dict) -> dict:
        self.calls.append((verb, body))
        if verb == "events":
            self.stepped = self.stepped or any(event["type"] == "metrics" for event in body["events"])
        return {"verdict": "cancel" if self.stepped else "continue"} if verb == "heartbeat" else {}

    def download(self, job_id: str, sha256: str, size: int, target: Path, attempt: int | None = None) -> Path:
        target.parent.mkdir(parents=True, exist_ok=True)
        return Path(shutil.copyfile(SAMPLE_CHAT, target))

    def upload(self, job_id: str, path: Path, attempt: int | None = None) -> str:
        return path.name


def test_an_agent_cancels_the_whole_group_and_leaves_no_process(demo_model_dir: Path, tmp_path: Path) -> None:
    link = CancellingLink()
    agent = Agent(
        link,  # type: ignore[arg-type]
        tmp_path / "work",
        name="test",
        heartbeat_seconds=0.2,
        poll_seconds=0.1,
        models_dir=tmp_path / "models",
    )
    job = Assignment(
        job_id="ftjob-1",
        tenant_id="tenant",
        attempt=1,
        base_model="base",
        base_model_ref=str(demo_model_dir),
        training_file=BlobRef("a" * 64, SAMPLE_CHAT.stat().st_size),
        validation_file=None,
        arguments={**FINETUNE_DEFAULTS, **RUN, "n_epochs": 500, "processes": 2},
    )
    agent.run_job(job)
    finished = [body for verb, body in link.calls if verb == "finish"]
    assert [body["state"] for body in finished] == ["cancelled"]
    assert not psutil.Process().children(recursive=True)  # the launcher and both ranks are gone


def test_an_agent_refuses_more_processes_than_it_has_or_other_nodes(tmp_path: Path) -> None:
    for arguments, refusal in (
        ({"processes": usable_cpus() + 1}, f"asks for {usable_cpus() + 1} processes but this agent has"),
        ({"processes": 2, "nodes": 2}, "asks for 2 nodes; this agent runs jobs on its own machine"),
    ):
        link = CancellingLink()
        job = Assignment("ftjob-1", "tenant", 1, "base", str(tmp_path), BlobRef("a" * 64, 1), None, arguments)
        Agent(
            link,  # type: ignore[arg-type]
            tmp_path / "work",
            name="test",
            heartbeat_seconds=60,
            poll_seconds=0.1,
            models_dir=tmp_path / "models",
        ).run_job(job)
        (finish,) = [body for verb, body in link.calls if verb == "finish"]
        assert finish["state"] == "failed" and refusal in finish["message"]


def _failure(exitcode: int, timestamp: float, local_rank: int):  # noqa: ANN202 - the shape of torch's ProcessFailure
    from types import SimpleNamespace

    return SimpleNamespace(exitcode=exitcode, timestamp=timestamp, local_rank=local_rank)


def test_two_ranks_failing_on_the_same_data_give_one_error_event_whoever_was_first(tmp_path: Path) -> None:
    """Every rank reads the same file: the peer may raise a moment before rank 0 (seen in CI). Rank 0's own error
    event has said it; the launcher adds no second one."""
    from adaptery.training.launch import failed_group
    from adaptery.training.runner import EXIT_ERROR, EXIT_PEER_LOST

    peer_first = {0: _failure(EXIT_ERROR, 2.0, 0), 1: _failure(EXIT_ERROR, 1.0, 1)}
    assert failed_group(peer_first, tmp_path, 2) == (EXIT_ERROR, None)
    # A peer killed first (out of memory) is the cause, whatever rank 0 then said.
    killed = {0: _failure(EXIT_PEER_LOST, 2.0, 0), 1: _failure(-signal.SIGKILL, 1.0, 1)}
    code, message = failed_group(killed, tmp_path, 2)
    assert code == EXIT_ERROR and message.startswith("training process 1 of 2 stopped by SIGKILL")
    # A peer whose own code failed while rank 0 only lost it: the peer's words.
    peer_only = {0: _failure(EXIT_PEER_LOST, 2.0, 0), 1: _failure(EXIT_ERROR, 1.0, 1)}
    assert failed_group(peer_only, tmp_path, 2)[1] == f"training process 1 of 2 exited with code {EXIT_ERROR}"


def test_a_peer_whose_own_code_failed_first_is_relayed_in_its_own_words(tmp_path: Path) -> None:
    """Under load a peer may reach the bad line first while rank 0 only loses it: the launcher relays the peer's own
    message (what one process would have said), not its traceback."""
    from adaptery.training.launch import failed_group
    from adaptery.training.runner import ERROR_MARK, EXIT_ERROR, EXIT_PEER_LOST

    log = tmp_path / "run" / "attempt_0" / "1" / "stderr.log"
    log.parent.mkdir(parents=True)
    log.write_text("Traceback (most recent call last):\n  ...\nValueError: x\n" + ERROR_MARK + '"line 7: not JSON"\n')
    peer_first = {0: _failure(EXIT_PEER_LOST, 2.0, 0), 1: _failure(EXIT_ERROR, 1.0, 1)}
    assert failed_group(peer_first, tmp_path, 2) == (EXIT_ERROR, "line 7: not JSON")


def test_rank_0_that_spoke_before_the_launcher_stopped_it_is_the_one_error_event(tmp_path: Path) -> None:
    """Seen in the clean-clone run: the peer raised first, the launcher stopped rank 0 after rank 0 had written its
    own error event (its events go straight out, past the launcher); a second event from the launcher followed."""
    from adaptery.training.launch import failed_group
    from adaptery.training.runner import ERROR_MARK, EXIT_ERROR

    for rank in (0, 1):
        log = tmp_path / "run" / "attempt_0" / str(rank) / "stderr.log"
        log.parent.mkdir(parents=True)
        log.write_text(ERROR_MARK + '"line 7: not JSON"\n')
    stopped = {0: _failure(-signal.SIGTERM, 2.0, 0), 1: _failure(EXIT_ERROR, 1.0, 1)}
    assert failed_group(stopped, tmp_path, 2) == (EXIT_ERROR, None)
    assert failed_group({1: _failure(EXIT_ERROR, 1.0, 1)}, tmp_path, 2) == (EXIT_ERROR, None)
    # another node's launcher: its local rank 0 is not the group's, so the peer's words are relayed
    assert failed_group(stopped, tmp_path, 2, rank0_here=False) == (EXIT_ERROR, "line 7: not JSON")
