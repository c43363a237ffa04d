"""A fine-tune on tool-calling records teaches the adapter to call: the tiny random base, given the tools and
a question, answers with the call in its template's syntax, the function chosen by the question and the argument
taken from it, on held-out questions too."""

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
# Two phrasings of each function's question, every city asked in each. A held-out question is a phrasing and a city
# never seen together, each seen in training with the same function (the phrasing with other cities, the city in
# the other phrasing). The random-initialised base learns nothing that is not in its fine-tune: it cannot copy a
# city it was never trained to answer, nor (at this budget) a city seen only with the other function.
ASK = {
    "get_weather": ("What is the weather in {}?", "Is it raining in {}?"),
    "get_time": ("What time is it in {}?", "Is it late in {}?"),
}
CITIES = ("Paris", "Rome", "Tokyo", "Oslo")
HELD_OUT = [("get_weather", 1, "Oslo"), ("get_time", 1, "Rome")]  # (function, phrasing, city)
TRAINED = [(f, p, c) for f in ASK for p in range(2) for c in CITIES if (f, p, c) not in HELD_OUT]


def question(function: str, phrasing: int, city: str) -> dict:
    return {"role": "user", "content": ASK[function][phrasing].format(city)}


def record(function: str, phrasing: int, city: str) -> dict:
    call = {"id": "call_1", "type": "function", "function": {"name": function, "arguments": json.dumps({"city": city})}}
    reply = {"role": "assistant", "content": "", "tool_calls": [call]}
    return {"messages": [question(function, phrasing, city), reply], "tools": TOOLS}


def calls(model, tokenizer, function: str, phrasing: int, city: str) -> list[tuple[str, dict]]:
    asked = [question(function, phrasing, city)]
    prompt = tokenizer.apply_chat_template(asked, tools=TOOLS, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)  # fmt: skip
    with torch.no_grad():
        output = model.generate(**prompt, max_new_tokens=60, do_sample=False)
    text = tokenizer.decode(output[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    return [(c.name, json.loads(c.arguments)) for c in FORMATS["hermes"].parse(text)[1]]


@pytest.mark.timeout(1200)  # 100 steps of ~230-token rows: 5.8 min measured on the shared 2-core machine (load 8)
def test_a_tool_calling_fine_tune_makes_the_adapter_call_the_right_function_with_the_right_argument(
    demo_model_dir: Path, tmp_path: Path
):
    data = write_jsonl(tmp_path / "tools.jsonl", [record(*row) for row in TRAINED])
    result = train(demo_spec(demo_model_dir, data, tmp_path / "adapter", n_epochs=25, seed=42), lambda event: None)
    base, tokenizer = load_causal_lm(str(demo_model_dir))
    assert calls(base, tokenizer, *TRAINED[0]) == []  # the random base calls nothing
    tuned = PeftModel.from_pretrained(base, result.output_dir)
    tuned.eval()
    for function, phrasing, city in TRAINED:
        assert calls(tuned, tokenizer, function, phrasing, city) == [(function, {"city": city})]
    for function, phrasing, city in HELD_OUT:  # a question it has not seen: the right function and argument
        assert calls(tuned, tokenizer, function, phrasing, city) == [(function, {"city": city})], (phrasing, city)
