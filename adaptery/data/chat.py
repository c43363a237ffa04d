"""OpenAI chat-format records: validating them line by line, and their one canonical form.

Every problem in the file is reported with its line number and field, so a person can fix the
file in one pass instead of one error at a time.

A record is a conversation, `{"messages": [...], "tools"?: [...]}` in OpenAI's fine-tuning format
(function calling included: assistant `tool_calls` with ids, `tool` messages answering them by
`tool_call_id`, the functions' JSON Schemas in `tools`), or a document for continued pre-training,
`{"text": "..."}`. Content may be a string or a list of text parts, as OpenAI allows;
`canonical_record` joins the parts, wraps bare function schemas, writes arguments as JSON text and
drops what training does not use, so every later stage reads one shape. A document's canonical form
is a conversation too, so every stage that reads messages (statistics, dedup, PII, the dataset page)
reads it unchanged: `{"messages": [{"role": "assistant", "content": text}], "document": true}`;
training renders it without the chat template, loss on every token, packed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from jsonschema.exceptions import SchemaError
from jsonschema.validators import validator_for

from adaptery.data.untrusted import LineTooLong, RecordLimits, UntrustedJSONError, loads

ROLES = ("system", "user", "assistant", "tool")
MAX_REPORTED_ERRORS = 50
FUNCTION_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")  # OpenAI's rule, with the '.' and ':' MCP names use

Where = Callable[[int], str]  # a message's index -> its field as the source file spells it


@dataclass(frozen=True)
class LineError:
    line: int
    field: str
    message: str
    unit: str = "line"  # "record" where the file has no lines to point at (a JSON array)

    def __str__(self) -> str:
        where = f"{self.unit} {self.line}" + (f": {self.field}" if self.field else "")
        return f"{where}: {self.message}"

    def to_dict(self) -> dict[str, object]:
        return {"line": self.line, "unit": self.unit, "field": self.field, "message": self.message}


@dataclass
class ChatFileReport:
    records: int = 0
    errors: list[LineError] = field(default_factory=list)
    error_count: int = 0

    @property
    def ok(self) -> bool:
        return self.error_count == 0 and self.records > 0

    def summary(self) -> str:
        if self.records == 0 and self.error_count == 0:
            return "the file has no records: expected one JSON object per line with a 'messages' list"
        shown = "; ".join(str(e) for e in self.errors[:5])
        more = f" (and {self.error_count - 5} more)" if self.error_count > 5 else ""
        return f"{self.error_count} invalid line(s) of {self.records + self.error_count}: {shown}{more}"


# --- content --------------------------------------------------------------------------------------


def content_text(content: object) -> str | None:
    """The text of a message's content: the string, or its text parts joined; None when it is neither
    (`content_problem` says why)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str) for part in content
    ):
        return "".join(part["text"] for part in content)
    return None


def content_problem(content: object) -> str:
    if isinstance(content, list):
        for index, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind in ("image_url", "input_image", "image", "input_audio", "file"):
                return f"part {index} is {kind!r}: only text parts are supported (images and audio are not, yet)"
            if kind != "text" or not isinstance(part.get("text"), str):
                return f"part {index} must be {{'type': 'text', 'text': <string>}}"
    return "must be a string or a list of text parts"


# --- tools and calls ------------------------------------------------------------------------------


def tool_function(tool: object) -> dict[str, Any] | None:
    """The function object of a tool, OpenAI's `{"type": "function", "function": {...}}` or the bare
    `{"name", "description", "parameters"}` that LLaMA-Factory and Glaive write; None when neither."""
    if not isinstance(tool, dict):
        return None
    if "function" in tool and isinstance(tool["function"], dict) and tool.get("type", "function") == "function":
        return tool["function"]
    if "name" in tool and "function" not in tool:
        return tool
    return None


def schema_problem(schema: object) -> str | None:
    """Why `schema` is not a JSON Schema (the validator's own words and where), or None."""
    if not isinstance(schema, dict | bool):
        return "must be a JSON Schema object"
    try:
        validator_for(schema).check_schema(schema)
    except SchemaError as exc:
        at = "/".join(str(p) for p in exc.absolute_path)
        return f"is not JSON Schema: {exc.message}" + (f" (at {at})" if at else "")
    return None


