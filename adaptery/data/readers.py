"""Dataset files in every supported format: detected, then read as a stream of canonical chat records.

The canonical record is OpenAI's chat form, `{"messages": [{"role", "content", "weight"?}]}` with
roles system, user and assistant and `weight` 0 or 1. Plain text becomes completion-style records,
`{"messages": [{"role": "assistant", "content": text}]}`: no prompt, so training learns the whole
text.

Files are streamed: JSONL and text line by line, JSON arrays element by element through `ijson`,
CSV/TSV row by row, so memory stays bounded whatever the file's size. `text-document` is the
exception by nature (its one record is the whole file). Every record is bounded (`RecordLimits`): one
longer than the limit in bytes, or nested deeper, is reported as an invalid record without being
parsed whole, so one line cannot take the server's memory or fail the rest of the file.

A record that cannot be used comes out as its errors instead, each naming the field as the original
format spells it (`conversations[2].from`, `output`, `column answer`), at the record's position:
the 1-based line for line-based files and tables, the 1-based element index ("record 3") for JSON
arrays. All the errors of one record come together, with the same position.
"""

from __future__ import annotations

import codecs
import csv
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, BinaryIO

import ijson

from adaptery.data.chat import (
    LineError,
    arguments_object,
    canonical_record,
    canonical_tools,
    record_errors,
    tools_errors,
)
from adaptery.data.untrusted import LineTooLong, RecordLimits, UntrustedJSONError, bounded_lines, loads

FORMATS = (
    "openai-chat",
    "alpaca",
    "sharegpt",
    "documents",
    "text-lines",
    "text-document",
    "csv",
    "tsv",
    "parquet",
    "openai-preference",
)
SNIFF_BYTES = 16 * 1024  # how much of a file detection reads
_OPENS, _CLOSES = ("start_map", "start_array"), ("end_map", "end_array")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
SHAREGPT_CALL, SHAREGPT_RESULT = ("function_call",), ("observation", "tool")  # LLaMA-Factory's and Glaive's speakers
PARQUET_MAGIC = b"PAR1"
PARQUET_BATCH_ROWS = 256  # rows decoded at a time: a row group is streamed, never held whole
_BOM = b"\xef\xbb\xbf"
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


class FormatError(ValueError):
    """The file as a whole cannot be read in the format asked for; the message says what to do."""


@dataclass(frozen=True)
class ColumnMapping:
    """Which CSV/TSV columns hold what: prompt/response, or instruction/input/output; system optional."""

    prompt: str | None = None
    response: str | None = None
    instruction: str | None = None
    input: str | None = None
    output: str | None = None
    system: str | None = None
    text: str | None = None  # a table of documents: one column of text


@dataclass(frozen=True, slots=True)
class Record:
    """One canonical chat record and where it came from in the file."""

    line: int
    record: dict[str, Any]
    unit: str = "line"  # "record" for an element of a JSON array


# --- detection -----------------------------------------------------------------------------------


def _key_format(keys: list[str] | str) -> str:
    """The format a first JSON record's top-level keys (or its JSON type, when not an object) point to."""
    if isinstance(keys, list):
        if "preferred_output" in keys or "non_preferred_output" in keys:
            return "openai-preference"
        if "messages" in keys:
            return "openai-chat"
        if "conversations" in keys:
            return "sharegpt"
        if "instruction" in keys or "output" in keys:
            return "alpaca"
        if "text" in keys:
            return "documents"
        found = f"has keys {', '.join(keys[:10])}" if keys else "is an empty object"
    else:
        found = f"is a JSON {keys}, not an object"
    raise FormatError(
        f"cannot tell the dataset format: the first record {found}; expected 'messages' (openai-chat), "
        f"'conversations' (sharegpt), 'instruction'/'output' (alpaca) or 'text' (documents). Give the format "
        f"explicitly "
        f"({', '.join(FORMATS)})"
    )


