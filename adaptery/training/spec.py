"""What a fine-tuning run needs, as plain JSON-round-trippable data.

The spec is written by the platform and read by the training child process, so it holds only
paths and numbers, nothing tied to a database or an HTTP request.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


class LoraHyperparameters(BaseModel):
    # Unknown keys are refused so a typo ("learning_rat") fails loudly instead of being ignored.
    model_config = ConfigDict(extra="forbid")

    n_epochs: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    learning_rate: float = Field(gt=0)
    lora_r: int = Field(ge=1)
    lora_alpha: int = Field(ge=1)
    lora_dropout: float = Field(ge=0, lt=1)
    target_modules: list[str] | str = "all-linear"
    max_seq_length: int = Field(default=1024, ge=8)
    seed: int = 42
    warmup_ratio: float = Field(default=0.0, ge=0, lt=1)


class TrainingSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    base_model: str = Field(min_length=1, description="A local model directory or a Hugging Face hub id.")
    training_file: Path
    validation_file: Path | None = None
    output_dir: Path
    hyperparameters: LoraHyperparameters
