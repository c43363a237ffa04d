"""The dataset format layer: each format detected, streamed and normalised to canonical chat, every bad
record reported with its position, field and an exact message, and big files in bounded memory."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from adaptery.data.chat import record_errors
from adaptery.data.chat_template import TemplateBudget
from adaptery.data.formats import (
    ColumnMapping,
    FormatError,
    Record,
    detect_format,
    make_token_counter,
    read_records,
    validate_and_normalise,
)
from adaptery.data.untrusted import RecordLimits
from adaptery.settings import Settings

LIMITS = RecordLimits.from_settings(Settings())
BUDGET = TemplateBudget.from_settings(Settings())
QA = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]


def write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def jsonl(*records: object) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def normalise(path: Path, fmt: str, **options) -> tuple[list[dict], list[str], dict]:
    """(the canonical records written, each error as str() shows it, the report as a dict)."""
    out = io.BytesIO()
    report = validate_and_normalise(path, fmt, out, **{"limits": LIMITS, **options}).to_dict()
    json.dumps(report)  # JSON-safe, as the API stores it
    written = out.getvalue().decode()
    assert written == "" or written.endswith("\n")
    records = [json.loads(line) for line in written.splitlines()]
    shown = [
        f"{e['unit']} {e['line']}: {e['field']}: {e['message']}"
        if e["field"]
        else f"{e['unit']} {e['line']}: {e['message']}"
        for e in report["errors"]
    ]
    return records, shown, report


def user_assistant(question: str, answer: str, system: str | None = None) -> dict:
    messages = [{"role": "system", "content": system}] if system else []
    return {"messages": [*messages, {"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


# --- openai-chat ---------------------------------------------------------------------------------


def test_openai_chat_keeps_turns_and_weights_and_drops_unknown_keys(tmp_path):
    conversation = [
        {"role": "system", "content": "Be brief"},
        {"role": "user", "content": "Hi", "name": "ann"},
        {"role": "assistant", "content": "Hello", "weight": 0},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Goodbye", "weight": True},
    ]
    content = "\ufeff" + json.dumps({"messages": conversation, "id": 7}) + "\r\n\r\n" + json.dumps({"messages": QA})
    records, shown, report = normalise(write(tmp_path, "chat.jsonl", content), "openai-chat")
    assert records == [
        {
            "messages": [
                {"role": "system", "content": "Be brief"},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello", "weight": 0},
                {"role": "user", "content": "Bye"},
                {"role": "assistant", "content": "Goodbye", "weight": 1},
            ]
        },
        {"messages": QA},
    ]
    assert shown == []
    assert report["ok"] and (report["records_total"], report["records_valid"]) == (2, 2)
    assert report["summary"] == "all 2 records are valid"


def test_openai_chat_reports_every_bad_line_with_its_field(tmp_path):
    lines = [
        json.dumps({"messages": QA}),
        '{"messages": [',
        json.dumps({"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]}),
        json.dumps({"messages": [{"role": "developer", "content": "x"}, {"role": "assistant", "content": "y"}]}),
        json.dumps({"messages": [{"role": "user", "content": "only a question"}]}),
        json.dumps({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "  "}]}),
        json.dumps(["not", "an", "object"]),
        json.dumps({"messages": [*QA[:1], {"role": "assistant", "content": "a", "weight": 2}]}),
        json.dumps({"prompt": "x"}),
        '{"messages": [{"role": "user", "content": "x\\ud800"}, {"role": "assistant", "content": "\\ud83d\\ude00"}]}',
    ]
    records, shown, report = normalise(write(tmp_path, "bad.jsonl", "\n".join(lines)), "openai-chat")
    assert records == [{"messages": QA}]
    assert shown == [
        "line 2: invalid JSON: Expecting value (column 15)",
        "line 3: messages[0].role: unknown role 'bot' (expected system, user, assistant or tool)",
        "line 4: messages[0].role: unknown role 'developer' (expected system, user, assistant or tool)",
        "line 5: messages: has no assistant message to learn from",
        "line 6: messages[0].content: must be a string or a list of text parts",
        "line 6: messages[1].content: is empty",
        "line 7: each line must be a JSON object",
        "line 8: messages[1].weight: must be 0 or 1",
        "line 9: messages: must be a non-empty list of messages",
        "line 10: messages[0].content: holds an unpaired \\ud800-\\udfff escape, which is not text: remove or fix it",
    ]
    assert (report["records_total"], report["records_valid"], report["records_invalid"]) == (10, 1, 9)
    assert report["error_counts"] == {
        "record": 2,
        "messages[].role": 2,
        "messages": 2,
        "messages[].content": 3,
        "messages[].weight": 1,
    }
    assert not report["ok"]


# --- alpaca --------------------------------------------------------------------------------------

ALPACA_ROWS = [
    {"instruction": "Add", "input": "2 and 3", "output": "5"},
    {"instruction": "Greet", "input": "", "output": "Hello!", "system": "Be kind"},
    {"instruction": "And now?", "output": "6", "history": [["Add 2 and 3", "5"]]},
]
ALPACA_CANONICAL = [
    user_assistant("Add\n\n2 and 3", "5"),
    user_assistant("Greet", "Hello!", system="Be kind"),
    {
        "messages": [
            {"role": "user", "content": "Add 2 and 3"},
            {"role": "assistant", "content": "5"},
            {"role": "user", "content": "And now?"},
            {"role": "assistant", "content": "6"},
        ]
    },
]


def test_alpaca_jsonl_and_json_array_normalise_alike(tmp_path):
    as_lines = write(tmp_path, "a.jsonl", jsonl(*ALPACA_ROWS))
    as_array = write(tmp_path, "a.json", "\ufeff" + json.dumps(ALPACA_ROWS, indent=2))
    assert normalise(as_lines, "alpaca")[0] == ALPACA_CANONICAL
    records, shown, report = normalise(as_array, "alpaca")
    assert records == ALPACA_CANONICAL and shown == [] and report["ok"]


def test_alpaca_errors_name_the_alpaca_fields(tmp_path):
    rows = [
        {"instruction": "Add", "output": "5"},
        {"instruction": "No answer"},
        {"instruction": "", "output": 3},
        {"instruction": "x", "input": ["list"], "output": "y"},
        {"instruction": "x", "output": "y", "history": [["only a question"]]},
        "a string",
    ]
    _, shown, report = normalise(write(tmp_path, "a.jsonl", jsonl(*rows)), "alpaca")
    assert shown == [
        "line 2: output: is missing",
        "line 3: instruction: must be a non-empty string",
        "line 3: output: must be a non-empty string",
        "line 4: input: must be a string",
        "line 5: history[0]: must be a pair of non-empty strings",
        "line 6: must be a JSON object with instruction, input and output",
    ]
    assert report["records_invalid"] == 5


def test_json_array_errors_point_at_the_record_number(tmp_path):
    rows = [{"instruction": "Add", "output": "5"}, {"instruction": "No answer"}, {"input": "x", "output": "y"}]
    _, shown, report = normalise(write(tmp_path, "a.json", json.dumps(rows, indent=2)), "alpaca")
    assert shown == ["record 2: output: is missing", "record 3: instruction: is missing"]
    assert [e["unit"] for e in report["errors"]] == ["record", "record"]


def test_a_truncated_json_array_says_where_it_broke(tmp_path):
    path = write(tmp_path, "a.json", '[{"instruction": "a", "output": "b"}, {"instruction": "c", "outp')
    records, shown, report = normalise(path, "alpaca")
    assert records == [user_assistant("a", "b")]
    assert shown == [
        "record 2: the JSON array is broken after record 1: the file ends inside record 2 (was the upload cut short?)"
    ]
    assert (report["records_total"], report["records_invalid"]) == (2, 1)


def test_an_invalid_json_array_says_where_it_broke(tmp_path):
    path = write(tmp_path, "a.json", '[{"instruction": "a", "output": "b"},, {"instruction": "c", "output": "d"}]')
    _, shown, _ = normalise(path, "alpaca")
    assert shown == [
        "record 2: the JSON array is broken after record 1 (parse error: unallowed token at this point in JSON "
        "text): nothing after it was read"
    ]


def test_a_json_array_is_read_one_record_at_a_time(tmp_path):
    """ijson hands over each element as it is parsed: the first record arrives before the file's end is read."""
    path = write(tmp_path, "a.json", "[" + ",".join(json.dumps(r) for r in ALPACA_ROWS * 2000) + "]")
    records = read_records(path, "alpaca", limits=LIMITS)
    assert next(records) == Record(1, ALPACA_CANONICAL[0], "record")
    path.write_bytes(b"")  # truncated under the reader: it only ever held its buffer
    assert sum(1 for _ in records) < 2000


