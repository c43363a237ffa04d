"""What a job asks for, resolved and refused at creation (a 400 naming the field) before any compute."""

from __future__ import annotations

from pathlib import Path

import pytest

from adaptery.db import models as m
from adaptery.engine.demo_model import FINETUNE_DEFAULTS
from adaptery.services import finetuning
from adaptery.services.errors import InvalidRequest
from adaptery.settings import Settings
from adaptery.training.methods import ConfigurationError
from adaptery.training.options import OPTION_KEYS, resolve_options
from adaptery.training.spec import LoraHyperparameters, TrainingSpec


def options(requested: dict, *, method: str = "supervised", has_validation_file: bool = False) -> dict:
    return resolve_options(requested, FINETUNE_DEFAULTS, method=method, has_validation_file=has_validation_file)


def test_options_are_filled_from_the_base_model_defaults() -> None:
    resolved = options({"peft_method": "dora", "lora_r": 8, "packing": True, "n_epochs": 2})
    assert set(resolved) == set(OPTION_KEYS)
    assert resolved["peft_method"] == "dora" and resolved["lora_r"] == 8 and resolved["packing"] is True
    assert resolved["learning_rate"] == FINETUNE_DEFAULTS["learning_rate"]
    assert resolved["lora_alpha"] == FINETUNE_DEFAULTS["lora_alpha"]
    assert resolved["lr_scheduler"] == "linear" and resolved["gradient_accumulation_steps"] == 1


@pytest.mark.parametrize(
    ("requested", "kwargs", "param", "message"),
    [
        ({"lora_r": "8"}, {}, "hyperparameters.lora_r", "lora_r: Input should be a valid integer (got '8')"),
        ({"lora_r": True}, {}, "hyperparameters.lora_r", "lora_r: Input should be a valid integer"),
        ({"lora_dropout": 1.5}, {}, "hyperparameters.lora_dropout", "lora_dropout: Input should be less than 1"),
        ({"peft_method": "prefix"}, {}, "hyperparameters.peft_method", "peft_method: Input should be 'lora'"),
        ({"lr_scheduler": "wavy"}, {}, "hyperparameters.lr_scheduler", "lr_scheduler: Input should be 'linear'"),
        ({"target_modules": [1]}, {}, "hyperparameters.target_modules", "must be 'all-linear' or a list"),
        ({"warp": 9}, {}, "hyperparameters", "unknown hyperparameter(s) for supervised: warp (known: n_epochs"),
        ({"beta": 0.2}, {}, "hyperparameters", "unknown hyperparameter(s) for supervised: beta"),
        (
            {"early_stopping_patience": 2},
            {},
            "hyperparameters.early_stopping_patience",
            "early_stopping_patience needs validation data: a validation_file, or validation_split above 0",
        ),
        ({"eval_every_steps": 5}, {}, "hyperparameters.eval_every_steps", "eval_every_steps needs validation data"),
        (
            {"validation_split": 0.1},
            {"has_validation_file": True},
            "hyperparameters.validation_split",
            "give either a validation_file or a validation_split, not both",
        ),
        ({"packing": True}, {"method": "dpo"}, "hyperparameters.packing", "packing applies to supervised"),
        ({"keep_checkpoints": 0}, {}, "hyperparameters.keep_checkpoints", "keep_checkpoints: Input should be greater"),
        ({"keep_checkpoints": 2.5}, {}, "hyperparameters.keep_checkpoints", "keep_checkpoints: Input should be a"),
    ],
    ids=[
        "string-rank",
        "bool-rank",
        "dropout",
        "method",
        "scheduler",
        "modules",
        "unknown",
        "beta-sft",
        "patience",
        "eval-steps",
        "both-validations",
        "dpo-packing",
        "keep-none",
        "keep-fraction",
    ],
)
def test_bad_options_name_the_field(requested: dict, kwargs: dict, param: str, message: str) -> None:
    with pytest.raises(ConfigurationError) as raised:
        options(requested, **kwargs)
    assert raised.value.param == param
    assert message in str(raised.value)


def test_early_stopping_with_a_split_or_file_is_accepted() -> None:
    assert options({"early_stopping_patience": 2, "validation_split": 0.1})["early_stopping_patience"] == 2
    assert options({"early_stopping_patience": 2}, has_validation_file=True)["validation_split"] == 0.0


# --- job creation: resolution and refusal --------------------------------------------------------------


@pytest.fixture
def demo_base(demo_model_dir: Path) -> m.BaseModel:
    return m.BaseModel(id="adaptery-demo", ref=str(demo_model_dir), finetune_defaults=FINETUNE_DEFAULTS)


