"""Building test adapters with PEFT directly, and the PEFT reference the engine is compared with."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import IA3Config, LoHaConfig, LoKrConfig, LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from adaptery.engine.batching import BatchEngine
from adaptery.engine.sampling import SamplingParams

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def peft_config(kind: str, rank: int, targets: list[str] | None = None):  # noqa: ANN201 - any PEFT config
    targets = targets or ALL
    if kind == "loha":
        return LoHaConfig(r=rank, alpha=rank, target_modules=targets, init_weights=False)
    if kind == "lokr":
        return LoKrConfig(r=rank, alpha=rank, target_modules=targets, init_weights=False)
    if kind == "ia3":
        return IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    return LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules=targets, use_rslora=kind == "rslora", use_dora=kind == "dora"
    )


def make_adapter(base_dir: Path, out: Path, kind: str = "lora", rank: int = 8, seed: int = 0, **kw) -> Path:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft = get_peft_model(model, peft_config(kind, rank, **kw))
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_B" in name or "lora_A" in name:
                param.copy_(torch.randn_like(param) * 0.08)
            elif "magnitude" in name:
                param.mul_(1 + 0.2 * torch.rand_like(param))
            elif "ia3" in name:
                param.copy_(1 + 0.5 * torch.randn_like(param))
    peft.save_pretrained(out)
    return out


def reference_greedy(
    base_dir: Path, adapter: Path | None, prompt: list[int], steps: int, eos: set[int], merge: bool = True
) -> list[int]:
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
        if merge:
            model = model.merge_and_unload()
    model.eval()
    ids = list(prompt)
    out: list[int] = []
    with torch.inference_mode():
        for _ in range(steps):
            token = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            if token in eos:
                break
            out.append(token)
            ids.append(token)
    return out


def engine_tokens(engine: BatchEngine, prompt: list[int], adapter: tuple[str, Path] | None, **params) -> list[int]:
    key, path = adapter if adapter else (None, None)
    request = engine.submit(prompt, SamplingParams(**{"temperature": 0.0, **params}), key, path)
    return collect(request)


def collect(request, timeout: float = 60) -> list[int]:  # noqa: ANN001 - batching.Request
    tokens = []
    while True:
        event = request.events.get(timeout=timeout)
        if event.finish == "error":
            raise RuntimeError(event.error)
        if event.finish is not None:
            return tokens
        tokens.append(event.token)
