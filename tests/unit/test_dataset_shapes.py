"""Every common dataset shape read as its authors meant: tool calls (ShareGPT's function_call/observation
and OpenAI's tool_calls/tool), content parts, {"text"} documents, Parquet; public demo files from
LLaMA-Factory (tests/data/llamafactory, Apache-2.0) read record for record; tool records trained on the
assistant's calls and answers, never on the tool results."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from adaptery.data.chat import validate_lines
from adaptery.data.chat_template import template_messages
from adaptery.data.formats import detect_format
from adaptery.data.untrusted import bounded_lines
from adaptery.training.data import IGNORE_INDEX, load_chat_dataset, pack_examples
from tests.unit.test_formats import LIMITS, jsonl, normalise, write

LLAMAFACTORY = Path(__file__).parents[1] / "data" / "llamafactory"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def call(call_id: str, name: str = "get_weather", arguments: str = '{"city": "Paris"}') -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def tool_record(**changes: object) -> dict:
    """OpenAI's function-calling fine-tuning example: a call, its result, the answer."""
    record = {
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Weather in "}, {"type": "text", "text": "Paris?"}]},
            {"role": "assistant", "tool_calls": [call("call_1")]},
            {"role": "tool", "tool_call_id": "call_1", "content": '{"celsius": 21}'},
            {"role": "assistant", "content": "21 degrees in Paris."},
        ],
        "tools": [WEATHER],
    }
    return {**record, **changes}


# --- LLaMA-Factory's demo files ---------------------------------------------------------------------


def test_llamafactory_glaive_tool_calls_read_as_openai_tool_calls():
    path = LLAMAFACTORY / "glaive_toolcall_en_demo.json"
    source = json.loads(path.read_text())
    assert detect_format(path) == "sharegpt"
    records, shown, report = normalise(path, "sharegpt")
    assert shown == [] and report["records_valid"] == len(source) == 12
    for original, record in zip(source, records, strict=True):
        tools = json.loads(original["tools"]) if original["tools"] else []
        assert record.get("tools", []) == [{"type": "function", "function": tool} for tool in tools]
        turns = original["conversations"]
        assert len(record["messages"]) == len(turns)
        for turn, message in zip(turns, record["messages"], strict=True):
            if turn["from"] == "function_call":
                (made,) = message["tool_calls"]
                expected = json.loads(turn["value"])
                assert made["function"]["name"] == expected["name"]
                assert json.loads(made["function"]["arguments"]) == expected["arguments"]
                assert message == {"role": "assistant", "content": "", "tool_calls": [made]}
            elif turn["from"] == "observation":
                assert message == {"role": "tool", "tool_call_id": made["id"], "content": turn["value"]}
            else:
                assert message == {
                    "role": {"human": "user", "gpt": "assistant"}[turn["from"]],
                    "content": turn["value"],
                }
    assert sum("tool_calls" in m for r in records for m in r["messages"]) == 8  # in 5 of the 12 records


@pytest.mark.parametrize("name", ["alpaca_en_demo.json", "identity.json"])
def test_llamafactory_alpaca_and_identity_read_as_one_exchange_each(name):
    path = LLAMAFACTORY / name
    source = json.loads(path.read_text())
    assert detect_format(path) == "alpaca"
    records, shown, _ = normalise(path, "alpaca")
    assert shown == []
    assert records == [
        {
            "messages": [
                {"role": "user", "content": item["instruction"] + (f"\n\n{item['input']}" if item["input"] else "")},
                {"role": "assistant", "content": item["output"]},
            ]
        }
        for item in source
    ]


def test_llamafactory_c4_text_documents_read_as_documents():
    path = LLAMAFACTORY / "c4_demo.jsonl"
    source = [json.loads(line) for line in path.read_text().splitlines()]
    assert detect_format(path) == "documents"
    records, shown, _ = normalise(path, "documents")
    assert shown == []
    assert records == [
        {"messages": [{"role": "assistant", "content": item["text"]}], "document": True} for item in source
    ]


# --- OpenAI's function-calling format -----------------------------------------------------------------


def test_openai_tool_records_are_normalised_parts_joined_and_arguments_as_json_text(tmp_path):
    arguments_as_object = tool_record()
    arguments_as_object["messages"][1] = {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                                           "arguments": {"city": "Paris"}}}],
    }  # fmt: skip
    bare_tools = tool_record(tools=[WEATHER["function"]])  # LLaMA-Factory's bare function schemas
    records, shown, _ = normalise(write(tmp_path, "t.jsonl", jsonl(tool_record(), arguments_as_object, bare_tools)),
                                  "openai-chat")  # fmt: skip
    assert shown == []
    expected = {
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "", "tool_calls": [call("call_1")]},
            {"role": "tool", "tool_call_id": "call_1", "content": '{"celsius": 21}'},
            {"role": "assistant", "content": "21 degrees in Paris."},
        ],
        "tools": [WEATHER],
    }
    assert records == [expected, expected, expected]


