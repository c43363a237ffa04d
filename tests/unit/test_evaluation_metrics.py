"""The evaluation's scores against known values, the checks of structured answers, the evaluation set's and the
lm-eval task file's errors, and which examples count as better and worse."""

from __future__ import annotations

import json

import pytest
from rouge_score import rouge_scorer

from adaptery.data.untrusted import RecordLimits
from adaptery.evaluation import heldout, metrics
from adaptery.services import evaluation_tasks
from adaptery.services.errors import InvalidRequest

LIMITS = RecordLimits(max_bytes=100_000, max_depth=32)


def test_exact_match_ignores_case_punctuation_and_articles_as_squad_does():
    assert metrics.exact_match("The Cat!", "cat") == 1.0
    assert metrics.exact_match("a  cat sat.", "cat sat") == 1.0
    assert metrics.exact_match("cats", "cat") == 0.0


def test_token_f1_is_the_harmonic_mean_of_token_precision_and_recall():
    # "the cat sat" → [cat, sat]; "a cat sat down" → [cat, sat, down]: precision 1, recall 2/3, F1 0.8
    assert metrics.token_f1("the cat sat", "a cat sat down") == pytest.approx(0.8)
    assert metrics.token_f1("dog", "cat") == 0.0
    assert metrics.token_f1("", "") == 1.0
    assert metrics.token_f1("the", "cat") == 0.0  # nothing left of the prediction after normalisation
    # repeated tokens count as often as both sides have them: common = min(2, 1) = 1 → P 1/2, R 1, F1 2/3
    assert metrics.token_f1("cat cat", "cat") == pytest.approx(2 / 3)


def test_rouge_l_matches_lins_worked_example():
    # Lin (2004), ROUGE, section 3.1: reference "police killed the gunman"; S2 "police kill the gunman" has an LCS of
    # 3 words (ROUGE-L 3/4 without stemming), S3 "the gunman kill police" of 2 (2/4). With Porter stemming, as the
    # report uses, "killed" and "kill" match and S2 scores 1.
    reference = "police killed the gunman"
    plain = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    assert plain.score(reference, "police kill the gunman")["rougeL"].fmeasure == pytest.approx(0.75)
    assert plain.score(reference, "the gunman kill police")["rougeL"].fmeasure == pytest.approx(0.5)
    assert metrics.rouge_l("police kill the gunman", reference) == pytest.approx(1.0)
    assert metrics.rouge_l("the gunman kill police", reference) == pytest.approx(0.5)
    # P = 6/7, R = 6/6: F = 12/13
    assert metrics.rouge_l("the cat was found under the bed", "the cat was under the bed") == pytest.approx(12 / 13)


def test_json_schema_check_passes_valid_json_and_says_why_not_otherwise():
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    assert metrics.check_json_schema('{"n": 3}', schema).passed
    wrong = metrics.check_json_schema('{"n": "three"}', schema)
    assert not wrong.passed and "'three' is not of type 'integer'" in wrong.reason
    broken = metrics.check_json_schema("{n: 3}", schema)
    assert not broken.passed and broken.reason.startswith("not JSON")


def test_tool_call_check_wants_the_same_functions_with_equal_arguments_valid_for_the_tool():
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]  # fmt: skip
    expected = [{"name": "get_weather", "arguments": '{"city": "Oslo"}'}]
    assert metrics.check_tool_calls([{"name": "get_weather", "arguments": '{"city":"Oslo"}'}], expected, tools).passed
    wrong_name = metrics.check_tool_calls([{"name": "x", "arguments": "{}"}], expected, tools)
    assert "expected ['get_weather']" in wrong_name.reason
    invalid = metrics.check_tool_calls([{"name": "get_weather", "arguments": {"city": 3}}], expected, tools)
    assert not invalid.passed and "3 is not of type 'string'" in invalid.reason
    other = metrics.check_tool_calls([{"name": "get_weather", "arguments": {"city": "Bergen"}}], expected, tools)
    assert not other.passed and "differ" in other.reason
    assert metrics.check_tool_calls([], expected, tools).reason == "no tool call in the answer"


