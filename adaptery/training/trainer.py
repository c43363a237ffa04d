"""LoRA fine-tuning of a causal LM with transformers' Trainer and PEFT.

Progress is reported through `on_event` as plain dicts, and cancellation is polled through
`should_stop`, so the caller (the runner child process, a test) decides how both travel.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.trainer_callback import PrinterCallback

from adaptery.engine.loading import load_causal_lm
from adaptery.training.data import (
    IGNORE_INDEX,
    ChatDataset,
    DatasetError,
    load_chat_dataset,
    read_chat_records,
)
from adaptery.training.spec import TrainingSpec

Event = dict[str, Any]


class TrainingCancelled(Exception):
    """`should_stop` asked for the run to end; no adapter was saved."""


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    train_loss: float  # loss of the last optimisation step
    trained_tokens: int  # non-padding tokens processed, over all epochs
    seconds: float  # wall time of the whole run: loading, training and saving


class _PadCollator:
    """Right-pads a batch: pad id for inputs, 0 for the attention mask, -100 for labels."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, examples: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(example["input_ids"]) for example in examples)
        pads = {"input_ids": self.pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX}
        return {
            key: torch.tensor([ex[key] + [pad] * (width - len(ex[key])) for ex in examples], dtype=torch.long)
            for key, pad in pads.items()
        }


