"""Tool calls in a model's own words: recognising them in its output and the grammar that forces one.

A model family writes calls its own way, as its chat template teaches it. Where the tokenizer carries a
`response_template` (transformers' response parsing), transformers parses the output; otherwise one small
parser per family, chosen by what the template writes:

- **hermes** (Qwen2.5/3, Hermes, the demo model): `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`,
  one block per call;
- **mistral**: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`;
- **llama3** (Llama 3.1+ JSON calling): the whole answer is `{"name": ..., "parameters": {...}}`, optionally
  after `<|python_tag|>`, several separated by `;`.

Each family also gives the text around one call's JSON, so `tool_choice` required / named constrains the
output to the family's call syntax (`constraints.tool_call_grammar`), and where a call starts, so a stream
holds back call text instead of sending it as content.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ParsedCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it


@dataclass(frozen=True)
class ToolFormat:
    family: str
    opener: str  # what starts a call in the output
    closer: str  # what ends one ("" where the JSON ends it)
    arguments_key: str = "arguments"

    def parse(self, text: str) -> tuple[str, list[ParsedCall]]:
        """(the content before any call, the calls) of a model's whole output; text that is not a well-formed
        call stays content, as it would for a client reading the raw text."""
        return _PARSERS[self.family](self, text)

    def call_start(self, text: str) -> int:
        """Where the first call starts in `text`, -1 when none has."""
        if self.family == "llama3":
            stripped = text.lstrip()
            if stripped.startswith((self.opener, '{"name"')):
                return len(text) - len(stripped)
            return -1
        return text.find(self.opener)

    def may_start_call(self, text: str) -> int:
        """How many characters at the end of `text` could begin a call (held back while streaming)."""
        if self.family == "llama3":
            stripped = text.lstrip()
            return len(text) if stripped and any(p.startswith(stripped) for p in (self.opener, '{"name"')) else 0
        for length in range(min(len(self.opener) - 1, len(text)), 0, -1):
            if text.endswith(self.opener[:length]):
                return length
        return 0


def _call(name: object, arguments: object) -> ParsedCall | None:
    if not isinstance(name, str) or not isinstance(arguments, dict):
        return None
    return ParsedCall(name, json.dumps(arguments, ensure_ascii=False))


def _hermes(fmt: ToolFormat, text: str) -> tuple[str, list[ParsedCall]]:
    start = text.find(fmt.opener)
    if start == -1:
        return text, []
    calls = []
    for body in re.findall(r"<tool_call>\s*(.*?)\s*</tool_call>", text[start:], flags=re.DOTALL):
        try:
            value = json.loads(body)
        except json.JSONDecodeError:
            return text, []
        call = _call(value.get("name"), value.get("arguments")) if isinstance(value, dict) else None
        if call is None:
            return text, []
        calls.append(call)
    return (text[:start], calls) if calls else (text, [])


def _mistral(fmt: ToolFormat, text: str) -> tuple[str, list[ParsedCall]]:
    start = text.find(fmt.opener)
    if start == -1:
        return text, []
    try:
        value = json.loads(text[start + len(fmt.opener) :].strip())
    except json.JSONDecodeError:
        return text, []
    items = value if isinstance(value, list) else [value]
    calls = [_call(item.get("name"), item.get("arguments")) if isinstance(item, dict) else None for item in items]
    if not calls or None in calls:
        return text, []
    return text[:start], calls  # type: ignore[return-value]


def _llama3(fmt: ToolFormat, text: str) -> tuple[str, list[ParsedCall]]:
    body = text.strip().removeprefix(fmt.opener).strip()
    calls = []
    decoder = json.JSONDecoder()
    position = 0
    while position < len(body):
        try:
            value, end = decoder.raw_decode(body, position)
        except json.JSONDecodeError:
            return text, []
        key = "parameters" if isinstance(value, dict) and "parameters" in value else "arguments"
        call = _call(value.get("name"), value.get(key)) if isinstance(value, dict) else None
        if call is None:
            return text, []
        calls.append(call)
        position = end
        while position < len(body) and body[position] in "; \n\t":
            position += 1
    return ("", calls) if calls else (text, [])


_PARSERS = {"hermes": _hermes, "mistral": _mistral, "llama3": _llama3}
FORMATS = {
    "hermes": ToolFormat("hermes", "<tool_call>", "</tool_call>"),
    "mistral": ToolFormat("mistral", "[TOOL_CALLS]", ""),
    "llama3": ToolFormat("llama3", "<|python_tag|>", "", arguments_key="parameters"),
}


@dataclass(frozen=True)
class TransformersToolFormat(ToolFormat):
    """A tokenizer with a `response_template`: transformers parses the output (`parse_response`); the call's
    opener and closer, for streams and forced calls, are those of its `tool_calls` field."""

    tokenizer: Any = None

    def parse(self, text: str) -> tuple[str, list[ParsedCall]]:
        anchor = self.tokenizer.response_template.get("start_anchor", "")
        try:
            parsed = self.tokenizer.parse_response(text, prefix=anchor)
        except (ValueError, KeyError):  # output the template cannot read: it is content, as for the others
            return text, []
        calls = [_call(c.get("function", {}).get("name"), c.get("function", {}).get("arguments"))
                 for c in parsed.get("tool_calls") or [] if isinstance(c, dict)]  # fmt: skip
        if not calls or None in calls:
            return text, []
        start = self.call_start(text)
        return (text[:start] if start >= 0 else parsed.get("content") or ""), calls  # type: ignore[return-value]


def response_template_format(tokenizer: Any) -> ToolFormat | None:
    """The tool format of a tokenizer that carries transformers' `response_template` with a tool_calls field."""
    template = getattr(tokenizer, "response_template", None)
    field = (template or {}).get("fields", {}).get("tool_calls") if isinstance(template, dict) else None
    if not isinstance(field, dict) or not isinstance(field.get("open"), str):
        return None
    return TransformersToolFormat("transformers", field["open"], field.get("close") or "", tokenizer=tokenizer)


def tool_format(chat_template: str) -> ToolFormat | None:
    """The family whose call syntax `chat_template` writes; None when it renders no tools."""
    if "tools" not in chat_template:
        return None
    if "<tool_call>" in chat_template:
        return FORMATS["hermes"]
    if "[TOOL_CALLS]" in chat_template:
        return FORMATS["mistral"]
    if "<|python_tag|>" in chat_template or '"parameters"' in chat_template:
        return FORMATS["llama3"]
    return None


def call_id() -> str:
    return "call_" + secrets.token_urlsafe(18).replace("-", "x").replace("_", "x")[:24]
