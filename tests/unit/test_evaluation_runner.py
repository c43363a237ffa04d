"""The held-out runner scores several adapters on one loaded base: an adapter scored after another one was attached
scores exactly as it does alone, and the base (adapters switched off) exactly as the base loaded bare."""

from __future__ import annotations

from pathlib import Path

import pytest

from adaptery.evaluation.runner import run_held_out
from tests.conftest import SAMPLE_CHAT


def random_lora(base_dir: Path, target: Path, seed: int) -> Path:
    """A LoRA whose B is not zero (PEFT's default init would make it the base), so it changes the answers."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    config = LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(target)
    return target


@pytest.fixture(scope="module")
def adapters(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("adapters")
    return {name: str(random_lora(demo_model_dir, root / name, seed)) for name, seed in (("a", 1), ("b", 2))}


def spec(demo_model_dir: Path, models: list[dict]) -> dict:
    return {
        "base_model": str(demo_model_dir),
        "models": models,
        "evaluation_file": str(SAMPLE_CHAT),
        "split": None,
        "max_new_tokens": 8,
        "max_seq_length": 256,
        "max_examples": 2,
        "record_limits": {"max_bytes": 100_000, "max_depth": 32},
    }


def answers(result: dict, label: str) -> list[str]:
    return [row["models"][label]["answer"] for row in result["examples"]]


def losses(result: dict, label: str) -> list[float]:
    return [row["models"][label]["loss"] for row in result["examples"]]


def test_adapters_and_the_base_score_the_same_together_as_alone(demo_model_dir, adapters):
    events: list[dict] = []
    together = run_held_out(spec(demo_model_dir, [
        {"label": "candidate", "model": "ft:a", "adapter_dir": adapters["a"]},
        {"label": "predecessor", "model": "ft:b", "adapter_dir": adapters["b"]},
        {"label": "base", "model": "demo", "adapter_dir": None},
    ]), events.append)  # fmt: skip
    alone_b = run_held_out(spec(demo_model_dir, [{"label": "b", "model": "ft:b", "adapter_dir": adapters["b"]}]),
                           lambda event: None)  # fmt: skip
    alone_base = run_held_out(spec(demo_model_dir, [{"label": "base", "model": "demo", "adapter_dir": None}]),
                              lambda event: None)  # fmt: skip
    assert answers(together, "predecessor") == answers(alone_b, "b")
    assert losses(together, "predecessor") == pytest.approx(losses(alone_b, "b"), rel=1e-5)
    assert answers(together, "base") == answers(alone_base, "base")
    assert losses(together, "base") == pytest.approx(losses(alone_base, "base"), rel=1e-5)
    assert answers(together, "candidate") != answers(together, "base")  # the adapter does change the answers
    assert set(together["models"]) == {"candidate", "predecessor", "base"}
    assert together["models"]["predecessor"]["model"] == "ft:b" and together["models"]["base"]["examples"] == 2
    progress = [event for event in events if event["type"] == "progress"]
    assert [(e["done"], e["total"]) for e in progress] == [(i, 6) for i in range(1, 7)]


def test_the_result_says_what_each_models_answers_used(demo_model_dir, adapters):
    """The control plane charges a held-out run's generation from `usage`: per model, one request an example, the
    tokens of its prompts (as a chat call counts them) and of the answers generated (at most max_new_tokens each)."""
    from transformers import AutoTokenizer

    from adaptery.data.untrusted import RecordLimits
    from adaptery.evaluation.heldout import read_evaluation_set

    result = run_held_out(spec(demo_model_dir, [
        {"label": "candidate", "model": "ft:a", "adapter_dir": adapters["a"]},
        {"label": "base", "model": "demo", "adapter_dir": None},
    ]), lambda event: None)  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir)
    examples = read_evaluation_set(SAMPLE_CHAT, RecordLimits(100_000, 32), max_examples=2)
    prompts = sum(
        len(tokenizer.apply_chat_template(e.prompt, add_generation_prompt=True, return_dict=True)["input_ids"])
        for e in examples
    )
    assert set(result["usage"]) == {"candidate", "base"}
    for label, used in result["usage"].items():
        assert used["requests"] == 2 and used["prompt_tokens"] == prompts, label
        assert 2 <= used["completion_tokens"] <= 2 * 8, label