def tools_errors(line: int, tools: object, field_name: str = "tools") -> tuple[list[LineError], set[str]]:
    """Errors of a record's tools, and the names of its functions."""
    if tools is None:
        return [], set()
    if not isinstance(tools, list):
        return [LineError(line, field_name, "must be a list of function tools")], set()
    errors, names = [], set()
    for index, tool in enumerate(tools):
        where = f"{field_name}[{index}]"
        function = tool_function(tool)
        if function is None:
            message = "must be {'type': 'function', 'function': {'name', 'description', 'parameters'}}"
            errors.append(LineError(line, where, message))
            continue
        name = function.get("name")
        if not isinstance(name, str) or not FUNCTION_NAME.match(name):
            errors.append(LineError(line, f"{where}.name", "must be 1-64 letters, digits, '_', '-', '.' or ':'"))
        elif name in names:
            errors.append(LineError(line, f"{where}.name", f"function {name!r} is defined twice"))
        else:
            names.add(name)
        if function.get("description") is not None and not isinstance(function["description"], str):
            errors.append(LineError(line, f"{where}.description", "must be a string"))
        if "parameters" in function:
            problem = schema_problem(function["parameters"])
            if problem:
                errors.append(LineError(line, f"{where}.parameters", problem))
    return errors, names


def arguments_object(arguments: object) -> tuple[dict[str, Any] | None, str | None]:
    """A call's arguments as an object (they come as JSON text, as OpenAI writes them, or as an object)."""
    if isinstance(arguments, dict):
        return arguments, None
    if not isinstance(arguments, str):
        return None, "must be a JSON object, or JSON text of one"
    try:
        value = json.loads(arguments)
    except (json.JSONDecodeError, RecursionError) as exc:
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else "nested too deep"
        return None, f"are not JSON ({reason}): {arguments[:80]!r}"
    if not isinstance(value, dict):
        return None, f"must be a JSON object, not {type(value).__name__}"
    return value, None


def _call_errors(line: int, where: str, call: object, names: set[str], has_tools: bool) -> list[LineError]:
    if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
        return [LineError(line, where, "must be {'id', 'type': 'function', 'function': {'name', 'arguments'}}")]
    errors = []
    if not isinstance(call.get("id"), str) or not call["id"]:
        errors.append(LineError(line, f"{where}.id", "must be a non-empty string"))
    if call.get("type", "function") != "function":
        errors.append(LineError(line, f"{where}.type", "must be 'function'"))
    name = call["function"].get("name")
    if not isinstance(name, str) or not name:
        errors.append(LineError(line, f"{where}.function.name", "must be a non-empty string"))
    elif name not in names:
        known = f"the record's tools define {', '.join(sorted(names))}" if has_tools else "the record has no tools"
        errors.append(LineError(line, f"{where}.function.name", f"calls {name!r}, which is not in tools ({known})"))
    _, problem = arguments_object(call["function"].get("arguments"))
    if problem:
        errors.append(LineError(line, f"{where}.function.arguments", problem))
    return errors


def _message_errors(line: int, index: int, message: object, where: str = "") -> list[LineError]:
    where = where or f"messages[{index}]"
    if not isinstance(message, dict):
        return [LineError(line, where, "must be an object with 'role' and 'content'")]
    errors = []
    role = message.get("role")
    if role not in ROLES:
        message_text = f"unknown role {role!r} (expected system, user, assistant or tool)"
        errors.append(LineError(line, f"{where}.role", message_text))
    content = message.get("content")
    calls = message.get("tool_calls") if role == "assistant" else None
    if role == "assistant" and message.get("tool_calls") is not None and not isinstance(calls, list):
        errors.append(LineError(line, f"{where}.tool_calls", "must be a list of calls"))
    if content is None and calls:
        pass  # a turn that only calls tools
    else:
        text = content_text(content)
        if text is None:
            errors.append(LineError(line, f"{where}.content", content_problem(content)))
        elif not text.strip() and role != "tool" and not calls:
            errors.append(LineError(line, f"{where}.content", "is empty"))
    if role == "tool" and (not isinstance(message.get("tool_call_id"), str) or not message["tool_call_id"]):
        errors.append(LineError(line, f"{where}.tool_call_id", "must name the call this message answers"))
    weight = message.get("weight")
    if weight is not None and weight not in (0, 1):
        errors.append(LineError(line, f"{where}.weight", "must be 0 or 1"))
    return errors