def row(line: int, **scores: tuple[float, float, float | None]) -> dict:
    return {"line": line, "models": {label: {"rouge_l": r, "token_f1": f, "loss": loss, "answer": ""}
                                     for label, (r, f, loss) in scores.items()}}  # fmt: skip


def test_better_and_worse_examples_are_ordered_by_rouge_then_f1_then_loss():
    rows = [
        row(1, candidate=(1.0, 1.0, 0.1), base=(0.2, 0.2, 3.0)),  # better by 0.8
        row(2, candidate=(0.5, 0.5, 1.0), base=(0.5, 0.5, 2.0)),  # tied scores, lower loss: better
        row(3, candidate=(0.1, 0.1, 1.0), base=(0.6, 0.6, 1.0)),  # worse by 0.5
        row(4, candidate=(0.3, 0.3, 1.0), base=(0.3, 0.3, 1.0)),  # unchanged: neither
    ]
    found = heldout.changes(rows, "candidate", "base")
    assert [r["line"] for r in found["better"]] == [1, 2]
    assert [r["line"] for r in found["worse"]] == [3]


def test_an_evaluation_set_with_a_bad_line_is_refused_naming_the_line(tmp_path):
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    path = tmp_path / "set.jsonl"
    path.write_text(json.dumps(good) + "\n" + '{"messages": [oops\n')
    with pytest.raises(heldout.EvaluationSetError, match="^line 2: invalid JSON"):
        heldout.read_evaluation_set(path, LIMITS, max_examples=10)
    path.write_text(json.dumps({"messages": [{"role": "assistant", "content": "a"}]}) + "\n")
    with pytest.raises(heldout.EvaluationSetError, match="line 1: messages: no prompt before the assistant's answer"):
        heldout.read_evaluation_set(path, LIMITS, max_examples=10)


def test_the_reference_is_the_last_assistant_turn_and_a_schema_is_kept(tmp_path):
    schema = {"type": "object"}
    record = {
        "messages": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
                     {"role": "user", "content": "q2"}, {"role": "assistant", "content": "{}"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
    }  # fmt: skip
    path = tmp_path / "set.jsonl"
    path.write_text(json.dumps(record) + "\n")
    [example] = heldout.read_evaluation_set(path, LIMITS, max_examples=10)
    assert example.reference["content"] == "{}" and len(example.prompt) == 3
    assert metrics.json_schema_of(example.record) == schema


def test_the_held_out_split_is_the_trainers_own():
    from adaptery.training.trainer import split_validation

    items = list(range(20))
    assert heldout.held_out_split(items, 0.2, 7) == split_validation(items, 0.2, 7)[1]


GOOD_TASK = 'task: facts\ndoc_to_text: "{{question}}"\ndoc_to_target: "{{ answer }}"\n'


def test_a_task_file_that_is_not_yaml_names_its_line():
    found = r"task file is not valid YAML at line 2, column 6: found character .@. that cannot start any token"
    with pytest.raises(InvalidRequest, match=found):
        evaluation_tasks.check_task("task: facts\nfoo: @bar\n")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (GOOD_TASK + "process_results: !function utils.process\n", "not valid YAML"),  # no code from a task file
        (GOOD_TASK + "dataset_path: some/hub-dataset\n", "unsupported key(s) dataset_path"),
        ('task: facts\ndoc_to_text: "{{ q.__class__ }}"\ndoc_to_target: "{{a}}"\n', "may only use {{ field }}"),
        ('task: facts\ndoc_to_text: "{% for x in y %}"\ndoc_to_target: "{{a}}"\n', "may only use {{ field }}"),
        (GOOD_TASK + "output_type: loglikelihood\n", "only output_type generate_until"),
        (GOOD_TASK + "metric_list: [{metric: bleu}]\n", "each metric is {metric: exact_match}"),
        ("- just\n- a list\n", "expected a YAML mapping"),
        ('task: "bad name!"\ndoc_to_text: "{{q}}"\ndoc_to_target: "{{a}}"\n', "'task' must be a name"),
        # L10: string fields the harness renders or matches are plain text, never a template
        (GOOD_TASK + 'target_delimiter: "{{ 7*7 }}"\n', "'target_delimiter' must be plain text"),
        (GOOD_TASK + 'target_delimiter: "{% if x %}"\n', "'target_delimiter' must be plain text"),
        (GOOD_TASK + 'generation_kwargs: {until: ["{{ a }}"]}\n', "until must be plain text"),
        # L2: deep nesting is a clear 400 naming where, never a RecursionError (a 500)
        ("x: " + "[" * 5000, "nested deeper than 16 levels at line 1, column 19"),
        ("- " * 3000, "nested deeper than 16 levels at line 1"),
        ("{a: " * 2000, "nested deeper than 16 levels at line 1"),
        ("task: facts\nx:\n" + "".join("  " * i + "- \n" for i in range(40)), "nested deeper than 16 levels at line"),
    ],
)
def test_a_task_file_outside_the_checked_subset_is_refused(text, message):
    with pytest.raises(InvalidRequest) as caught:
        evaluation_tasks.check_task(text)
    assert message in str(caught.value)


