"""Training library: dataset validation and masking, the real demo fine-tune, and the runner process."""

from __future__ import annotations

import copy
import json
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from training_helpers import (
    GOOD,
    RUNNER,
    demo_spec,
    greedy_answer,
    of_type,
    run_runner,
    trained_text,
    write_jsonl,
    write_spec,
)

from adaptery.engine.demo_model import FINETUNE_DEFAULTS
from adaptery.engine.loading import load_causal_lm
from adaptery.training.data import IGNORE_INDEX, DatasetError, load_chat_dataset, tokenize_conversation
from adaptery.training.spec import LoraHyperparameters, TrainingSpec
from adaptery.training.trainer import TrainingCancelled, train


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread() -> Iterator[None]:
    # The runner trains on all CPUs but one; in-process tests do the same on this small machine,
    # since torch threads that compete with other processes for cores slow training 20x or more.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- dataset ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        ([GOOD, '{"messages": ['], "line 2: invalid JSON: Expecting value (column 15)"),
        (
            [
                GOOD,
                GOOD,
                {"messages": [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Yo"}]},
            ],
            "line 3: messages[1].role: unknown role 'bot' (expected system, user, assistant or tool)",
        ),
        (
            [{"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}]}],
            "line 1: messages: has no assistant message to learn from",
        ),
        (
            [
                GOOD,
                "",
                {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " "}]},
            ],
            "line 3: messages[1].content: is empty",
        ),
        ([{"prompt": "Hi", "completion": "Hello"}], "line 1: messages: must be a non-empty list of messages"),
        (
            [
                {
                    "messages": [
                        {"role": "user", "content": "Hi"},
                        {"role": "assistant", "content": "Yo", "weight": 0},
                    ]
                }
            ],
            "bad.jsonl: no trainable assistant tokens (every assistant message has weight 0 "
            "or lies beyond max_seq_length=1024)",
        ),
        ([], "bad.jsonl: no training examples (expected one JSON object per line with a 'messages' list)"),
    ],
    ids=["json", "role", "no-assistant", "empty-content", "not-chat", "all-weight-0", "empty-file"],
)
def test_bad_datasets_name_line_and_field(tmp_path: Path, demo_tokenizer, lines: list, expected: str) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(DatasetError) as raised:
        load_chat_dataset(path, demo_tokenizer, max_seq_length=1024)
    assert str(raised.value) == expected


CONVERSATION = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "Who leads the lab?"},
    {"role": "assistant", "content": "Dr. Okafor.", "weight": 0},
    {"role": "user", "content": "And the mascot?"},
    {"role": "assistant", "content": "A green tortoise."},
]


def test_only_weighted_assistant_tokens_are_trained(demo_tokenizer) -> None:
    example = tokenize_conversation(demo_tokenizer, CONVERSATION, max_seq_length=1024)
    assert len(example["input_ids"]) == len(example["labels"]) == len(example["attention_mask"])
    assert trained_text(demo_tokenizer, example) == "A green tortoise.<|end|>"
    trained = [i for i, label in enumerate(example["labels"]) if label != IGNORE_INDEX]
    assert all(example["labels"][i] == example["input_ids"][i] for i in trained)
    # The trained tokens are the tail of the sequence, right after the last <|assistant|>.
    assistant = demo_tokenizer.convert_tokens_to_ids("<|assistant|>")
    last_turn = max(i for i, token in enumerate(example["input_ids"]) if token == assistant)
    assert trained == list(range(last_turn + 1, len(example["input_ids"])))


def test_templates_without_generation_blocks_give_the_same_labels(demo_tokenizer) -> None:
    # Most hub templates have no {% generation %}: the assistant turns are then found by rendering
    # the conversation turn by turn, which must agree with the generation-mask path.
    plain = copy.deepcopy(demo_tokenizer)
    for tag in ("{% generation %}", "{% endgeneration %}"):
        plain.chat_template = plain.chat_template.replace(tag, "")
    assert "generation %" not in plain.chat_template
    for messages in (CONVERSATION, [{"role": "assistant", "content": "Opening line."}, *CONVERSATION[1:]]):
        expected = tokenize_conversation(demo_tokenizer, messages, max_seq_length=1024)
        assert tokenize_conversation(plain, messages, max_seq_length=1024) == expected


def test_truncation(demo_tokenizer, sample_chat: Path) -> None:
    example = tokenize_conversation(demo_tokenizer, CONVERSATION, max_seq_length=8)
    assert len(example["input_ids"]) == 8
    assert all(label == IGNORE_INDEX for label in example["labels"])
    with pytest.raises(DatasetError, match="no trainable assistant tokens"):
        load_chat_dataset(sample_chat, demo_tokenizer, max_seq_length=8)


