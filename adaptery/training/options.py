"""The training options a job may set beyond OpenAI's, checked once where the job is created.

OpenAI's hyperparameters object holds `n_epochs`, `batch_size`, `learning_rate_multiplier` (and
`beta` for DPO). Ours go in the same object, next to them:

    {"type": "supervised", "supervised": {"hyperparameters": {
        "n_epochs": 3, "peft_method": "dora", "lora_r": 8, "target_modules": ["q_proj", "v_proj"],
        "packing": true, "validation_split": 0.1, "early_stopping_patience": 2, "keep_checkpoints": 5}}}

Every option is a field of `LoraHyperparameters` (its one definition, types and bounds included);
`learning_rate` replaces the base model's recommended rate, which `learning_rate_multiplier`
then scales. `keep_checkpoints` (default 3, 1 to 1000) is how many of the latest checkpoints the platform
keeps; the best one (lowest validation loss, else training loss) is kept besides them.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from adaptery.training.methods import ConfigurationError
from adaptery.training.spec import LoraHyperparameters

METHODS = ("supervised", "dpo")
OPENAI_KEYS: dict[str, tuple[str, ...]] = {
    "supervised": ("n_epochs", "batch_size", "learning_rate_multiplier"),
    "dpo": ("n_epochs", "batch_size", "learning_rate_multiplier", "beta"),
}
# The seed is OpenAI's top-level `seed`; epochs, batch size and beta are OpenAI's knobs.
OPTION_KEYS: tuple[str, ...] = tuple(
    name for name in LoraHyperparameters.model_fields if name not in ("n_epochs", "batch_size", "seed", "beta")
)


def _first_error(exc: ValidationError) -> ConfigurationError:
    error = exc.errors()[0]
    if not error["loc"]:  # a rule between fields (processes over nodes)
        return ConfigurationError(error["msg"].removeprefix("Value error, "), param="hyperparameters")
    field = str(error["loc"][0])  # deeper parts name union branches and list items, not fields
    message = "must be 'all-linear' or a list of module names" if field == "target_modules" else error["msg"]
    return ConfigurationError(f"{field}: {message} (got {error.get('input')!r})", param=f"hyperparameters.{field}")


def resolve_options(
    requested: dict[str, Any], defaults: dict[str, Any], *, method: str, has_validation_file: bool
) -> dict[str, Any]:
    """Our options from `requested` (OpenAI's keys are ignored here) over `defaults`, every one filled in.

    ConfigurationError names the field of the first problem.
    """
    unknown = sorted(set(requested) - set(OPTION_KEYS) - set(OPENAI_KEYS[method]))
    if unknown:
        known = ", ".join((*OPENAI_KEYS[method], *OPTION_KEYS))
        raise ConfigurationError(
            f"unknown hyperparameter(s) for {method}: {', '.join(unknown)} (known: {known})", param="hyperparameters"
        )
    chosen = {name: value for name, value in requested.items() if name in OPTION_KEYS}
    base = {name: value for name, value in defaults.items() if name in OPTION_KEYS}
    try:
        # n_epochs and batch_size stand in for OpenAI's knobs (checked elsewhere, the batch against the
        # processes it is split among too); only our options are kept.
        processes = chosen.get("processes", 1)
        batch = processes if isinstance(processes, int) and processes >= 1 else 1  # any batch that splits evenly
        stand_ins = {"n_epochs": 1, "batch_size": batch}
        checked = LoraHyperparameters.model_validate({**base, **chosen, **stand_ins}, strict=True)
    except ValidationError as exc:
        raise _first_error(exc) from None
    options = checked.model_dump(include=set(OPTION_KEYS))
    validating = has_validation_file or options["validation_split"] > 0
    if has_validation_file and options["validation_split"] > 0:
        raise ConfigurationError(
            "give either a validation_file or a validation_split, not both", param="hyperparameters.validation_split"
        )
    for name in ("early_stopping_patience", "eval_every_steps"):
        if options[name] is not None and not validating:
            raise ConfigurationError(
                f"{name} needs validation data: a validation_file, or validation_split above 0",
                param=f"hyperparameters.{name}",
            )
    if method == "dpo" and options["packing"]:
        raise ConfigurationError(
            "packing applies to supervised fine-tuning; DPO compares whole preference pairs",
            param="hyperparameters.packing",
        )
    return options
