"""Constrained decoding in the batched step, tool-call parsers per model family, incremental detokenisation."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from adaptery.engine.batching import BatchEngine
from adaptery.engine.constraints import (
    Grammars,
    UnsupportedConstraint,
    call_schema,
    check,
    json_grammar,
    tool_call_grammar,
)
from adaptery.engine.demo_model import CHAT_TEMPLATE
from adaptery.engine.fallback import TransformersBase
from adaptery.engine.native import NativeLlama
from adaptery.engine.sampling import Detokenizer, SamplingParams, releasable
from adaptery.engine.tool_calls import FORMATS, ParsedCall, response_template_format, tool_format
from tests.unit.engine_helpers import collect

SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["ok", "n"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def engine(demo_model_dir):
    hf = AutoModelForCausalLM.from_pretrained(demo_model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir)
    eos = {tokenizer.eos_token_id}
    grammars = Grammars(tokenizer, hf.config.vocab_size, eos)
    native = BatchEngine("g", NativeLlama(hf, torch.float32, 256), eos, max_rank=8, kv_cache_bytes=8 << 20,
                         adapter_cache_bytes=1 << 24, grammars=grammars).start()  # fmt: skip
    yield native, tokenizer
    native.stop()


def test_constrained_and_free_requests_share_a_batch_and_free_ones_are_unchanged(engine):
    native, tokenizer = engine
    prompts = [tokenizer(text)["input_ids"] for text in ("The lab", "Our cluster is", "Fine-tuning", "Adapters")]
    alone = []
    for prompt in prompts:
        alone.append(collect(native.submit(prompt, SamplingParams(max_tokens=12, temperature=0), None, None)))
    constrained = SamplingParams(max_tokens=80, temperature=1.0, seed=3, constraint=json_grammar(SCHEMA))
    free = SamplingParams(max_tokens=12, temperature=0)
    requests = [native.submit(p, constrained if i % 2 else free, None, None) for i, p in enumerate(prompts * 2)]
    outputs = [collect(request) for request in requests]
    for i, tokens in enumerate(outputs):
        if i % 2:
            jsonschema.validate(json.loads(tokenizer.decode(tokens)), SCHEMA)  # complete, valid, nothing after it
        else:
            assert tokens == alone[i % 4]  # masks touch only their own rows


def test_the_transformers_path_is_constrained_too(demo_model_dir):
    hf = AutoModelForCausalLM.from_pretrained(demo_model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir)
    eos = {tokenizer.eos_token_id}
    grammars = Grammars(tokenizer, hf.config.vocab_size, eos)
    params = SamplingParams(max_tokens=80, temperature=1.0, seed=5, constraint=json_grammar(SCHEMA))
    events = TransformersBase(hf).events(None, None, tokenizer("The lab")["input_ids"], params, eos, lambda: False,
                                         None, grammars)  # fmt: skip
    tokens = [event.token for event in events if event.token is not None]
    jsonschema.validate(json.loads(tokenizer.decode(tokens)), SCHEMA)


def test_a_forced_call_is_the_family_syntax_around_a_valid_call(engine):
    native, tokenizer = engine
    weather = {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"enum": ["Rome"]}},
                                                     "required": ["city"]}}  # fmt: skip
    fmt = FORMATS["hermes"]
    grammar = tool_call_grammar(fmt.opener, fmt.closer, [call_schema(weather)], parallel=False)
    params = SamplingParams(max_tokens=120, temperature=0.8, seed=1, constraint=grammar)
    text = tokenizer.decode(collect(native.submit(tokenizer("Weather?")["input_ids"], params, None, None)))
    assert fmt.parse(text) == ("", [ParsedCall("get_weather", '{"city": "Rome"}')])


@pytest.mark.parametrize(
    ("schema", "named"),
    [({"type": "string", "format": "credit-card"}, "credit-card"), ({"$ref": "#/definitions/nope"}, "nope")],
)
def test_a_schema_the_grammar_engine_cannot_enforce_is_refused_naming_the_feature(schema, named):
    with pytest.raises(UnsupportedConstraint, match=named):
        check(json_grammar(schema))


def test_tool_formats_are_recognised_from_the_chat_template():
    assert tool_format(CHAT_TEMPLATE) is FORMATS["hermes"]
    assert tool_format("{% for m in messages %}{{ m.content }}{% endfor %}") is None
    assert tool_format("{% if tools %}[AVAILABLE_TOOLS]{{ tools|tojson }}{% endif %}[TOOL_CALLS]") is FORMATS["mistral"]
    assert tool_format('{% if tools %}{{ "<|python_tag|>" }}{% endif %}') is FORMATS["llama3"]


@pytest.mark.parametrize(
    ("family", "text", "content", "calls"),
    [
        ("hermes", 'Sure.\n<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>\n'
                   '<tool_call>{"name": "g", "arguments": {}}</tool_call>', "Sure.\n",
         [ParsedCall("f", '{"a": 1}'), ParsedCall("g", "{}")]),
        ("hermes", "no call here", "no call here", []),
        ("hermes", '<tool_call>{"name": "f", "arguments": {"a": </tool_call>', None, []),  # broken: stays text
        ("mistral", 'x[TOOL_CALLS][{"name": "f", "arguments": {"a": "b"}}]', "x", [ParsedCall("f", '{"a": "b"}')]),
        ("mistral", "[TOOL_CALLS]not json", None, []),
        ("llama3", '<|python_tag|>{"name": "f", "parameters": {"q": 2}}; {"name": "g", "parameters": {}}', "",
         [ParsedCall("f", '{"q": 2}'), ParsedCall("g", "{}")]),
        ("llama3", '{"name": "f", "parameters": {"q": 2}}', "", [ParsedCall("f", '{"q": 2}')]),
        ("llama3", "The answer is 4.", "The answer is 4.", []),
    ],
)  # fmt: skip
def test_each_family_parser_reads_its_calls(family, text, content, calls):
    fmt = FORMATS[family]
    assert fmt.parse(text) == (text if content is None else content, calls)
    if calls:
        start = fmt.call_start(text)
        assert start >= 0 and fmt.parse(text[start:])[1] == calls  # what a stream keeps parses the same


def test_a_tokenizer_with_a_response_template_is_parsed_by_transformers(demo_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir)
    assert response_template_format(tokenizer) is None
    tokenizer.response_template = {
        "version": 1,
        "start_anchor": "<|assistant|>",
        "fields": {
            "content": {},
            "tool_calls": {"open": "<tool_call>", "close": "</tool_call>", "content": "json", "repeats": True,
                           "transform": {"type": "function", "function": "{content}"}},
        },
    }  # fmt: skip
    fmt = response_template_format(tokenizer)
    assert (fmt.opener, fmt.closer) == ("<tool_call>", "</tool_call>")
    text = 'Sure.<tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call>'
    assert fmt.parse(text) == ("Sure.", [ParsedCall("f", '{"a": 1}')])
    assert fmt.parse("just words") == ("just words", [])


def test_a_stream_holds_back_what_may_start_a_call():
    fmt = FORMATS["hermes"]
    assert fmt.may_start_call("Sure <tool_") == len("<tool_")
    assert fmt.may_start_call("Sure <b>") == 0


def test_incremental_detokenising_equals_decoding_the_whole(demo_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir)
    text = "Café ☕ — the lab's ＧＰＵ cluster 🚀 opens at nine.\nBring a badge: 🪪."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    detokenizer = Detokenizer(tokenizer)
    pieces = [detokenizer.add(token) for token in ids]
    assert "".join(pieces) + detokenizer.rest() == tokenizer.decode(ids) == text
    assert all("\ufffd" not in piece for piece in pieces)


def test_stop_sequences_are_found_in_the_unsent_tail_only():
    assert releasable("ab<", ["<END>"]) == ("ab", False)
    assert releasable("<END> more", ["<END>"]) == ("", True)