# --- sharegpt ------------------------------------------------------------------------------------


def test_sharegpt_speakers_become_roles(tmp_path):
    rows = [
        {
            "conversations": [
                {"from": "system", "value": "Be brief"},
                {"from": "human", "value": "Hi"},
                {"from": "gpt", "value": "Hello"},
            ]
        },
        {"system": "Be kind", "conversations": [{"from": "user", "value": "Hi"}, {"from": "assistant", "value": "Yo"}]},
    ]
    expected = [user_assistant("Hi", "Hello", system="Be brief"), user_assistant("Hi", "Yo", system="Be kind")]
    assert normalise(write(tmp_path, "s.jsonl", jsonl(*rows)), "sharegpt")[0] == expected
    assert normalise(write(tmp_path, "s.json", json.dumps(rows)), "sharegpt")[0] == expected


def test_sharegpt_errors_name_the_sharegpt_fields(tmp_path):
    rows = [
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "robot", "value": "Beep"}]},
        {"conversations": [{"from": "human", "value": "Hi"}]},
        {"conversations": [{"from": "human", "value": ""}, {"from": "gpt", "value": None}]},
        {"conversations": []},
        {"conversations": ["Hi"]},
    ]
    _, shown, report = normalise(write(tmp_path, "s.jsonl", jsonl(*rows)), "sharegpt")
    assert shown == [
        "line 1: conversations[1].from: unknown speaker 'robot' (expected human, gpt, system, function_call or "
        "observation)",
        "line 2: conversations: has no gpt turn to learn from",
        "line 3: conversations[0].value: is empty",
        "line 3: conversations[1].value: must be a string",
        "line 4: conversations: must be a non-empty list of turns",
        "line 5: conversations[0]: must be an object with 'from' and 'value'",
    ]
    assert report["error_counts"]["conversations[].value"] == 2


