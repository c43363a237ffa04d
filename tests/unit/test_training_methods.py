"""PEFT methods: each trains on the demo model into an adapter PEFT loads and generates with;
what cannot be trained or served is refused with the field to fix."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from training_helpers import demo_spec, greedy_answer, of_type

from adaptery.engine.demo_model import FINETUNE_DEFAULTS
from adaptery.engine.generation import AdapterSpec, InferenceEngine, Usage
from adaptery.engine.loading import load_causal_lm
from adaptery.engine.sampling import SamplingParams
from adaptery.training.methods import (
    ConfigurationError,
    check_configuration,
    module_inventory,
    quantization_problem,
)
from adaptery.training.spec import LoraHyperparameters
from adaptery.training.trainer import train

LLAMA_LINEAR = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def hyperparameters(**overrides: object) -> LoraHyperparameters:
    return LoraHyperparameters(**{**FINETUNE_DEFAULTS, **overrides})


@pytest.mark.parametrize(
    ("method", "peft_type", "config_flags"),
    [
        ("lora", "LORA", {"use_dora": False, "use_rslora": False}),
        ("rslora", "LORA", {"use_rslora": True}),
        ("dora", "LORA", {"use_dora": True}),
        ("loha", "LOHA", {}),
        ("lokr", "LOKR", {}),
        ("ia3", "IA3", {"feedforward_modules": ["down_proj"]}),
    ],
)
def test_every_method_trains_an_adapter_peft_loads_and_generates_with(
    demo_model_dir: Path, sample_chat: Path, tmp_path: Path, method: str, peft_type: str, config_flags: dict
) -> None:
    events: list[dict] = []
    spec = demo_spec(demo_model_dir, sample_chat, tmp_path / "adapter", peft_method=method, n_epochs=1, batch_size=3)
    result = train(spec, events.append)
    assert result.steps == 2 and result.peft_type == peft_type
    assert [event["step"] for event in of_type(events, "metrics")] == [1, 2]

    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == peft_type
    assert sorted(config["target_modules"]) == LLAMA_LINEAR  # "all-linear": every projection, never lm_head
    assert {key: config[key] for key in config_flags} == config_flags

    base, tokenizer = load_causal_lm(str(demo_model_dir))
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi?"}], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        base_logits = base(prompt).logits
    tuned = PeftModel.from_pretrained(base, tmp_path / "adapter")
    tuned.eval()
    with torch.no_grad():
        tuned_logits = tuned(prompt).logits
    assert not torch.allclose(tuned_logits, base_logits)  # the trained adapter changes the model
    answer = greedy_answer(tuned, tokenizer, [{"role": "user", "content": "Hi?"}], max_new_tokens=5)

    # ... and the platform's engine serves it (natively or through PEFT, as it says) with the same tokens.
    engine = InferenceEngine("cpu", dtype="float32", kv_cache_mb=16, adapter_cache_mb=64, adapter_dtype="float32")
    try:
        adapter = AdapterSpec(f"{method}-adapter", tmp_path / "adapter")
        engine.check_adapter(adapter)
        ids = engine.chat_prompt("demo", str(demo_model_dir), [{"role": "user", "content": "Hi?"}], adapter)
        params = SamplingParams(max_tokens=5, temperature=0)
        served = "".join(d.text for d in engine.generate("demo", str(demo_model_dir), adapter, ids, params, Usage()))
    finally:
        engine.stop()
    assert served == answer and answer.strip()  # five real tokens, not an empty match


def test_named_target_modules_are_the_ones_adapted(demo_model_dir: Path, sample_chat: Path, tmp_path: Path) -> None:
    spec = demo_spec(demo_model_dir, sample_chat, tmp_path / "adapter", target_modules=["v_proj", "q_proj"], n_epochs=1)
    result = train(spec, lambda event: None)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"] and result.rank == 16


# --- what is refused ---------------------------------------------------------------------------------


def test_inventory_lists_the_adaptable_modules(demo_model_dir: Path) -> None:
    inventory = module_inventory(demo_model_dir)
    assert list(inventory.linear) == LLAMA_LINEAR
    assert inventory.output_head == "lm_head" and inventory.model_type == "llama"
    assert "embed_tokens" in inventory.others


@pytest.mark.parametrize(
    ("overrides", "max_rank", "param", "message"),
    [
        ({"lora_r": 128}, 64, "hyperparameters.lora_r", "rank 128 is above this server's maximum LoRA rank of 64"),
        ({"peft_method": "lokr", "lora_r": 65}, 64, "hyperparameters.lora_r", "rank 65 is above"),
        (
            {"target_modules": ["q_proj", "qkv_proj"]},
            None,
            "hyperparameters.target_modules",
            "target module 'qkv_proj' cannot be adapted: the base model has no module of that name. "
            "Adaptable modules of this llama base: down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj "
            "(or 'all-linear')",
        ),
        ({"target_modules": ["lm_head"]}, None, "hyperparameters.target_modules", "the output head cannot be adapted"),
        ({"target_modules": "embed_tokens"}, None, "hyperparameters.target_modules", "it is not a linear layer"),
        ({"target_modules": []}, None, "hyperparameters.target_modules", "must name at least one module"),
        ({"peft_method": "ia3", "lora_init": "loftq"}, None, "hyperparameters.lora_init", "applies to LoRA"),
    ],
    ids=["rank", "rank-lokr", "unknown-module", "lm-head", "embedding", "no-modules", "loftq-ia3"],
)
def test_configurations_that_cannot_be_trained_or_served_are_refused(
    demo_model_dir: Path, overrides: dict, max_rank: int | None, param: str, message: str
) -> None:
    with pytest.raises(ConfigurationError) as raised:
        check_configuration(hyperparameters(**overrides), module_inventory(demo_model_dir), max_rank=max_rank)
    assert raised.value.param == param
    assert message in str(raised.value)


def test_ia3_has_no_rank_to_limit(demo_model_dir: Path) -> None:
    targets = check_configuration(
        hyperparameters(peft_method="ia3", lora_r=512), module_inventory(demo_model_dir), max_rank=64
    )
    assert targets == LLAMA_LINEAR


@pytest.mark.skipif(quantization_problem() is None, reason="bitsandbytes and CUDA are present: QLoRA can run")
@pytest.mark.parametrize(
    ("overrides", "param", "what"),
    [
        ({"quantization": "4bit"}, "hyperparameters.quantization", "QLoRA (4-bit quantized base)"),
        ({"lora_init": "loftq"}, "hyperparameters.lora_init", "LoftQ initialisation"),
    ],
)
def test_4bit_methods_are_refused_without_bitsandbytes_and_cuda(
    demo_model_dir: Path, overrides: dict, param: str, what: str
) -> None:
    with pytest.raises(ConfigurationError) as raised:
        check_configuration(hyperparameters(**overrides), module_inventory(demo_model_dir), max_rank=64)
    assert raised.value.param == param
    assert str(raised.value).startswith(f"{what} needs bitsandbytes and a CUDA GPU, and {quantization_problem()}")


@pytest.mark.skipif(
    quantization_problem() is not None, reason=f"QLoRA needs bitsandbytes and CUDA: {quantization_problem()}"
)
@pytest.mark.parametrize("lora_init", ["default", "loftq"])
def test_qlora_trains_on_a_4bit_base(demo_model_dir: Path, sample_chat: Path, tmp_path: Path, lora_init: str) -> None:
    spec = demo_spec(
        demo_model_dir, sample_chat, tmp_path / "adapter", quantization="4bit", lora_init=lora_init, n_epochs=1
    )
    result = train(spec, lambda event: None)
    assert result.steps == 2 and (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