def _first_value_keys(head: bytes, prefix: str) -> list[str] | str:
    """Top-level keys of the first JSON value at `prefix` ("" for JSONL, "item" for an array), or its
    JSON type when it is not an object. Reads the head only: a first record longer than the head
    still shows the keys it starts with. (Events without prefixes: ijson builds each event's prefix
    string, which for a value nested thousands deep is quadratic work.)"""
    keys: list[str] = []
    first_at = 1 if prefix == "item" else 0  # the nesting at which the first value starts
    depth = 0
    try:
        for event, value in ijson.basic_parse(head, multiple_values=True):
            if depth == first_at:
                if event == "end_array":
                    raise FormatError("the file is an empty JSON array: there are no records")
                if event != "start_map":
                    return {"start_array": "array", "string": "string", "null": "null"}.get(event, "number or boolean")
            elif depth == first_at + 1 and event == "map_key":
                keys.append(value)
            elif depth == first_at + 1 and event == "end_map":
                break
            depth += (event in _OPENS) - (event in _CLOSES)
    except ijson.JSONError as exc:
        if not keys:
            raise FormatError(f"the file starts like JSON but is not valid JSON ({_ijson_reason(exc)})") from None
    return keys


def _json_format(head: bytes, stripped: str, name: str) -> str:
    start = head.find(stripped[:1].encode())
    if stripped.startswith("["):
        return _key_format(_first_value_keys(head[start:], "item"))
    first_line, newline, _ = stripped.partition("\n")
    if not newline:  # a first record longer than the head
        return _key_format(_first_value_keys(head[start:], ""))
    try:
        first = json.loads(first_line)
    except json.JSONDecodeError as exc:
        raise FormatError(
            f"the first line of '{name}' is not a complete JSON object ({exc.msg}, column {exc.colno}): "
            "JSONL needs one object per line, and a pretty-printed JSON file must be an array of records"
        ) from None
    except (RecursionError, ValueError):  # nested too deep for the parser, or a number too long: keys only
        return _key_format(_first_value_keys(head[start:], ""))
    return _key_format(list(first) if isinstance(first, dict) else type(first).__name__)


def _table_format(first_line: str) -> str | None:
    """csv or tsv when the first line is a header we can map; None otherwise."""
    for fmt, delimiter in (("tsv", "\t"), ("csv", ",")):
        header = next(csv.reader([first_line], delimiter=delimiter))
        if len(header) >= 2:
            try:
                _infer_mapping(header)
            except FormatError:
                continue
            return fmt
    return None


def detect_format(path: Path, filename: str | None = None) -> str:
    """Tell the format from the file's name (`filename`, else the path's) and its first few KB.

    .csv/.tsv name tables; JSON content is recognised by its first record's keys, whatever the name
    (an array of records or one object per line); other .txt files are text-lines; a header row of
    known columns is a table. Raises FormatError, saying what was found, when it cannot tell.
    """
    name = filename or path.name
    suffix = Path(name).suffix.lower()
    with path.open("rb") as handle:
        head = handle.read(SNIFF_BYTES)
    if suffix == ".parquet" or head.startswith(PARQUET_MAGIC):
        return "parquet"
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise FormatError(f"'{name}' is UTF-16 text: save it as UTF-8")
    if b"\x00" in head:
        raise FormatError(f"'{name}' is a binary file, not a dataset: expected JSONL, a JSON array, CSV, TSV or text")
    if suffix in (".csv", ".tsv"):
        return suffix[1:]  # a row that is not UTF-8 is then reported on its line
    try:
        # Not final when the head is cut from a longer file: its last character may be cut in two.
        text = codecs.getincrementaldecoder("utf-8")().decode(head, final=len(head) < SNIFF_BYTES)
    except UnicodeDecodeError as exc:
        line = head.count(b"\n", 0, exc.start) + 1
        raise FormatError(
            f"'{name}' is not UTF-8 text (line {line}, byte {exc.start} of the file): save it as UTF-8"
        ) from None
    stripped = text.lstrip("\ufeff \t\r\n")
    if not stripped:
        raise FormatError(f"'{name}' is empty")
    if stripped.startswith(("[", "{")):
        try:
            return _json_format(head, stripped, name)
        except FormatError:
            if suffix in (".txt", ".text"):  # text that happens to start like JSON
                return "text-lines"
            raise
    if suffix in (".json", ".jsonl"):
        raise FormatError(
            f"'{name}' does not start with a JSON object or array: expected one JSON object per line, or an "
            "array of records"
        )
    if suffix in (".txt", ".text"):
        return "text-lines"
    table = _table_format(stripped.partition("\n")[0].rstrip("\r"))
    if table:
        return table
    raise FormatError(
        f"cannot tell the dataset format of '{name}': it is not JSON, its first line is not a header of known "
        f"columns, and its name does not end in .jsonl, .json, .csv, .tsv or .txt. Give the format explicitly "
        f"({', '.join(FORMATS)})"
    )