def conversation_errors(
    line: int, messages: list[dict[str, Any]], names: set[str], has_tools: bool, where: Where | None = None
) -> list[LineError]:
    """Calls and answers in order: each call's function is in tools and its arguments are a JSON object;
    each tool message answers a call made before it; every call is answered before the conversation
    goes on (a conversation may end on calls: it teaches to call). `messages` are individually valid."""
    where = where or (lambda index: f"messages[{index}]")
    errors: list[LineError] = []
    pending: dict[str, int] = {}  # call id -> index of the message that made it
    seen: set[str] = set()
    for index, message in enumerate(messages):
        role = message["role"]
        if role == "tool":
            call_id = message["tool_call_id"]
            if pending.pop(call_id, None) is None:
                answered = "was answered already" if call_id in seen else "matches no earlier tool call"
                message_text = f"answers no call: tool_call_id {call_id!r} {answered}"
                errors.append(LineError(line, f"{where(index)}.tool_call_id", message_text))
            continue
        errors += _unanswered(line, pending, messages, where)
        pending = {}
        for number, call in enumerate((message.get("tool_calls") or []) if role == "assistant" else []):
            call_where = f"{where(index)}.tool_calls[{number}]"
            problems = _call_errors(line, call_where, call, names, has_tools)
            errors += problems
            call_id = call.get("id") if isinstance(call, dict) else None
            if isinstance(call_id, str) and call_id:
                if call_id in seen:
                    errors.append(LineError(line, f"{call_where}.id", f"{call_id!r} is used by an earlier call"))
                seen.add(call_id)
                pending[call_id] = index
    return errors


def _unanswered(line: int, pending: dict[str, int], messages: list[dict[str, Any]], where: Where) -> list[LineError]:
    errors = []
    for call_id, index in pending.items():
        calls = [c for c in messages[index]["tool_calls"] if isinstance(c, dict) and c.get("id") == call_id]
        name = calls[0]["function"].get("name")
        message = f"the call {call_id!r} to {name!r} has no answer: a tool message with its tool_call_id must follow"
        errors.append(LineError(line, f"{where(index)}.tool_calls", message))
    return errors


def _document_errors(line: int, record: dict[str, Any]) -> list[LineError]:
    text = record["text"]
    if not isinstance(text, str):
        return [LineError(line, "text", "must be a string")]
    if not text.strip():
        return [LineError(line, "text", "is empty")]
    return []


def is_document(record: object) -> bool:
    """A `{"text": ...}` record, or the canonical form of one."""
    return isinstance(record, dict) and (
        ("text" in record and "messages" not in record) or record.get("document") is True
    )


# --- preference pairs: OpenAI's DPO form ----------------------------------------------------------------
PREFERENCE_PARTS = ("preferred_output", "non_preferred_output")


def is_preference(record: object) -> bool:
    """A preference pair: `{"input": {"messages"}, "preferred_output": [...], "non_preferred_output": [...]}`."""
    return isinstance(record, dict) and "preferred_output" in record


def preference_errors(line: int, record: dict[str, Any]) -> list[LineError]:
    conversation = record.get("input")
    messages = conversation.get("messages") if isinstance(conversation, dict) else None
    if not isinstance(messages, list) or not messages:
        return [LineError(line, "input.messages", "must be a non-empty list of messages")]
    errors = [
        LineError(e.line, f"input.{e.field}", e.message)
        for i, m in enumerate(messages)
        for e in _message_errors(line, i, m)
    ]
    if not errors and messages[-1].get("role") != "user":
        errors.append(LineError(line, "input.messages", "must end with the user's turn that the outputs answer"))
    for part in PREFERENCE_PARTS:
        output = record.get(part)
        if not isinstance(output, list) or not output:
            errors.append(LineError(line, part, "must be a non-empty list of assistant messages"))
            continue
        problems = [e for i, m in enumerate(output) for e in _message_errors(line, i, m, f"{part}[{i}]")]
        if not problems and any(m.get("role") != "assistant" for m in output):
            problems.append(LineError(line, part, "must hold only assistant messages"))
        errors += problems
    return errors


def canonical_preference(record: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"input": {"messages": [canonical_message(m) for m in record["input"]["messages"]]}}
    for part in PREFERENCE_PARTS:
        out[part] = [canonical_message(m) for m in record[part]]
    return out


