"""Every supported format: detected, streamed, normalised to chat, and its bad records reported exactly."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from adaptery.data.formats import (
    ColumnMapping,
    FormatError,
    detect_format,
    make_token_counter,
    read_records,
    validate_and_normalise,
)


def write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def run(path: Path, fmt: str, **kwargs) -> tuple[list[dict], dict]:
    out = io.BytesIO()
    report = validate_and_normalise(path, fmt, out, **kwargs)
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    return records, report.to_dict()


def errors(report: dict) -> list[str]:
    return [
        f"{e['unit']} {e['line']}: {e['field']}: {e['message']}"
        if e["field"]
        else f"{e['unit']} {e['line']}: {e['message']}"
        for e in report["errors"]
    ]


USER_ASSISTANT = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]


def test_openai_chat_keeps_roles_turns_and_weights(tmp_path):
    line = {
        "messages": [
            {"role": "system", "content": "Be brief"},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello", "weight": 0},
            {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "Goodbye", "weight": 1},
        ],
        "extra": "ignored",
    }
    path = write(tmp_path, "chat.jsonl", json.dumps(line) + "\n\n")
    records, report = run(path, "openai-chat")
    assert records == [{"messages": line["messages"]}]
    assert report["ok"] and report["records_total"] == 1


def test_openai_chat_bad_records_are_each_reported(tmp_path):
    lines = [
        json.dumps({"messages": USER_ASSISTANT}),
        '{"messages": [',
        json.dumps({"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]}),
        json.dumps({"messages": [{"role": "user", "content": "only a question"}]}),
        json.dumps({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": ""}]}),
        json.dumps(["not", "an", "object"]),
        json.dumps(
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 2}]}
        ),
    ]
    path = write(tmp_path, "bad.jsonl", "\n".join(lines) + "\n")
    records, report = run(path, "openai-chat")
    assert len(records) == 1
    assert (report["records_total"], report["records_valid"], report["records_invalid"]) == (7, 1, 6)
    assert errors(report) == [
        "line 2: invalid JSON: Expecting value (column 15)",
        "line 3: messages[0].role: unknown role 'bot' (expected system, user or assistant)",
        "line 4: messages: has no assistant message to learn from",
        "line 5: messages[0].content: must be a string",
        "line 5: messages[1].content: is empty",
        "line 6: each line must be a JSON object",
        "line 7: messages[1].weight: must be 0 or 1",
    ]
    assert report["error_counts"]["messages[].content"] == 2
    assert report["summary"].startswith("6 of 7 records are invalid: line 2: invalid JSON")


def test_alpaca_jsonl_and_json_array(tmp_path):
    rows = [
        {"instruction": "Add", "input": "2 and 3", "output": "5"},
        {"instruction": "Greet", "input": "", "output": "Hello!", "system": "Be kind"},
    ]
    expected = [
        {"messages": [{"role": "user", "content": "Add\n\n2 and 3"}, {"role": "assistant", "content": "5"}]},
        {
            "messages": [
                {"role": "system", "content": "Be kind"},
                {"role": "user", "content": "Greet"},
                {"role": "assistant", "content": "Hello!"},
            ]
        },
    ]
    jsonl = write(tmp_path, "a.jsonl", "\n".join(map(json.dumps, rows)))
    array = write(tmp_path, "a.json", json.dumps(rows, indent=2))
    assert detect_format(jsonl) == detect_format(array) == "alpaca"
    assert run(jsonl, "alpaca")[0] == expected
    assert run(array, "alpaca")[0] == expected


def test_alpaca_bad_records_name_the_alpaca_fields_and_array_records(tmp_path):
    rows = [{"instruction": "Add", "output": "5"}, {"instruction": "No answer"}, {"instruction": "", "output": 3}]
    _, report = run(write(tmp_path, "a.json", json.dumps(rows)), "alpaca")
    assert errors(report) == [
        "record 2: output: is missing",
        "record 3: instruction: must be a non-empty string",
        "record 3: output: must be a non-empty string",
    ]


def test_a_broken_json_array_says_where_it_broke(tmp_path):
    path = write(tmp_path, "a.json", '[{"instruction": "a", "output": "b"}, {"instruction": ')
    records, report = run(path, "alpaca")
    assert len(records) == 1 and report["records_invalid"] == 1
    assert report["errors"][0]["message"].startswith("the JSON array is broken after record 1")


def test_sharegpt(tmp_path):
    good = {
        "conversations": [
            {"from": "system", "value": "Be brief"},
            {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "Hello"},
        ]
    }
    bad = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "robot", "value": "Beep"}]}
    no_answer = {"conversations": [{"from": "human", "value": "Hi"}]}
    path = write(tmp_path, "s.jsonl", "\n".join(json.dumps(r) for r in (good, bad, no_answer)))
    assert detect_format(path) == "sharegpt"
    records, report = run(path, "sharegpt")
    assert records == [
        {
            "messages": [
                {"role": "system", "content": "Be brief"},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"},
            ]
        }
    ]
    assert errors(report) == [
        "line 2: conversations[1].from: unknown speaker 'robot' (expected human, gpt or system)",
        "line 3: conversations: has no gpt turn to learn from",
    ]


def test_text_lines_and_text_document_are_completion_style(tmp_path):
    path = write(tmp_path, "notes.txt", "first document\n\nsecond document\n")
    assert detect_format(path) == "text-lines"
    assert run(path, "text-lines")[0] == [
        {"messages": [{"role": "assistant", "content": "first document"}]},
        {"messages": [{"role": "assistant", "content": "second document"}]},
    ]
    assert run(path, "text-document")[0] == [
        {"messages": [{"role": "assistant", "content": "first document\n\nsecond document\n"}]}
    ]
    empty = write(tmp_path, "empty.txt", "  \n")
    assert errors(run(empty, "text-document")[1]) == ["line 1: the document is empty"]


def test_csv_with_inferred_and_explicit_mapping_and_tsv(tmp_path):
    csv_path = write(tmp_path, "qa.csv", 'question,answer\n"What is 2+2?",4\n"Quote ""this""","Done"\n,empty\n')
    records, report = run(csv_path, "csv")
    assert records[0] == {
        "messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]
    }
    assert records[1]["messages"][0]["content"] == 'Quote "this"'
    assert errors(report) == ["line 4: column question: is empty"]
    renamed = write(tmp_path, "x.csv", "q,a,sys\nHi,Hello,Be brief\n")
    records, _ = run(renamed, "csv", mapping=ColumnMapping(prompt="q", response="a", system="sys"))
    assert records[0]["messages"][0] == {"role": "system", "content": "Be brief"}
    tsv = write(tmp_path, "x.tsv", "instruction\tinput\toutput\nTranslate\tbonjour\thello\n")
    assert detect_format(tsv) == "tsv"
    assert run(tsv, "tsv")[0][0]["messages"][0]["content"] == "Translate\n\nbonjour"