# --- plain text ----------------------------------------------------------------------------------


def test_text_lines_are_completion_records_on_their_own_line_numbers(tmp_path):
    path = write(tmp_path, "notes.txt", b"first document\r\n\n  \ncaf\xe9 broken\nsecond document\n")
    records, shown, report = normalise(path, "text-lines")
    assert records == [
        {"messages": [{"role": "assistant", "content": "first document"}]},
        {"messages": [{"role": "assistant", "content": "second document"}]},
    ]
    assert shown == ["line 4: not valid UTF-8 text (byte 3 of the line): save the file as UTF-8"]
    assert report["records_total"] == 3


def test_text_document_is_one_completion_record_of_the_whole_file(tmp_path):
    text = "# Title\n\nA paragraph.\n"
    records, _, report = normalise(write(tmp_path, "doc.md", text), "text-document")
    assert records == [{"messages": [{"role": "assistant", "content": text}]}]
    assert report["ok"]
    assert normalise(write(tmp_path, "empty.txt", " \n"), "text-document")[1] == ["line 1: the document is empty"]
    broken = write(tmp_path, "latin1.txt", b"one\ntwo caf\xe9\n")
    assert normalise(broken, "text-document")[1] == [
        "line 2: not valid UTF-8 text (byte 7 of the line): save the file as UTF-8"
    ]


def test_completion_records_pass_the_chat_check():
    assert record_errors(1, {"messages": [{"role": "assistant", "content": "a document"}]}) == []


# --- csv / tsv -----------------------------------------------------------------------------------


def test_csv_columns_are_inferred_from_the_header(tmp_path):
    content = '\ufeffQuestion,Answer\r\n"What is 2+2?",4\r\n"Quote ""this""","Two\nlines"\r\n'
    records, shown, _ = normalise(write(tmp_path, "qa.csv", content), "csv")
    assert records == [user_assistant("What is 2+2?", "4"), user_assistant('Quote "this"', "Two\nlines")]
    assert shown == []
    content = "system,user,assistant\nBe brief,Hi,Hello\n,Bye,Goodbye\n"
    assert normalise(write(tmp_path, "ua.csv", content), "csv")[0] == [
        user_assistant("Hi", "Hello", system="Be brief"),
        user_assistant("Bye", "Goodbye"),
    ]


def test_tsv_with_instruction_input_output(tmp_path):
    path = write(tmp_path, "x.tsv", "instruction\tinput\toutput\nTranslate\tbonjour\thello\nSay hi\t\thi\n")
    assert normalise(path, "tsv")[0] == [
        user_assistant("Translate\n\nbonjour", "hello"),
        user_assistant("Say hi", "hi"),
    ]


