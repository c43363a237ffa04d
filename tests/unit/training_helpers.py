"""Shared pieces of the training tests: specs for the demo model, JSONL files, the runner process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from adaptery.engine.demo_model import FINETUNE_DEFAULTS
from adaptery.training.data import IGNORE_INDEX
from adaptery.training.spec import LoraHyperparameters, TrainingSpec

RUNNER = [sys.executable, "-m", "adaptery.training.runner"]
GOOD = {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}
SPEC_FIELDS = ("validation_file", "method", "checkpoint_dir", "resume_from", "checkpoint_every_steps", "init_adapter")


def write_jsonl(path: Path, lines: list[object]) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def demo_spec(model_dir: Path, training_file: Path, output_dir: Path, **overrides: object) -> TrainingSpec:
    """The demo model's defaults; spec fields and hyperparameters both come from `overrides`."""
    fields = {name: overrides.pop(name) for name in SPEC_FIELDS if name in overrides}
    return TrainingSpec(
        base_model=str(model_dir),
        training_file=training_file,
        output_dir=output_dir,
        hyperparameters=LoraHyperparameters(**{**FINETUNE_DEFAULTS, **overrides}),
        **fields,
    )


def trained_text(tokenizer, example: dict[str, list[int]]) -> str:
    return tokenizer.decode([label for label in example["labels"] if label != IGNORE_INDEX])


def greedy_answer(model, tokenizer, messages: list[dict], max_new_tokens: int = 40) -> str:
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**prompt, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(output[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)


def write_spec(directory: Path, spec: TrainingSpec, name: str = "spec.json") -> Path:
    path = directory / name
    path.write_text(spec.model_dump_json())
    return path


def run_runner(spec_path: Path) -> tuple[int, list[dict]]:
    done = subprocess.run([*RUNNER, str(spec_path)], capture_output=True, text=True, timeout=120)
    events = [json.loads(line) for line in done.stdout.splitlines()]  # every stdout line is JSON
    return done.returncode, events


def of_type(events: list[dict], kind: str) -> list[dict]:
    return [event for event in events if event["type"] == kind]