def test_a_task_reads_only_its_template_fields_and_bad_data_lines_are_named():
    config, fields = evaluation_tasks.check_task(GOOD_TASK)
    assert fields == {"question", "answer"} and config["generation_kwargs"]["do_sample"] is False
    good = b'{"question": "q", "answer": "a"}\n'
    assert evaluation_tasks.check_task_data(good * 3, fields, LIMITS) == 3
    with pytest.raises(InvalidRequest, match="data line 2: field 'answer'"):
        evaluation_tasks.check_task_data(good + b'{"question": "q"}\n', fields, LIMITS)
    with pytest.raises(InvalidRequest, match="data line 1: invalid JSON"):
        evaluation_tasks.check_task_data(b"{oops\n", fields, LIMITS)


def test_the_report_recommends_promotion_only_when_better_on_some_score_and_worse_on_none():
    recommendation = heldout.recommendation
    old = {"exact_match": 0.0, "token_f1": 0.40, "rouge_l": 0.40, "check_pass_rate": None, "loss": 3.0}
    better = {"exact_match": 1.0, "token_f1": 0.95, "rouge_l": 0.95, "check_pass_rate": None, "loss": 0.5}
    verdict = recommendation({"candidate": better, "predecessor": old}, "predecessor")
    assert verdict["promote"] is True and verdict["against"] == "predecessor"
    assert "exact match 1.000 against 0.000" in verdict["reason"] and "loss 0.500 against 3.000" in verdict["reason"]
    mixed = {**better, "rouge_l": 0.30}  # better on two scores, worse on one: the one it would lose decides
    verdict = recommendation({"candidate": mixed, "base": old}, "base")
    assert verdict["promote"] is False and "worse than the base" in verdict["reason"] and "ROUGE-L" in verdict["reason"]
    same = {**old, "token_f1": 0.405, "loss": 1.0}  # within the margin: nothing measurable to gain
    verdict = recommendation({"candidate": same, "predecessor": old}, "predecessor")
    assert verdict["promote"] is False and "no held-out score differs" in verdict["reason"]
    assert recommendation({"candidate": better}, "predecessor")["promote"] is False  # nothing to compare with


def test_a_task_named_like_a_harness_builtin_runs_the_tenants_own_file_only(tmp_path):
    """The harness is given only the task's own folder (no built-in tasks): a tenant's task called 'hellaswag'
    cannot pull in the harness's own 'hellaswag' (its hub dataset and Python helpers)."""
    from adaptery.agent.evaluation import write_task
    from adaptery.evaluation.runner import task_manager

    config, _ = evaluation_tasks.check_task(GOOD_TASK.replace("task: facts", "task: hellaswag"))
    data = tmp_path / "task.jsonl"
    data.write_text('{"question": "q", "answer": "a"}\n')
    write_task({"name": "hellaswag", "config": config}, data, tmp_path / "task")
    manager = task_manager(tmp_path / "task")
    assert set(manager.all_tasks) == {"hellaswag"}
    (task,) = manager.load(["hellaswag"])["tasks"].values()
    assert task.config.dataset_path == "json" and task.config.dataset_kwargs["data_files"]["test"] == str(data)
