"""What a fine-tuning run needs, as plain JSON-round-trippable data.

The spec is written by the platform and read by the training child process, so it holds only
paths and numbers, nothing tied to a database or an HTTP request.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

# PEFT methods a job may ask for. rsLoRA and DoRA are LoRA variants (same weights, different
# scaling / a magnitude vector); LoHa and LoKr are Hadamard / Kronecker products; IA3 learns
# per-feature scales and has no rank.
PeftMethod = Literal["lora", "rslora", "dora", "loha", "lokr", "ia3"]
RANKED_METHODS: tuple[str, ...] = ("lora", "rslora", "dora", "loha", "lokr")
LORA_FAMILY: tuple[str, ...] = ("lora", "rslora", "dora")
Scheduler = Literal[
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "inverse_sqrt"
]
DEFAULT_CHECKPOINT_EVERY_STEPS = 100
# The platform keeps a job's latest few checkpoints and its best one (as OpenAI keeps three, and as the
# Trainer's save_total_limit with a best model does); `keep_checkpoints` asks for more.
DEFAULT_KEEP_CHECKPOINTS = 3
MAX_KEEP_CHECKPOINTS = 1000
MAX_PROCESSES = 64  # an agent also refuses more than it has (GPUs, or CPUs)
MAX_SEED = 2**31 - 1  # OpenAI's seed is a 32-bit integer, and so is the column a job's seed is stored in


class LoraHyperparameters(BaseModel):
    """Every knob of a run. The name predates the non-LoRA methods; `peft_method` picks the method."""

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

    peft_method: PeftMethod = "lora"
    # LoftQ initialises LoRA against the 4-bit quantised base (so it implies `quantization="4bit"`).
    lora_init: Literal["default", "loftq"] = "default"
    quantization: Literal["none", "4bit"] = "none"  # "4bit": QLoRA (bitsandbytes NF4 base, CUDA only)
    gradient_accumulation_steps: int = Field(default=1, ge=1)
    lr_scheduler: Scheduler = "linear"
    weight_decay: float = Field(default=0.0, ge=0)
    # Pack several short examples into each row of max_seq_length tokens (each still attends only to itself).
    packing: bool = False
    # Hold out this fraction of the training examples for evaluation when there is no validation file.
    validation_split: float = Field(default=0.0, ge=0, lt=0.5)
    eval_every_steps: int | None = Field(default=None, ge=1)  # default: evaluate once per epoch
    # Stop after this many evaluations without an eval-loss improvement; the best adapter is kept.
    early_stopping_patience: int | None = Field(default=None, ge=1)
    early_stopping_threshold: float = Field(default=0.0, ge=0)
    beta: float = Field(default=0.1, gt=0)  # DPO: how far the policy may move from the reference
    # How many of the latest checkpoints the platform keeps; the best (lowest validation loss, else training
    # loss) is kept besides them. Older ones are deleted with their files as new ones arrive.
    keep_checkpoints: int = Field(default=DEFAULT_KEEP_CHECKPOINTS, ge=1, le=MAX_KEEP_CHECKPOINTS)
    # Training processes (one per GPU on a GPU machine), launched as one torch.distributed group. `batch_size` stays
    # the global batch, split evenly among them, so a run's trajectory does not depend on how many there are.
    processes: int = Field(default=1, ge=1, le=MAX_PROCESSES)
    # How the processes share the model: DDP (a copy each, gradients averaged), or FSDP (parameters sharded, for a
    # base that does not fit one device).
    distributed: Literal["ddp", "fsdp"] = "ddp"
    # Machines the processes are spread over, evenly (a Slurm agent's job; a local agent has one).
    nodes: int = Field(default=1, ge=1, le=MAX_PROCESSES)

    @model_validator(mode="after")
    def _work_splits_evenly(self) -> Self:
        if self.processes % self.nodes:
            raise ValueError(f"{self.processes} processes do not spread evenly over {self.nodes} nodes")
        if self.batch_size % self.processes:
            raise ValueError(
                f"batch_size {self.batch_size} does not split evenly among {self.processes} processes: "
                "use a multiple of processes"
            )
        return self

    @property
    def quantized(self) -> bool:
        return self.quantization == "4bit" or self.lora_init == "loftq"


TrainingHyperparameters = LoraHyperparameters


class TrainingSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    base_model: str = Field(min_length=1, description="A local model directory or a Hugging Face hub id.")
    method: Literal["supervised", "dpo"] = "supervised"
    training_file: Path
    validation_file: Path | None = None
    output_dir: Path
    hyperparameters: LoraHyperparameters
    checkpoint_dir: Path | None = Field(
        default=None, description="Where checkpoint-<step> directories are written; default: <output_dir>-checkpoints."
    )
    resume_from: Path | None = Field(
        default=None, description="A checkpoint directory to continue from (same step, optimizer, schedule, RNG)."
    )
    checkpoint_every_steps: int = Field(default=DEFAULT_CHECKPOINT_EVERY_STEPS, ge=1)
    init_adapter: Path | None = Field(
        default=None,
        description="Start from this PEFT adapter's weights (fresh optimizer and schedule). With resume_from too "
        "(a run that started from it, interrupted): its shape, and DPO's reference; the weights are the checkpoint's.",
    )

    @model_validator(mode="after")
    def _default_checkpoint_dir(self) -> Self:
        if self.checkpoint_dir is None:
            self.checkpoint_dir = self.output_dir.with_name(self.output_dir.name + "-checkpoints")
        return self
