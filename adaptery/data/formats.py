"""Dataset formats: detect, read as a stream, normalise to one chat form, validate every record.

The canonical record is OpenAI's chat form, `{"messages": [{"role", "content", "weight"?}]}` with
roles system, user and assistant. Plain text becomes completion-style records: the document is the
assistant's text with no prompt, so training learns the whole of it.

Files are read as streams (JSONL line by line, JSON arrays through `ijson`, CSV row by row), so a
large upload is processed in bounded memory; `text-document` is the exception by nature (one
record is the whole file), bounded by the upload size limit.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

import ijson

from adaptery.data.chat import LineError, record_errors

FORMATS = ("openai-chat", "alpaca", "sharegpt", "text-lines", "text-document", "csv", "tsv")
SNIFF_BYTES = 64 * 1024
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
PROGRESS_EVERY = 1000


class FormatError(ValueError):
    pass


@dataclass(frozen=True)
class ColumnMapping:
    """Which CSV/TSV columns hold what: prompt/response, or instruction/input/output; system optional."""

    prompt: str | None = None
    response: str | None = None
    instruction: str | None = None
    input: str | None = None
    output: str | None = None
    system: str | None = None


@dataclass(frozen=True)
class Record:
    line: int
    record: dict[str, Any]
    unit: str = "line"


class Sink(Protocol):
    def write(self, data: bytes) -> int: ...


# --- detection -----------------------------------------------------------------------------------


def _first_json_item(path: Path) -> Any:
    with path.open("rb") as handle:
        try:
            return next(ijson.items(handle, "item"), None)
        except ijson.JSONError as exc:
            raise FormatError(f"the file starts like a JSON array but is not valid JSON: {exc}") from exc


def _format_of_object(obj: Any) -> str:
    if isinstance(obj, dict):
        if "messages" in obj:
            return "openai-chat"
        if "conversations" in obj:
            return "sharegpt"
        if "instruction" in obj or "output" in obj:
            return "alpaca"
        found = ", ".join(sorted(obj)[:10]) or "none"
    else:
        found = f"a JSON {type(obj).__name__}, not an object"
    raise FormatError(
        f"cannot tell the dataset format: the first record has keys {found}; expected 'messages' (openai-chat), "
        "'conversations' (sharegpt) or 'instruction'/'output' (alpaca). Give the format explicitly "
        f"({', '.join(FORMATS)})"
    )


def detect_format(path: Path, filename: str | None = None) -> str:
    """Tell the format from the file's name and its first few KB."""
    suffix = Path(filename or path.name).suffix.lower()
    with path.open("rb") as handle:
        head = handle.read(SNIFF_BYTES)
    if b"\x00" in head:
        raise FormatError("this is a binary file, not a dataset: expected JSONL, JSON, CSV, TSV or text")
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError as exc:
        raise FormatError(f"the file is not UTF-8 text (byte {exc.start}): save it as UTF-8") from exc
    stripped = text.lstrip("\ufeff \t\r\n")
    if suffix == ".csv":
        return "csv"
    if suffix == ".tsv":
        return "tsv"
    if stripped.startswith("["):
        return _format_of_object(_first_json_item(path))
    if stripped.startswith("{"):
        first_line = stripped.split("\n", 1)[0]
        try:
            return _format_of_object(json.loads(first_line))
        except json.JSONDecodeError:
            raise FormatError(
                "the first line is not a complete JSON object: JSONL needs one object per line "
                "(a pretty-printed JSON file must be a JSON array)"
            ) from None
    if suffix in (".txt", ".md", ".text"):
        return "text-lines"
    if not stripped:
        raise FormatError("the file is empty")
    raise FormatError(
        f"cannot tell the dataset format of '{filename or path.name}': not JSON, and the name does not end in "
        f".csv, .tsv or .txt. Give the format explicitly ({', '.join(FORMATS)})"
    )


# --- reading -------------------------------------------------------------------------------------


def _decode(raw: bytes, line: int, unit: str = "line") -> str | LineError:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return LineError(
            line, "", f"not valid UTF-8 text (byte {exc.start} of the {unit}): save the file as UTF-8", unit
        )


