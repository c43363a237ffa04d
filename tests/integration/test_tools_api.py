"""Tools and structured outputs on /v1/chat/completions: constrained decoding makes even the random demo
base answer in the schema or call the function it must; calls come back with ids and finish_reason
"tool_calls", streamed as OpenAI streams them; the official client parses both; bad schemas are 400s."""

from __future__ import annotations

import json
from typing import Literal

import jsonschema
import pytest
from openai import OpenAI
from pydantic import BaseModel

from tests.contracts.openai_schema import assert_matches, assert_stream_chunk
from tests.integration.test_inference_api import stream_chunks

ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {"city": {"enum": ["Paris", "Rome"]}, "unit": {"enum": ["C", "F"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER_PARAMETERS}},
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}},
]
VERDICT = {
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "level": {"enum": ["low", "high"]},
        "score": {"type": "integer", "minimum": 0, "maximum": 9},
    },  # fmt: skip
    "required": ["ok", "level", "score"],
    "additionalProperties": False,
}


def chat(running, **body):
    return running.client.post(
        "/v1/chat/completions",
        headers=running.auth(),
        json={"model": "adaptery-demo", "messages": ASK, "temperature": 0, "max_tokens": 200, **body},
    )


def test_json_schema_response_format_always_parses_and_validates(running):
    response_format = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": VERDICT, "strict": True}}
    for seed in range(3):
        response = chat(running, response_format=response_format, temperature=1.0, seed=seed)
        assert response.status_code == 200, response.text
        assert_matches("CreateChatCompletionResponse", response.json())
        choice = response.json()["choices"][0]
        jsonschema.validate(json.loads(choice["message"]["content"]), VERDICT)
        assert choice["finish_reason"] == "stop"
    plain = chat(running).json()["choices"][0]["message"]["content"]  # the random base, unconstrained
    with pytest.raises(ValueError):
        json.loads(plain)


def test_json_object_response_format_gives_an_object(running):
    response = chat(running, response_format={"type": "json_object"}, max_tokens=200)
    assert isinstance(json.loads(response.json()["choices"][0]["message"]["content"]), dict)


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_forced_tool_calls_come_back_with_ids_and_stream_as_openai_streams_them(running, tool_choice):
    response = chat(running, tools=TOOLS, tool_choice=tool_choice, parallel_tool_calls=False)
    assert response.status_code == 200, response.text
    whole = response.json()
    assert_matches("CreateChatCompletionResponse", whole)
    choice = whole["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    assert call["id"].startswith("call_") and call["type"] == "function"
    if isinstance(tool_choice, dict):
        assert call["function"]["name"] == "get_weather"
        jsonschema.validate(json.loads(call["function"]["arguments"]), WEATHER_PARAMETERS)

    with running.client.stream(
        "POST",
        "/v1/chat/completions",
        headers=running.auth(),
        json={
            "model": "adaptery-demo",
            "messages": ASK,
            "temperature": 0,
            "max_tokens": 200,
            "stream": True,
            "tools": TOOLS,
            "tool_choice": tool_choice,
            "parallel_tool_calls": False,
        },  # fmt: skip
    ) as streamed:
        chunks = stream_chunks(streamed)
    for chunk in chunks:
        assert_stream_chunk(chunk)
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    pieces = [piece for delta in deltas for piece in delta.get("tool_calls") or []]
    assert pieces[0]["id"].startswith("call_") and pieces[0]["function"]["arguments"] == ""
    assembled = {
        "name": pieces[0]["function"]["name"],
        "arguments": "".join(p["function"]["arguments"] for p in pieces),
    }
    assert assembled == call["function"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert "".join(d.get("content") or "" for d in deltas) == ""


def test_a_tool_conversation_is_prompted_with_the_calls_and_results(running):
    weather = {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "C"}'}
    call = {"id": "call_1", "type": "function", "function": weather}
    messages = [*ASK, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "21"}]  # fmt: skip
    response = chat(running, messages=messages, tools=TOOLS, max_tokens=5)
    assert response.status_code == 200, response.text
    prompt = response.json()["usage"]["prompt_tokens"]
    without_result = chat(running, messages=messages[:1], tools=TOOLS, max_tokens=5).json()["usage"]["prompt_tokens"]
    assert prompt > without_result + 20  # the call and its result are in the prompt


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}]},
         "tools[0].parameters", "is not JSON Schema"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "nope"),
        ({"tool_choice": "required"}, "tool_choice", "needs tools"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": "get_weather"}}, "tool_choice", "None"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
            "type": "string", "format": "credit-card"}}}}, "response_format.json_schema", "credit-card"),
        ({"response_format": {"type": "yaml"}}, "response_format.type", "yaml"),
        ({"messages": [*ASK, {"role": "tool", "content": "x"}]}, "messages[1]", "tool_call_id"),
    ],
)  # fmt: skip
def test_bad_tool_and_format_requests_are_400s_naming_the_param(running, body, param, words):
    response = chat(running, **body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert_matches("ErrorResponse", response.json())
    assert error["param"] == param and words in error["message"]


class Verdict(BaseModel):
    ok: bool
    level: Literal["low", "high"]


def test_the_openai_client_parses_structured_outputs_and_tool_calls(running):
    client = OpenAI(base_url="http://testserver/v1", api_key=running.first.api_key, http_client=running.client,
                    max_retries=0)  # fmt: skip
    parsed = client.chat.completions.parse(model="adaptery-demo", messages=ASK, response_format=Verdict,
                                           temperature=0, max_tokens=200)  # fmt: skip
    verdict = parsed.choices[0].message.parsed
    assert isinstance(verdict, Verdict)

    tools = [
        {"type": "function", "function": {"name": "get_weather", "strict": True, "parameters": WEATHER_PARAMETERS}}
    ]
    made = client.chat.completions.create(model="adaptery-demo", messages=ASK, tools=tools, tool_choice="required",
                                          temperature=0, max_tokens=200)  # fmt: skip
    (call,) = made.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and made.choices[0].finish_reason == "tool_calls"
    # the round trip: the client runs the function and sends its result back for the final answer
    result = {"celsius": 21, **json.loads(call.function.arguments)}
    conversation = [
        *ASK,
        made.choices[0].message,
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps(result)},
    ]
    final = client.chat.completions.create(model="adaptery-demo", messages=conversation, tools=tools,
                                           tool_choice="none", temperature=0, max_tokens=8)  # fmt: skip
    assert final.choices[0].message.tool_calls is None and final.choices[0].message.content
    assert final.usage.prompt_tokens > made.usage.prompt_tokens  # the call and its result were read
    with client.chat.completions.stream(model="adaptery-demo", messages=ASK, tools=tools, tool_choice="required",
                                        temperature=0, max_tokens=200) as stream:  # fmt: skip
        final = stream.get_final_completion()
    assert final.choices[0].message.tool_calls[0].function.arguments == call.function.arguments
