"""Validate response bodies against the official OpenAI OpenAPI document.

The spec (``openai-openapi.json`` beside this file, MIT licensed, see ``openai-openapi.LICENSE``)
is an OpenAPI 3.1 document, but several of its schemas still use OpenAPI 3.0 / draft 2019-09
idioms that a plain JSON Schema Draft 2020-12 validator would misread.  The document is loaded
once, every schema under ``#/components/schemas`` is rewritten into plain Draft 2020-12, and all
``$ref``s are resolved against that whole (normalised) document through a ``referencing`` registry.

Quirks handled (found by scanning every schema keyword in the document):

* ``"exclusiveMinimum": true`` next to ``minimum`` (OpenAPI 3.0 boolean form, 7 places, e.g.
  ``FineTuningJob.hyperparameters.learning_rate_multiplier``).  Read literally by 2020-12 it means
  "greater than ``True`` (== 1)", which rejects ``0.5``.  Rewritten to the numeric form
  ``{"exclusiveMinimum": <minimum>}``; ``false`` is dropped.  The same for ``exclusiveMaximum``.
* ``"nullable": true`` (109 places, e.g. ``CreateChatCompletionStreamResponse`` ``finish_reason``
  and ``usage``): ``null`` is allowed -- by adding ``"null"`` to ``type`` (and ``None`` to
  ``enum``) where the schema is a plain typed schema, otherwise by wrapping it in
  ``anyOf: [<schema>, {"type": "null"}]`` (``$ref`` siblings, ``oneOf``...).  An ``allOf`` branch
  that is only ``{"nullable": true}`` makes the whole ``allOf`` nullable.  ``nullable: false`` is
  dropped.
* ``$recursiveRef: "#"`` / ``$recursiveAnchor`` (draft 2019-09, ``CompoundFilter``): 2020-12
  ignores them, which turns the recursive branch into an always-true schema (and breaks the
  surrounding ``oneOf``).  Rewritten to a ``$ref`` to the schema that carries the anchor.
* duplicate names in ``required`` (``ContainerResource``) are removed, so that every normalised
  schema passes the 2020-12 metaschema.
* ``discriminator``, ``example``, ``x-*`` extension keys (``x-stainless-const``, ``x-oaiMeta``,
  ...) and the non-standard ``optional`` / ``min_items`` / ``max_items`` keys are removed.
* ``format`` (``unixtime``, ``uri``, ``date``, ``float``...) is kept as an annotation but never
  asserted (no format checker is passed to the validator).

Only schema positions are rewritten: property names such as ``"type"``, ``"title"`` or
``"nullable"`` inside ``properties`` and literal values (``enum``, ``const``, ``default``) are
left untouched.
"""

from __future__ import annotations

import copy
import functools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator, ValidationError
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

__all__ = [
    "SPEC_PATH",
    "SPEC_URI",
    "assert_matches",
    "assert_stream_chunk",
    "component_schema",
    "load_spec",
    "schema_names",
    "validation_errors",
]

SPEC_PATH = Path(__file__).with_name("openai-openapi.json")
SPEC_URI = "urn:openai:openapi"
_SCHEMAS_POINTER = "#/components/schemas/"

# Keywords whose value is a single subschema.
_SUBSCHEMA_KEYWORDS = frozenset(
    {
        "items",
        "additionalProperties",
        "not",
        "if",
        "then",
        "else",
        "contains",
        "propertyNames",
        "unevaluatedProperties",
        "unevaluatedItems",
        "additionalItems",
        "contentSchema",
    }
)
# Keywords whose value is a list of subschemas.
_SUBSCHEMA_LIST_KEYWORDS = frozenset({"allOf", "anyOf", "oneOf", "prefixItems"})
# Keywords whose value maps names to subschemas.
_SUBSCHEMA_MAP_KEYWORDS = frozenset({"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"})
# OpenAPI-only or non-standard keys that carry no validation meaning for us.
_DROPPED_KEYWORDS = frozenset({"discriminator", "example", "xml", "externalDocs", "optional", "min_items", "max_items"})
# Keys that do not constrain anything: an ``allOf`` branch made only of these plus
# ``nullable: true`` is the 3.0 idiom for "the other branches, or null".
_ANNOTATION_KEYWORDS = frozenset(
    {"nullable", "description", "title", "default", "example", "deprecated", "readOnly", "writeOnly"}
)
_COMBINATOR_KEYWORDS = ("$ref", "allOf", "anyOf", "oneOf", "not", "const", "if")

