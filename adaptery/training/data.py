"""OpenAI chat JSONL -> tokenised training examples, rendered with the base model's chat template.

Only assistant tokens are trained (labels are -100 everywhere else), so the adapter learns to
answer and to call tools, not to imitate users or tool results. Assistant messages with
``"weight": 0`` are context, not targets. A record's `tools` reach the template as
`apply_chat_template(tools=...)` passes them. Documents (`{"text": ...}`) are trained on every
token, without the chat template, and packed.
Templates render within a `TemplateBudget` and records are read within `RecordLimits`; both default
to this process's settings.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jinja2 import TemplateError

# _message_errors: the one definition of a valid chat message, shared with the upload validator.
from adaptery.data.chat import _message_errors, canonical_record, is_document, record_errors
from adaptery.data.chat_template import TemplateBudget, document_ids, render_for, template_messages
from adaptery.data.untrusted import LineTooLong, RecordLimits, UntrustedJSONError, bounded_lines, loads
from adaptery.settings import Settings

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100  # the label value the causal-LM loss skips

Messages = list[dict[str, Any]]

_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


class DatasetError(ValueError):
    """The dataset cannot be used for training; the message names the line and field."""


@dataclass
class ChatDataset:
    examples: list[dict[str, list[int]]]
    records: int
    trainable_tokens: int
    truncated: int = 0  # examples cut at max_seq_length
    dropped: list[int] = field(default_factory=list)  # line numbers left with nothing to train on
    documents: int = 0  # records that are documents (continued pre-training): these are always packed


def _jsonl(path: Path, limits: RecordLimits | None) -> Iterator[tuple[int, Any]]:
    """(line number, parsed JSON) for each non-blank line; a DatasetError naming the line if one is not JSON
    or is over `limits`."""
    limits = limits or RecordLimits.from_settings(Settings())
    try:
        with Path(path).open("rb") as handle:
            for number, raw in enumerate(bounded_lines(handle, limits.max_bytes), start=1):
                if isinstance(raw, LineTooLong):
                    raise DatasetError(f"line {number}: {limits.too_large(raw.size)}")
                if not raw.strip():
                    continue
                try:
                    record = loads(raw.rstrip(b"\r\n"), max_depth=limits.max_depth)
                except UntrustedJSONError as exc:
                    raise DatasetError(f"line {number}: {exc}") from exc
                yield number, record
    except OSError as exc:
        raise DatasetError(f"cannot read {Path(path).name}: {exc.strerror or exc}") from exc


def read_chat_records(path: Path, limits: RecordLimits | None = None) -> list[tuple[int, dict[str, Any]]]:
    """Validate every line of a chat JSONL file; return (line number, canonical record) per record."""
    records = []
    for number, record in _jsonl(path, limits):
        # The same rules as the upload-time validator, so a file accepted there trains here.
        problems = record_errors(number, record)
        if problems:
            raise DatasetError(str(problems[0]))
        records.append((number, canonical_record(record)))
    if not records:
        raise DatasetError(
            f"{Path(path).name}: no training examples (expected one JSON object per line with a 'messages' list)"
        )
    return records


def _is_trained(message: dict[str, Any]) -> bool:
    return message["role"] == "assistant" and message.get("weight", 1) != 0


def _mask_runs(mask: list[int]) -> list[tuple[int, int]]:
    runs, start = [], None
    for i, bit in enumerate([*mask, 0]):
        if bit and start is None:
            start = i
        elif not bit and start is not None:
            runs.append((start, i))
            start = None
    return runs


def _labels_from_generation_mask(
    tokenizer: PreTrainedTokenizerBase, messages: Messages, budget: TemplateBudget, tools: list | None = None
) -> dict | None:
    """Use the template's {% generation %} blocks; None when they cannot be mapped to messages."""
    text, spans = render_for(tokenizer, template_messages(messages), budget=budget, spans=True, tools=tools)
    encoded = tokenizer(text, add_special_tokens=False)
    ids = list(encoded["input_ids"])
    mask = [0] * len(ids)
    for start, end in spans:  # characters to tokens, as apply_chat_template's assistant mask does it
        first, last = encoded.char_to_token(start), encoded.char_to_token(end - 1)
        if first is None:
            break
        for token in range(first, last + 1 if last else len(ids)):
            mask[token] = 1
    assistants = [m for m in messages if m["role"] == "assistant"]
    runs = _mask_runs(mask)
    if len(runs) != len(assistants):
        return None
    labels = [IGNORE_INDEX] * len(ids)
    for (start, end), message in zip(runs, assistants, strict=True):
        if _is_trained(message):
            labels[start:end] = ids[start:end]
    return {"input_ids": ids, "labels": labels}


