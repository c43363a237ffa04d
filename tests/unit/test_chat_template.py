"""Chat templates render as transformers renders them, and within their budget whatever they try."""

from __future__ import annotations

import time
import tracemalloc
from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from adaptery.data.chat_template import (
    ChatTemplateError,
    TemplateBudget,
    TemplateBudgetExceeded,
    check_template,
    render,
    render_for,
)
from adaptery.training.data import _labels_from_generation_mask

BUDGET = TemplateBudget(max_chars=2_000_000, max_steps=1_000_000, seconds=2.0, max_json_depth=64)
CONVERSATIONS = [
    [{"role": "user", "content": "hi"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "6"},
    ],
]
# Templates in the styles of the Hub's families: ChatML, Llama 3 (namespaces, tojson, trimming), Mistral
# (alternation enforced with raise_exception, loop.index0 and arithmetic).
TEMPLATES = {
    "chatml": (
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>'"
        " + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "llama3": (
        "{{- bos_token }}{%- set ns = namespace(system='') %}{%- for m in messages %}{%- if m.role == 'system' %}"
        "{%- set ns.system = m.content | trim %}{%- endif %}{%- endfor %}{%- if ns.system %}"
        "<|start_header_id|>system<|end_header_id|>\n\n{{ ns.system }}<|eot_id|>{%- endif %}"
        "{%- for m in messages if m.role != 'system' %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n"
        "{{ m.content | trim }}<|eot_id|>{%- endfor %}{{ {'n': messages | length, 'roles': messages | "
        "map(attribute='role') | list} | tojson(indent=2) }}{%- if add_generation_prompt %}"
        "<|start_header_id|>assistant<|end_header_id|>\n\n{%- endif %}"
    ),
    "mistral": (
        "{{ bos_token }}{% for message in messages if message.role != 'system' %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
    ),
}