def test_csv_mapping_problems_are_clear(tmp_path):
    path = write(tmp_path, "x.csv", "foo,bar\n1,2\n")
    with pytest.raises(FormatError, match="the header has foo, bar; expected prompt/response"):
        list(read_records(path, "csv"))
    with pytest.raises(FormatError, match="names column 'nope' for prompt"):
        list(read_records(path, "csv", mapping=ColumnMapping(prompt="nope", response="bar")))
    ragged = write(tmp_path, "r.csv", "prompt,response\na,b,c\n")
    assert errors(run(ragged, "csv")[1]) == ["line 2: has 3 columns; the header has 2"]


def test_detection_and_its_clear_failures(tmp_path):
    assert detect_format(write(tmp_path, "x.jsonl", json.dumps({"messages": USER_ASSISTANT}))) == "openai-chat"
    assert detect_format(write(tmp_path, "data", json.dumps({"messages": USER_ASSISTANT}))) == "openai-chat"
    with pytest.raises(FormatError, match="binary file"):
        detect_format(write(tmp_path, "x.bin", b"\x00\x01\x02"))
    with pytest.raises(FormatError, match=r"keys foo, id; expected 'messages'"):
        detect_format(write(tmp_path, "y.jsonl", '{"foo": 1, "id": 2}\n'))
    with pytest.raises(FormatError, match="not UTF-8"):
        detect_format(write(tmp_path, "z.txt", b"caf\xe9\n"))
    with pytest.raises(FormatError, match="cannot tell the dataset format of 'mystery'"):
        detect_format(write(tmp_path, "mystery", "just some words"))
    with pytest.raises(FormatError, match="unknown format 'yaml'"):
        list(read_records(write(tmp_path, "q.txt", "x"), "yaml"))


def test_an_explicit_format_wins_over_detection(tmp_path):
    path = write(tmp_path, "looks.jsonl", json.dumps({"messages": USER_ASSISTANT}) + "\n")
    records, _ = run(path, "text-lines")
    assert records[0]["messages"][0]["content"].startswith('{"messages"')


def test_bad_utf8_is_an_error_on_its_line_not_a_crash(tmp_path):
    path = write(tmp_path, "x.jsonl", json.dumps({"messages": USER_ASSISTANT}).encode() + b"\n\xff\xfe\n")
    records, report = run(path, "openai-chat")
    assert len(records) == 1
    assert errors(report) == ["line 2: not valid UTF-8 text (byte 0 of the line): save the file as UTF-8"]


def test_records_longer_than_the_context_are_reported_with_the_token_count(tmp_path, demo_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir)
    count = make_token_counter(tokenizer)
    short = {"messages": USER_ASSISTANT}
    long = {"messages": [{"role": "user", "content": "tell"}, {"role": "assistant", "content": "lab " * 300}]}
    path = write(tmp_path, "x.jsonl", json.dumps(short) + "\n" + json.dumps(long) + "\n")
    records, report = run(path, "openai-chat", count_tokens=count, max_tokens=64)
    assert records == [short]
    tokens = count(long["messages"])
    assert errors(report) == [
        f"line 2: messages: record has {tokens} tokens; the base model's context is 64: shorten or split it"
    ]
    assert count(short["messages"]) > 2  # the chat template's role tokens count too


def test_normalising_a_large_file_takes_bounded_memory(tmp_path):
    """~100 MB of JSONL through validation must not grow the process by anything like its size."""
    line = (
        json.dumps(
            {"messages": [{"role": "user", "content": "q " * 40}, {"role": "assistant", "content": "answer " * 60}]}
        )
        + "\n"
    )
    path = tmp_path / "big.jsonl"
    with path.open("w") as handle:
        for _ in range(100 * 1024 * 1024 // len(line)):
            handle.write(line)
    script = textwrap.dedent(f"""
        import resource, sys
        from pathlib import Path
        from adaptery.data.formats import validate_and_normalise
        class Null:
            def write(self, data): return len(data)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        report = validate_and_normalise(Path({str(path)!r}), "openai-chat", Null())
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(report.records_valid, (after - before) // 1024)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    valid, growth_mib = map(int, result.stdout.split())
    assert valid > 100_000
    assert growth_mib < 30, f"peak memory grew by {growth_mib} MiB for a 100 MiB file"
