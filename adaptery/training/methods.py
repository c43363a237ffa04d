"""PEFT methods: what a job may ask for, checked against the base model, turned into a PeftConfig.

The checks run twice: at job creation in the control plane (a 400 before any compute is spent),
and again in the training process, which is the last line of defence for specs written by hand.
They need only the base model's config.json: the model is built on the meta device, so no weight
is read and nothing is allocated.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from adaptery.training.spec import LORA_FAMILY, RANKED_METHODS, LoraHyperparameters

ALL_LINEAR = "all-linear"


class ConfigurationError(ValueError):
    """The job asks for something this platform cannot train or serve; `param` names the field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class ModuleInventory:
    """Leaf names of a base model's modules, as PEFT's `target_modules` matches them."""

    model_type: str
    linear: tuple[str, ...]  # every nn.Linear leaf name but the output head: what "all-linear" means
    output_head: str | None  # lm_head: a linear layer, but adapting it is refused (it is not served)
    others: tuple[str, ...]  # embeddings, norms, containers: real names, but not adaptable here


def quantization_problem() -> str | None:
    """Why 4-bit (QLoRA, LoftQ) training cannot run in this process, or None when it can."""
    import torch

    if importlib.util.find_spec("bitsandbytes") is None:
        return "the bitsandbytes package is not installed"
    if not torch.cuda.is_available():
        return "no CUDA GPU is available"
    return None


@lru_cache(maxsize=32)
def _inventory(model_dir: str, config_mtime: float) -> ModuleInventory:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False, local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    head = model.get_output_embeddings()
    linear, others, head_name = set(), set(), None
    for name, module in model.named_modules():
        if not name:
            continue
        leaf = name.rsplit(".", 1)[-1]
        if module is head:
            head_name = leaf
        elif isinstance(module, torch.nn.Linear):
            linear.add(leaf)
        else:
            others.add(leaf)
    return ModuleInventory(
        model_type=config.model_type,
        linear=tuple(sorted(linear)),
        output_head=head_name,
        others=tuple(sorted(others - linear - {head_name})),
    )


def module_inventory(model_dir: Path) -> ModuleInventory:
    """The adaptable modules of the base model in `model_dir` (cached per directory and config version)."""
    config = Path(model_dir) / "config.json"
    try:
        mtime = config.stat().st_mtime
        json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigurationError(f"the base model has no readable config.json: {exc}", param="model") from exc
    return _inventory(str(Path(model_dir).resolve()), mtime)


def resolve_target_modules(requested: list[str] | str, inventory: ModuleInventory) -> list[str]:
    """Names (or "all-linear") → the sorted leaf names to adapt; ConfigurationError for anything else."""
    param = "hyperparameters.target_modules"
    if isinstance(requested, str):
        if requested.lower() == ALL_LINEAR:
            return list(inventory.linear)
        requested = [requested]
    if not requested:
        raise ConfigurationError("target_modules must name at least one module, or be 'all-linear'", param=param)
    unknown = [name for name in requested if name not in inventory.linear]
    if unknown:
        name = unknown[0]
        if name == inventory.output_head:
            why = "the output head cannot be adapted (it is not served per adapter)"
        elif name in inventory.others:
            why = "it is not a linear layer"
        else:
            why = "the base model has no module of that name"
        raise ConfigurationError(
            f"target module {name!r} cannot be adapted: {why}. Adaptable modules of this {inventory.model_type} "
            f"base: {', '.join(inventory.linear)} (or 'all-linear')",
            param=param,
        )
    return sorted(set(requested))


def check_configuration(hp: LoraHyperparameters, inventory: ModuleInventory, *, max_rank: int | None) -> list[str]:
    """Refuse what cannot be trained here or served later; return the resolved target modules."""
    if hp.peft_method in RANKED_METHODS and max_rank is not None and hp.lora_r > max_rank:
        raise ConfigurationError(
            f"rank {hp.lora_r} is above this server's maximum LoRA rank of {max_rank}; "
            "adapters above it could not be served",
            param="hyperparameters.lora_r",
        )
    if hp.lora_init == "loftq" and hp.peft_method not in LORA_FAMILY:
        raise ConfigurationError(
            f"LoftQ initialisation applies to LoRA, rsLoRA and DoRA, not {hp.peft_method}",
            param="hyperparameters.lora_init",
        )
    if hp.quantized:
        problem = quantization_problem()
        if problem:
            what = "LoftQ initialisation" if hp.lora_init == "loftq" else "QLoRA (4-bit quantized base)"
            raise ConfigurationError(
                f"{what} needs bitsandbytes and a CUDA GPU, and {problem} here; "
                "train in full precision instead (quantization 'none', lora_init 'default')",
                param="hyperparameters.lora_init" if hp.lora_init == "loftq" else "hyperparameters.quantization",
            )
        if hp.peft_method not in LORA_FAMILY:
            raise ConfigurationError(
                f"a 4-bit base is trained with LoRA, rsLoRA or DoRA, not {hp.peft_method}",
                param="hyperparameters.quantization",
            )
    return resolve_target_modules(hp.target_modules, inventory)


def _ia3_feedforward(model_type: str, targets: list[str]) -> list[str]:
    # IA3 scales the input of feed-forward layers and the output of the others; PEFT knows which
    # modules are feed-forward for the architectures it supports.
    from peft.utils import TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as FEEDFORWARD

    return [name for name in FEEDFORWARD.get(model_type, []) if name in targets]


def peft_config(hp: LoraHyperparameters, targets: list[str], model_type: str):  # noqa: ANN201 - a PeftConfig
    """The PeftConfig for the method; `targets` come from `check_configuration`."""
    from peft import IA3Config, LoHaConfig, LoKrConfig, LoraConfig

    if hp.peft_method in LORA_FAMILY:
        return LoraConfig(
            task_type="CAUSAL_LM",
            r=hp.lora_r,
            lora_alpha=hp.lora_alpha,
            lora_dropout=hp.lora_dropout,
            target_modules=targets,
            use_rslora=hp.peft_method == "rslora",
            use_dora=hp.peft_method == "dora",
        )
    if hp.peft_method == "loha":
        return LoHaConfig(
            task_type="CAUSAL_LM",
            r=hp.lora_r,
            alpha=hp.lora_alpha,
            rank_dropout=hp.lora_dropout,
            target_modules=targets,
        )
    if hp.peft_method == "lokr":
        return LoKrConfig(
            task_type="CAUSAL_LM",
            r=hp.lora_r,
            alpha=hp.lora_alpha,
            rank_dropout=hp.lora_dropout,
            target_modules=targets,
        )
    return IA3Config(
        task_type="CAUSAL_LM", target_modules=targets, feedforward_modules=_ia3_feedforward(model_type, targets)
    )