_MAX_MESSAGE_CHARS = 300
_MAX_CONTEXT_LINES = 12


# --------------------------------------------------------------------------------------------
# Normalisation of the OpenAPI dialect into plain JSON Schema 2020-12
# --------------------------------------------------------------------------------------------


def _is_nullable_marker(branch: Any) -> bool:
    return (
        isinstance(branch, dict)
        and branch.get("nullable") is True
        and all(k in _ANNOTATION_KEYWORDS or k.startswith("x-") for k in branch)
    )


def _allow_null(schema: dict[str, Any]) -> dict[str, Any]:
    """Return ``schema`` widened so that JSON ``null`` is also valid."""
    schema_type = schema.get("type")
    plain = not any(k in schema for k in _COMBINATOR_KEYWORDS)
    if plain and isinstance(schema_type, str | list):
        types = [schema_type] if isinstance(schema_type, str) else list(schema_type)
        if "null" not in types:
            types.append("null")
        schema["type"] = types
        if "enum" in schema and None not in schema["enum"]:
            schema["enum"] = [*schema["enum"], None]
        return schema
    if plain and "type" not in schema and "enum" not in schema:
        return schema  # no type constraint at all: null is already valid
    return {"anyOf": [schema, {"type": "null"}]}


def _normalize(node: Any, pointer: str, anchor: str | None) -> Any:
    """Rewrite one schema (recursively) into Draft 2020-12; ``pointer`` is its JSON pointer."""
    if not isinstance(node, dict):
        return node  # boolean schemas (none in the current spec) are already valid

    if node.get("$recursiveAnchor") is True:
        anchor = pointer

    branches = node.get("allOf")
    nullable = node.get("nullable") is True
    if isinstance(branches, list) and any(_is_nullable_marker(b) for b in branches):
        nullable = True
        branches = [b for b in branches if not _is_nullable_marker(b)]

    out: dict[str, Any] = {}
    for key, value in node.items():
        if key.startswith("x-") or key in _DROPPED_KEYWORDS or key in ("nullable", "$recursiveAnchor"):
            continue
        if key == "$recursiveRef":
            if value != "#" or anchor is None:
                raise ValueError(f"unsupported $recursiveRef {value!r} at {pointer}")
            out["$ref"] = anchor
        elif key in ("exclusiveMinimum", "exclusiveMaximum") and isinstance(value, bool):
            bound = "minimum" if key == "exclusiveMinimum" else "maximum"
            if value:
                if bound not in node:
                    raise ValueError(f"{key}: true without {bound} at {pointer}")
                out[key] = node[bound]
        elif key in ("minimum", "maximum") and node.get(f"exclusive{key.capitalize()}") is True:
            continue  # folded into exclusiveMinimum / exclusiveMaximum above
        elif key == "allOf":
            if branches:
                out[key] = [_normalize(b, f"{pointer}/allOf/{i}", anchor) for i, b in enumerate(branches)]
        elif key in _SUBSCHEMA_LIST_KEYWORDS and isinstance(value, list):
            out[key] = [_normalize(b, f"{pointer}/{key}/{i}", anchor) for i, b in enumerate(value)]
        elif key in _SUBSCHEMA_MAP_KEYWORDS and isinstance(value, dict):
            out[key] = {
                name: _normalize(sub, f"{pointer}/{key}/{_escape(name)}", anchor) for name, sub in value.items()
            }
        elif key in _SUBSCHEMA_KEYWORDS:
            out[key] = _normalize(value, f"{pointer}/{key}", anchor)
        elif key == "required" and isinstance(value, list):
            out[key] = list(dict.fromkeys(value))  # the spec repeats names (ContainerResource)
        else:
            out[key] = copy.deepcopy(value)
    return _allow_null(out) if nullable else out


def _escape(token: str) -> str:
    return token.replace("~", "~0").replace("/", "~1")


@functools.cache
def load_spec() -> dict[str, Any]:
    """The OpenAPI document with ``components.schemas`` normalised to JSON Schema 2020-12.

    Everything outside ``components.schemas`` is kept as is (the schemas only ``$ref`` into
    ``#/components/schemas``).  Cached: the 3.4 MB file is read and rewritten once per process.
    """
    with SPEC_PATH.open(encoding="utf-8") as fh:
        spec = json.load(fh)
    schemas = spec["components"]["schemas"]
    spec["components"]["schemas"] = {
        name: _normalize(schema, f"{_SCHEMAS_POINTER}{_escape(name)}", None) for name, schema in schemas.items()
    }
    return spec