def conversations_of(record: dict[str, Any]) -> list[list[dict[str, Any]]]:
    """The conversations a canonical record holds: one, or a pair's prompt with each of its two outputs."""
    if is_preference(record):
        return [record["input"]["messages"] + record[part] for part in PREFERENCE_PARTS]
    return [record["messages"]]


def record_errors(line: int, record: object) -> list[LineError]:
    if not isinstance(record, dict):
        return [LineError(line, "", "each line must be a JSON object")]
    if is_preference(record):
        return preference_errors(line, record)
    if "text" in record and "messages" not in record:
        return _document_errors(line, record)
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        return [LineError(line, "messages", "must be a non-empty list of messages")]
    if record.get("document") not in (None, False, True):
        return [LineError(line, "document", "must be true or false")]
    if record.get("document") and (len(messages) != 1 or not isinstance(messages[0], dict)
                                   or messages[0].get("role") != "assistant"):  # fmt: skip
        return [LineError(line, "messages", "a document is one assistant message holding its text")]
    errors, names = tools_errors(line, record.get("tools"))
    errors += [e for i, m in enumerate(messages) for e in _message_errors(line, i, m)]
    if errors:
        return errors
    errors = conversation_errors(line, messages, names, record.get("tools") is not None)
    if not errors and not any(m.get("role") == "assistant" for m in messages):
        errors.append(LineError(line, "messages", "has no assistant message to learn from"))
    return errors


# --- the canonical form ---------------------------------------------------------------------------


def canonical_tools(tools: list[Any]) -> list[dict[str, Any]]:
    out = []
    for tool in tools:
        function = tool_function(tool) or {}
        clean = {"name": function["name"]}
        for key in ("description", "parameters", "strict"):
            if function.get(key) is not None:
                clean[key] = function[key]
        out.append({"type": "function", "function": clean})
    return out


def canonical_call(call: dict[str, Any]) -> dict[str, Any]:
    arguments, _ = arguments_object(call["function"].get("arguments"))
    return {
        "id": call["id"],
        "type": "function",
        "function": {"name": call["function"]["name"], "arguments": json.dumps(arguments, ensure_ascii=False)},
    }


def canonical_message(message: dict[str, Any]) -> dict[str, Any]:
    clean: dict[str, Any] = {"role": message["role"], "content": content_text(message.get("content")) or ""}
    if message["role"] == "assistant" and message.get("tool_calls"):
        clean["tool_calls"] = [canonical_call(call) for call in message["tool_calls"]]
    if message["role"] == "tool":
        clean["tool_call_id"] = message["tool_call_id"]
    if message.get("weight") is not None:
        clean["weight"] = int(message["weight"])  # true/1.0 are accepted; the canonical form says 1
    return clean


def canonical_record(record: dict[str, Any]) -> dict[str, Any]:
    """The canonical form of a record `record_errors` accepts."""
    if is_preference(record):
        return canonical_preference(record)
    if "text" in record and "messages" not in record:
        return {"messages": [{"role": "assistant", "content": record["text"]}], "document": True}
    if record.get("document"):
        return {"messages": [{"role": "assistant", "content": content_text(record["messages"][0]["content"])}],
                "document": True}  # fmt: skip
    out: dict[str, Any] = {"messages": [canonical_message(m) for m in record["messages"]]}
    if record.get("tools"):
        out["tools"] = canonical_tools(record["tools"])
    return out


def validate_lines(lines: Iterable[bytes | LineTooLong], limits: RecordLimits) -> ChatFileReport:
    """Check every line (from `untrusted.bounded_lines`); keep the first MAX_REPORTED_ERRORS errors and
    count them all. A line over `limits` is an invalid line like any other."""
    report = ChatFileReport()
    for number, raw in enumerate(lines, start=1):
        if isinstance(raw, LineTooLong):
            problems = [LineError(number, "", limits.too_large(raw.size))]
        elif not raw.strip():
            continue
        else:
            try:
                problems = record_errors(number, loads(raw.rstrip(b"\r\n"), max_depth=limits.max_depth))
            except UntrustedJSONError as exc:
                problems = [LineError(number, "", str(exc))]
        if problems:
            report.error_count += 1
            room = MAX_REPORTED_ERRORS - len(report.errors)
            report.errors.extend(problems[: max(room, 0)])
        else:
            report.records += 1
    return report
