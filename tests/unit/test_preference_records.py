"""Preference pairs (OpenAI's DPO form) through the dataset tools as any upload: detected, validated with the
field named, deduplicated on the prompt and both outputs, PII-scrubbed in every part, counted in statistics."""

from __future__ import annotations

import io
import json
from pathlib import Path

from adaptery.data import dedup, pii, stats
from adaptery.data.formats import detect_format, validate_and_normalise
from adaptery.data.untrusted import RecordLimits


def pair(prompt: str, good: str, bad: str) -> dict:
    return {
        "input": {"messages": [{"role": "user", "content": prompt}]},
        "preferred_output": [{"role": "assistant", "content": good}],
        "non_preferred_output": [{"role": "assistant", "content": bad}],
    }


def write(tmp_path: Path, records: list) -> Path:
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_a_preference_file_is_detected_validated_and_bad_pairs_name_their_field(tmp_path: Path):
    bad_output = {**pair("q", "a", "b"), "non_preferred_output": [{"role": "user", "content": "b"}]}
    no_user = {**pair("q", "a", "b"), "input": {"messages": [{"role": "assistant", "content": "x"}]}}
    path = write(
        tmp_path,
        [
            pair("Who runs the lab?", "Dr. Okafor.", "Nobody."),
            bad_output,
            no_user,
            {"input": {}, "preferred_output": []},
        ],
    )
    assert detect_format(path, path.name) == "openai-preference"
    out = io.BytesIO()
    report = validate_and_normalise(
        path, "openai-preference", out, limits=RecordLimits(max_bytes=1 << 20, max_depth=64)
    )
    assert (report.records_total, report.records_valid) == (4, 1)
    fields = {(e.line, e.field) for e in report.errors}
    assert (2, "non_preferred_output") in fields
    assert (3, "input.messages") in fields
    assert (4, "input.messages") in fields
    kept = json.loads(out.getvalue())
    assert kept == pair("Who runs the lab?", "Dr. Okafor.", "Nobody.")


def test_dedup_keeps_pairs_that_differ_in_either_output_and_drops_exact_repeats():
    records = [pair("q", "a", "b"), pair("q", "a", "c"), pair("q", "a", "b")]
    result = dedup.deduplicate(iter(enumerate(records)), threshold=0.9, num_perm=64, near=False)
    assert sorted(result.keep) == [0, 1]


def test_pii_is_scrubbed_in_the_prompt_and_both_outputs():
    record = pair("mail me at ann@lab.example", "call +44 20 7946 0958", "ann@lab.example")
    scrubbed, counts = pii.scrub_record(record)
    text = json.dumps(scrubbed)
    assert "ann@lab.example" not in text and "7946" not in text
    assert sum(counts.values()) == 3
    assert set(scrubbed) == set(record)


def test_statistics_count_a_pair_as_one_record():
    summary = stats.compute_stats([pair("q", "a", "b"), pair("r", "c", "d")])
    assert summary["records"] == 2 and summary["role_counts"]["assistant"] == 2
