"""A fine-tune on tool-calling records teaches the adapter to call: the tiny random base, given the tools and
a question, answers with the call in its template's syntax, the function chosen by the question."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from adaptery.engine.loading import load_causal_lm
from adaptery.engine.tool_calls import FORMATS
from adaptery.training.trainer import train
from tests.unit.training_helpers import demo_spec, write_jsonl

# Bare schemas keep the rendered prompt at ~230 tokens (with parameters ~350): the fine-tune's cost is its tokens.
TOOLS = [{"type": "function", "function": {"name": name}} for name in ("get_weather", "get_time")]
ASK = {"get_weather": "What is the weather in {}?", "get_time": "What time is it in {}?"}
CITIES = ["Paris", "Rome", "Tokyo", "Lima", "Oslo", "Cairo"]
HELD_OUT = [("get_weather", "Oslo"), ("get_time", "Rome")]  # each function and city seen, never together
TRAINED = [(f, c) for f in ASK for c in CITIES if (f, c) not in HELD_OUT]


def record(function: str, city: str) -> dict:
    call = {"id": "call_1", "type": "function", "function": {"name": function, "arguments": json.dumps({"city": city})}}
    question = {"role": "user", "content": ASK[function].format(city)}
    return {"messages": [question, {"role": "assistant", "content": "", "tool_calls": [call]}], "tools": TOOLS}


def answer(model, tokenizer, function: str, city: str) -> str:
    question = [{"role": "user", "content": ASK[function].format(city)}]
    prompt = tokenizer.apply_chat_template(question, tools=TOOLS, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)  # fmt: skip
    with torch.no_grad():
        output = model.generate(**prompt, max_new_tokens=90, do_sample=False)
    return tokenizer.decode(output[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)


@pytest.mark.timeout(1200)  # 60 steps of ~230-token rows: 6.6 min measured on the shared 2-core machine
def test_a_tool_calling_fine_tune_makes_the_adapter_call_the_right_function(demo_model_dir: Path, tmp_path: Path):
    data = write_jsonl(tmp_path / "tools.jsonl", [record(f, c) for f, c in TRAINED])
    result = train(demo_spec(demo_model_dir, data, tmp_path / "adapter", n_epochs=20), lambda event: None)
    base, tokenizer = load_causal_lm(str(demo_model_dir))
    hermes = FORMATS["hermes"]
    assert hermes.parse(answer(base, tokenizer, *TRAINED[0]))[1] == []  # the random base calls nothing
    tuned = PeftModel.from_pretrained(base, result.output_dir)
    tuned.eval()
    for function, city in TRAINED:
        _, calls = hermes.parse(answer(tuned, tokenizer, function, city))
        assert [(c.name, json.loads(c.arguments)) for c in calls] == [(function, {"city": city})]
    # Held-out pairs: the function follows the question. (The random-initialised base does not learn to copy
    # an unseen pairing's city into the arguments in this budget; the arguments are still a city it knows.)
    for function, city in HELD_OUT:
        _, calls = hermes.parse(answer(tuned, tokenizer, function, city))
        assert [c.name for c in calls] == [function]
        assert json.loads(calls[0].arguments)["city"] in CITIES