@pytest.fixture(scope="module")
def tokenizer(demo_model_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(demo_model_dir)


@pytest.mark.parametrize("template", [None, *TEMPLATES.values()], ids=["demo", *TEMPLATES])
@pytest.mark.parametrize("messages", CONVERSATIONS, ids=["one turn", "five turns"])
@pytest.mark.parametrize("prompt", [False, True], ids=["", "with generation prompt"])
def test_a_template_renders_what_transformers_renders(tokenizer, template, messages, prompt):
    expected = tokenizer.apply_chat_template(
        messages, chat_template=template, add_generation_prompt=prompt, tokenize=False
    )
    text, _ = render_for(tokenizer, messages, budget=BUDGET, chat_template=template, add_generation_prompt=prompt)
    assert text == expected


@pytest.mark.parametrize("messages", CONVERSATIONS[1:], ids=["five turns"])
def test_generation_spans_mask_the_tokens_transformers_masks(tokenizer, messages):
    expected = tokenizer.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
    labelled = _labels_from_generation_mask(tokenizer, messages, BUDGET)
    assert labelled["input_ids"] == list(expected["input_ids"])
    trained = [int(label != -100) for label in labelled["labels"]]
    assert trained == list(expected["assistant_masks"]) and sum(trained) > 0


def test_mistral_style_refusals_are_the_templates_own_message(tokenizer):
    twice = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(ChatTemplateError, match="Conversation roles must alternate"):
        render_for(tokenizer, twice, budget=BUDGET, chat_template=TEMPLATES["mistral"])


# What an attacker's probe tried (issue 14); tests/security renders them through the API as well.
EXPLODING_TEMPLATES = {
    "a huge string": "{{ 'x' * 50000000 }}",
    "nested 100k loops": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "range(100000000)": "{% for i in range(100000000) %}{{ i }}{% endfor %}",
    "doubling by concatenation": (
        "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}"
    ),
    "a shared list printed": (
        "{% set ns = namespace(s=['x']) %}{% for i in range(60) %}{% set ns.s = [ns.s, ns.s] %}{% endfor %}{{ ns.s }}"
    ),
    "a padding filter": "{{ 'x' | center(1000000000) }}",
    "a padding method": "{{ 'x'.ljust(1000000000) }}",
    "a format width": "{{ '%1000000000s' % 'x' }}",
    "exponential macro calls": (
        "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(60) }}"
    ),
}

MORE_EXPLODING = {
    "a repeated list": "{{ ['x'] * 100000000 }}",
    "a huge power": "{{ 2 ** 100000000 }}",
    "repeated squaring": (
        "{% set ns = namespace(n=3) %}{% for i in range(40) %}{% set ns.n = ns.n * ns.n %}{% endfor %}"
    ),
    "a shared list as JSON": (
        "{% set ns = namespace(s=['x']) %}{% for i in range(60) %}{% set ns.s = [ns.s, ns.s] %}{% endfor %}"
        "{{ ns.s | tojson }}"
    ),
    "a shared list upper-cased": (
        "{% set ns = namespace(s=['x']) %}{% for i in range(60) %}{% set ns.s = [ns.s, ns.s] %}{% endfor %}"
        "{{ ns.s | upper }}"
    ),
    "indenting many lines": "{{ ('\n' * 100000) | indent(100000) }}",
    "a star width": "{{ '%*s' % (1000000000, 'x') }}",
    "a format width": "{{ '{:>1000000000}'.format('x') }}",
    "a format field repeated": "{% set s = 'y' * 1000000 %}{{ ('{0}' * 1000).format(s) }}",
    "tabs expanded": "{{ ('\t' * 100000).expandtabs(100000) }}",
    "a replace that grows": "{{ ('x' * 100000).replace('x', 'y' * 100000) }}",
    "a join with a long separator": "{{ ('y' * 100000).join(range(100000)) }}",
    "a block built in a macro": (
        "{% macro m() %}{% for i in range(1000000) %}{{ 'z' * 1000 }}{% endfor %}{% endmacro %}{{ m() }}"
    ),
    "a set block": "{% set s %}{% for i in range(1000000) %}0123456789{% endfor %}{% endset %}{{ s | length }}",
    "a mapped padding": "{{ range(100000) | map('center', 1000000) | list | length }}",
    "a recursive loop": "{% for x in [1] recursive %}{{ loop(range(100000)) }}{% endfor %}",
    "deep recursion": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "a list measured before its namespace grew": (
        "{% set ns = namespace(s='x') %}{% set l = [ns] %}{{ l }}"
        "{% for i in range(60) %}{% set ns.s = [ns.s, ns.s] %}{% endfor %}{{ l }}"
    ),
    "comparing shared parts": (
        "{% set ns = namespace(a=['x'], b=['x']) %}{% for i in range(60) %}{% set ns.a = [ns.a, ns.a] %}"
        "{% set ns.b = [ns.b, ns.b] %}{% endfor %}{{ ns.a == ns.b }}"
    ),
    "testing shared parts": (
        "{% set ns = namespace(a=['x'], b=['x']) %}{% for i in range(60) %}{% set ns.a = [ns.a, ns.a] %}"
        "{% set ns.b = [ns.b, ns.b] %}{% endfor %}{{ ns.a is eq(ns.b) }}"
    ),
    "hashing shared parts": (
        "{% set ns = namespace(t=('x',)) %}{% for i in range(60) %}{% set ns.t = (ns.t, ns.t) %}{% endfor %}"
        "{{ {ns.t: 1} | length }}"
    ),
    "a part shared by siblings": (
        "{% set ns = namespace(l=['x']) %}{% for i in range(60) %}{% set ns.l = [ns.l, [ns.l]] %}{% endfor %}{{ ns.l }}"
    ),
}


@pytest.mark.parametrize(
    "template",
    [*EXPLODING_TEMPLATES.values(), *MORE_EXPLODING.values()],
    ids=[*EXPLODING_TEMPLATES, *MORE_EXPLODING],
)
def test_a_template_cannot_take_more_than_its_budget(template):
    tracemalloc.start()
    started = time.monotonic()
    try:
        with pytest.raises(ChatTemplateError):
            render(template, CONVERSATIONS[0], budget=BUDGET)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.monotonic() - started < 3 * BUDGET.seconds + 5  # tracing slows it; the budget is 2 s
    assert peak < 64 * 1024 * 1024, f"{peak / 2**20:.0f} MiB"


@pytest.mark.parametrize(
    "template",
    ["{{ 'x'.translate({120: 'y' * 1000}) }}", "{{ (1).to_bytes(1000000000, 'big') }}", "{{ 'x'.__class__.__mro__ }}"],
)
def test_methods_that_can_grow_a_value_unchecked_are_not_reachable(template):
    with pytest.raises(ChatTemplateError):
        render(template, CONVERSATIONS[0], budget=BUDGET)


def test_the_output_is_bounded_by_the_budget():
    small = TemplateBudget(max_chars=1000, max_steps=1_000_000, seconds=2.0, max_json_depth=64)
    render("{% for i in range(99) %}0123456789{% endfor %}", CONVERSATIONS[0], budget=small)
    with pytest.raises(TemplateBudgetExceeded, match="more than 1000 characters"):
        render("{% for i in range(101) %}0123456789{% endfor %}", CONVERSATIONS[0], budget=small)


def test_a_template_is_checked_on_a_sample_conversation_within_its_budget():
    check_template(TEMPLATES["chatml"], budget=BUDGET, variables={})
    no_system = "{% if messages[0].role == 'system' %}{{ raise_exception('no system') }}{% endif %}ok"
    check_template(no_system, budget=BUDGET, variables={})  # tried again without the system turn
    with pytest.raises(ChatTemplateError, match="cannot render a plain conversation"):
        check_template("{{ raise_exception('never') }}", budget=BUDGET, variables={})
    with pytest.raises(TemplateBudgetExceeded):
        check_template(EXPLODING_TEMPLATES["nested 100k loops"], budget=BUDGET, variables={})
