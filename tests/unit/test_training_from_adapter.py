"""DPO that continues an adapter (a stable name's fine-tune): the run starts from the adapter's weights, and the
reference it is held to is that adapter, not the bare base; the saved result is one adapter of the same shape."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from training_helpers import demo_spec, of_type, write_jsonl
from transformers import AutoModelForCausalLM

from adaptery.training.trainer import train


def random_adapter(base_dir: Path, target: Path) -> Path:
    """A LoRA whose B matrices are not zero: it changes the base's answers, so it is not the base in disguise."""
    torch.manual_seed(7)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(target)
    return target


def test_dpo_continues_an_adapter_and_is_held_to_it(demo_model_dir: Path, tmp_path: Path) -> None:
    start = random_adapter(demo_model_dir, tmp_path / "start")
    pairs = [
        {
            "input": {"messages": [{"role": "user", "content": question}]},
            "preferred_output": [{"role": "assistant", "content": answer}],
            "non_preferred_output": [{"role": "assistant", "content": "I do not know."}],
        }
        for question, answer in [("Who leads the lab?", "Dr. Okafor."), ("And the mascot?", "A green tortoise.")]
    ]
    spec = demo_spec(
        demo_model_dir,
        write_jsonl(tmp_path / "prefs.jsonl", pairs),
        tmp_path / "adapter",
        method="dpo",
        init_adapter=start,
        n_epochs=2,
        batch_size=2,
    )
    events: list[dict] = []
    result = train(spec, events.append)
    metrics = of_type(events, "metrics")
    # At the first step the policy is the starting adapter; had the reference been the base, the policy's and the
    # reference's log-probabilities would differ and the loss would not be log 2.
    assert metrics[0]["train_loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert result.steps == 2 and metrics[-1]["train_loss"] < metrics[0]["train_loss"]
    saved = spec.output_dir
    assert not (saved / "ref").exists()  # the frozen reference copy is not part of the result
    assert json.loads((saved / "adapter_config.json").read_text())["r"] == 4  # the starting adapter's shape
    before, after = load_file(start / "adapter_model.safetensors"), load_file(saved / "adapter_model.safetensors")
    assert before.keys() == after.keys()
    moved = [name for name in before if not torch.equal(before[name], after[name])]
    assert moved and all((before[n] - after[n]).abs().max() < 0.5 for n in before)  # trained on from it, nearby