def _labels_from_prefixes(
    tokenizer: PreTrainedTokenizerBase, messages: Messages, line: int, budget: TemplateBudget, tools: list | None
) -> dict:
    """Locate each assistant turn by rendering the conversation up to it (works with any template
    that renders earlier turns the same way whatever follows them)."""

    def render(upto: int, prompt: bool) -> str:
        if upto == 0:
            return ""
        text, _ = render_for(
            tokenizer, template_messages(messages[:upto]), budget=budget, add_generation_prompt=prompt, tools=tools
        )
        return text

    text = render(len(messages), False)
    spans = []
    for i, message in enumerate(messages):
        if not _is_trained(message):
            continue
        before, through = render(i, True), render(i + 1, False)
        if not (through.startswith(before) and text.startswith(through)):
            raise DatasetError(
                f"line {line}: the base model's chat template renders earlier turns differently once later "
                "turns follow, so the assistant tokens to train cannot be located"
            )
        start = len(before)
        if i == 0:
            # No earlier turns to render a generation prompt after (templates refuse an empty
            # conversation), so skip the template's header by finding where the content begins.
            start = max(through.find(message["content"]), 0) if message["content"] else len(through)
        spans.append((start, len(through)))
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    labels = [
        token if any(start < span_end and end > span_start for span_start, span_end in spans) else IGNORE_INDEX
        for token, (start, end) in zip(ids, encoded["offset_mapping"], strict=True)
    ]
    return {"input_ids": ids, "labels": labels}


def _label_record(
    tokenizer: PreTrainedTokenizerBase, record: dict[str, Any], line: int, budget: TemplateBudget
) -> dict:
    messages, tools = record["messages"], record.get("tools")
    if is_document(record):
        ids = document_ids(tokenizer, messages[0]["content"])
        return {"input_ids": ids, "labels": list(ids)}
    try:
        example = None
        if _GENERATION_TAG.search(tokenizer.get_chat_template()):
            example = _labels_from_generation_mask(tokenizer, messages, budget, tools)
        if example is None:
            example = _labels_from_prefixes(tokenizer, messages, line, budget, tools)
    except TemplateError as exc:
        raise DatasetError(f"line {line}: the base model's chat template rejected this conversation: {exc}") from exc
    return example


def tokenize_conversation(
    tokenizer: PreTrainedTokenizerBase,
    messages: Messages,
    *,
    max_seq_length: int,
    line: int = 0,
    budget: TemplateBudget | None = None,
    tools: list[dict[str, Any]] | None = None,
) -> dict[str, list[int]]:
    """Tokenise one conversation: input_ids, attention_mask and labels (-100 outside trained turns)."""
    budget = budget or TemplateBudget.from_settings(Settings())
    record = {"messages": messages, **({"tools": tools} if tools else {})}
    example = _label_record(tokenizer, record, line, budget)
    ids, labels = example["input_ids"][:max_seq_length], example["labels"][:max_seq_length]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def load_chat_dataset(
    path: Path,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_seq_length: int,
    budget: TemplateBudget | None = None,
    limits: RecordLimits | None = None,
) -> ChatDataset:
    """Read, validate and tokenise a chat JSONL file; raise DatasetError when nothing is trainable."""
    if not tokenizer.chat_template:
        raise DatasetError("the base model's tokenizer has no chat template, so chat records cannot be formatted")
    budget = budget or TemplateBudget.from_settings(Settings())
    dataset = ChatDataset(examples=[], records=0, trainable_tokens=0)
    for line, record in read_chat_records(path, limits):
        dataset.records += 1
        dataset.documents += is_document(record)
        example = _label_record(tokenizer, record, line, budget)
        dataset.truncated += len(example["input_ids"]) > max_seq_length
        ids, labels = example["input_ids"][:max_seq_length], example["labels"][:max_seq_length]
        trainable = sum(label != IGNORE_INDEX for label in labels)
        if trainable == 0:
            # Nothing to learn (all weights 0, or truncated away); an all-ignored batch has no loss.
            dataset.dropped.append(line)
            continue
        dataset.trainable_tokens += trainable
        dataset.examples.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    if not dataset.examples:
        raise DatasetError(
            f"{Path(path).name}: no trainable assistant tokens (every assistant message has weight 0 "
            f"or lies beyond max_seq_length={max_seq_length})"
        )
    return dataset


