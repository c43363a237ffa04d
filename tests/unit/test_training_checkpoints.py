"""Checkpoints: complete, weights-only, resumable elsewhere with the same trajectory; pause and cancel."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from training_helpers import RUNNER, demo_spec, of_type, run_runner, write_spec
from transformers.trainer_pt_utils import safe_globals

from adaptery.engine.loading import load_causal_lm
from adaptery.training.trainer import CheckpointError, TrainingPaused, train


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def losses(events: list[dict]) -> list[tuple[int, float]]:
    return [(event["step"], event["train_loss"]) for event in of_type(events, "metrics")]


# 6 examples, batch 2: 3 steps per epoch, 9 in all. Dropout makes the trajectory depend on the RNG too.
RUN = {"n_epochs": 3, "batch_size": 2, "lora_dropout": 0.1}


@pytest.fixture(scope="module")
def uninterrupted(demo_model_dir: Path, sample_chat: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("uninterrupted")
    events: list[dict] = []
    spec = demo_spec(demo_model_dir, sample_chat, root / "adapter", checkpoint_every_steps=2, **RUN)
    result = train(spec, events.append)
    return spec, result, events


def test_checkpoints_every_n_steps_and_every_epoch(uninterrupted) -> None:
    spec, result, events = uninterrupted
    checkpoints = of_type(events, "checkpoint")
    # every 2 steps (2, 4, 6, 8) and each epoch's end (3, 6, 9), each once
    assert [c["step"] for c in checkpoints] == [2, 3, 4, 6, 8, 9]
    assert [c["epoch"] for c in checkpoints if c["step"] in (3, 6, 9)] == [1.0, 2.0, 3.0]
    for checkpoint in checkpoints:
        assert checkpoint["path"] == str(spec.checkpoint_dir / f"checkpoint-{checkpoint['step']}")
        assert checkpoint["metrics"]["train_loss"] > 0 and checkpoint["metrics"]["eval_loss"] is None
    # The event follows the step's metrics, so the queue never hears of a checkpoint before its step.
    order = [(e["type"], e["step"]) for e in events if e["type"] in ("metrics", "checkpoint")]
    assert order.index(("metrics", 2)) < order.index(("checkpoint", 2)) < order.index(("metrics", 3))
    assert result.steps == 9


def test_a_checkpoint_is_a_servable_adapter_and_weights_only_state(uninterrupted, demo_model_dir: Path) -> None:
    spec, _, _ = uninterrupted
    checkpoint = spec.checkpoint_dir / "checkpoint-4"
    names = {path.name for path in checkpoint.iterdir()}
    assert {
        "adapter_model.safetensors",
        "adapter_config.json",
        "chat_template.jinja",
        "tokenizer.json",
        "optimizer.pt",
        "scheduler.pt",
        "rng_state.pth",
        "trainer_state.json",
    } <= names
    assert "training_args.bin" not in names  # a pickle of arbitrary objects; resuming never reads it
    for name in ("optimizer.pt", "scheduler.pt"):
        torch.load(checkpoint / name, weights_only=True)  # raises for anything but plain data
    with safe_globals():  # numpy's RNG state: arrays and dtypes allowlisted, nothing callable
        assert set(torch.load(checkpoint / "rng_state.pth", weights_only=True)) >= {"python", "numpy", "cpu"}
    assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == 4
    base, tokenizer = load_causal_lm(str(demo_model_dir))
    tuned = PeftModel.from_pretrained(base, checkpoint)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi?"}], return_tensors="pt")
    assert tuned.generate(**prompt, max_new_tokens=3, do_sample=False).shape[1] > prompt["input_ids"].shape[1]


def test_resume_elsewhere_continues_at_the_step_with_the_same_trajectory(
    uninterrupted, demo_model_dir: Path, sample_chat: Path, tmp_path: Path
) -> None:
    spec, _, full = uninterrupted
    # Mid-epoch (step 4 of 9: epoch 2, one batch in), copied away from the run that wrote it.
    moved = shutil.copytree(spec.checkpoint_dir / "checkpoint-4", tmp_path / "elsewhere" / "checkpoint-4")
    events: list[dict] = []
    resumed_spec = demo_spec(demo_model_dir, sample_chat, tmp_path / "adapter", resume_from=moved, **RUN)
    result = train(resumed_spec, events.append)
    assert "resuming at step 4" in next(e["message"] for e in events if e.get("phase") == "first_step")
    assert losses(events) == losses(full)[4:]  # steps 5..9, bit for bit
    assert result.steps == 9
    assert (
        load_file(tmp_path / "adapter" / "adapter_model.safetensors").keys()
        == load_file(spec.output_dir / "adapter_model.safetensors").keys()
    )
    first = load_file(spec.output_dir / "adapter_model.safetensors")
    second = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_pause_saves_a_checkpoint_then_resumes_from_it(
    uninterrupted, demo_model_dir: Path, sample_chat: Path, tmp_path: Path
) -> None:
    _, _, full = uninterrupted
    events: list[dict] = []
    spec = demo_spec(demo_model_dir, sample_chat, tmp_path / "adapter", checkpoint_every_steps=100, **RUN)
    steps = iter(range(100))
    with pytest.raises(TrainingPaused) as paused:
        train(spec, events.append, should_pause=lambda: next(steps) >= 4)  # polled after each step
    assert paused.value.step == 5 and paused.value.checkpoint == spec.checkpoint_dir / "checkpoint-5"
    assert [c["step"] for c in of_type(events, "checkpoint")] == [3, 5]  # epoch 1's end, then the pause
    assert not (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    rest: list[dict] = []
    train(
        demo_spec(demo_model_dir, sample_chat, tmp_path / "adapter", resume_from=paused.value.checkpoint, **RUN),
        rest.append,
    )
    assert losses(events) + losses(rest) == losses(full)


def test_resuming_from_an_incomplete_checkpoint_is_refused(
    demo_model_dir: Path, sample_chat: Path, tmp_path: Path
) -> None:
    (tmp_path / "checkpoint-3").mkdir()
    (tmp_path / "checkpoint-3" / "trainer_state.json").write_text("{}")
    spec = demo_spec(demo_model_dir, sample_chat, tmp_path / "adapter", resume_from=tmp_path / "checkpoint-3")
    with pytest.raises(CheckpointError, match="cannot resume: the checkpoint has no adapter_model.safetensors"):
        train(spec, lambda event: None)


def test_runner_pauses_on_the_pause_file_and_a_new_runner_finishes(
    demo_model_dir: Path, sample_chat: Path, tmp_path: Path
) -> None:
    out = tmp_path / "adapter"
    spec = demo_spec(demo_model_dir, sample_chat, out, n_epochs=5, batch_size=1)  # 30 steps
    process = subprocess.Popen(
        [*RUNNER, str(write_spec(tmp_path, spec))], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    try:
        for line in process.stdout:
            if json.loads(line)["type"] == "metrics":
                (out / "PAUSE").touch()
                break
        rest = [json.loads(line) for line in process.stdout]
        assert process.wait(timeout=60) == 4
    finally:
        process.kill()
    assert [event["type"] for event in rest[-2:]] == ["checkpoint", "paused"]
    checkpoint, paused = rest[-2], rest[-1]
    assert paused == {"type": "paused", "step": checkpoint["step"]}
    assert Path(checkpoint["path"]).is_dir() and not (out / "adapter_model.safetensors").exists()

    (out / "PAUSE").unlink()
    resumed = spec.model_copy(update={"resume_from": Path(checkpoint["path"])})
    code, events = run_runner(write_spec(tmp_path, resumed, "resume.json"))
    assert code == 0, events
    assert of_type(events, "metrics")[0]["step"] == checkpoint["step"] + 1
    assert events[-1]["type"] == "result" and events[-1]["steps"] == 30
    assert (out / "adapter_model.safetensors").is_file()


def test_runner_cancels_mid_run_on_the_cancel_file(demo_model_dir: Path, sample_chat: Path, tmp_path: Path) -> None:
    out = tmp_path / "adapter"
    spec = demo_spec(demo_model_dir, sample_chat, out, n_epochs=200, batch_size=2)
    process = subprocess.Popen(
        [*RUNNER, str(write_spec(tmp_path, spec))], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    try:
        for line in process.stdout:
            if json.loads(line)["type"] == "metrics":
                (out / "CANCEL").touch()
                started = time.monotonic()
                break
        rest = [json.loads(line) for line in process.stdout]
        assert process.wait(timeout=60) == 3
    finally:
        process.kill()
    assert time.monotonic() - started < 30  # honoured within seconds, not after 200 epochs (10.8 s under a load of 15)
    assert rest[-1] == {"type": "cancelled"} and not of_type(rest, "paused")
    assert not (out / "adapter_model.safetensors").exists()


def test_a_new_run_can_start_from_a_finished_adapter(
    uninterrupted, demo_model_dir: Path, sample_chat: Path, tmp_path: Path
) -> None:
    spec, _, full = uninterrupted
    events: list[dict] = []
    extended = demo_spec(demo_model_dir, sample_chat, tmp_path / "adapter", init_adapter=spec.output_dir, **RUN)
    result = train(extended, events.append)
    # A fresh optimizer and schedule (step 1 of 9 again), but the weights the first run ended with.
    assert result.steps == 9 and losses(events)[0][0] == 1
    assert losses(events)[0][1] < losses(full)[0][1]
    # Interrupted, it resumes from its checkpoint on the same trajectory: the adapter it started from gives the
    # shape (and DPO's reference), the checkpoint the weights, optimizer, schedule and RNG.
    resumed: list[dict] = []
    checkpoint = extended.checkpoint_dir / "checkpoint-3"
    train(extended.model_copy(update={"output_dir": tmp_path / "resumed", "resume_from": checkpoint}), resumed.append)
    assert [step for step, _ in losses(resumed)] == [step for step, _ in losses(events)[3:]] == [4, 5, 6, 7, 8, 9]
    assert [loss for _, loss in losses(resumed)] == pytest.approx([loss for _, loss in losses(events)[3:]], rel=1e-5)