def test_a_record_may_end_on_parallel_calls(tmp_path):
    calls = [call("a"), call("b", arguments='{"city": "Rome"}')]
    record = {"messages": [{"role": "user", "content": "Paris and Rome?"}, {"role": "assistant", "tool_calls": calls}],
              "tools": [WEATHER]}  # fmt: skip
    records, shown, _ = normalise(write(tmp_path, "t.jsonl", jsonl(record)), "openai-chat")
    assert shown == [] and records[0]["messages"][1]["tool_calls"] == calls


def test_tool_record_mistakes_are_line_errors_naming_the_field(tmp_path):
    def with_messages(*replacements: tuple[int, dict | None]) -> dict:
        record = tool_record()
        messages = list(record["messages"])
        for index, message in replacements:
            messages[index] = message
        return {**record, "messages": [m for m in messages if m is not None]}

    lines = [
        with_messages((2, None)),  # the call has no answer before the conversation goes on
        with_messages((2, {"role": "tool", "tool_call_id": "call_9", "content": "x"})),  # answers no call
        with_messages((1, {"role": "assistant", "tool_calls": [call("call_1", arguments="{city: Paris}")]})),
        with_messages((1, {"role": "assistant", "tool_calls": [call("call_1", name="get_time")]})),
        tool_record(
            tools=[{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "objekt"}}}]
        ),
        tool_record(tools=None),
        with_messages((0, {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]})),
    ]
    _, shown, report = normalise(write(tmp_path, "t.jsonl", jsonl(*lines)), "openai-chat")
    assert shown == [
        "line 1: messages[1].tool_calls: the call 'call_1' to 'get_weather' has no answer: a tool message with its "
        "tool_call_id must follow",
        "line 2: messages[2].tool_call_id: answers no call: tool_call_id 'call_9' matches no earlier tool call",
        "line 2: messages[1].tool_calls: the call 'call_1' to 'get_weather' has no answer: a tool message with its "
        "tool_call_id must follow",
        "line 3: messages[1].tool_calls[0].function.arguments: are not JSON (Expecting property name enclosed in "
        "double quotes): '{city: Paris}'",
        "line 4: messages[1].tool_calls[0].function.name: calls 'get_time', which is not in tools (the record's "
        "tools define get_weather)",
        "line 5: tools[0].parameters: is not JSON Schema: 'objekt' is not valid under any of the given schemas "
        "(at type)",
        "line 6: messages[1].tool_calls[0].function.name: calls 'get_weather', which is not in tools (the record "
        "has no tools)",
        "line 7: messages[0].content: part 0 is 'image_url': only text parts are supported (images and audio are "
        "not, yet)",
    ]
    assert report["records_invalid"] == 7


def test_sharegpt_tool_mistakes_are_errors_in_sharegpt_terms(tmp_path):
    tools = json.dumps([WEATHER["function"]])
    human = {"from": "human", "value": "Weather?"}
    lines = [
        {
            "conversations": [human, {"from": "observation", "value": "21"}, {"from": "gpt", "value": "ok"}],
            "tools": tools,
        },
        {"conversations": [human, {"from": "function_call", "value": "get_weather(Paris)"}], "tools": tools},
        {
            "conversations": [
                human,
                {"from": "function_call", "value": '{"name": "get_weather", "arguments": {}}'},
                {"from": "gpt", "value": "ok"},
            ],
            "tools": tools,
        },  # fmt: skip
        {"conversations": [human, {"from": "gpt", "value": "ok"}], "tools": "[{not json"},
    ]
    _, shown, _ = normalise(write(tmp_path, "s.jsonl", jsonl(*lines)), "sharegpt")
    assert shown == [
        "line 1: conversations[1].from: 'observation' answers no call: no function_call before it is left unanswered",
        'line 2: conversations[1].value: is not JSON: a function_call is {"name": ..., "arguments": {...}}',
        "line 3: conversations[1]: the function_call has no observation answering it before the conversation goes on",
        "line 4: tools: is text but not JSON: expected a list of function schemas",
    ]


