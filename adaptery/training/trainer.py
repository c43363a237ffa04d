"""Fine-tuning a causal LM with PEFT: supervised (transformers' Trainer) or DPO (TRL's DPOTrainer).

Progress is reported through `on_event` as plain dicts; cancellation and pausing are polled
through `should_stop` / `should_pause`, so the caller (the runner child process, a test) decides
how all three travel.

Checkpoints are the Trainer's own (`checkpoint-<step>/` under the spec's checkpoint_dir: the PEFT
adapter in safetensors, optimizer, scheduler, RNG and trainer state), written every
`checkpoint_every_steps` steps and at the end of every epoch (after that epoch's evaluation).
Everything in them loads with safetensors or `torch.load(weights_only=True)` (for the RNG state
with only numpy's array and dtype reconstructors allowed, as the Trainer does); the pickled
`training_args.bin` the Trainer also writes is removed, since resuming never reads it.
"""

from __future__ import annotations

import math
import os
import random
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.trainer_callback import PrinterCallback

from adaptery.engine.loading import load_causal_lm, resolve_model_path
from adaptery.training.data import (
    IGNORE_INDEX,
    ChatDataset,
    DatasetError,
    load_chat_dataset,
    pack_examples,
    read_chat_records,
    read_preference_records,
)
from adaptery.training.methods import ConfigurationError, check_configuration, module_inventory, peft_config
from adaptery.training.spec import LoraHyperparameters, TrainingSpec

Event = dict[str, Any]
CHECKPOINT_PREFIX = "checkpoint-"
PICKLED_TRAINING_ARGS = "training_args.bin"


class TrainingCancelled(Exception):
    """`should_stop` asked for the run to end; no adapter was saved."""


class CheckpointError(ValueError):
    """A checkpoint or adapter to start from is incomplete."""


class TrainingPaused(Exception):
    """`should_pause` asked for a pause; the checkpoint of `step` was saved (and reported) first."""

    def __init__(self, step: int, checkpoint: Path | None) -> None:
        super().__init__(f"paused at step {step}")
        self.step = step
        self.checkpoint = checkpoint


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    train_loss: float  # loss of the last optimisation step
    trained_tokens: int  # non-padding tokens processed, over all epochs (this process only)
    seconds: float  # wall time of the whole run: loading, training and saving
    eval_loss: float | None = None  # of the adapter saved (the best one when early stopping)
    stopped_early: bool = False
    useful_token_ratio: float | None = None  # real tokens / tokens computed, padding included (supervised)
    peft_type: str = "LORA"
    rank: int | None = None
    accelerator: bool = False  # trained on an accelerator (CUDA): its wall time is accelerator time


