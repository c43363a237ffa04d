"""Constrained decoding: a request's grammar masks the tokens it may sample next, in the shared batch.

A `Constraint` (in `SamplingParams`, so it travels with the request wherever it is served) is a grammar
in llguidance's Lark dialect, where `%json {...}` embeds a JSON Schema. `response_format` json_object /
json_schema and `tool_choice` required / named all become one (`json_grammar`, `tool_call_grammar`).

Why llguidance (bench/structured.py measures both, same schema, same tokens, 6k-token vocabulary): one
request's mask costs the same in both (3.2 vs 3.4 µs a token), but llguidance builds a grammar in ~1 ms
where xgrammar compiles it in 2-10 ms before the request's first token, fills 16 requests' masks in 17 µs
on its own threads (xgrammar one after another: 49 µs), composes a tool call's text around the JSON
(`"<tool_call>" %json{...} "</tool_call>"`) in one grammar, and `validate_grammar` names the schema feature
it does not support, which is the 400 a client gets.

Masks of all constrained rows in a step are computed together, on llguidance's own threads, while free
rows are not touched: a request's grammar costs the step only its own mask.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import llguidance
import llguidance.hf
import torch

from adaptery.engine.sampling import Constraint

JSON_OBJECT_SCHEMA: dict[str, Any] = {"type": "object"}
_BIT = torch.arange(32, dtype=torch.int32)  # a bitmask word's bits, lowest first (llguidance's layout)
# JSON written as json.dumps and chat templates' `tojson` write it ({"a": 1, "b": 2}): one way to space it, so a
# model cannot spend its tokens on whitespace, and a call reads as the calls it was trained on.
_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class UnsupportedConstraint(ValueError):
    """The grammar (a schema feature, most often) cannot be enforced; the message names what."""


def json_grammar(schema: dict[str, Any] | bool) -> Constraint:
    """Output that is one JSON value matching `schema` (json_object: any object)."""
    return Constraint(f"start: %json {json.dumps(_laid_out(schema))}")


def tool_call_grammar(opener: str, closer: str, call_schemas: list[dict[str, Any]], parallel: bool) -> Constraint:
    """Output that is one call (or, with `parallel`, several) in the model's own call syntax: `opener`, a
    JSON object `{"name", "arguments"}` matching one of `call_schemas`, `closer`."""
    schema = call_schemas[0] if len(call_schemas) == 1 else {"anyOf": call_schemas}
    repeat = "+" if parallel else ""
    start = f"start: ({_literal(opener)} call {_literal(closer)}){repeat}"
    return Constraint(f"{start}\ncall: %json {json.dumps(_laid_out(schema))}")


def _laid_out(schema: dict[str, Any] | bool) -> dict[str, Any]:
    schema = {"anyOf": [schema]} if isinstance(schema, bool) else schema
    return {**schema, "x-guidance": _LAYOUT}


def call_schema(function: dict[str, Any]) -> dict[str, Any]:
    """The JSON of one call to `function` as chat templates write it: its name, arguments by its schema."""
    parameters = function.get("parameters") or {"type": "object"}
    return {
        "type": "object",
        "properties": {"name": {"const": function["name"]}, "arguments": parameters},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def _literal(text: str) -> str:
    return json.dumps(text)  # a Lark string literal is a JSON string


def check(constraint: Constraint) -> None:
    """UnsupportedConstraint naming what llguidance cannot enforce (an unknown format, a broken $ref...)."""
    problem = llguidance.LLMatcher.validate_grammar(constraint.grammar)
    if problem:
        raise UnsupportedConstraint(problem)


class Grammars:
    """One base model's grammar machinery: its tokenizer as llguidance sees it, a matcher per request."""

    def __init__(self, tokenizer: Any, vocab: int, eos_ids: set[int]) -> None:
        self._hf_tokenizer = tokenizer
        self._eos = sorted(eos_ids)
        self._tokenizer: llguidance.LLTokenizer | None = None  # built on first use (about a second for 150k tokens)
        self._lock = threading.Lock()
        self.vocab = vocab  # the logits' width
        self.executor = llguidance.LLExecutor()

    def _ll_tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = llguidance.hf.from_tokenizer(
                    self._hf_tokenizer, n_vocab=self.vocab, eos_token=self._eos
                )
            return self._tokenizer

    def matcher(self, constraint: Constraint) -> llguidance.LLMatcher:
        """A fresh grammar state for one request; UnsupportedConstraint when the grammar cannot be enforced."""
        matcher = llguidance.LLMatcher(self._ll_tokenizer(), constraint.grammar)
        if matcher.is_error():
            raise UnsupportedConstraint(matcher.get_error())
        return matcher

    def mask(self, logits: torch.Tensor, rows: list[tuple[llguidance.LLMatcher, int]]) -> None:
        """Set to -inf, in place, the logits ((batch, vocab) fp32) each listed row's grammar forbids next.

        One bitmask row per constrained row, filled on llguidance's threads, then unpacked and applied to all
        of them in one tensor operation (llguidance's per-row apply took 3.3 ms for 16 rows of a 6k vocabulary,
        this 0.7 ms: bench/structured.py)."""
        # imported at the first constrained step: its module applies torch.compile at import (1.2 s of every start)
        import llguidance.torch as lltorch

        bitmask = lltorch.allocate_token_bitmask(len(rows), self.vocab)
        lltorch.fill_next_token_bitmask_par(self.executor, [(m, i) for i, (m, _) in enumerate(rows)], bitmask)
        allowed = ((bitmask.unsqueeze(-1) >> _BIT) & 1).bool().view(len(rows), -1)[:, : logits.shape[1]]
        index = torch.tensor([row for _, row in rows])
        logits[index] = logits[index].masked_fill(~allowed, float("-inf"))