def test_csv_with_an_explicit_mapping(tmp_path):
    path = write(tmp_path, "x.csv", "q,a,sys,answer\nHi,Hello,Be brief,ignored\n")
    mapping = ColumnMapping(prompt="q", response="a", system="sys")
    assert normalise(path, "csv", mapping=mapping)[0] == [user_assistant("Hi", "Hello", system="Be brief")]
    mapping = ColumnMapping(instruction="Q", output="A")  # matched case-insensitively when not exact
    assert normalise(path, "csv", mapping=mapping)[0] == [user_assistant("Hi", "Hello")]


def test_csv_bad_rows_are_reported_on_the_line_they_start(tmp_path):
    content = (
        b'question,answer\nok,fine\n"",empty question\nno answer,\na,b,c\ncaf\xe9,x\n"multi\nline",ok\n"open,x\ny,z\n'
    )
    records, shown, report = normalise(write(tmp_path, "x.csv", content), "csv")
    assert records == [user_assistant("ok", "fine"), user_assistant("multi\nline", "ok")]
    assert shown == [
        "line 3: column question: is empty",
        "line 4: column answer: is empty",
        "line 5: has 3 columns; the header has 2",
        "line 6: not valid UTF-8 text (byte 3 of the line): save the file as UTF-8",
        "line 9: has 1 column; the header has 2 (the row spans lines 9-10: is a quote left open?)",
    ]
    assert report["error_counts"] == {"column question": 1, "column answer": 1, "record": 3}


def test_csv_mapping_problems_are_clear(tmp_path):
    path = write(tmp_path, "x.csv", "foo,bar\n1,2\n")
    with pytest.raises(FormatError) as raised:
        list(read_records(path, "csv", limits=LIMITS))
    assert str(raised.value) == (
        "cannot tell which columns to use: the header has foo, bar; expected prompt/response, question/answer, "
        "user/assistant or instruction/input/output (system optional), or one text column (documents), or give a "
        "column mapping such as "
        "prompt=<column>, response=<column>"
    )
    with pytest.raises(FormatError) as raised:
        list(read_records(path, "csv", limits=LIMITS, mapping=ColumnMapping(prompt="nope", response="bar")))
    assert str(raised.value) == "the mapping names column 'nope' for prompt, but the header has foo, bar"
    with pytest.raises(FormatError, match="^a column mapping needs prompt and response, or instruction and output"):
        list(read_records(path, "csv", limits=LIMITS, mapping=ColumnMapping(prompt="foo", output="bar")))
    with pytest.raises(FormatError, match="^the table has no header row"):
        list(read_records(write(tmp_path, "empty.csv", ""), "csv", limits=LIMITS))


# --- detection -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("chat.jsonl", jsonl({"messages": QA}), "openai-chat"),
        ("chat.json", json.dumps([{"messages": QA}], indent=2), "openai-chat"),
        ("a.jsonl", jsonl(ALPACA_ROWS[0]), "alpaca"),
        ("a.json", json.dumps(ALPACA_ROWS, indent=2), "alpaca"),
        ("s.jsonl", jsonl({"conversations": [{"from": "human", "value": "x"}]}), "sharegpt"),
        ("s.json", json.dumps([{"conversations": []}]), "sharegpt"),
        ("notes.txt", "a line\nanother\n", "text-lines"),
        ("qa.csv", "question,answer\nq,a\n", "csv"),
        ("qa.tsv", "prompt\tresponse\nq\ta\n", "tsv"),
        ("upload", jsonl({"messages": QA}), "openai-chat"),  # no extension: the content decides
        ("upload", "question\tanswer\nq\ta\n", "tsv"),
        ("upload", "instruction,output\nq,a\n", "csv"),
        ("long.jsonl", json.dumps({"messages": [{"role": "assistant", "content": "x" * 100_000}]}), "openai-chat"),
        ("code.txt", "{ not json at all\n", "text-lines"),
    ],
)
def test_detection_of_each_format(tmp_path, name, content, expected):
    assert detect_format(write(tmp_path, name, content)) == expected


