"""Held-out evaluation of a base model and its adapters on a chat JSONL file, example by example.

Each record's last assistant turn is the reference; the turns before it are the prompt. Every model is scored on
the same examples: the loss of the reference under teacher forcing (mean negative log-likelihood per trained
assistant token, the number training reports as eval_loss) and the greedy answer, compared with the reference
(`metrics`). The base model is loaded once and the adapters are attached to it by name and switched, so three
models cost one load.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from adaptery.data.chat import canonical_record, record_errors
from adaptery.data.untrusted import LineTooLong, RecordLimits, UntrustedJSONError, bounded_lines, loads
from adaptery.engine.tool_calls import tool_format
from adaptery.evaluation import metrics
from adaptery.training.data import IGNORE_INDEX, tokenize_conversation
from adaptery.training.trainer import split_validation

EXAMPLE_TEXT_CHARS = 400  # a report keeps this much of each prompt, reference and answer
# An answer is generated up to twice its reference's tokens and 16 more (and at most max_new_tokens): one longer
# scores low anyway, and a model that never stops (the random demo base does not) would cost the whole budget on
# every example.
ANSWER_ROOM_FACTOR, ANSWER_ROOM_EXTRA = 2, 16


class EvaluationSetError(ValueError):
    """The evaluation set cannot be used; the message names the line and field."""


@dataclass
class Example:
    line: int
    record: dict[str, Any]  # canonical: messages (and tools), response_format where the line had one
    prompt: list[dict[str, Any]]
    reference: dict[str, Any]  # the last assistant message


@dataclass
class ModelScores:
    """One model's scores on every example, in the examples' order."""

    label: str
    loss: list[float | None] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)
    exact_match: list[float] = field(default_factory=list)
    f1: list[float] = field(default_factory=list)
    rouge_l: list[float] = field(default_factory=list)
    checks: list[metrics.Check | None] = field(default_factory=list)
    # What generating the answers used, counted as a chat call would be (its prompt and the tokens it generated):
    # the control plane charges it to the usage ledger and the month's budget (`usage`).
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def usage(self) -> dict[str, int]:
        return {"requests": len(self.answers), "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens}  # fmt: skip


def read_evaluation_set(path: Path, limits: RecordLimits, *, max_examples: int) -> list[Example]:
    """Every line validated as a training line would be (an error names its line and field); empty lines skipped."""
    examples: list[Example] = []
    with Path(path).open("rb") as handle:
        for number, raw in enumerate(bounded_lines(handle, limits.max_bytes), start=1):
            if isinstance(raw, LineTooLong):
                raise EvaluationSetError(f"line {number}: {limits.too_large(raw.size)}")
            if not raw.strip():
                continue
            try:
                record = loads(raw.rstrip(b"\r\n"), max_depth=limits.max_depth)
            except UntrustedJSONError as exc:
                raise EvaluationSetError(f"line {number}: {exc}") from exc
            problems = record_errors(number, record)
            if problems:
                raise EvaluationSetError(str(problems[0]))
            if record.get("document"):
                raise EvaluationSetError(f"line {number}: a document has no prompt to answer; use chat records")
            clean = canonical_record(record)
            schema = metrics.json_schema_of(record)
            if schema is not None:
                clean["response_format"] = record["response_format"]
            messages = clean["messages"]
            last = max(i for i, message in enumerate(messages) if message["role"] == "assistant")
            if last == 0:
                raise EvaluationSetError(f"line {number}: messages: no prompt before the assistant's answer")
            examples.append(Example(number, clean, messages[:last], messages[last]))
            if len(examples) >= max_examples:
                break
    if not examples:
        raise EvaluationSetError(f"{Path(path).name}: no examples (one JSON object with 'messages' per line)")
    return examples


def held_out_split(examples: list[Example], fraction: float, seed: int) -> list[Example]:
    """The examples a job with `validation_split` set aside: the trainer's own seeded split of its records."""
    return split_validation(examples, fraction, seed)[1]


def _reference_text(message: dict[str, Any]) -> str:
    if message.get("tool_calls"):
        return json.dumps([call["function"] for call in message["tool_calls"]], ensure_ascii=False)
    return message.get("content") or ""


