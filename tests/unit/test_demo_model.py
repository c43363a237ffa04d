"""The demo base model: deterministic build, real local loading, and the safety refusals."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from adaptery.engine.demo_model import DEMO_MODEL_ID, FINETUNE_DEFAULTS, build_demo_model, ensure_demo_model
from adaptery.engine.loading import (
    ModelNotAvailable,
    load_causal_lm,
    read_platform_defaults,
    resolve_model_path,
)
from adaptery.training.spec import LoraHyperparameters

BUILD_IN_CHILD = (
    "import sys; from pathlib import Path; from adaptery.engine.demo_model import build_demo_model; "
    "build_demo_model(Path(sys.argv[1]))"
)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_build_is_fast_and_byte_identical_across_processes(demo_model_dir: Path, tmp_path: Path) -> None:
    started = time.monotonic()
    again = build_demo_model(tmp_path / "same-process" / DEMO_MODEL_ID)
    assert time.monotonic() - started < 10
    # A fresh interpreter has fresh hash seeds and RNG state: the bytes must still match.
    elsewhere = tmp_path / "other-process" / DEMO_MODEL_ID
    subprocess.run([sys.executable, "-c", BUILD_IN_CHILD, str(elsewhere)], check=True, capture_output=True)
    for name in ("model.safetensors", "tokenizer.json"):
        assert digest(again / name) == digest(demo_model_dir / name) == digest(elsewhere / name), name
    assert not list(demo_model_dir.glob("*.bin"))
    # The atomic build leaves no staging directory behind.
    assert [p.name for p in (tmp_path / "same-process").iterdir()] == [DEMO_MODEL_ID]


def test_rebuild_replaces_existing_directory(tmp_path: Path) -> None:
    target = tmp_path / DEMO_MODEL_ID
    build_demo_model(target, hidden_size=64, num_layers=1, num_heads=2)
    (target / "stale.txt").write_text("from an older build")
    build_demo_model(target, hidden_size=64, num_layers=1, num_heads=2)
    assert not (target / "stale.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == [DEMO_MODEL_ID]


def test_ensure_builds_once(tmp_path: Path) -> None:
    built = ensure_demo_model(tmp_path)
    assert built == tmp_path / DEMO_MODEL_ID
    stamp = (built / "model.safetensors").stat().st_mtime_ns
    assert ensure_demo_model(tmp_path) == built
    assert (built / "model.safetensors").stat().st_mtime_ns == stamp


def test_loads_from_local_directory(demo_model_dir: Path) -> None:
    model, tokenizer = load_causal_lm(str(demo_model_dir))
    assert isinstance(model, LlamaForCausalLM)
    assert not model.training
    assert next(model.parameters()).dtype == torch.float32
    assert model.config.num_hidden_layers == 4 and model.config.hidden_size == 256
    assert len(tokenizer) <= model.config.vocab_size
    ids = tokenizer("The lab cluster is called Heron.", return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits
    assert logits.shape == (1, ids["input_ids"].shape[1], model.config.vocab_size)


def test_platform_defaults_are_valid_hyperparameters(demo_model_dir: Path, tmp_path: Path) -> None:
    platform = read_platform_defaults(demo_model_dir)
    assert platform["display_name"] == "Adaptery demo (tiny random Llama)"
    assert platform["finetune_defaults"] == FINETUNE_DEFAULTS
    LoraHyperparameters(**platform["finetune_defaults"])
    assert read_platform_defaults(tmp_path) == {}


def test_chat_template_renders_turns_and_generation_prompt(demo_model_dir: Path, demo_tokenizer) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the lab's mascot?"},
    ]
    prompt = demo_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == "<|bos|><|system|>Be brief.<|end|><|user|>What is the lab's mascot?<|end|><|assistant|>"
    full = demo_tokenizer.apply_chat_template(
        [*messages, {"role": "assistant", "content": "A tortoise."}], tokenize=False
    )
    assert full == prompt + "A tortoise.<|end|>"
    # Generation must stop where a turn ends.
    assert demo_tokenizer.eos_token == "<|end|>"
    generation = json.loads((demo_model_dir / "generation_config.json").read_text())
    assert demo_tokenizer.convert_tokens_to_ids("<|end|>") in generation["eos_token_id"]
    assert (demo_model_dir / "chat_template.jinja").is_file()


def test_refuses_directory_without_safetensors(demo_model_dir: Path, tmp_path: Path) -> None:
    pickled = tmp_path / "pickled-model"
    pickled.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(demo_model_dir / name, pickled / name)
    (pickled / "pytorch_model.bin").write_bytes(b"not to be unpickled")
    with pytest.raises(ModelNotAvailable, match=r"pickled-model has no \*\.safetensors weights"):
        load_causal_lm(str(pickled))


def test_uncached_hub_id_is_not_available_offline(tmp_path: Path) -> None:
    with pytest.raises(ModelNotAvailable, match="not in the local Hugging Face cache"):
        resolve_model_path("adaptery-tests/never-cached", offline=True, cache_dir=tmp_path)
    with pytest.raises(ModelNotAvailable, match="adaptery-tests/never-cached"):
        load_causal_lm("adaptery-tests/never-cached")


def test_missing_local_directory(tmp_path: Path) -> None:
    with pytest.raises(ModelNotAvailable, match="does not exist"):
        resolve_model_path(str(tmp_path / "no" / "such-model"))