def test_detection_uses_the_uploaded_name_over_the_stored_path(tmp_path):
    blob = write(tmp_path, "3f2a9c", "q,a\n1,2\n")
    assert detect_format(blob, "pairs.csv") == "csv"


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        (
            "x.bin",
            b"PK\x03\x04\x00\x00",
            "'x.bin' is a binary file, not a dataset: expected JSONL, a JSON array, CSV, TSV or text",
        ),
        ("x.jsonl", "\ufeff".encode("utf-16"), "'x.jsonl' is UTF-16 text: save it as UTF-8"),
        (
            "y.jsonl",
            '{"foo": 1, "id": 2}\n',
            "cannot tell the dataset format: the first record has keys foo, id; expected 'messages' (openai-chat), "
            "'conversations' (sharegpt), 'instruction'/'output' (alpaca) or 'text' (documents). Give the format "
            "explicitly (openai-chat, alpaca, sharegpt, documents, text-lines, text-document, csv, tsv, parquet, "
            "openai-preference)",
        ),
        (
            "y.json",
            '[["a", "b"]]',
            "cannot tell the dataset format: the first record is a JSON array, not an object; expected 'messages' "
            "(openai-chat), 'conversations' (sharegpt), 'instruction'/'output' (alpaca) or 'text' (documents). Give "
            "the format explicitly (openai-chat, alpaca, sharegpt, documents, text-lines, text-document, csv, tsv, "
            "parquet, openai-preference)",
        ),
        ("z.txt", b"ok\ncaf\xe9\n", "'z.txt' is not UTF-8 text (line 2, byte 6 of the file): save it as UTF-8"),
        ("e.jsonl", " \n\n", "'e.jsonl' is empty"),
        ("e.json", "[ ]", "the file is an empty JSON array: there are no records"),
        (
            "p.json",
            '{\n  "messages": []\n}\n',
            "the first line of 'p.json' is not a complete JSON object (Expecting property name enclosed in double "
            "quotes, column 2): JSONL needs one object per line, and a pretty-printed JSON file must be an array of "
            "records",
        ),
        (
            "n.jsonl",
            "hello\n",
            "'n.jsonl' does not start with a JSON object or array: expected one JSON object per line, or an array of "
            "records",
        ),
        (
            "mystery",
            "just some words\n",
            "cannot tell the dataset format of 'mystery': it is not JSON, its first line is not a header of known "
            "columns, and its name does not end in .jsonl, .json, .csv, .tsv or .txt. Give the format explicitly "
            "(openai-chat, alpaca, sharegpt, documents, text-lines, text-document, csv, tsv, parquet, "
            "openai-preference)",
        ),
    ],
)
def test_an_undetectable_file_is_a_clear_format_error(tmp_path, name, content, message):
    with pytest.raises(FormatError) as raised:
        detect_format(write(tmp_path, name, content))
    assert str(raised.value) == message


def test_an_explicit_format_wins_over_detection(tmp_path):
    line = json.dumps({"messages": QA})
    path = write(tmp_path, "looks.jsonl", line + "\n")
    assert detect_format(path) == "openai-chat"
    assert normalise(path, "text-lines")[0] == [{"messages": [{"role": "assistant", "content": line}]}]


def test_an_unknown_format_name_is_refused(tmp_path):
    with pytest.raises(FormatError, match="^unknown format 'yaml'; known: openai-chat, alpaca"):
        list(read_records(write(tmp_path, "q.txt", "x"), "yaml", limits=LIMITS))


# --- the report ----------------------------------------------------------------------------------


def test_the_report_counts_every_invalid_record_but_lists_only_the_first(tmp_path):
    bad = {"messages": [{"role": "bot", "content": ""}]}
    path = write(tmp_path, "x.jsonl", jsonl({"messages": QA}, bad, bad, bad))
    records, shown, report = normalise(path, "openai-chat", max_reported_errors=3)
    assert len(records) == 1
    assert (report["records_invalid"], report["errors_truncated"], len(shown)) == (3, True, 3)
    assert report["error_counts"] == {"messages[].role": 3, "messages[].content": 3}
    assert report["summary"] == (
        "3 of 4 records are invalid: line 2: messages[0].role: unknown role 'bot' (expected system, user, "
        "assistant or tool); line 2: messages[0].content: is empty; line 3: messages[0].role: unknown role 'bot' "
        "(expected system, user, assistant or tool) (and 3 more errors)"
    )


def test_an_empty_file_is_not_ok_and_says_what_a_record_looks_like(tmp_path):
    _, _, report = normalise(write(tmp_path, "x.jsonl", "\n\n"), "openai-chat")
    assert not report["ok"] and report["records_total"] == 0
    assert report["summary"] == (
        "the file has no records: openai-chat expects one JSON object per line (or a JSON array of them) with a "
        "'messages' list"
    )


def test_progress_is_reported_every_thousand_records(tmp_path):
    seen: list[int] = []
    path = write(tmp_path, "x.jsonl", jsonl(*[{"messages": QA}] * 2500))
    validate_and_normalise(path, "openai-chat", io.BytesIO(), limits=LIMITS, progress=seen.append)
    assert seen == [1000, 2000]