def _predicted_calls(text: str, chat_template: str) -> list[dict[str, Any]]:
    fmt = tool_format(chat_template or "")
    if fmt is not None:
        _, calls = fmt.parse(text)
        return [{"name": call.name, "arguments": call.arguments} for call in calls]
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return []
    values = value if isinstance(value, list) else [value]
    return [v for v in values if isinstance(v, dict) and "name" in v]


def _loss(model, tokenizer, example: Example, max_seq_length: int) -> float | None:  # noqa: ANN001
    messages = [*example.prompt, example.reference]
    encoded = tokenize_conversation(
        tokenizer, messages, max_seq_length=max_seq_length, line=example.line, tools=example.record.get("tools")
    )
    # Only the reference turn is scored: earlier assistant turns are part of the prompt.
    prompt_ids = (
        tokenize_conversation(
            tokenizer, example.prompt, max_seq_length=max_seq_length, tools=example.record.get("tools")
        )["input_ids"]
        if any(m["role"] == "assistant" for m in example.prompt)
        else []
    )
    labels = [IGNORE_INDEX if i < len(prompt_ids) else label for i, label in enumerate(encoded["labels"])]
    if all(label == IGNORE_INDEX for label in labels):
        return None
    ids = torch.tensor([encoded["input_ids"]])
    with torch.no_grad():
        out = model(input_ids=ids, labels=torch.tensor([labels]))
    value = float(out.loss)
    return value if math.isfinite(value) else None


