"""Scores of one prediction against its reference: exact match, token F1, ROUGE-L, and structured checks.

Exact match and token F1 follow SQuAD's evaluation script (lower-case, punctuation and the articles a/an/the
removed, whitespace collapsed; F1 over the bag of tokens). ROUGE-L is Google's `rouge-score` package (the
implementation the ROUGE numbers in papers come from), F-measure, with its tokenizer and Porter stemming. The
structured checks pass where the data asks for structure: an answer that must be JSON valid against a schema
(`response_format` of type json_schema), or a reference turn that calls tools (the same functions, with equal
arguments that the tool's parameter schema accepts).
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from dataclasses import dataclass
from typing import Any

import jsonschema
from rouge_score import rouge_scorer

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)
_ROUGE = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def normalize(text: str) -> str:
    """SQuAD's answer normalisation."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize(prediction) == normalize(reference))


def token_f1(prediction: str, reference: str) -> float:
    predicted, expected = normalize(prediction).split(), normalize(reference).split()
    if not predicted or not expected:
        return float(predicted == expected)
    common = sum((Counter(predicted) & Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (longest common subsequence of stemmed tokens)."""
    return _ROUGE.score(reference, prediction)["rougeL"].fmeasure


@dataclass(frozen=True)
class Check:
    """A structured check of one answer: what was asked (`kind`) and whether it passed, with why not."""

    kind: str  # "json_schema" or "tool_call"
    passed: bool
    reason: str = ""


def json_schema_of(record: dict[str, Any]) -> dict[str, Any] | None:
    """The schema a record's answer must satisfy (OpenAI's response_format), if it has one."""
    response_format = record.get("response_format")
    if not isinstance(response_format, dict) or response_format.get("type") != "json_schema":
        return None
    spec = response_format.get("json_schema")
    schema = spec.get("schema") if isinstance(spec, dict) else None
    return schema if isinstance(schema, dict) else None


def check_json_schema(prediction: str, schema: dict[str, Any]) -> Check:
    try:
        value = json.loads(prediction)
    except json.JSONDecodeError as exc:
        return Check("json_schema", False, f"not JSON: {exc.msg} at character {exc.pos}")
    try:
        jsonschema.validate(value, schema)
    except jsonschema.ValidationError as exc:
        return Check("json_schema", False, f"schema: {exc.message}")
    except jsonschema.SchemaError as exc:
        return Check("json_schema", False, f"the record's schema is invalid: {exc.message}")
    return Check("json_schema", True)


def _arguments(call: dict[str, Any]) -> Any:
    function = call.get("function") if isinstance(call.get("function"), dict) else call
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except json.JSONDecodeError:
            return arguments
    return arguments


def _name(call: dict[str, Any]) -> Any:
    function = call.get("function") if isinstance(call.get("function"), dict) else call
    return function.get("name")


def check_tool_calls(
    predicted: list[dict[str, Any]], expected: list[dict[str, Any]], tools: list[dict[str, Any]] | None
) -> Check:
    """The predicted calls name the expected functions in order, with equal arguments, each valid against its
    tool's `parameters` schema where the record declares the tool."""
    if not predicted:
        return Check("tool_call", False, "no tool call in the answer")
    names = [_name(call) for call in predicted]
    wanted = [_name(call) for call in expected]
    if names != wanted:
        return Check("tool_call", False, f"called {names}, expected {wanted}")
    schemas = {}
    for tool in tools or []:
        function = tool.get("function") if isinstance(tool, dict) else None
        if isinstance(function, dict) and isinstance(function.get("parameters"), dict):
            schemas[function.get("name")] = function["parameters"]
    for call, reference in zip(predicted, expected, strict=True):
        arguments = _arguments(call)
        if _name(call) in schemas:
            try:
                jsonschema.validate(arguments, schemas[_name(call)])
            except jsonschema.ValidationError as exc:
                return Check("tool_call", False, f"{_name(call)}: arguments {exc.message}")
        if arguments != _arguments(reference):
            return Check("tool_call", False, f"{_name(call)}: arguments differ from the reference")
    return Check("tool_call", True)


def mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None