def test_v1_files_validator_accepts_openai_function_calling_lines():
    lines = (jsonl(tool_record(), tool_record(tools=None))).encode()
    report = validate_lines(bounded_lines(__import__("io").BytesIO(lines), LIMITS.max_bytes), LIMITS)
    assert report.records == 1 and report.error_count == 1


# --- documents and Parquet ------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "content"), [("d.csv", "text\nfirst doc\n\"second, with a comma\"\n"),
                                               ("d.tsv", "Content\nfirst doc\nsecond, with a comma\n")])  # fmt: skip
def test_a_one_column_text_table_is_documents(tmp_path, name, content):
    path = write(tmp_path, name, content)
    fmt = detect_format(path)
    records, shown, _ = normalise(path, fmt)
    assert shown == []
    assert [r["messages"][0]["content"] for r in records] == ["first doc", "second, with a comma"]
    assert all(r["document"] is True for r in records)


def test_parquet_rows_are_read_in_row_groups_in_every_shape(tmp_path):
    chat = tmp_path / "chat.parquet"
    rows = [tool_record(), {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]},
            {"messages": [{"role": "user", "content": "Q"}]}, tool_record()]  # fmt: skip
    for row in rows:  # Hugging Face datasets store tools as JSON text and contents as strings
        row["tools"] = json.dumps(row.get("tools")) if row.get("tools") else None
        row["messages"][0]["content"] = "Weather in Paris?" if row["tools"] else row["messages"][0]["content"]
    pq.write_table(pa.Table.from_pylist(rows), chat, row_group_size=2)
    assert pq.ParquetFile(chat).num_row_groups == 2
    assert detect_format(chat, "upload.bin") == "parquet"
    records, shown, _ = normalise(chat, "parquet")
    assert shown == ["row 3: messages: has no assistant message to learn from"]
    assert [r.get("tools") for r in records] == [[WEATHER], None, [WEATHER]]
    assert records[0]["messages"][1]["tool_calls"] == [call("call_1")]

    table = tmp_path / "table.parquet"
    pq.write_table(pa.table({"question": ["Q1", "Q2"], "answer": ["A1", ""]}), table)
    records, shown, _ = normalise(table, "parquet")
    assert [r["messages"][1]["content"] for r in records] == ["A1"]
    assert shown == ["row 2: column answer: is empty"]

    documents = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": ["one", "two"], "url": ["u1", "u2"]}), documents)
    records, _, _ = normalise(documents, "parquet")
    assert [r["messages"][0]["content"] for r in records] == ["one", "two"]

    glaive = tmp_path / "glaive.parquet"
    pq.write_table(
        pa.Table.from_pylist(json.loads((LLAMAFACTORY / "glaive_toolcall_en_demo.json").read_text())), glaive
    )
    from_parquet, shown, _ = normalise(glaive, "parquet")
    assert shown == [] and from_parquet == normalise(LLAMAFACTORY / "glaive_toolcall_en_demo.json", "sharegpt")[0]


# --- training ----------------------------------------------------------------------------------------------


def test_tool_records_train_on_calls_and_answers_not_on_tool_results(tmp_path, demo_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir)
    path = write(tmp_path, "t.jsonl", jsonl(tool_record()))
    (example,) = load_chat_dataset(path, tokenizer, max_seq_length=1024).examples
    trained = tokenizer.decode([t for t, label in zip(example["input_ids"], example["labels"], strict=True)
                                if label != IGNORE_INDEX])  # fmt: skip
    assert (
        trained == '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call><|end|>'
        "21 degrees in Paris.<|end|>"
    )
    text = tokenizer.decode(example["input_ids"])
    assert '<tools>{"type": "function", "function": {"name": "get_weather"' in text  # the schemas reach the model
    assert '<tool_response>{"celsius": 21}</tool_response>' in text
    canonical = normalise(path, "openai-chat")[0][0]
    rendered = tokenizer.apply_chat_template(template_messages(canonical["messages"]), tools=[WEATHER], tokenize=False)
    assert text == rendered  # as transformers renders the same template


def test_documents_train_on_every_token_and_are_packed(tmp_path, demo_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir)
    path = write(tmp_path, "d.jsonl", jsonl({"text": "the lab opens at nine"}, {"text": "bring a badge"}))
    dataset = load_chat_dataset(path, tokenizer, max_seq_length=64)
    assert dataset.documents == dataset.records == 2
    for example in dataset.examples:
        assert example["labels"] == example["input_ids"]
        assert example["input_ids"][-1] == tokenizer.eos_token_id
    assert tokenizer.decode(dataset.examples[0]["input_ids"], skip_special_tokens=True) == "the lab opens at nine"
    assert len(pack_examples(dataset.examples, 64)) == 1