def _answer(model, tokenizer, example: Example, max_new_tokens: int) -> tuple[str, int, int]:  # noqa: ANN001
    """The greedy answer, and the prompt's and the answer's tokens."""
    tools = example.record.get("tools")
    prompt = tokenizer.apply_chat_template(
        example.prompt, tools=tools, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        output = model.generate(
            **prompt, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    prompt_length = prompt["input_ids"].shape[1]
    generated = output[0, prompt_length:]
    return tokenizer.decode(generated, skip_special_tokens=True).strip(), prompt_length, int(generated.shape[0])


def score_model(
    label: str,
    model,  # noqa: ANN001
    tokenizer,  # noqa: ANN001
    examples: list[Example],
    *,
    max_new_tokens: int,
    max_seq_length: int,
    on_progress: Callable[[int], None] = lambda done: None,
) -> ModelScores:
    scores = ModelScores(label)
    template = tokenizer.chat_template or ""
    for done, example in enumerate(examples, start=1):
        reference = _reference_text(example.reference)
        room = ANSWER_ROOM_FACTOR * len(tokenizer(reference, add_special_tokens=False)["input_ids"]) + ANSWER_ROOM_EXTRA
        answer, prompt_tokens, completion_tokens = _answer(model, tokenizer, example, min(max_new_tokens, room))
        scores.prompt_tokens += prompt_tokens
        scores.completion_tokens += completion_tokens
        scores.loss.append(_loss(model, tokenizer, example, max_seq_length))
        scores.answers.append(answer)
        scores.exact_match.append(metrics.exact_match(answer, reference))
        scores.f1.append(metrics.token_f1(answer, reference))
        scores.rouge_l.append(metrics.rouge_l(answer, reference))
        schema = metrics.json_schema_of(example.record)
        if example.reference.get("tool_calls"):
            expected = [call["function"] for call in example.reference["tool_calls"]]
            predicted = _predicted_calls(answer, template)
            scores.checks.append(metrics.check_tool_calls(predicted, expected, example.record.get("tools")))
        elif schema is not None:
            scores.checks.append(metrics.check_json_schema(answer, schema))
        else:
            scores.checks.append(None)
        on_progress(done)
    return scores


def summary(scores: ModelScores) -> dict[str, Any]:
    losses = [value for value in scores.loss if value is not None]
    checks = [check for check in scores.checks if check is not None]
    return {
        "examples": len(scores.answers),
        "loss": metrics.mean(losses),
        "exact_match": metrics.mean(scores.exact_match),
        "token_f1": metrics.mean(scores.f1),
        "rouge_l": metrics.mean(scores.rouge_l),
        "checks": len(checks),
        "check_pass_rate": metrics.mean([float(check.passed) for check in checks]) if checks else None,
    }


def _clip(text: str) -> str:
    return text if len(text) <= EXAMPLE_TEXT_CHARS else text[: EXAMPLE_TEXT_CHARS - 1] + "…"


def example_rows(examples: list[Example], scored: list[ModelScores]) -> list[dict[str, Any]]:
    """Per example: its prompt's last user turn, the reference, and each model's answer and scores."""
    rows = []
    for i, example in enumerate(examples):
        user = next((m.get("content") or "" for m in reversed(example.prompt) if m["role"] == "user"), "")
        per_model = {}
        for scores in scored:
            check = scores.checks[i]
            per_model[scores.label] = {
                "answer": _clip(scores.answers[i]),
                "loss": scores.loss[i],
                "exact_match": scores.exact_match[i],
                "token_f1": round(scores.f1[i], 6),
                "rouge_l": round(scores.rouge_l[i], 6),
                "check": None
                if check is None
                else {"kind": check.kind, "passed": check.passed, "reason": check.reason},
            }
        rows.append(
            {"line": example.line, "prompt": _clip(user), "reference": _clip(_reference_text(example.reference)),
             "models": per_model}
        )  # fmt: skip
    return rows


def changes(rows: list[dict[str, Any]], new: str, old: str, *, limit: int = 10) -> dict[str, list[dict[str, Any]]]:
    """The examples on which `new` did better and worse than `old`: by ROUGE-L, then token F1, then loss (lower
    is better), the largest differences first."""

    def key(row: dict[str, Any], label: str) -> tuple[float, float, float]:
        scores = row["models"][label]
        loss = scores["loss"]
        return scores["rouge_l"], scores["token_f1"], -(loss if loss is not None else math.inf)

    better, worse = [], []
    for row in rows:
        if new not in row["models"] or old not in row["models"]:
            continue
        delta = tuple(a - b for a, b in zip(key(row, new), key(row, old), strict=True))
        first = next((d for d in delta if d == d and d != 0), 0.0)
        if first > 0:
            better.append((delta, row))
        elif first < 0:
            worse.append((delta, row))
    better.sort(key=lambda pair: pair[0], reverse=True)
    worse.sort(key=lambda pair: pair[0])
    return {"better": [row for _, row in better[:limit]], "worse": [row for _, row in worse[:limit]]}


QUALITY = (("exact_match", "exact match"), ("token_f1", "token F1"), ("rouge_l", "ROUGE-L"),
           ("check_pass_rate", "checks passed"))  # fmt: skip
MARGIN = 0.01  # a difference smaller than this on a 0-1 score is noise on a held-out set of this size


def recommendation(table: dict[str, dict[str, Any]], against: str) -> dict[str, Any]:
    """Whether to promote the candidate over `against` (its predecessor, else the base), with the reason: promote
    when it is better by more than MARGIN on at least one held-out score and worse by more than MARGIN on none.
    A worse score outweighs any better one: the version it would replace answers those questions today. Loss
    does not decide (DPO moves it without changing answers) but is said."""
    new, old = table.get("candidate") or {}, table.get(against) or {}
    better, worse = [], []
    for key, label in QUALITY:
        a, b = new.get(key), old.get(key)
        if not isinstance(a, int | float) or not isinstance(b, int | float):
            continue
        said = f"{label} {a:.3f} against {b:.3f}"
        if a > b + MARGIN:
            better.append(said)
        elif a < b - MARGIN:
            worse.append(said)
    loss = ""
    if isinstance(new.get("loss"), int | float) and isinstance(old.get("loss"), int | float):
        loss = f"; loss {new['loss']:.3f} against {old['loss']:.3f}"
    if worse:
        why = f"worse than the {against} on the held-out set: {', '.join(worse)}{loss}"
        return {"promote": False, "against": against, "reason": why}
    if better:
        why = f"better than the {against} on the held-out set ({', '.join(better)}) and worse on none{loss}"
        return {"promote": True, "against": against, "reason": why}
    why = f"no held-out score differs from the {against}'s by more than {MARGIN}{loss}: nothing to gain"
    return {"promote": False, "against": against, "reason": why}
