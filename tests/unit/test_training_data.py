"""Packing (rows of several examples that never see each other), validation splits, early stopping,
and OpenAI's preference JSONL for DPO."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from training_helpers import demo_spec, greedy_answer, of_type, write_jsonl

from adaptery.engine.loading import load_causal_lm
from adaptery.training.data import (
    IGNORE_INDEX,
    DatasetError,
    load_chat_dataset,
    pack_examples,
    read_preference_records,
)
from adaptery.training.trainer import _PadCollator, split_validation, train


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def example(length: int, start: int = 0) -> dict[str, list[int]]:
    ids = list(range(start, start + length))
    return {"input_ids": ids, "attention_mask": [1] * length, "labels": ids}


# --- packing -----------------------------------------------------------------------------------------


def test_packing_fills_rows_and_keeps_every_example_once() -> None:
    lengths = [7, 3, 5, 2, 8, 1, 4, 6]
    examples = [example(n, start=100 * i) for i, n in enumerate(lengths)]
    rows = pack_examples(examples, max_seq_length=10)
    assert all(len(row["input_ids"]) <= 10 for row in rows)
    assert len(rows) == 4  # 36 tokens: best-fit decreasing needs only the minimum of ceil(36 / 10) rows
    packed = sorted(token for row in rows for token in row["input_ids"])
    assert packed == sorted(token for ex in examples for token in ex["input_ids"])
    for row in rows:
        starts = [i for i, position in enumerate(row["position_ids"]) if position == 0]
        assert all(row["labels"][i] == IGNORE_INDEX for i in starts)  # nothing before an example predicts it
        assert all(row["labels"][i] == row["input_ids"][i] for i in range(len(row["labels"])) if i not in starts)
    assert pack_examples(examples, 10) == rows  # deterministic


def test_a_packed_row_computes_exactly_what_its_examples_compute_alone(demo_model_dir: Path, sample_chat: Path) -> None:
    model, tokenizer = load_causal_lm(str(demo_model_dir))
    model.config.use_cache = False  # as in training: the position ids then delimit the examples
    examples = load_chat_dataset(sample_chat, tokenizer, max_seq_length=1024).examples[:3]
    collate = _PadCollator(tokenizer.pad_token_id)
    batch = collate(pack_examples(examples, 1024))
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 1
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
        offset = 0
        for ex in sorted(examples, key=lambda ex: -len(ex["input_ids"])):  # the order packing put them in
            alone = model(input_ids=torch.tensor([ex["input_ids"]])).logits[0]
            assert torch.allclose(packed[offset : offset + len(alone)], alone, atol=1e-4)
            offset += len(alone)


def test_packing_raises_the_useful_token_ratio(demo_model_dir: Path, sample_chat: Path, tmp_path: Path) -> None:
    padded = train(demo_spec(demo_model_dir, sample_chat, tmp_path / "padded", n_epochs=1, batch_size=6), print)
    events: list[dict] = []
    spec = demo_spec(demo_model_dir, sample_chat, tmp_path / "packed", n_epochs=1, batch_size=1, packing=True)
    packed = train(spec, events.append)
    assert "Packed 6 examples into 1 row of up to 1024 tokens" in [e["message"] for e in of_type(events, "message")]
    assert packed.useful_token_ratio == 1.0 and packed.steps == 1
    assert padded.useful_token_ratio < 0.85  # 6 examples of 22-39 tokens padded to the longest


# --- validation split and early stopping -------------------------------------------------------------


def test_validation_split_is_seeded_and_never_empty() -> None:
    items = list(range(10))
    train_part, held = split_validation(items, 0.2, seed=1)
    assert len(held) == 2 and sorted(train_part + held) == items
    assert split_validation(items, 0.2, seed=1) == (train_part, held)
    assert len(split_validation(items, 0.01, seed=1)[1]) == 1
    with pytest.raises(DatasetError, match="leaves no training examples"):
        split_validation([1], 0.4, seed=1)


def test_early_stopping_stops_and_keeps_the_best_adapter(
    demo_model_dir: Path, sample_chat: Path, tmp_path: Path
) -> None:
    events: list[dict] = []
    # A threshold no later evaluation can beat: epoch 1 stays the best, epoch 2 uses up the patience.
    spec = demo_spec(
        demo_model_dir,
        sample_chat,
        tmp_path / "adapter",
        n_epochs=5,
        batch_size=5,
        validation_split=0.2,
        early_stopping_patience=1,
        early_stopping_threshold=100.0,
    )
    result = train(spec, events.append)
    assert result.stopped_early and result.steps == 2  # 5 training examples, batch 5: one step per epoch
    evaluated = [e for e in of_type(events, "metrics") if "eval_loss" in e]
    assert [e["step"] for e in evaluated] == [1, 2]
    assert result.eval_loss == evaluated[0]["eval_loss"]
    assert "Early stopping: kept the adapter of step 1" in [e["message"] for e in of_type(events, "message")][-3]
    best = load_file(spec.checkpoint_dir / "checkpoint-1" / "adapter_model.safetensors")
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(best[name], saved[name]) for name in best)


# --- DPO -----------------------------------------------------------------------------------------------

QUESTION = [{"role": "user", "content": "Who leads the lab?"}]


def pair(answer: str = "Dr. Okafor.", worse: str = "I do not know.") -> dict:
    return {
        "input": {"messages": QUESTION},
        "preferred_output": [{"role": "assistant", "content": answer}],
        "non_preferred_output": [{"role": "assistant", "content": worse}],
    }


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        (
            {"input": {}, "preferred_output": [], "non_preferred_output": []},
            "line 1: input.messages: must be a non-empty",
        ),
        (
            {**pair(), "preferred_output": [{"role": "assistant", "content": ""}]},
            "line 1: preferred_output[0].content: is empty",
        ),
        ({**pair(), "non_preferred_output": "no"}, "line 1: non_preferred_output: must be a non-empty list"),
        (
            {**pair(), "preferred_output": [{"role": "user", "content": "Hi"}]},
            "line 1: preferred_output: must hold only assistant messages",
        ),
        (
            {**pair(), "input": {"messages": [{"role": "robot", "content": "x"}]}},
            "line 1: input.messages[0].role: unknown role 'robot'",
        ),
    ],
    ids=["no-input", "empty-answer", "not-a-list", "wrong-role", "bad-input-role"],
)
def test_bad_preference_records_name_line_and_field(tmp_path: Path, record: dict, expected: str) -> None:
    with pytest.raises(DatasetError) as raised:
        read_preference_records(write_jsonl(tmp_path / "prefs.jsonl", [record]))
    assert str(raised.value).startswith(expected)


def test_preference_records_become_conversational_pairs(tmp_path: Path) -> None:
    [converted] = read_preference_records(write_jsonl(tmp_path / "prefs.jsonl", [pair(), ""]))
    assert converted == {
        "prompt": QUESTION,
        "chosen": [{"role": "assistant", "content": "Dr. Okafor."}],
        "rejected": [{"role": "assistant", "content": "I do not know."}],
    }
    with pytest.raises(DatasetError, match="no preference pairs"):
        read_preference_records(write_jsonl(tmp_path / "empty.jsonl", []))


def test_dpo_learns_to_prefer_the_preferred_answer(demo_model_dir: Path, tmp_path: Path) -> None:
    answers = ["Dr. Okafor.", "A green tortoise.", "In the basement.", "On Fridays."]
    questions = ["Who leads the lab?", "And the mascot?", "Where is the lab?", "When do we meet?"]
    records = [
        {
            "input": {"messages": [{"role": "user", "content": question}]},
            "preferred_output": [{"role": "assistant", "content": answer}],
            "non_preferred_output": [{"role": "assistant", "content": "I do not know."}],
        }
        for question, answer in zip(questions, answers, strict=True)
    ]
    prefs = write_jsonl(tmp_path / "prefs.jsonl", records)
    events: list[dict] = []
    spec = demo_spec(
        demo_model_dir,
        prefs,
        tmp_path / "adapter",
        method="dpo",
        n_epochs=3,
        batch_size=2,
        beta=0.1,
        validation_file=prefs,
    )
    result = train(spec, events.append)
    metrics = of_type(events, "metrics")
    assert result.steps == 6 and metrics[0]["train_loss"] == pytest.approx(0.6931, abs=1e-3)  # log 2: policy = ref
    assert metrics[-1]["train_loss"] < 0.3 and metrics[-1]["reward_accuracy"] == 1.0
    assert metrics[-1]["eval_loss"] < 0.6931
    assert [c["step"] for c in of_type(events, "checkpoint")] == [2, 4, 6]
    base, tokenizer = load_causal_lm(str(demo_model_dir))
    tuned = PeftModel.from_pretrained(base, tmp_path / "adapter")
    assert isinstance(greedy_answer(tuned, tokenizer, QUESTION, max_new_tokens=5), str)

    # DPO resumes through the same checkpoints, on the same trajectory.
    resumed: list[dict] = []
    checkpoint = spec.checkpoint_dir / "checkpoint-2"
    train(spec.model_copy(update={"output_dir": tmp_path / "resumed", "resume_from": checkpoint}), resumed.append)
    steps = [(e["step"], e["train_loss"]) for e in of_type(resumed, "metrics")]
    assert steps == [(e["step"], e["train_loss"]) for e in metrics][2:]