def _json_objects(path: Path) -> Iterator[tuple[int, str, Any]]:
    """(position, unit, object or LineError) from JSONL, or from a JSON array (position = record index)."""
    with path.open("rb") as handle:
        head = handle.read(SNIFF_BYTES).lstrip(b"\xef\xbb\xbf \t\r\n")
    if head.startswith(b"["):
        with path.open("rb") as handle:
            index = 0
            try:
                for index, item in enumerate(ijson.items(handle, "item", use_float=True), start=1):
                    yield index, "record", item
            except ijson.JSONError as exc:
                yield (
                    index + 1,
                    "record",
                    LineError(index + 1, "", f"the JSON array is broken after record {index}: {exc}", "record"),
                )
        return
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            text = _decode(raw, number)
            if isinstance(text, LineError):
                yield number, "line", text
                continue
            try:
                yield number, "line", json.loads(text.rstrip("\r\n"))
            except json.JSONDecodeError as exc:
                yield number, "line", LineError(number, "", f"invalid JSON: {exc.msg} (column {exc.colno})")


def _nonempty_string(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _chat(line: int, unit: str, obj: Any) -> Record | list[LineError]:
    errors = [LineError(e.line, e.field, e.message, unit) for e in record_errors(line, obj)]
    if errors:
        return errors
    messages = []
    for message in obj["messages"]:
        clean = {"role": message["role"], "content": message["content"]}
        if message.get("weight") is not None:
            clean["weight"] = message["weight"]
        messages.append(clean)
    return Record(line, {"messages": messages}, unit)


def _alpaca(line: int, unit: str, obj: Any) -> Record | list[LineError]:
    if not isinstance(obj, dict):
        return [LineError(line, "", "each record must be a JSON object with instruction, input and output", unit)]
    errors = []
    for name in ("instruction", "output"):
        if name not in obj:
            errors.append(LineError(line, name, "is missing", unit))
        elif not _nonempty_string(obj[name]):
            errors.append(LineError(line, name, "must be a non-empty string", unit))
    for name in ("input", "system"):
        if obj.get(name) is not None and not isinstance(obj[name], str):
            errors.append(LineError(line, name, "must be a string", unit))
    if errors:
        return errors
    prompt = obj["instruction"] + (f"\n\n{obj['input']}" if (obj.get("input") or "").strip() else "")
    messages = [{"role": "system", "content": obj["system"]}] if _nonempty_string(obj.get("system")) else []
    messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": obj["output"]}]
    return Record(line, {"messages": messages}, unit)


def _sharegpt(line: int, unit: str, obj: Any) -> Record | list[LineError]:
    if not isinstance(obj, dict) or not isinstance(obj.get("conversations"), list) or not obj["conversations"]:
        return [LineError(line, "conversations", "must be a non-empty list of turns", unit)]
    errors, messages = [], []
    if _nonempty_string(obj.get("system")):
        messages.append({"role": "system", "content": obj["system"]})
    for i, turn in enumerate(obj["conversations"]):
        where = f"conversations[{i}]"
        if not isinstance(turn, dict):
            errors.append(LineError(line, where, "must be an object with 'from' and 'value'", unit))
            continue
        role = SHAREGPT_ROLES.get(turn.get("from"))
        if role is None:
            errors.append(
                LineError(
                    line, f"{where}.from", f"unknown speaker {turn.get('from')!r} (expected human, gpt or system)", unit
                )
            )
        if not isinstance(turn.get("value"), str):
            errors.append(LineError(line, f"{where}.value", "must be a string", unit))
        elif not turn["value"].strip():
            errors.append(LineError(line, f"{where}.value", "is empty", unit))
        if role and isinstance(turn.get("value"), str):
            messages.append({"role": role, "content": turn["value"]})
    if not errors and not any(m["role"] == "assistant" for m in messages):
        errors.append(LineError(line, "conversations", "has no gpt turn to learn from", unit))
    return errors or Record(line, {"messages": messages}, unit)


_CONVERTERS = {"openai-chat": _chat, "alpaca": _alpaca, "sharegpt": _sharegpt}


def _text_lines(path: Path) -> Iterator[Record | LineError]:
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            text = _decode(raw, number)
            if isinstance(text, LineError):
                yield text
            elif text.strip():
                yield Record(number, {"messages": [{"role": "assistant", "content": text.rstrip("\r\n")}]})


def _text_document(path: Path) -> Iterator[Record | LineError]:
    text = _decode(path.read_bytes(), 1, "file")
    if isinstance(text, LineError):
        yield text
    elif not text.strip():
        yield LineError(1, "", "the document is empty")
    else:
        yield Record(1, {"messages": [{"role": "assistant", "content": text}]})


_INFERRED_COLUMNS = {
    "prompt": ("prompt", "question", "user", "input_text", "query"),
    "response": ("response", "answer", "assistant", "completion", "reply"),
    "instruction": ("instruction",),
    "input": ("input", "context"),
    "output": ("output",),
    "system": ("system", "system_prompt"),
}


def _resolve_mapping(header: list[str], mapping: ColumnMapping | None) -> ColumnMapping:
    columns = {name.strip().lower(): name for name in header}
    if mapping is None:
        found = {
            key: next((columns[c] for c in names if c in columns), None) for key, names in _INFERRED_COLUMNS.items()
        }
        mapping = ColumnMapping(**found)
        if not ((mapping.instruction and mapping.output) or (mapping.prompt and mapping.response)):
            raise FormatError(
                f"cannot tell which columns to use: the header has {', '.join(header) or 'no columns'}; expected "
                "prompt/response (or question/answer) or instruction/input/output, or give a mapping such as "
                "prompt=question,response=answer"
            )
        if mapping.instruction and mapping.output:
            mapping = ColumnMapping(
                instruction=mapping.instruction, input=mapping.input, output=mapping.output, system=mapping.system
            )
        return mapping
    for item in fields(mapping):
        column = getattr(mapping, item.name)
        if column is not None and column not in header:
            raise FormatError(
                f"the mapping names column '{column}' for {item.name}, but the header has {', '.join(header)}"
            )
    if not ((mapping.prompt and mapping.response) or (mapping.instruction and mapping.output)):
        raise FormatError("a mapping needs prompt and response, or instruction and output")
    return mapping


def _table(path: Path, delimiter: str, mapping: ColumnMapping | None) -> Iterator[Record | LineError]:
    with path.open("rb") as raw:
        text = io.TextIOWrapper(raw, encoding="utf-8-sig", errors="strict", newline="")
        reader = csv.reader(text, delimiter=delimiter)
        try:
            header = next(reader, None)
        except UnicodeDecodeError as exc:
            raise FormatError(f"the file is not UTF-8 text (byte {exc.start}): save it as UTF-8") from exc
        if not header:
            raise FormatError("the table is empty: expected a header row")
        resolved = _resolve_mapping(header, mapping)
        index = {name: i for i, name in enumerate(header)}
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except UnicodeDecodeError as exc:
                yield LineError(reader.line_num + 1, "", f"not valid UTF-8 text (byte {exc.start}): save as UTF-8")
                return
            except csv.Error as exc:
                yield LineError(reader.line_num, "", f"malformed row: {exc}")
                continue
            line = reader.line_num
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                yield LineError(line, "", f"has {len(row)} columns; the header has {len(header)}")
                continue

            def cell(column: str | None, row: list[str] = row) -> str:
                return row[index[column]] if column else ""

            if resolved.prompt:
                prompt, answer, names = (
                    cell(resolved.prompt),
                    cell(resolved.response),
                    (resolved.prompt, resolved.response),
                )
            else:
                extra = cell(resolved.input)
                prompt = cell(resolved.instruction) + (f"\n\n{extra}" if extra.strip() else "")
                answer, names = cell(resolved.output), (resolved.instruction, resolved.output)
            empty = [n for n, v in zip(names, (prompt, answer), strict=True) if not v.strip()]
            if empty:
                yield LineError(line, f"column {empty[0]}", "is empty")
                continue
            messages = [{"role": "system", "content": cell(resolved.system)}] if cell(resolved.system).strip() else []
            messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
            yield Record(line, {"messages": messages})


def read_records(path: Path, fmt: str, *, mapping: ColumnMapping | None = None) -> Iterator[Record | LineError]:
    """Every record of the file in canonical form, or the error that kept it out, in file order."""
    if fmt not in FORMATS:
        raise FormatError(f"unknown format '{fmt}'; known: {', '.join(FORMATS)}")
    if fmt == "text-lines":
        yield from _text_lines(path)
    elif fmt == "text-document":
        yield from _text_document(path)
    elif fmt in ("csv", "tsv"):
        yield from _table(path, "," if fmt == "csv" else "\t", mapping)
    else:
        convert = _CONVERTERS[fmt]
        for position, unit, obj in _json_objects(path):
            if isinstance(obj, LineError):
                yield obj
                continue
            result = convert(position, unit, obj)
            if isinstance(result, Record):
                yield result
            else:
                yield from result


# --- validation ----------------------------------------------------------------------------------


@dataclass
class ValidationReport:
    format: str
    records_total: int = 0
    records_valid: int = 0
    records_invalid: int = 0
    errors: list[LineError] = field(default_factory=list)
    errors_truncated: bool = False
    error_counts: Counter = field(default_factory=Counter)

    @property
    def ok(self) -> bool:
        return self.records_invalid == 0 and self.records_valid > 0

    def summary(self) -> str:
        if self.records_total == 0:
            return "the file has no records"
        shown = "; ".join(str(e) for e in self.errors[:5])
        more = f" (and {self.records_invalid - 5} more)" if self.records_invalid > 5 else ""
        return f"{self.records_invalid} of {self.records_total} records are invalid: {shown}{more}"

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
            "summary": None if self.ok else self.summary(),
        }