@functools.cache
def _registry() -> Registry:
    resource = Resource.from_contents(load_spec(), default_specification=DRAFT202012)
    return Registry().with_resource(SPEC_URI, resource)


def schema_names() -> list[str]:
    """Names of every schema under ``#/components/schemas``."""
    return sorted(load_spec()["components"]["schemas"])


def component_schema(schema_name: str) -> dict[str, Any]:
    """The normalised ``#/components/schemas/<schema_name>`` (``$ref``s left unresolved)."""
    schemas = load_spec()["components"]["schemas"]
    if schema_name not in schemas:
        close = [n for n in schemas if schema_name.lower() in n.lower()][:10]
        hint = f"; similar names: {', '.join(close)}" if close else ""
        raise KeyError(f"no schema #/components/schemas/{schema_name} in {SPEC_PATH.name}{hint}")
    return schemas[schema_name]


@functools.cache
def _validator(schema_name: str) -> Draft202012Validator:
    component_schema(schema_name)  # raises a readable KeyError for unknown names
    ref = {"$ref": f"{SPEC_URI}{_SCHEMAS_POINTER}{_escape(schema_name)}"}
    # No format_checker: ``format`` stays an annotation (unixtime, uri, date, float ...).
    return Draft202012Validator(ref, registry=_registry())


# --------------------------------------------------------------------------------------------
# Validation and error reporting
# --------------------------------------------------------------------------------------------


def _short(message: str) -> str:
    """One line; long instance reprs are cut in the middle so the verdict at the end survives."""
    message = " ".join(message.split())
    if len(message) > _MAX_MESSAGE_CHARS:
        tail = _MAX_MESSAGE_CHARS // 3
        return f"{message[: _MAX_MESSAGE_CHARS - tail - 5]} ... {message[-tail:]}"
    return message


def _leaf_errors(error: ValidationError) -> Iterator[ValidationError]:
    """The innermost errors under an ``anyOf``/``oneOf`` failure (what each branch rejected)."""
    if not error.context:
        yield error
        return
    for sub in error.context:
        yield from _leaf_errors(sub)


def _describe(error: ValidationError) -> list[str]:
    lines = [f"{error.json_path}: {_short(error.message)}"]
    if error.context:
        leaves = sorted(_leaf_errors(error), key=lambda e: (e.json_path, list(e.relative_schema_path)))
        details = list(dict.fromkeys(f"    - {leaf.json_path}: {_short(leaf.message)}" for leaf in leaves))
        lines.extend(details[:_MAX_CONTEXT_LINES])
        if len(details) > _MAX_CONTEXT_LINES:
            lines.append(f"    - ... ({len(details) - _MAX_CONTEXT_LINES} more)")
    return lines


def validation_errors(schema_name: str, body: Any) -> list[str]:
    """Every violation of ``#/components/schemas/<schema_name>`` by ``body``, one string per
    error (``<JSON path>: <message>``, with the rejected alternatives of ``anyOf``/``oneOf``
    indented below).  Empty when ``body`` conforms."""
    errors = sorted(_validator(schema_name).iter_errors(body), key=lambda e: (e.json_path, e.message))
    return [line for error in errors for line in _describe(error)]


def assert_matches(schema_name: str, body: dict | list) -> None:
    """Assert that ``body`` (a decoded JSON response body) conforms to the OpenAI schema
    ``#/components/schemas/<schema_name>``.

    Raises ``AssertionError`` listing every violation (JSON path + message), ``KeyError`` when the
    schema name does not exist in the spec.
    """
    problems = validation_errors(schema_name, body)
    if problems:
        count = sum(1 for p in problems if not p.startswith("    "))
        raise AssertionError(
            f"body does not match OpenAI schema {schema_name!r} ({count} violation"
            f"{'s' if count != 1 else ''}):\n" + "\n".join(problems)
        )


def assert_stream_chunk(chunk: dict) -> None:
    """Assert that one decoded ``data:`` payload of a streamed chat completion conforms to
    ``CreateChatCompletionStreamResponse``."""
    assert_matches("CreateChatCompletionStreamResponse", chunk)