def _finite(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


class _EventCallback(TrainerCallback):
    """Turns Trainer logs into our events and polls `should_stop` after every step."""

    def __init__(self, on_event: Callable[[Event], None], should_stop: Callable[[], bool], intro: str) -> None:
        self.on_event = on_event
        self.should_stop = should_stop
        self.intro = intro
        self.cancelled = False
        self.last_loss = math.nan
        self._mark = (time.monotonic(), 0)

    def on_train_begin(self, args, state, control, **kwargs):
        self._mark = (time.monotonic(), state.num_input_tokens_seen)
        self.on_event({"type": "message", "level": "info", "message": f"{self.intro}, {state.max_steps} steps"})

    def on_step_end(self, args, state, control, **kwargs):
        if self.should_stop():
            self.cancelled = True
            control.should_training_stop = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs:
            return  # the end-of-training summary and evaluation logs have no step loss
        now, tokens = time.monotonic(), state.num_input_tokens_seen
        elapsed = now - self._mark[0]
        tokens_per_second = (tokens - self._mark[1]) / elapsed if elapsed > 0 else 0.0
        self._mark = (now, tokens)
        self.last_loss = float(logs["loss"])
        self.on_event(
            {
                "type": "metrics",
                "step": state.global_step,
                "total_steps": state.max_steps,
                "epoch": float(state.epoch or 0.0),
                "train_loss": self.last_loss,
                "learning_rate": float(logs.get("learning_rate", 0.0)),
                "grad_norm": _finite(logs.get("grad_norm")),
                "tokens_per_second": tokens_per_second,
            }
        )

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if metrics and "eval_loss" in metrics:
            self.on_event(
                {
                    "type": "eval",
                    "step": state.global_step,
                    "epoch": float(state.epoch or 0.0),
                    "valid_loss": float(metrics["eval_loss"]),
                }
            )


@contextmanager
def _in_validation_file() -> Iterator[None]:
    # Training-file messages pass through as they are; validation-file ones get a prefix so the
    # user knows which file the line number refers to.
    try:
        yield
    except DatasetError as exc:
        raise DatasetError(f"validation file: {exc}") from exc


def _dataset_warnings(dataset: ChatDataset, max_seq_length: int) -> list[str]:
    warnings = []
    if dataset.truncated:
        warnings.append(f"{dataset.truncated} example(s) were cut at max_seq_length={max_seq_length}")
    if dataset.dropped:
        lines = ", ".join(str(line) for line in dataset.dropped[:10])
        warnings.append(f"{len(dataset.dropped)} example(s) have nothing to train on, skipped (lines {lines})")
    return warnings


def train(
    spec: TrainingSpec,
    on_event: Callable[[Event], None],
    should_stop: Callable[[], bool] = lambda: False,
) -> TrainResult:
    """Fine-tune a LoRA adapter as `spec` says and save it (safetensors) with the tokenizer."""
    started = time.monotonic()
    hp = spec.hyperparameters
    if should_stop():
        raise TrainingCancelled()
    # Malformed files fail here, in milliseconds, rather than after loading a large base model.
    read_chat_records(spec.training_file)
    if spec.validation_file is not None:
        with _in_validation_file():
            read_chat_records(spec.validation_file)

    cuda = torch.cuda.is_available()
    # bf16 weights halve GPU memory; PEFT keeps the adapter itself in float32 for stable updates.
    dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    model, tokenizer = load_causal_lm(spec.base_model, dtype=dtype, device="cuda" if cuda else "cpu")

    train_data = load_chat_dataset(spec.training_file, tokenizer, max_seq_length=hp.max_seq_length)
    eval_data = None
    if spec.validation_file is not None:
        with _in_validation_file():
            eval_data = load_chat_dataset(spec.validation_file, tokenizer, max_seq_length=hp.max_seq_length)
    for warning in _dataset_warnings(train_data, hp.max_seq_length):
        on_event({"type": "message", "level": "warning", "message": warning})

    # The LoRA initialisation draws random numbers, so seed before it for reproducible runs.
    set_seed(hp.seed)
    lora = LoraConfig(
        task_type="CAUSAL_LM",
        r=hp.lora_r,
        lora_alpha=hp.lora_alpha,
        lora_dropout=hp.lora_dropout,
        target_modules=hp.target_modules,
    )
    with warnings.catch_warnings():
        # PEFT 0.21 still reads the `is_gradient_checkpointing` property that transformers 5 deprecated.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        model = get_peft_model(model, lora)
    trainable, total = model.get_nb_trainable_parameters()

    spec.output_dir.mkdir(parents=True, exist_ok=True)
    # Trainer wants a working directory; nothing is checkpointed (save_strategy="no"), and it is
    # removed at the end so the output directory holds only the adapter.
    scratch = Path(tempfile.mkdtemp(prefix=".trainer-", dir=spec.output_dir))
    try:
        args = TrainingArguments(
            output_dir=str(scratch),
            num_train_epochs=hp.n_epochs,
            per_device_train_batch_size=hp.batch_size,
            per_device_eval_batch_size=hp.batch_size,
            learning_rate=hp.learning_rate,
            lr_scheduler_type="linear",
            warmup_steps=hp.warmup_ratio,  # transformers 5: a float in [0, 1) is a ratio of all steps
            weight_decay=0.0,
            logging_strategy="steps",
            logging_steps=1,
            eval_strategy="epoch" if eval_data else "no",
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            use_cpu=not cuda,
            bf16=dtype == torch.bfloat16,
            seed=hp.seed,
            data_seed=hp.seed,
            dataloader_num_workers=0,
            remove_unused_columns=False,
            include_num_input_tokens_seen="non_padding",
        )
        intro = (
            f"Training {trainable:,} LoRA parameters ({100 * trainable / total:.2f}% of {total:,}) "
            f"on {len(train_data.examples)} examples "
            f"({train_data.trainable_tokens:,} trained tokens per epoch) "
            f"for {hp.n_epochs} epoch{'s' if hp.n_epochs > 1 else ''} on {'GPU' if cuda else 'CPU'}"
        )
        callback = _EventCallback(on_event, should_stop, intro)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        trainer = Trainer(
            model=model,
            args=args,
            data_collator=_PadCollator(pad_id if pad_id is not None else 0),
            train_dataset=train_data.examples,
            eval_dataset=eval_data.examples if eval_data else None,
            callbacks=[callback],
        )
        # disable_tqdm swaps the progress bar for a callback that print()s every log line; our
        # events replace both (and stdout belongs to the event stream in the runner).
        trainer.remove_callback(PrinterCallback)
        if should_stop():
            raise TrainingCancelled()
        trainer.train()
        if callback.cancelled:
            raise TrainingCancelled()
        steps, tokens = trainer.state.global_step, int(trainer.state.num_input_tokens_seen)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

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
    return TrainResult(spec.output_dir, steps, callback.last_loss, tokens, seconds)