def test_spec_round_trips_through_json(tmp_path: Path) -> None:
    spec = demo_spec(tmp_path / "model", tmp_path / "train.jsonl", tmp_path / "out", target_modules=["q_proj"])
    assert TrainingSpec.model_validate_json(spec.model_dump_json()) == spec
    with pytest.raises(ValueError, match="learning_rat"):
        LoraHyperparameters(**{**FINETUNE_DEFAULTS, "learning_rat": 1.0})


# --- the demo fine-tune ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_run(demo_model_dir: Path, sample_chat: Path, tmp_path_factory: pytest.TempPathFactory):
    """The documented demo: the sample dataset, the demo model's own defaults, trained once."""
    output_dir = tmp_path_factory.mktemp("demo-adapter")
    events: list[dict] = []
    result = train(demo_spec(demo_model_dir, sample_chat, output_dir), events.append)
    print(f"demo fine-tune: {result.steps} steps in {result.seconds:.1f} s, final loss {result.train_loss:.4f}")
    return result, events


def test_demo_fine_tune_reports_progress(demo_run) -> None:
    result, events = demo_run
    assert result.steps == 40  # 6 records, batch 4 -> 2 steps per epoch, 20 epochs
    assert result.train_loss < 0.5
    assert result.trained_tokens > 0 and result.seconds > 0
    # what the run is doing, in order, while it has no step to show yet (the job page shows the latest)
    assert [e["phase"] for e in events if "phase" in e] == ["loading_base", "preparing_data", "first_step", "saving"]
    assert "LoRA parameters" in next(e["message"] for e in events if e.get("phase") == "first_step")
    assert events[-1]["type"] == "message" and "adapter saved" in events[-1]["message"]
    # Events are shown to end users, so they must not reveal server paths.
    assert not any(str(result.output_dir.parent) in event.get("message", "") for event in events)
    metrics = [event for event in events if event["type"] == "metrics"]
    assert [event["step"] for event in metrics] == list(range(1, 41))
    assert set(metrics[0]) == {
        "type",
        "step",
        "total_steps",
        "epoch",
        "train_loss",
        "learning_rate",
        "grad_norm",
        "tokens_per_second",
    }
    assert metrics[-1]["total_steps"] == 40 and metrics[-1]["epoch"] == pytest.approx(20.0)
    assert metrics[-1]["train_loss"] < metrics[0]["train_loss"]
    saved = {path.name for path in result.output_dir.iterdir()}
    assert {
        "adapter_model.safetensors",
        "adapter_config.json",
        "tokenizer.json",
        "chat_template.jinja",
    } <= saved
    assert not any(name.endswith((".bin", ".pt")) or name.startswith(".trainer-") for name in saved)


def test_adapter_reproduces_the_trained_answers(demo_run, demo_model_dir: Path, sample_chat: Path) -> None:
    result, _ = demo_run
    records = [json.loads(line)["messages"] for line in sample_chat.read_text().splitlines()]
    base, tokenizer = load_causal_lm(str(demo_model_dir))
    base_answers = [greedy_answer(base, tokenizer, messages[:-1]) for messages in records]
    tuned = PeftModel.from_pretrained(base, result.output_dir)  # wraps `base` in place
    tuned.eval()
    for messages, base_answer in zip(records, base_answers, strict=True):
        expected = messages[-1]["content"]
        assert greedy_answer(tuned, tokenizer, messages[:-1]) == expected
        assert base_answer != expected


def test_should_stop_cancels_without_saving(demo_model_dir: Path, sample_chat: Path, tmp_path: Path) -> None:
    events: list[dict] = []
    steps = iter(range(100))
    with pytest.raises(TrainingCancelled):
        train(demo_spec(demo_model_dir, sample_chat, tmp_path), events.append, lambda: next(steps) >= 3)
    assert [event["step"] for event in events if event["type"] == "metrics"] == [1, 2]
    assert not (tmp_path / "adapter_model.safetensors").exists()
    assert list(tmp_path.iterdir()) == []