@pytest.mark.parametrize(
    ("requested", "param", "message"),
    [
        ({"lora_r": 65}, "hyperparameters.lora_r", "rank 65 is above this server's maximum LoRA rank of 64"),
        ({"target_modules": ["attn"]}, "hyperparameters.target_modules", "target module 'attn' cannot be adapted"),
        ({"quantization": "4bit"}, "hyperparameters.quantization", "QLoRA (4-bit quantized base) needs bitsandbytes"),
        ({"lora_init": "loftq"}, "hyperparameters.lora_init", "LoftQ initialisation needs bitsandbytes"),
    ],
)
def test_job_creation_refuses_what_could_not_be_trained_or_served(
    demo_base: m.BaseModel, requested: dict, param: str, message: str
) -> None:
    settings = Settings(max_lora_rank=64)
    with pytest.raises(InvalidRequest) as raised:
        finetuning._training_options(
            requested, demo_base, method="supervised", has_validation_file=False, settings=settings
        )
    assert raised.value.status == 400 and raised.value.param == param
    assert message in raised.value.message


def test_a_missing_base_model_is_refused(tmp_path: Path) -> None:
    base = m.BaseModel(id="gone", ref=str(tmp_path / "gone"), finetune_defaults={})
    with pytest.raises(InvalidRequest, match="the base model's files are not available") as raised:
        finetuning._training_options({}, base, method="supervised", has_validation_file=False, settings=Settings())
    assert raised.value.param == "model"


def test_a_job_s_options_reach_the_training_spec(demo_base: m.BaseModel, tmp_path: Path) -> None:
    requested = {"n_epochs": 2, "learning_rate_multiplier": 0.5, "peft_method": "loha", "lora_r": 4, "packing": True}
    resolved = finetuning.resolve_hyperparameters(requested, demo_base.finetune_defaults)
    chosen = finetuning._training_options(
        requested, demo_base, method="supervised", has_validation_file=False, settings=Settings()
    )
    job = m.FineTuningJob(
        hyperparameters=resolved,
        method={"type": "supervised", "supervised": {"hyperparameters": {**resolved, **chosen}}},
        seed=7,
    )
    arguments = finetuning.training_arguments(job, demo_base)
    hp = LoraHyperparameters(**arguments)  # every key is a field the runner's spec accepts
    assert (hp.peft_method, hp.lora_r, hp.packing, hp.n_epochs, hp.seed) == ("loha", 4, True, 2, 7)
    assert hp.learning_rate == pytest.approx(FINETUNE_DEFAULTS["learning_rate"] * 0.5)
    spec = TrainingSpec(base_model="m", training_file="t", output_dir=tmp_path / "a", hyperparameters=hp)
    assert spec.checkpoint_dir == tmp_path / "a-checkpoints"


def test_dpo_jobs_carry_beta_and_their_method(demo_base: m.BaseModel) -> None:
    resolved = finetuning.resolve_hyperparameters({"beta": 0.3}, demo_base.finetune_defaults, "dpo")
    assert resolved["beta"] == 0.3
    assert finetuning.resolve_hyperparameters({"beta": "auto"}, {}, "dpo")["beta"] == 0.1
    with pytest.raises(InvalidRequest, match="beta must be 'auto' or a number above 0 and at most 2"):
        finetuning.resolve_hyperparameters({"beta": 3}, {}, "dpo")
    job = m.FineTuningJob(
        hyperparameters=resolved, method={"type": "dpo", "dpo": {"hyperparameters": resolved}}, seed=1
    )
    assert finetuning.training_method(job) == "dpo"
    assert LoraHyperparameters(**finetuning.training_arguments(job, demo_base)).beta == 0.3


def test_jobs_from_before_the_options_still_train(demo_base: m.BaseModel) -> None:
    job = m.FineTuningJob(
        hyperparameters={"n_epochs": 1, "batch_size": 1, "learning_rate_multiplier": 1.0},
        method={"type": "supervised"},
        seed=1,
    )
    hp = LoraHyperparameters(**finetuning.training_arguments(job, demo_base))
    assert hp.peft_method == "lora" and hp.lora_r == FINETUNE_DEFAULTS["lora_r"]


def test_unsupported_method_types_are_refused() -> None:
    with pytest.raises(InvalidRequest, match="method.type 'reinforcement' is not supported") as raised:
        finetuning._method_hyperparameters({"type": "reinforcement"})
    assert raised.value.param == "method.type"
    with pytest.raises(InvalidRequest, match="must be an object"):
        finetuning._method_hyperparameters({"type": "dpo", "dpo": {"hyperparameters": [1]}})


def test_processes_are_checked_where_the_job_is_made() -> None:
    assert options({"processes": 2})["processes"] == 2 and options({})["processes"] == 1
    for requested, param, message in (
        ({"processes": 0}, "hyperparameters.processes", "processes: Input should be greater than or equal to 1"),
        ({"processes": 65}, "hyperparameters.processes", "processes: Input should be less than or equal to 64"),
        ({"distributed": "zero3"}, "hyperparameters.distributed", "distributed: Input should be 'ddp' or 'fsdp'"),
        ({"processes": 3, "nodes": 2}, "hyperparameters", "3 processes do not spread evenly over 2 nodes"),
    ):
        with pytest.raises(ConfigurationError) as refused:
            options(requested)
        assert refused.value.param == param and str(refused.value).startswith(message), str(refused.value)
    # batch_size is the global batch: each process takes an equal share of it.
    with pytest.raises(ValueError, match="batch_size 3 does not split evenly among 2 processes"):
        LoraHyperparameters(**{**FINETUNE_DEFAULTS, "batch_size": 3, "processes": 2})