# --- packing -----------------------------------------------------------------------------------------


def pack_examples(examples: list[dict[str, list[int]]], max_seq_length: int) -> list[dict[str, list[int]]]:
    """Pack examples into rows of at most `max_seq_length` tokens (best-fit decreasing, deterministic).

    Each row carries `position_ids` that restart at 0 for every example; with no attention mask,
    transformers turns them into a block-diagonal causal mask, so an example never attends to its
    neighbours. The first label of every example is ignored: nothing before it in the row may
    predict it (unpacked, the shift in the loss drops it anyway).
    """
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i]["input_ids"]), i))
    rows: list[list[int]] = []
    free: list[int] = []  # room left in each row
    for index in order:
        length = len(examples[index]["input_ids"])
        best = None
        for row, room in enumerate(free):
            if length <= room and (best is None or room < free[best]):
                best = row
                if room == length:
                    break
        if best is None:
            rows.append([index])
            free.append(max_seq_length - length)
        else:
            rows[best].append(index)
            free[best] -= length
    packed = []
    for members in rows:
        ids, labels, positions = [], [], []
        for index in members:
            example = examples[index]
            ids += example["input_ids"]
            labels += [IGNORE_INDEX, *example["labels"][1:]]
            positions += list(range(len(example["input_ids"])))
        packed.append({"input_ids": ids, "labels": labels, "position_ids": positions})
    return packed


# --- preference pairs (DPO) --------------------------------------------------------------------------


def _preference_errors(line: int, record: object) -> list[str]:
    if not isinstance(record, dict):
        return [f"line {line}: each line must be a JSON object"]
    problems = []
    conversation = record.get("input")
    messages = conversation.get("messages") if isinstance(conversation, dict) else None
    if not isinstance(messages, list) or not messages:
        problems.append(f"line {line}: input.messages: must be a non-empty list of messages")
    else:
        problems += [f"line {line}: input.{error.field}: {error.message}" for error in _messages_errors(line, messages)]
    for key in ("preferred_output", "non_preferred_output"):
        output = record.get(key)
        if not isinstance(output, list) or not output:
            problems.append(f"line {line}: {key}: must be a non-empty list of assistant messages")
            continue
        problems += [
            f"line {line}: {key}{error.field.removeprefix('messages')}: {error.message}"
            for error in _messages_errors(line, output)
        ]
        if not problems and any(message["role"] != "assistant" for message in output):
            problems.append(f"line {line}: {key}: must hold only assistant messages")
    return problems


def _messages_errors(line: int, messages: list) -> list:
    return [error for index, message in enumerate(messages) for error in _message_errors(line, index, message)]


def read_preference_records(path: Path, limits: RecordLimits | None = None) -> list[dict[str, Messages]]:
    """OpenAI's preference JSONL → TRL's conversational pairs: {"prompt", "chosen", "rejected"}."""
    pairs = []
    for number, record in _jsonl(path, limits):
        problems = _preference_errors(number, record)
        if problems:
            raise DatasetError(problems[0])
        pairs.append(
            {
                "prompt": template_messages(record["input"]["messages"]),
                "chosen": template_messages(record["preferred_output"]),
                "rejected": template_messages(record["non_preferred_output"]),
            }
        )
    if not pairs:
        raise DatasetError(
            f"{Path(path).name}: no preference pairs (expected one JSON object per line with 'input', "
            "'preferred_output' and 'non_preferred_output')"
        )
    return pairs