def test_runs_are_reproducible_and_evaluate_the_validation_file(
    demo_model_dir: Path, sample_chat: Path, tmp_path: Path
) -> None:
    context_only = {"messages": [GOOD["messages"][0], {**GOOD["messages"][1], "weight": 0}]}
    training = write_jsonl(tmp_path / "train.jsonl", [*sample_chat.read_text().splitlines(), context_only])
    runs = []
    for name in ("first", "second"):
        events: list[dict] = []
        spec = demo_spec(demo_model_dir, training, tmp_path / name, validation_file=sample_chat, n_epochs=2)
        train(spec, events.append)
        runs.append(events)
    adapters = [(tmp_path / name / "adapter_model.safetensors").read_bytes() for name in ("first", "second")]
    assert adapters[0] == adapters[1]
    losses = [[e["train_loss"] for e in events if e["type"] == "metrics"] for events in runs]
    assert losses[0] == losses[1] and len(losses[0]) == 4
    # Evaluated steps (each epoch's last) carry the eval loss in their metrics event.
    evals = [event for event in of_type(runs[0], "metrics") if "eval_loss" in event]
    assert [(event["step"], event["epoch"]) for event in evals] == [(2, 1.0), (4, 2.0)]
    assert evals[-1]["eval_loss"] > 0 and evals[-1]["valid_loss"] == evals[-1]["eval_loss"]
    checkpoints = of_type(runs[0], "checkpoint")
    assert [(c["step"], c["metrics"]["eval_loss"]) for c in checkpoints] == [(e["step"], e["eval_loss"]) for e in evals]
    warnings = [event["message"] for event in runs[0] if event.get("level") == "warning"]
    assert warnings == ["1 example(s) have nothing to train on, skipped (lines 7)"]


def test_validation_file_errors_name_the_file(demo_model_dir: Path, sample_chat: Path, tmp_path: Path) -> None:
    bad = write_jsonl(tmp_path / "valid.jsonl", ["{oops"])
    with pytest.raises(DatasetError) as raised:
        train(demo_spec(demo_model_dir, sample_chat, tmp_path / "out", validation_file=bad), print)
    assert str(raised.value).startswith("validation file: line 1: invalid JSON: ")


# --- the runner child process ----------------------------------------------------------------------


def test_runner_streams_events_and_result(demo_model_dir: Path, sample_chat: Path, tmp_path: Path) -> None:
    spec = demo_spec(demo_model_dir, sample_chat, tmp_path / "out", n_epochs=2)
    code, events = run_runner(write_spec(tmp_path, spec))
    assert code == 0, events
    epoch = ["metrics", "metrics", "checkpoint"]  # 2 steps per epoch, a checkpoint at its end
    starting = ["message"] * 4  # starting, loading the base, preparing the data, the first step
    assert [event["type"] for event in events] == [*starting, *epoch, *epoch, "message", "message", "result"]
    assert events[0]["phase"] == "starting" and events[-3]["phase"] == "saving"
    result = events[-1]
    assert result["steps"] == 4 and result["output_dir"] == str(tmp_path / "out")
    assert set(result) == {
        "type",
        "output_dir",
        "steps",
        "train_loss",
        "trained_tokens",
        "seconds",
        "eval_loss",
        "stopped_early",
        "useful_token_ratio",
        "peft_type",
        "rank",
        "accelerator",
    }
    assert (result["peft_type"], result["rank"], result["eval_loss"]) == ("LORA", 16, None)
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


def test_runner_reports_dataset_errors_verbatim(demo_model_dir: Path, tmp_path: Path) -> None:
    bad = write_jsonl(tmp_path / "bad.jsonl", [GOOD, {"messages": [{"role": "bot", "content": "Hi"}]}])
    code, events = run_runner(write_spec(tmp_path, demo_spec(demo_model_dir, bad, tmp_path / "out")))
    assert code == 1
    assert events[-1] == {
        "type": "error",
        "message": "line 2: messages[0].role: unknown role 'bot' (expected system, user, assistant or tool)",
    }


def test_runner_reports_an_invalid_spec(tmp_path: Path) -> None:
    spec_path = tmp_path / "spec.json"
    spec_path.write_text('{"base_model": "x"}')
    code, events = run_runner(spec_path)
    assert code == 1
    assert [event["type"] for event in events] == ["error"]
    assert events[0]["message"].startswith(f"invalid training spec {spec_path}: ")
    assert "training_file" in events[0]["message"]


def test_runner_exits_3_when_cancel_file_exists(demo_model_dir: Path, sample_chat: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "CANCEL").touch()
    code, events = run_runner(write_spec(tmp_path, demo_spec(demo_model_dir, sample_chat, out)))
    assert code == 3
    assert events == [{"type": "cancelled"}]


def test_runner_cancels_on_sigterm(demo_model_dir: Path, sample_chat: Path, tmp_path: Path) -> None:
    spec = demo_spec(demo_model_dir, sample_chat, tmp_path / "out", n_epochs=500)
    process = subprocess.Popen(
        [*RUNNER, str(write_spec(tmp_path, spec))],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        for line in process.stdout:
            if json.loads(line)["type"] == "metrics":
                break
        process.send_signal(signal.SIGTERM)
        rest = [json.loads(line) for line in process.stdout]
        assert process.wait(timeout=60) == 3
    finally:
        process.kill()
    assert rest[-1] == {"type": "cancelled"}
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()