def _field_kind(field_name: str) -> str:
    return re.sub(r"\[\d+\]", "[]", field_name) or "record"


def validate_and_normalise(
    path: Path,
    fmt: str,
    out: Sink,
    *,
    mapping: ColumnMapping | None = None,
    count_tokens: Callable[[list[dict]], int] | None = None,
    max_tokens: int | None = None,
    max_reported_errors: int = 1000,
    progress: Callable[[int], None] | None = None,
) -> ValidationReport:
    """Check every record; write the valid ones to `out` as canonical JSONL; report all the others."""
    report = ValidationReport(format=fmt)
    last: LineError | None = None

    def reject(problems: list[LineError]) -> None:
        report.records_invalid += 1
        for problem in problems:
            report.error_counts[_field_kind(problem.field)] += 1
        room = max_reported_errors - len(report.errors)
        report.errors.extend(problems[: max(room, 0)])
        report.errors_truncated = report.errors_truncated or room < len(problems)

    pending: list[LineError] = []
    for item in read_records(path, fmt, mapping=mapping):
        if isinstance(item, LineError):
            # Several errors of one record arrive one after another with the same position.
            if last is not None and (item.line, item.unit) != (last.line, last.unit) and pending:
                reject(pending)
                report.records_total += 1
                pending = []
            pending.append(item)
            last = item
            continue
        if pending:
            reject(pending)
            report.records_total += 1
            pending, last = [], None
        report.records_total += 1
        messages = item.record["messages"]
        if count_tokens is not None and max_tokens is not None:
            tokens = count_tokens(messages)
            if tokens > max_tokens:
                message = f"record has {tokens} tokens; the base model's context is {max_tokens}: shorten or split it"
                reject([LineError(item.line, "messages", message, item.unit)])
                continue
        out.write(json.dumps(item.record, ensure_ascii=False, separators=(",", ":")).encode() + b"\n")
        report.records_valid += 1
        if progress is not None and report.records_total % PROGRESS_EVERY == 0:
            progress(report.records_total)
    if pending:
        reject(pending)
        report.records_total += 1
    return report


def make_token_counter(tokenizer: Any) -> Callable[[list[dict]], int]:
    """Tokens a record takes as the model sees it: rendered with the model's chat template."""
    if getattr(tokenizer, "chat_template", None):

        def count(messages: list[dict]) -> int:
            text = tokenizer.apply_chat_template(messages, tokenize=False)
            return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    else:

        def count(messages: list[dict]) -> int:
            return len(tokenizer("\n".join(m["content"] for m in messages))["input_ids"])

    return count


__all__ = [
    "FORMATS",
    "ColumnMapping",
    "FormatError",
    "Record",
    "ValidationReport",
    "detect_format",
    "make_token_counter",
    "read_records",
    "validate_and_normalise",
]