class _PadCollator:
    """Right-pads a batch: pad id for inputs, -100 for labels; attention mask 0, or for packed rows
    position ids that restart, so the padding forms a block of its own that nothing attends to."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, examples: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(example["input_ids"]) for example in examples)

        def padded(key: str, pad: int) -> torch.Tensor:
            return torch.tensor([ex[key] + [pad] * (width - len(ex[key])) for ex in examples], dtype=torch.long)

        batch = {"input_ids": padded("input_ids", self.pad_token_id), "labels": padded("labels", IGNORE_INDEX)}
        if "position_ids" in examples[0]:
            positions = [ex["position_ids"] + list(range(width - len(ex["position_ids"]))) for ex in examples]
            batch["position_ids"] = torch.tensor(positions, dtype=torch.long)
        else:
            mask = [[1] * len(ex["input_ids"]) + [0] * (width - len(ex["input_ids"])) for ex in examples]
            batch["attention_mask"] = torch.tensor(mask, dtype=torch.long)
        batch["num_real_tokens"] = torch.tensor(sum(len(ex["input_ids"]) for ex in examples))
        return batch


class LengthGroupedSampler(torch.utils.data.Sampler[int]):
    """A random order in which each batch holds examples of similar length, so little padding is computed.

    As transformers' LengthGroupedSampler (shuffle, cut into mega-batches of 50 batches, sort each by
    length, cut into batches), but drawn from its own generator seeded by (seed, epoch): a run resumed
    mid-epoch sees the very order the interrupted run saw. Batch order within a mega-batch is shuffled
    too, keeping the short final batch last so later batches stay aligned.
    """

    MEGA_BATCHES = 50

    def __init__(self, lengths: list[int], batch_size: int, seed: int) -> None:
        self.lengths = lengths
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:  # the Trainer calls this at the start of every epoch
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        span = self.batch_size * self.MEGA_BATCHES
        batches = []
        for start in range(0, len(order), span):
            mega = sorted(order[start : start + span], key=lambda index: -self.lengths[index])
            batches += [mega[i : i + self.batch_size] for i in range(0, len(mega), self.batch_size)]
        tail = [batches.pop()] if len(batches[-1]) < self.batch_size else []
        shuffled = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        return iter([index for batch in shuffled + tail for index in batch])


class _SupervisedTrainer(Trainer):
    """The Trainer, batching examples of similar length and counting real against computed tokens."""

    real_tokens = 0
    computed_tokens = 0

    def _get_train_sampler(self, train_dataset=None):
        dataset = self.train_dataset if train_dataset is None else train_dataset
        lengths = [len(example["input_ids"]) for example in dataset]
        # Grouped by the global batch: the processes of a group are dealt its consecutive slices, so each step
        # trains on the examples one process would have.
        global_batch = self.args.per_device_train_batch_size * self.args.world_size
        return LengthGroupedSampler(lengths, global_batch, self.args.data_seed)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        real = inputs.pop("num_real_tokens", None)
        if real is not None and model.training:
            self.real_tokens += int(real)
            self.computed_tokens += inputs["input_ids"].numel()
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)


def phase(name: str, message: str) -> Event:
    """A message that also says what the run is doing now (the job page shows it while nothing else moves)."""
    return {"type": "message", "level": "info", "message": message, "phase": name}


def _finite(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def _is_epoch_end(epoch: float | None) -> bool:
    # The Trainer sets epoch = e + (step + 1) / steps_in_epoch, exactly integral at an epoch's last step.
    return epoch is not None and epoch > 0 and abs(epoch - round(epoch)) < 1e-9


def fsync_tree(path: Path) -> None:
    """Flush every file of `path`, then the directories, so a complete checkpoint survives a crash."""
    for item in sorted(path.rglob("*")):
        if item.is_file():
            fd = os.open(item, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for directory in [*sorted(p for p in path.rglob("*") if p.is_dir()), path, path.parent]:
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class _EventCallback(TrainerCallback):
    """Turns Trainer logs into our events, polls cancel/pause after every step, checkpoints each epoch.

    A step's metrics event is held until that step's evaluation (if any) has run, so it carries
    the eval loss; it goes out before the next step starts, before a checkpoint event, or at the end.
    """

    def __init__(
        self,
        on_event: Callable[[Event], None],
        should_stop: Callable[[], bool],
        should_pause: Callable[[], bool],
        intro: str,
    ) -> None:
        self.on_event = on_event
        self.should_stop = should_stop
        self.should_pause = should_pause
        self.intro = intro
        self.stop_reason: str | None = None  # "cancel" or "pause"
        self.last_loss = math.nan
        self.last_eval_loss: float | None = None
        self.last_saved_step = -1
        self.last_checkpoint: Path | None = None
        self.pending: Event | None = None
        self._mark = (time.monotonic(), 0)

    def _flush(self) -> None:
        if self.pending is not None:
            self.on_event(self.pending)
            self.pending = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._mark = (time.monotonic(), state.num_input_tokens_seen)
        self.last_saved_step = state.global_step  # a resumed run's checkpoint already exists
        resumed = f", resuming at step {state.global_step}" if state.global_step else ""
        self.on_event(phase("first_step", f"{self.intro}, {state.max_steps} steps{resumed}"))

    def on_step_begin(self, args, state, control, **kwargs):
        self._flush()

    def on_step_end(self, args, state, control, **kwargs):
        if self.should_stop():
            self.stop_reason = "cancel"
            control.should_training_stop = True
            control.should_save = control.should_evaluate = False
            return
        if self.should_pause():
            self.stop_reason = "pause"
            control.should_training_stop = True
            control.should_save = True
        if _is_epoch_end(state.epoch):
            # The epoch's checkpoint is written in on_epoch_end, after its evaluation, so its
            # metrics include the eval loss.
            control.should_save = False

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.stop_reason == "cancel":
            control.should_save = control.should_evaluate = False
        elif self.stop_reason == "pause" and not _is_epoch_end(state.epoch):
            control.should_evaluate = False  # a partial epoch; its checkpoint is already written
        elif state.global_step > self.last_saved_step:
            control.should_save = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs:
            return  # the end-of-training summary and evaluation logs have no step loss
        now, tokens = time.monotonic(), state.num_input_tokens_seen
        elapsed = now - self._mark[0]
        tokens_per_second = (tokens - self._mark[1]) / elapsed if elapsed > 0 else 0.0
        self._mark = (now, tokens)
        self.last_loss = float(logs["loss"])
        self._flush()
        self.pending = {
            "type": "metrics",
            "step": state.global_step,
            "total_steps": state.max_steps,
            "epoch": float(state.epoch or 0.0),
            "train_loss": self.last_loss,
            "learning_rate": float(logs.get("learning_rate", 0.0)),
            "grad_norm": _finite(logs.get("grad_norm")),
            "tokens_per_second": tokens_per_second,
        }
        # DPO's own measures: how often and by how much the preferred answer wins.
        for source, name in (("rewards/accuracies", "reward_accuracy"), ("rewards/margins", "reward_margin")):
            if source in logs:
                self.pending[name] = _finite(logs[source])

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if not metrics or "eval_loss" not in metrics:
            return
        self.last_eval_loss = float(metrics["eval_loss"])
        if self.pending is None or self.pending["step"] != state.global_step:
            self._flush()
            self.pending = {
                "type": "metrics",
                "step": state.global_step,
                "total_steps": state.max_steps,
                "epoch": float(state.epoch or 0.0),
            }
        # eval_loss is our name; valid_loss is what OpenAI's metric events call it.
        self.pending["eval_loss"] = self.pending["valid_loss"] = self.last_eval_loss
        self._flush()

    def on_save(self, args, state, control, **kwargs):
        self._flush()
        if torch.distributed.is_initialized():
            torch.distributed.barrier()  # every rank has written its part (its RNG state) before it is reported
        if state.global_step == self.last_saved_step or not state.is_world_process_zero:
            return
        self.last_saved_step = state.global_step
        path = Path(args.output_dir) / f"{CHECKPOINT_PREFIX}{state.global_step}"
        (path / PICKLED_TRAINING_ARGS).unlink(missing_ok=True)
        fsync_tree(path)
        self.last_checkpoint = path
        self.on_event(
            {
                "type": "checkpoint",
                "step": state.global_step,
                "epoch": float(state.epoch or 0.0),
                "path": str(path),
                "metrics": {"train_loss": _finite(self.last_loss), "eval_loss": self.last_eval_loss},
            }
        )

    def on_train_end(self, args, state, control, **kwargs):
        self._flush()


class _EarlyStopping(TrainerCallback):
    """Stop after `patience` evaluations without improving the eval loss by more than `threshold`;
    remember the best adapter so it is the one saved. A resumed run replays the evaluations in the
    checkpoint's log history, so patience carries over."""

    def __init__(self, patience: int, threshold: float) -> None:
        self.patience = patience
        self.threshold = threshold
        self.best: float | None = None
        self.best_step = 0
        self.last_step = 0  # of the latest evaluation
        self.misses = 0
        self.stopped = False
        self.best_weights: dict[str, torch.Tensor] | None = None

    def _observe(self, loss: float, step: int) -> bool:
        self.last_step = step
        if self.best is None or loss < self.best - self.threshold:
            self.best, self.best_step, self.misses = loss, step, 0
            return True
        self.misses += 1
        return False

    def on_train_begin(self, args, state, control, **kwargs):
        for entry in state.log_history:
            if "eval_loss" in entry:
                self._observe(float(entry["eval_loss"]), int(entry.get("step", 0)))

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
        if not metrics or "eval_loss" not in metrics:
            return
        if self._observe(float(metrics["eval_loss"]), state.global_step) and model is not None:
            self.best_weights = {
                name: param.detach().clone() for name, param in model.named_parameters() if param.requires_grad
            }
        if self.misses >= self.patience:
            self.stopped = True
            control.should_training_stop = True

    def restore_best(self, model: torch.nn.Module, checkpoint_dir: Path) -> str | None:
        """Put the best adapter back into `model`; a message saying what was kept."""
        if self.best_weights is not None:
            parameters = dict(model.named_parameters())
            with torch.no_grad():
                for name, value in self.best_weights.items():
                    parameters[name].copy_(value)
            return f"kept the adapter of step {self.best_step} (best eval loss {self.best:.4f})"
        saved = checkpoint_dir / f"{CHECKPOINT_PREFIX}{self.best_step}" / "adapter_model.safetensors"
        if self.best_step and saved.is_file():  # best before a resume: only its checkpoint has it
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            set_peft_model_state_dict(model, load_file(str(saved)))
            return f"kept the adapter of step {self.best_step} (best eval loss {self.best:.4f})"
        return None


