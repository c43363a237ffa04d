"""Dataset formats: detect, read as a stream, normalise to one chat form, validate every record.

The canonical record is OpenAI's chat form, `{"messages": [{"role", "content", "weight"?}], "tools"?}`
with roles system, user, assistant (with `tool_calls`) and tool (with `tool_call_id`) and `weight` 0 or 1
(0: context, not trained on) — see `data.chat`. Documents (`{"text": ...}` records, a one-column text
table) stay `{"text": ...}`: continued pre-training, loss on every token, packed. Plain text
(`text-lines`, `text-document`) becomes completion-style records,
`{"messages": [{"role": "assistant", "content": text}]}`: there is no prompt, and training learns
the whole text.

Reading lives in `readers` (one module per concern); this module is the entry point: it checks every
record, the base model's context included, writes the valid ones as canonical JSONL and reports the
others so a person can fix the file in one pass. Memory stays bounded whatever the file's size.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path
from typing import Any, Protocol

from jinja2 import TemplateError

from adaptery.data.chat import LineError, conversations_of, is_document, is_preference, record_errors
from adaptery.data.chat_template import TemplateBudget, chat_text, document_ids, template_messages
from adaptery.data.readers import FORMATS, ColumnMapping, FormatError, Record, detect_format, read_records
from adaptery.data.untrusted import RecordLimits

PROGRESS_EVERY = 1000
SUMMARY_ERRORS = 5
_EXPECTED_RECORDS = {
    "openai-chat": "one JSON object per line (or a JSON array of them) with a 'messages' list",
    "openai-preference": "one JSON object per line with 'input', 'preferred_output' and 'non_preferred_output'",
    "alpaca": "records with 'instruction' and 'output' (JSONL or a JSON array)",
    "sharegpt": "records with a 'conversations' list (JSONL or a JSON array)",
    "documents": "records with a 'text' field (JSONL or a JSON array)",
    "parquet": "one row per record",
    "text-lines": "one document per non-empty line",
    "text-document": "some text",
    "csv": "a header row, then one row per record",
    "tsv": "a header row, then one row per record",
}
_INDEX = re.compile(r"\[\d+\]")

TokenCounter = Callable[[dict[str, Any]], int]  # a canonical record -> its tokens as training renders it


class Sink(Protocol):
    """Where valid records go: a binary file, a blob writer, anything with `write(bytes)`."""

    def write(self, data: bytes, /) -> int: ...


@dataclass
class ValidationReport:
    format: str
    records_total: int = 0
    records_valid: int = 0
    records_invalid: int = 0
    errors: list[LineError] = field(default_factory=list)  # the first `max_reported_errors`
    errors_truncated: bool = False
    error_counts: Counter[str] = field(default_factory=Counter)  # every error, by field kind: "messages[].role"

    @property
    def ok(self) -> bool:
        return self.records_invalid == 0 and self.records_valid > 0

    def summary(self) -> str:
        """One line for a person: how many records are invalid and the first few reasons."""
        if self.records_total == 0:
            return f"the file has no records: {self.format} expects {_EXPECTED_RECORDS[self.format]}"
        if self.records_invalid == 0:
            return (
                "the one record is valid" if self.records_total == 1 else f"all {self.records_total} records are valid"
            )
        shown = "; ".join(str(e) for e in self.errors[:SUMMARY_ERRORS])
        hidden = sum(self.error_counts.values()) - min(len(self.errors), SUMMARY_ERRORS)
        more = f" (and {hidden} more error{'s' if hidden > 1 else ''})" if hidden > 0 else ""
        return f"{self.records_invalid} of {self.records_total} records are invalid: {shown}{more}"

    def reject(self, problems: list[LineError], max_reported: int) -> None:
        self.records_invalid += 1
        self.error_counts.update(_INDEX.sub("[]", p.field) or "record" for p in problems)
        room = max(max_reported - len(self.errors), 0)
        self.errors.extend(problems[:room])
        self.errors_truncated = self.errors_truncated or room < len(problems)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "ok": self.ok,
            "records_total": self.records_total,
            "records_valid": self.records_valid,
            "records_invalid": self.records_invalid,
            "errors": [e.to_dict() for e in self.errors],
            "errors_truncated": self.errors_truncated,
            "error_counts": dict(self.error_counts),
            "summary": self.summary(),
        }


def _position(item: Record | LineError) -> tuple[int, str]:
    return item.line, item.unit


def validate_and_normalise(
    path: Path,
    fmt: str,
    out: Sink,
    *,
    limits: RecordLimits,
    mapping: ColumnMapping | None = None,
    count_tokens: TokenCounter | None = None,
    max_tokens: int | None = None,
    max_reported_errors: int = 1000,
    progress: Callable[[int], None] | None = None,
) -> ValidationReport:
    """Check every record; write the valid ones to `out` as canonical JSONL; count and list the others.

    A record over `limits` (bytes, nesting) is one invalid record, reported on its line, never parsed whole.

    With `count_tokens` and `max_tokens`, a record longer than `max_tokens` is invalid; `count_tokens`
    may also raise ValueError to refuse a record (its message is the error). It is called once per
    record that is otherwise valid, in file order. `progress(n)` is called every PROGRESS_EVERY
    records. Problems with the file as a whole raise FormatError.
    """
    report = ValidationReport(format=fmt)
    for (line, unit), group in groupby(read_records(path, fmt, limits=limits, mapping=mapping), key=_position):
        items = list(group)  # one Record, or the errors of one record
        first = items[0]
        report.records_total += 1
        if isinstance(first, LineError):
            report.reject(items, max_reported_errors)
        else:
            # The readers check in the source format's terms; this is the trainer's own check, so a
            # record written here is one training accepts.
            problems = record_errors(line, first.record) or _length_problems(first, count_tokens, max_tokens)
            if problems:
                report.reject([LineError(p.line, p.field, p.message, unit) for p in problems], max_reported_errors)
            else:
                out.write(json.dumps(first.record, ensure_ascii=False, separators=(",", ":")).encode() + b"\n")
                report.records_valid += 1
        if progress is not None and report.records_total % PROGRESS_EVERY == 0:
            progress(report.records_total)
    return report


def _length_problems(item: Record, count_tokens: TokenCounter | None, max_tokens: int | None) -> list[LineError]:
    if count_tokens is None or max_tokens is None:
        return []
    try:
        tokens = count_tokens(item.record)
    except ValueError as exc:
        return [LineError(item.line, "messages", str(exc))]
    if tokens > max_tokens:
        message = f"record has {tokens} tokens; the base model's context is {max_tokens} tokens: shorten it or split it"
        return [LineError(item.line, "messages", message)]
    return []


def make_token_counter(tokenizer: Any, budget: TemplateBudget) -> TokenCounter:
    """Tokens a record takes as the model sees it: rendered with the model's chat template (within
    `budget`), as training renders it. Without a chat template, the contents joined by newlines.

    A document counts its tokens and the end-of-text token. A conversation the template refuses (some refuse
    a system turn, or one not starting with a user) raises ValueError, which validation reports as that record's error.
    """
    templated = bool(getattr(tokenizer, "chat_template", None))

    def count(record: dict[str, Any]) -> int:
        if is_preference(record):  # the longer of the pair's two conversations must fit
            return max(count({"messages": messages}) for messages in conversations_of(record))
        if is_document(record):
            return len(document_ids(tokenizer, record["messages"][0]["content"]))
        messages = record["messages"]
        if not templated:
            return len(tokenizer("\n".join(m["content"] for m in messages))["input_ids"])
        try:
            text = chat_text(tokenizer, template_messages(messages), budget=budget, tools=record.get("tools"))
        except TemplateError as exc:
            raise ValueError(f"the base model's chat template rejected this conversation: {exc}") from exc
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    return count


__all__ = [
    "FORMATS",
    "ColumnMapping",
    "FormatError",
    "Record",
    "Sink",
    "TokenCounter",
    "ValidationReport",
    "detect_format",
    "make_token_counter",
    "read_records",
    "validate_and_normalise",
]