# --- JSON: one object per line, or an array of records ------------------------------------------


def _ijson_reason(exc: Exception) -> str:
    """yajl's message without the multi-line excerpt it appends."""
    reason = exc.args[0] if exc.args else exc
    if isinstance(reason, bytes):
        reason = reason.decode("utf-8", "replace")
    return str(reason).strip().splitlines()[0]


def _lone_surrogate_at(value: Any, path: str = "") -> str | None:
    """The path of the first string holding half of a UTF-16 pair (a `\\ud800` escape), which no
    text encoding can store; None when there is none."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path
    elif isinstance(value, dict):
        for key, item in value.items():
            found = _lone_surrogate_at(item, f"{path}.{key}" if path else str(key))
            if found is not None:
                return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found = _lone_surrogate_at(item, f"{path}[{index}]")
            if found is not None:
                return found
    return None


def _not_utf8(line: int, byte: int, where: str = "the line") -> LineError:
    return LineError(line, "", f"not valid UTF-8 text (byte {byte} of {where}): save the file as UTF-8")


def _jsonl_values(handle: BinaryIO, limits: RecordLimits) -> Iterator[tuple[int, Any]]:
    for number, raw in enumerate(bounded_lines(handle, limits.max_bytes), start=1):
        if isinstance(raw, LineTooLong):
            yield number, LineError(number, "", limits.too_large(raw.size))
            continue
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as exc:
            yield number, _not_utf8(number, exc.start)
            continue
        try:
            # rstrip: so a column past the end is the end of the line
            value = loads(text.rstrip("\r\n"), max_depth=limits.max_depth)
        except UntrustedJSONError as exc:
            yield number, LineError(number, "", str(exc))
            continue
        if _SURROGATE_ESCAPE.search(raw):
            where = _lone_surrogate_at(value)
            if where is not None:
                message = "holds an unpaired \\ud800-\\udfff escape, which is not text: remove or fix it"
                value = LineError(number, where, message)
        yield number, value


def _array_values(handle: BinaryIO, limits: RecordLimits) -> Iterator[tuple[int, Any]]:
    """Each element of the file's array; one over the limits as a LineError, skipped without being built.
    (An element's size is counted from its parsed strings and tokens: ijson tells no byte offsets.)"""
    index = depth = size = 0  # index: elements done; depth: 1 inside the file's array
    builder = ijson.ObjectBuilder()
    problem = None
    try:
        for event, value in ijson.basic_parse(handle, use_float=True):
            file_array_event = depth == 0 or (depth == 1 and event == "end_array")  # it opens or closes
            depth += (event in _OPENS) - (event in _CLOSES)
            if file_array_event:
                continue
            if problem is None:
                size += len(value) + 3 if isinstance(value, str) else 4
                if depth - 1 > limits.max_depth:
                    problem = limits.too_deep()
                elif size > limits.max_bytes:
                    problem = limits.too_large()
                else:
                    builder.event(event, value)
            if depth == 1:  # the element is complete
                index += 1
                yield index, LineError(index, "", problem, "record") if problem else builder.value
                builder, size, problem = ijson.ObjectBuilder(), 0, None
    except ijson.JSONError as exc:
        reason = _ijson_reason(exc)
        broken = f"the JSON array is broken after record {index}" if index else "the JSON array is broken"
        if "premature EOF" in reason:
            message = f"{broken}: the file ends inside record {index + 1} (was the upload cut short?)"
        elif "invalid bytes in UTF8" in reason:
            message = f"{broken}: it is not valid UTF-8 text; save the file as UTF-8 (nothing after it was read)"
        else:
            message = f"{broken} ({reason}): nothing after it was read"
        yield index + 1, LineError(index + 1, "", message, "record")


def _json_values(path: Path, limits: RecordLimits) -> Iterator[tuple[int, str, Any]]:
    """(position, unit, value or LineError) for each record of a JSONL file or of a JSON array."""
    with path.open("rb") as handle:
        head = handle.read(SNIFF_BYTES)
        stripped = head.removeprefix(_BOM).lstrip(b" \t\r\n")
        handle.seek(len(_BOM) if head.startswith(_BOM) else 0)
        if stripped.startswith(b"["):
            for index, value in _array_values(handle, limits):
                yield index, "record", value
        else:
            for number, value in _jsonl_values(handle, limits):
                yield number, "line", value


def _nonempty_string(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _json_text_field(obj: dict[str, Any], name: str) -> tuple[Any, LineError | None]:
    """`obj[name]`, parsed when it is JSON text (how LLaMA-Factory, Glaive and many Parquet files store
    `tools`), with the error when it does not parse."""
    value = obj.get(name)
    if not isinstance(value, str):
        return value, None
    if not value.strip():
        return None, None
    try:
        return json.loads(value), None
    except (json.JSONDecodeError, RecursionError):
        return None, LineError(0, name, "is text but not JSON: expected a list of function schemas")


def _chat(line: int, unit: str, obj: Any) -> Record | list[LineError]:
    if isinstance(obj, dict) and isinstance(obj.get("tools"), str):
        tools, problem = _json_text_field(obj, "tools")
        if problem:
            return [LineError(line, problem.field, problem.message, unit)]
        obj = {**obj, "tools": tools}
    errors = record_errors(line, obj)
    if errors:
        return [LineError(e.line, e.field, e.message, unit) for e in errors]
    return Record(line, canonical_record(obj), unit)


def _documents(line: int, unit: str, obj: Any) -> Record | list[LineError]:
    if not isinstance(obj, dict) or "text" not in obj:
        return [LineError(line, "text", "is missing: each record of a documents file is {'text': ...}", unit)]
    document = {"text": obj["text"]}
    errors = record_errors(line, document)
    return [LineError(e.line, e.field, e.message, unit) for e in errors] or Record(
        line, canonical_record(document), unit
    )


def _alpaca(line: int, unit: str, obj: Any) -> Record | list[LineError]:
    if not isinstance(obj, dict):
        return [LineError(line, "", "must be a JSON object with instruction, input and output", unit)]
    errors = []
    for name in ("instruction", "output"):
        if name not in obj:
            errors.append(LineError(line, name, "is missing", unit))
        elif not _nonempty_string(obj[name]):
            errors.append(LineError(line, name, "must be a non-empty string", unit))
    for name in ("input", "system"):
        if obj.get(name) is not None and not isinstance(obj[name], str):
            errors.append(LineError(line, name, "must be a string", unit))
    history = obj.get("history") or []
    if not isinstance(history, list):
        errors.append(LineError(line, "history", "must be a list of [instruction, response] pairs", unit))
        history = []
    for i, pair in enumerate(history):
        if not (isinstance(pair, list) and len(pair) == 2 and all(_nonempty_string(p) for p in pair)):
            errors.append(LineError(line, f"history[{i}]", "must be a pair of non-empty strings", unit))
    if errors:
        return errors
    messages = [{"role": "system", "content": obj["system"]}] if _nonempty_string(obj.get("system")) else []
    for earlier_prompt, earlier_answer in history:
        messages += [{"role": "user", "content": earlier_prompt}, {"role": "assistant", "content": earlier_answer}]
    extra = obj.get("input") or ""
    prompt = obj["instruction"] + (f"\n\n{extra}" if extra.strip() else "")
    messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": obj["output"]}]
    return Record(line, {"messages": messages}, unit)


def _sharegpt_calls(
    line: int, unit: str, where: str, value: str, names: set[str], has_tools: bool, first_id: int
) -> tuple[list[dict[str, Any]], list[LineError]]:
    """A `function_call` turn's value (one `{"name", "arguments"}` or a list of them) as OpenAI tool calls."""
    try:
        parsed = json.loads(value)
    except (json.JSONDecodeError, RecursionError):
        return [], [LineError(line, where, 'is not JSON: a function_call is {"name": ..., "arguments": {...}}', unit)]
    calls, errors = [], []
    for number, call in enumerate(parsed if isinstance(parsed, list) else [parsed]):
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            errors.append(LineError(line, where, 'must be {"name": ..., "arguments": {...}} (or a list of them)', unit))
            continue
        if call["name"] not in names:
            known = f"tools define {', '.join(sorted(names))}" if has_tools else "the record has no tools"
            errors.append(LineError(line, where, f"calls {call['name']!r}, which is not in tools ({known})", unit))
        arguments, problem = arguments_object(call.get("arguments", {}))
        if problem:
            errors.append(LineError(line, where, f"arguments {problem}", unit))
            continue
        function = {"name": call["name"], "arguments": json.dumps(arguments, ensure_ascii=False)}
        calls.append({"id": f"call_{first_id + number}", "type": "function", "function": function})
    return calls, errors


def _sharegpt(line: int, unit: str, obj: Any) -> Record | list[LineError]:
    if not isinstance(obj, dict):
        return [LineError(line, "", "must be a JSON object with a 'conversations' list", unit)]
    turns = obj.get("conversations")
    if not isinstance(turns, list) or not turns:
        return [LineError(line, "conversations", "must be a non-empty list of turns", unit)]
    errors, messages = [], []
    tools, problem = _json_text_field(obj, "tools")
    if problem:
        errors.append(LineError(line, "tools", problem.message, unit))
    tool_problems, names = tools_errors(line, tools)
    errors += [LineError(e.line, e.field, e.message, unit) for e in tool_problems]
    if obj.get("system") is not None and not isinstance(obj["system"], str):
        errors.append(LineError(line, "system", "must be a string", unit))
    elif _nonempty_string(obj.get("system")):
        messages.append({"role": "system", "content": obj["system"]})
    pending: list[tuple[str, int]] = []  # (call id, turn that made it), answered in order by observations
    calls_made = 0
    for i, turn in enumerate(turns):
        where = f"conversations[{i}]"
        if not isinstance(turn, dict):
            errors.append(LineError(line, where, "must be an object with 'from' and 'value'", unit))
            continue
        speaker, value = turn.get("from"), turn.get("value")
        known = isinstance(speaker, str) and speaker in (*SHAREGPT_ROLES, *SHAREGPT_CALL, *SHAREGPT_RESULT)
        if not known:
            message = f"unknown speaker {speaker!r} (expected human, gpt, system, function_call or observation)"
            errors.append(LineError(line, f"{where}.from", message, unit))
        if not isinstance(value, str):
            errors.append(LineError(line, f"{where}.value", "must be a string", unit))
            continue
        if not value.strip() and speaker not in SHAREGPT_RESULT:
            errors.append(LineError(line, f"{where}.value", "is empty", unit))
            continue
        if not known:
            continue
        if speaker in SHAREGPT_RESULT:
            if not pending:
                message = f"{speaker!r} answers no call: no function_call before it is left unanswered"
                errors.append(LineError(line, f"{where}.from", message, unit))
                continue
            call_id, _ = pending.pop(0)
            messages.append({"role": "tool", "tool_call_id": call_id, "content": value})
            continue
        for _, made_at in pending[:1]:
            message = "the function_call has no observation answering it before the conversation goes on"
            errors.append(LineError(line, f"conversations[{made_at}]", message, unit))
        pending = []
        if speaker in SHAREGPT_CALL:
            calls, problems = _sharegpt_calls(line, unit, f"{where}.value", value, names, tools is not None, calls_made)
            errors += problems
            calls_made += len(calls)
            pending = [(call["id"], i) for call in calls]
            messages.append({"role": "assistant", "content": "", "tool_calls": calls})
        else:
            messages.append({"role": SHAREGPT_ROLES[speaker], "content": value})
    if not errors and not any(m["role"] == "assistant" for m in messages):
        errors.append(LineError(line, "conversations", "has no gpt turn to learn from", unit))
    if errors:
        return errors
    record: dict[str, Any] = {"messages": messages}
    if tools:
        record["tools"] = canonical_tools(tools)
    return Record(line, record, unit)


_CONVERTERS = {
    "openai-chat": _chat,
    "openai-preference": _chat,
    "alpaca": _alpaca,
    "sharegpt": _sharegpt,
    "documents": _documents,
}


# --- plain text ----------------------------------------------------------------------------------


def _completion(line: int, text: str) -> Record:
    return Record(line, {"messages": [{"role": "assistant", "content": text}]})


def _text_lines(path: Path, limits: RecordLimits) -> Iterator[Record | LineError]:
    with path.open("rb") as handle:
        for number, raw in enumerate(bounded_lines(handle, limits.max_bytes), start=1):
            if isinstance(raw, LineTooLong):
                yield LineError(number, "", limits.too_large(raw.size))
                continue
            try:
                text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                yield _not_utf8(number, exc.start)
                continue
            if text.strip():
                yield _completion(number, text.rstrip("\r\n"))


def _text_document(path: Path, limits: RecordLimits) -> Iterator[Record | LineError]:
    """The whole file is one record, so it is read whole once it is known to be within the record limit."""
    size = path.stat().st_size
    if size > limits.max_bytes:
        yield LineError(1, "", limits.too_large(size))
        return
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line_start = raw.rfind(b"\n", 0, exc.start) + 1
        yield _not_utf8(raw.count(b"\n", 0, line_start) + 1, exc.start - line_start)
        return
    if not text.strip():
        yield LineError(1, "", "the document is empty")
    else:
        yield _completion(1, text)


# --- tables --------------------------------------------------------------------------------------

_PROMPT_COLUMNS = ("prompt", "question", "user", "query", "input")
_RESPONSE_COLUMNS = ("response", "answer", "assistant", "completion", "output")
_OUTPUT_COLUMNS = ("output", "response", "answer", "completion")
_INPUT_COLUMNS = ("input", "context")
_SYSTEM_COLUMNS = ("system", "system_prompt")
_TEXT_COLUMNS = ("text", "content", "document")
_EXPECTED_COLUMNS = (
    "prompt/response, question/answer, user/assistant or instruction/input/output (system optional), or one text "
    "column (documents)"
)


def _infer_mapping(header: list[str]) -> ColumnMapping:
    columns = {name.strip().casefold(): name for name in header}

    def first(names: tuple[str, ...]) -> str | None:
        return next((columns[name] for name in names if name in columns), None)

    system = first(_SYSTEM_COLUMNS)
    if "instruction" in columns and first(_OUTPUT_COLUMNS):
        return ColumnMapping(
            instruction=columns["instruction"],
            input=first(_INPUT_COLUMNS),
            output=first(_OUTPUT_COLUMNS),
            system=system,
        )
    if first(_PROMPT_COLUMNS) and first(_RESPONSE_COLUMNS):
        return ColumnMapping(prompt=first(_PROMPT_COLUMNS), response=first(_RESPONSE_COLUMNS), system=system)
    if len(header) == 1 and first(_TEXT_COLUMNS):
        return ColumnMapping(text=first(_TEXT_COLUMNS))
    raise FormatError(
        f"cannot tell which columns to use: the header has {', '.join(header) or 'no columns'}; expected "
        f"{_EXPECTED_COLUMNS}, or give a column mapping such as prompt=<column>, response=<column>"
    )


def _checked_mapping(header: list[str], mapping: ColumnMapping) -> ColumnMapping:
    """`mapping` with each column as the header spells it; FormatError for a column it lacks."""
    columns = {name.strip().casefold(): name for name in header}
    resolved = {}
    for item in fields(mapping):
        column = getattr(mapping, item.name)
        if column is None:
            continue
        found = column if column in header else columns.get(column.strip().casefold())
        if found is None:
            raise FormatError(
                f"the mapping names column '{column}' for {item.name}, but the header has {', '.join(header)}"
            )
        resolved[item.name] = found
    mapping = ColumnMapping(**resolved)
    prompt_style = mapping.prompt and mapping.response and not (mapping.instruction or mapping.input or mapping.output)
    instruction_style = mapping.instruction and mapping.output and not (mapping.prompt or mapping.response)
    document_style = mapping.text and not any(
        (mapping.prompt, mapping.response, mapping.instruction, mapping.input, mapping.output, mapping.system)
    )
    if mapping.text and not document_style:
        raise FormatError("a column mapping with text (documents) names no other column")
    if not (prompt_style or instruction_style or document_style):
        raise FormatError(
            "a column mapping needs prompt and response, or instruction and output (input optional); system is "
            "optional with either; or text alone, for documents"
        )
    return mapping


def _decoded_lines(
    handle: BinaryIO, bad: list[tuple[int, int]], too_long: list[tuple[int, int]], limits: RecordLimits
) -> Iterator[str]:
    """The file's lines as text for the csv module; a line that is not UTF-8 is noted in `bad` as
    (line, byte) and passed on with replacement characters, one over the record limit in `too_long` as
    (line, bytes) and passed on empty, so the row each belongs to can be refused."""
    for number, raw in enumerate(bounded_lines(handle, limits.max_bytes), start=1):
        if isinstance(raw, LineTooLong):
            too_long.append((number, raw.size))
            yield "\n"
            continue
        try:
            yield raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as exc:
            bad.append((number, exc.start))
            yield raw.decode("utf-8", "replace")


def _table(
    path: Path, delimiter: str, mapping: ColumnMapping | None, limits: RecordLimits
) -> Iterator[Record | LineError]:
    csv.field_size_limit(limits.max_bytes)  # a quoted field spanning many lines is bounded too
    bad: list[tuple[int, int]] = []
    too_long: list[tuple[int, int]] = []
    with path.open("rb") as handle:
        reader = csv.reader(_decoded_lines(handle, bad, too_long, limits), delimiter=delimiter)
        header = next(reader, None)
        if bad:
            raise FormatError(f"the header row is not UTF-8 text (byte {bad[0][1]}): save the file as UTF-8")
        if too_long:
            raise FormatError(f"the header row is {limits.too_large(too_long[0][1])}")
        if not header or not any(name.strip() for name in header):
            raise FormatError(f"the table has no header row: expected columns such as {_EXPECTED_COLUMNS}")
        mapping = _checked_mapping(header, mapping) if mapping else _infer_mapping(header)
        index = {name: i for i, name in enumerate(header)}
        while True:
            start = reader.line_num + 1
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                yield LineError(start, "", f"malformed row: {exc}")
                bad.clear()
                too_long.clear()
                continue
            end = reader.line_num
            spans = f" (the row spans lines {start}-{end}: is a quote left open?)" if end > start else ""
            size = sum(len(cell) for cell in row)
            if too_long or size > limits.max_bytes:
                number, size = too_long[0] if too_long else (start, size)
                yield LineError(number, "", limits.too_large(size))
                bad.clear()
                too_long.clear()
                continue
            if bad:
                number, byte = bad[0]
                yield _not_utf8(start, byte, "the line" if number == start else f"line {number}")
                bad.clear()
                continue
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                yield LineError(start, "", f"has {_columns(len(row))}; the header has {len(header)}{spans}")
                continue
            yield _table_record(start, row, index, mapping)


def _columns(count: int) -> str:
    return f"{count} column{'' if count == 1 else 's'}"


def _table_record(line: int, row: list[str], index: dict[str, int], mapping: ColumnMapping) -> Record | LineError:
    def cell(column: str | None) -> str:
        return row[index[column]] if column else ""

    if mapping.text:
        text = cell(mapping.text)
        if not text.strip():
            return LineError(line, f"column {mapping.text}", "is empty")
        return Record(line, canonical_record({"text": text}))
    if mapping.prompt:
        required = (mapping.prompt, mapping.response)
        prompt = cell(mapping.prompt)
    else:
        required = (mapping.instruction, mapping.output)
        extra = cell(mapping.input)
        prompt = cell(mapping.instruction) + (f"\n\n{extra}" if extra.strip() else "")
    empty = [column for column in required if not cell(column).strip()]
    if empty:
        return LineError(line, f"column {empty[0]}", "is empty")
    system = cell(mapping.system)
    messages = [{"role": "system", "content": system}] if system.strip() else []
    messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": cell(required[1])}]
    return Record(line, {"messages": messages})


# --- Parquet -------------------------------------------------------------------------------------


def _parquet_shape(columns: list[str], mapping: ColumnMapping | None) -> str | ColumnMapping:
    """The JSON format the rows are records of, or the column mapping of a flat table."""
    if mapping is not None:
        return _checked_mapping(columns, mapping)
    try:
        return _key_format(columns)
    except FormatError:
        pass
    try:
        return _infer_mapping(columns)
    except FormatError:
        raise FormatError(
            f"cannot tell what the Parquet file's rows hold: its columns are {', '.join(columns[:10])}; expected "
            f"'messages', 'conversations', 'instruction'/'output', 'text', or columns such as {_EXPECTED_COLUMNS}"
        ) from None


def _parquet(path: Path, mapping: ColumnMapping | None, limits: RecordLimits) -> Iterator[Record | LineError]:
    """Each row as a record (position: its 1-based row number), decoded a batch at a time from row group
    after row group, in any of the JSON shapes (the columns are the record's keys) or as a flat table."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise FormatError(f"'{path.name}' is not a readable Parquet file ({exc})") from None
    columns = table.schema_arrow.names
    shape = _parquet_shape(columns, mapping)
    index = {name: i for i, name in enumerate(columns)}
    number = 0
    try:
        for batch in table.iter_batches(batch_size=PARQUET_BATCH_ROWS):
            for row in batch.to_pylist():
                number += 1
                size = len(json.dumps(row, ensure_ascii=False, default=str))
                if size > limits.max_bytes:
                    yield LineError(number, "", limits.too_large(size), "row")
                    continue
                if isinstance(shape, ColumnMapping):
                    cells = ["" if row[name] is None else str(row[name]) for name in columns]
                    result = _table_record(number, cells, index, shape)
                else:
                    result = _CONVERTERS[shape](number, "row", {k: v for k, v in row.items() if v is not None})
                if isinstance(result, Record):
                    yield Record(result.line, result.record, "row")
                elif isinstance(result, LineError):
                    yield LineError(result.line, result.field, result.message, "row")
                else:
                    yield from (LineError(e.line, e.field, e.message, "row") for e in result)
    except (pa.ArrowException, OSError) as exc:
        yield LineError(number + 1, "", f"the Parquet file cannot be read past row {number}: {exc}", "row")


# --- all formats ---------------------------------------------------------------------------------


def read_records(
    path: Path, fmt: str, *, limits: RecordLimits, mapping: ColumnMapping | None = None
) -> Iterator[Record | LineError]:
    """Every record of the file in canonical form, or the errors that kept it out, in file order.

    A stream: nothing but the current record is held, and it within `limits` (a record over them is an
    error). Problems with the file as a whole (an unknown format, a table header that cannot be mapped)
    raise FormatError. `mapping` is for csv/tsv; without it the columns are inferred from the header.
    """
    if fmt not in FORMATS:
        raise FormatError(f"unknown format '{fmt}'; known: {', '.join(FORMATS)}")
    if fmt == "text-lines":
        yield from _text_lines(path, limits)
    elif fmt == "text-document":
        yield from _text_document(path, limits)
    elif fmt in ("csv", "tsv"):
        yield from _table(path, "," if fmt == "csv" else "\t", mapping, limits)
    elif fmt == "parquet":
        yield from _parquet(path, mapping, limits)
    else:
        convert = _CONVERTERS[fmt]
        for position, unit, value in _json_values(path, limits):
            if isinstance(value, LineError):
                yield value
                continue
            result = convert(position, unit, value)
            if isinstance(result, Record):
                yield result
            else:
                yield from result