@contextmanager
def _in_validation_file():
    # Training-file messages pass through as they are; validation-file ones get a prefix so the
    # user knows which file the line number refers to.
    try:
        yield
    except DatasetError as exc:
        raise DatasetError(f"validation file: {exc}") from exc


def _dataset_warnings(dataset: ChatDataset, max_seq_length: int) -> list[str]:
    messages = []
    if dataset.truncated:
        messages.append(f"{dataset.truncated} example(s) were cut at max_seq_length={max_seq_length}")
    if dataset.dropped:
        lines = ", ".join(str(line) for line in dataset.dropped[:10])
        messages.append(f"{len(dataset.dropped)} example(s) have nothing to train on, skipped (lines {lines})")
    return messages


def split_validation(examples: list, fraction: float, seed: int) -> tuple[list, list]:
    """A seeded hold-out of `fraction` of the examples (at least one), as (train, validation)."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held = max(1, round(len(examples) * fraction))
    if held >= len(examples):
        raise DatasetError(
            f"validation_split={fraction} leaves no training examples out of {len(examples)}; "
            "upload a validation file or use more data"
        )
    held_out = set(order[:held])
    kept = [example for i, example in enumerate(examples) if i not in held_out]
    return kept, [example for i, example in enumerate(examples) if i in held_out]


def _check_files(spec: TrainingSpec) -> None:
    """Malformed files fail here, in milliseconds, rather than after loading a large base model."""
    read = read_preference_records if spec.method == "dpo" else read_chat_records
    read(spec.training_file)
    if spec.validation_file is not None:
        with _in_validation_file():
            read(spec.validation_file)
    if spec.resume_from is not None:
        needed = ("trainer_state.json", "adapter_model.safetensors", "adapter_config.json")
        missing = [name for name in needed if not (spec.resume_from / name).is_file()]
        if missing:
            raise CheckpointError(f"cannot resume: the checkpoint has no {', '.join(missing)}")
    if spec.init_adapter is not None and not (spec.init_adapter / "adapter_config.json").is_file():
        raise CheckpointError("the adapter to start from has no adapter_config.json")


def _load_base(spec: TrainingSpec, hp: LoraHyperparameters, cuda: bool):
    # bf16 weights halve GPU memory; PEFT keeps the adapter itself in float32 for stable updates.
    dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    if not hp.quantized:
        model, tokenizer = load_causal_lm(spec.base_model, dtype=dtype, device="cuda" if cuda else "cpu")
        return model, tokenizer, dtype
    # QLoRA: the frozen base in 4-bit NF4 (check_configuration has made sure bitsandbytes and CUDA exist).
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    model_dir = resolve_model_path(spec.base_model)
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
    )
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir,
        quantization_config=quantization,
        dtype=dtype,
        use_safetensors=True,
        trust_remote_code=False,
        local_files_only=True,
        device_map={"": 0},
    )
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=True), tokenizer, dtype


def _wrap_peft(spec: TrainingSpec, hp: LoraHyperparameters, model, config):  # noqa: ANN001, ANN202
    from peft import PeftModel, get_peft_model

    with warnings.catch_warnings():
        # PEFT 0.21 still reads the `is_gradient_checkpointing` property that transformers 5 deprecated.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        if spec.init_adapter is not None:
            return PeftModel.from_pretrained(model, spec.init_adapter, is_trainable=True)
        model = get_peft_model(model, config)
    if hp.lora_init == "loftq" and spec.resume_from is None:
        from peft import replace_lora_weights_loftq

        model_dir = resolve_model_path(spec.base_model)
        replace_lora_weights_loftq(model, model_path=str(next(model_dir.glob("*.safetensors"))))
    return model


def _group_arguments(hp: LoraHyperparameters, *, cuda: bool) -> dict[str, Any]:
    """How the processes of a job share the work (the runner has joined them in one group already)."""
    if hp.processes == 1:
        return {}
    arguments: dict[str, Any] = {
        "ddp_backend": "nccl" if cuda else "gloo",
        "ddp_find_unused_parameters": False,  # every adapter weight takes part in each step
    }
    if hp.distributed == "fsdp":
        if not cuda:  # accelerate shards only across accelerators; on CPUs it would quietly run DDP
            raise ConfigurationError(
                "distributed='fsdp' shards the model across GPUs; this machine has none (use 'ddp')",
                param="hyperparameters.distributed",
            )
        arguments["fsdp"] = True
        arguments["fsdp_config"] = {"version": 2, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP"}
    return arguments


def _arguments(spec: TrainingSpec, hp: LoraHyperparameters, *, cuda: bool, dtype, evaluate: bool) -> dict[str, Any]:
    per_process = hp.batch_size // hp.processes  # batch_size is the global batch
    return {
        **_group_arguments(hp, cuda=cuda),
        "output_dir": str(spec.checkpoint_dir),
        "num_train_epochs": hp.n_epochs,
        "per_device_train_batch_size": per_process,
        "per_device_eval_batch_size": per_process,
        "gradient_accumulation_steps": hp.gradient_accumulation_steps,
        "learning_rate": hp.learning_rate,
        "lr_scheduler_type": hp.lr_scheduler,
        "warmup_steps": hp.warmup_ratio,  # transformers 5: a float in [0, 1) is a ratio of all steps
        "weight_decay": hp.weight_decay,
        "logging_strategy": "steps",
        "logging_steps": 1,
        "eval_strategy": ("steps" if hp.eval_every_steps else "epoch") if evaluate else "no",
        "eval_steps": hp.eval_every_steps,
        "save_strategy": "steps",
        "save_steps": spec.checkpoint_every_steps,
        "activation_checkpointing": hp.quantized,  # QLoRA: trade compute for the memory it exists to save
        "report_to": "none",
        "disable_tqdm": True,
        "use_cpu": not cuda,
        "bf16": dtype == torch.bfloat16,
        "seed": hp.seed,
        "data_seed": hp.seed,
        "dataloader_num_workers": 0,
        "remove_unused_columns": False,
        "include_num_input_tokens_seen": "non_padding",
    }


def _supervised_data(spec: TrainingSpec, hp: LoraHyperparameters, tokenizer, on_event) -> tuple[list, list | None]:  # noqa: ANN001
    train_data = load_chat_dataset(spec.training_file, tokenizer, max_seq_length=hp.max_seq_length)
    for message in _dataset_warnings(train_data, hp.max_seq_length):
        on_event({"type": "message", "level": "warning", "message": message})
    examples, eval_examples = train_data.examples, None
    if spec.validation_file is not None:
        with _in_validation_file():
            validation = load_chat_dataset(spec.validation_file, tokenizer, max_seq_length=hp.max_seq_length)
        eval_examples = validation.examples
    elif hp.validation_split > 0:
        examples, eval_examples = split_validation(examples, hp.validation_split, hp.seed)
    if hp.packing or train_data.documents == train_data.records:  # documents: continued pre-training, packed
        rows = pack_examples(examples, hp.max_seq_length)
        on_event(
            {
                "type": "message",
                "level": "info",
                "message": f"Packed {len(examples)} examples into {len(rows)} row{'s' if len(rows) > 1 else ''} "
                f"of up to {hp.max_seq_length} tokens",
            }
        )
        examples = rows
    return examples, eval_examples


def _dpo_data(spec: TrainingSpec, hp: LoraHyperparameters):  # noqa: ANN202
    from datasets import Dataset

    pairs = read_preference_records(spec.training_file)
    eval_pairs = None
    if spec.validation_file is not None:
        with _in_validation_file():
            eval_pairs = read_preference_records(spec.validation_file)
    elif hp.validation_split > 0:
        pairs, eval_pairs = split_validation(pairs, hp.validation_split, hp.seed)
    return Dataset.from_list(pairs), Dataset.from_list(eval_pairs) if eval_pairs else None


def train(
    spec: TrainingSpec,
    on_event: Callable[[Event], None],
    should_stop: Callable[[], bool] = lambda: False,
    should_pause: Callable[[], bool] = lambda: False,
) -> TrainResult:
    """Fine-tune an adapter as `spec` says and save it (safetensors) with the tokenizer."""
    started = time.monotonic()
    hp = spec.hyperparameters
    if should_stop():
        raise TrainingCancelled()
    _check_files(spec)
    model_dir = resolve_model_path(spec.base_model)
    inventory = module_inventory(model_dir)
    targets = check_configuration(hp, inventory, max_rank=None)

    cuda = torch.cuda.is_available()
    _group_arguments(hp, cuda=cuda)  # refuses what this machine cannot run before a large base is loaded
    on_event(phase("loading_base", "Loading the base model"))
    model, tokenizer, dtype = _load_base(spec, hp, cuda)
    # Training needs no KV cache, and with one transformers ignores packed rows' position ids (each
    # example would attend to the ones packed before it).
    model.config.use_cache = False
    on_event(phase("preparing_data", "Preparing the training data"))
    if spec.method == "dpo":
        train_set, eval_set = _dpo_data(spec, hp)
        examples = len(train_set)
    else:
        train_set, eval_set = _supervised_data(spec, hp, tokenizer, on_event)
        examples = len(train_set)

    # The adapter's initialisation draws random numbers, so seed before it for reproducible runs.
    set_seed(hp.seed)
    config = peft_config(hp, targets, inventory.model_type)
    if spec.method == "supervised" or spec.init_adapter is not None:
        # DPO from an adapter: TRL keeps a frozen copy of it as the reference ("ref"), so the policy is held near
        # the adapter it continues (not the bare base), and trains the "default" copy.
        model = _wrap_peft(spec, hp, model, config)

    spec.output_dir.mkdir(parents=True, exist_ok=True)
    spec.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    arguments = _arguments(spec, hp, cuda=cuda, dtype=dtype, evaluate=eval_set is not None)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    early = (
        _EarlyStopping(hp.early_stopping_patience, hp.early_stopping_threshold)
        if hp.early_stopping_patience and eval_set is not None
        else None
    )
    what = {"lora": "LoRA", "rslora": "rsLoRA", "dora": "DoRA", "loha": "LoHa", "lokr": "LoKr", "ia3": "IA3"}
    rows = ("row" if hp.packing else "example") + ("s" if examples > 1 else "")
    device = ("GPU" if cuda else "CPU") + (f", {hp.processes} processes ({hp.distributed})" if hp.processes > 1 else "")

    def intro(trained: int, total: int) -> str:
        kind = "DPO" if spec.method == "dpo" else "supervised"
        return (
            f"Training {trained:,} {what[hp.peft_method]} parameters ({100 * trained / total:.2f}% of {total:,}), "
            f"{kind}, on {examples} {rows} for {hp.n_epochs} epoch{'s' if hp.n_epochs > 1 else ''} on {device}"
        )

    if spec.method == "dpo":
        from trl import DPOConfig, DPOTrainer

        args = DPOConfig(**arguments, beta=hp.beta, max_length=hp.max_seq_length)
        trainer = DPOTrainer(
            model=model,
            args=args,
            train_dataset=train_set,
            eval_dataset=eval_set,
            processing_class=tokenizer,
            peft_config=None if spec.init_adapter is not None else config,
        )
    else:
        trainer = _SupervisedTrainer(
            model=model,
            args=TrainingArguments(**arguments),
            data_collator=_PadCollator(pad_id if pad_id is not None else 0),
            train_dataset=train_set,
            eval_dataset=eval_set,
            processing_class=tokenizer,
        )
    trained, total = trainer.model.get_nb_trainable_parameters()
    callback = _EventCallback(on_event, should_stop, should_pause, intro(trained, total))
    trainer.add_callback(callback)
    if early is not None:
        trainer.add_callback(early)
    # disable_tqdm swaps the progress bar for a callback that print()s every log line; our
    # events replace both (and stdout belongs to the event stream in the runner).
    trainer.remove_callback(PrinterCallback)
    if should_stop():
        raise TrainingCancelled()
    trainer.train(resume_from_checkpoint=str(spec.resume_from) if spec.resume_from else None)
    if callback.stop_reason == "cancel":
        raise TrainingCancelled()
    if callback.stop_reason == "pause":
        raise TrainingPaused(trainer.state.global_step, callback.last_checkpoint)
    steps, tokens = trainer.state.global_step, int(trainer.state.num_input_tokens_seen)

    model = trainer.model
    eval_loss = callback.last_eval_loss
    if early is not None and early.best is not None and early.best_step != early.last_step:
        kept = early.restore_best(model, spec.checkpoint_dir)
        if kept:
            eval_loss = early.best
            on_event({"type": "message", "level": "info", "message": f"Early stopping: {kept}"})
    elif early is not None and early.stopped:
        on_event({"type": "message", "level": "info", "message": f"Early stopping after step {steps}"})
    on_event(phase("saving", "Saving the adapter"))
    if "ref" in getattr(model, "peft_config", {}):  # DPO's frozen reference copy is not part of the result
        model.delete_adapter("ref")
    if trainer.is_fsdp_enabled:
        trainer.save_model(str(spec.output_dir))  # every rank: the sharded adapter is gathered, rank 0 writes it
    elif trainer.is_world_process_zero():  # one writer of the adapter for a whole group
        model.save_pretrained(spec.output_dir, safe_serialization=True)
        tokenizer.save_pretrained(spec.output_dir)
    seconds = time.monotonic() - started
    on_event(
        {
            "type": "message",
            "level": "info",
            # Events reach end users: no server paths in them.
            "message": f"Finished {steps} steps in {seconds:.1f} s (final loss {callback.last_loss:.4f}); "
            "adapter saved",
        }
    )
    counted = getattr(trainer, "computed_tokens", 0)
    saved_config = model.peft_config["default"]
    return TrainResult(
        output_dir=spec.output_dir,
        steps=steps,
        train_loss=callback.last_loss,
        trained_tokens=tokens,
        seconds=seconds,
        eval_loss=eval_loss,
        stopped_early=bool(early and early.stopped),
        useful_token_ratio=trainer.real_tokens / counted if counted else None,
        peft_type=str(getattr(saved_config.peft_type, "value", saved_config.peft_type)),
        rank=getattr(saved_config, "r", None),
        accelerator=bool(cuda),
    )