# --- tokens --------------------------------------------------------------------------------------


def test_records_longer_than_the_context_are_reported_with_the_token_count(tmp_path, demo_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir)
    count = make_token_counter(tokenizer, BUDGET)
    short = {"messages": QA}
    long = {"messages": [{"role": "user", "content": "tell"}, {"role": "assistant", "content": "lab " * 300}]}
    path = write(tmp_path, "x.jsonl", jsonl(short, long))
    records, shown, _ = normalise(path, "openai-chat", count_tokens=count, max_tokens=64)
    assert records == [short]
    tokens = count(long)
    assert tokens > 300
    assert shown == [
        f"line 2: messages: record has {tokens} tokens; the base model's context is 64 tokens: shorten it or split it"
    ]
    # As training sees it, template tokens included: <|bos|> <|user|> Q <|end|> <|assistant|> A <|end|>
    assert count({"messages": QA}) == count({"messages": [QA[0], {**QA[1], "weight": 0}]}) == 7


def test_without_a_chat_template_tokens_are_counted_on_the_joined_contents(demo_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir)
    tokenizer.chat_template = None
    assert make_token_counter(tokenizer, BUDGET)({"messages": QA}) == len(tokenizer("Q\nA")["input_ids"])


def test_a_conversation_the_chat_template_refuses_is_an_error_on_its_record(tmp_path):
    class StrictTokenizer:
        chat_template = "{{ raise_exception('Conversation roles must alternate user/assistant') }}"
        special_tokens_map: dict[str, str] = {}

        def get_chat_template(self, chat_template=None):
            return chat_template or self.chat_template

    path = write(tmp_path, "x.jsonl", jsonl({"messages": QA}))
    _, shown, _ = normalise(
        path, "openai-chat", count_tokens=make_token_counter(StrictTokenizer(), BUDGET), max_tokens=64
    )
    assert shown == [
        "line 1: messages: the base model's chat template rejected this conversation: Conversation roles must "
        "alternate user/assistant"
    ]


# --- bounded memory ------------------------------------------------------------------------------

MEASURE = textwrap.dedent("""
    import os, resource, sys, time
    from pathlib import Path
    from adaptery.data.formats import validate_and_normalise
    from adaptery.data.untrusted import RecordLimits
    from adaptery.settings import Settings
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    with open(os.devnull, "wb") as out:
        limits = RecordLimits.from_settings(Settings())
        report = validate_and_normalise(Path(sys.argv[1]), sys.argv[2], out, limits=limits)
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(report.records_valid, report.records_invalid, (after - before) // 1024, round(seconds, 2))
""")


def peak_growth(path: Path, fmt: str) -> tuple[int, int, int]:
    """(valid records, invalid records, peak RSS growth in MiB) of validating `path` in a fresh process."""
    result = subprocess.run([sys.executable, "-c", MEASURE, str(path), fmt], capture_output=True, text=True, check=True)
    valid, invalid, growth_mib, _seconds = result.stdout.split()
    return int(valid), int(invalid), int(growth_mib)


def test_a_200_mb_jsonl_file_is_normalised_in_bounded_memory(tmp_path):
    line = jsonl(user_assistant("q " * 100, "answer " * 150))
    path = tmp_path / "big.jsonl"
    lines = 200 * 1024 * 1024 // len(line)
    with path.open("w") as handle:
        for _ in range(lines // 1000):
            handle.write(line * 1000)
        handle.write("not json\n")  # errors are counted, not collected beyond the cap
    valid, invalid, growth_mib = peak_growth(path, "openai-chat")
    assert (valid, invalid) == (lines // 1000 * 1000, 1)
    assert growth_mib < 25, f"peak memory grew by {growth_mib} MiB for a 200 MiB file"


def test_a_50_mb_json_array_is_normalised_in_bounded_memory(tmp_path):
    element = json.dumps({"instruction": "q " * 100, "input": "", "output": "answer " * 150})
    path = tmp_path / "big.json"
    elements = 50 * 1024 * 1024 // len(element)
    with path.open("w") as handle:
        handle.write("[" + element)
        for _ in range(elements // 1000):
            handle.write(("," + element) * 1000)
        handle.write("]")
    valid, invalid, growth_mib = peak_growth(path, "alpaca")
    assert (valid, invalid) == (elements // 1000 * 1000 + 1, 0)
    assert growth_mib < 25, f"peak memory grew by {growth_mib} MiB for a 50 MiB JSON array"
