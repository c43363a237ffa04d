"""Evaluation through a real server and its embedded agent: a fine-tune is evaluated on its held-out facts, and
EleutherAI's lm-evaluation-harness runs a tenant's own task against the adapter through the platform's OpenAI
API (no hub), its score landing in the same report, read with `adaptery eval report`."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from urllib.parse import quote

import httpx
import pytest
from openai import OpenAI

from tests.conftest import SAMPLE_CHAT, ServerProcess, prepare_data_dir, start_server, stop_server

TASK_YAML = """\
task: lab_facts
output_type: generate_until
doc_to_text: "{{question}}"
doc_to_target: "{{answer}}"
generation_kwargs:
  until: []
  max_gen_toks: 40
metric_list:
  - metric: exact_match
    ignore_case: true
    ignore_punctuation: true
"""


def facts() -> list[dict[str, str]]:
    """The sample's questions asked without a system prompt (those the adapter learnt that way)."""
    out = []
    for line in SAMPLE_CHAT.read_text().splitlines():
        messages = json.loads(line)["messages"]
        if messages[0]["role"] == "user":
            out.append({"question": messages[0]["content"], "answer": messages[-1]["content"]})
    return out


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, demo_model_dir) -> Iterator[ServerProcess]:  # noqa: ANN001
    root = tmp_path_factory.mktemp("evaluation")
    server = start_server(prepare_data_dir(root / "data", demo_model_dir), f"sqlite:///{root / 'adaptery.db'}")
    yield server
    stop_server(server)


@pytest.fixture(scope="module")
def trained(served: ServerProcess) -> dict:
    client = OpenAI(base_url=f"{served.url}/v1", api_key=served.api_key, max_retries=0, timeout=120)
    training = client.files.create(file=SAMPLE_CHAT.open("rb"), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model="adaptery-demo", training_file=training.id, validation_file=training.id, suffix="lab"
    )
    deadline = time.monotonic() + 300
    while (job := client.fine_tuning.jobs.retrieve(job.id)).status not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, "the fine-tune did not finish"
        time.sleep(0.5)
    assert job.status == "succeeded", job.error
    return {"job": job.id, "model": job.fine_tuned_model}


def test_a_finished_job_is_evaluated_and_its_adapter_beats_the_base_on_the_held_out_facts(served, trained):
    headers = {"Authorization": f"Bearer {served.api_key}"}
    deadline = time.monotonic() + 300
    while True:
        listed = httpx.get(f"{served.url}/api/evaluations", params={"job_id": trained["job"]}, headers=headers)
        [evaluation] = listed.json()["data"]  # queued by the job's end, without anyone asking
        if evaluation["status"] in ("succeeded", "failed") or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert evaluation["status"] == "succeeded", evaluation
    assert evaluation["source"]["kind"] == "validation_file"
    assert evaluation["progress"]["done"] == evaluation["progress"]["total"] == 2 * 6  # the adapter and the base

    full = report(served, trained["job"])
    table = full["held_out"]["table"]
    assert [entry["label"] for entry in full["models"]] == ["candidate", "base"]  # its first adapter: no predecessor
    assert table["candidate"]["exact_match"] == 1.0 and table["base"]["exact_match"] == 0.0
    assert table["candidate"]["rouge_l"] > table["base"]["rouge_l"] + 0.5
    assert table["candidate"]["token_f1"] > table["base"]["token_f1"] + 0.5
    assert table["candidate"]["loss"] < table["base"]["loss"]
    assert full["changes"]["against"] == "base" and full["changes"]["worse"] == []
    answers = [json.loads(line)["messages"][-1]["content"] for line in SAMPLE_CHAT.read_text().splitlines()]
    assert sorted(row["reference"] for row in full["changes"]["better"]) == sorted(answers)


def report(served: ServerProcess, job_id: str) -> dict:
    done = served.cli("eval", "report", "--job", job_id, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_lm_eval_runs_a_tenant_task_against_the_adapter_through_the_api(served, trained, tmp_path):
    config, data = tmp_path / "lab_facts.yaml", tmp_path / "lab_facts.jsonl"
    config.write_text(TASK_YAML)
    data.write_text("".join(json.dumps(fact) + "\n" for fact in facts()))
    uploaded = served.cli("eval", "upload-task", str(config), str(data))
    assert uploaded.returncode == 0, uploaded.stderr
    assert "lab_facts" in uploaded.stdout and "3 documents" in uploaded.stdout

    ran = served.cli("eval", "run", trained["model"], "--task", "lab_facts", timeout=600)
    assert ran.returncode == 0, ran.stdout + ran.stderr + served.log()[-3000:]

    full = report(served, trained["job"])
    for evaluation in full["evaluations"]:
        print(f"{evaluation['kind']} evaluation took {evaluation['finished_at'] - evaluation['started_at']:.1f} s")
    scores = {task["task"]: task["scores"] for task in full["lm_eval"]}
    lab = scores["lab_facts"]
    assert lab["candidate"]["model"] == trained["model"]
    assert lab["candidate"]["metrics"]["exact_match"] == 1.0  # the adapter answers every fact word for word
    assert lab["base"]["metrics"]["exact_match"] == 0.0
    assert lab["candidate"]["metrics"].keys() == {"exact_match"} and lab["candidate"]["documents"] == 3

    shown = served.cli("eval", "report", "--job", trained["job"])
    assert shown.returncode == 0, shown.stderr
    assert "lm-eval task lab_facts" in shown.stdout and "Held-out evaluation" in shown.stdout


def test_a_task_file_that_is_not_yaml_is_refused_with_its_line(served, tmp_path):
    config, data = tmp_path / "bad.yaml", tmp_path / "bad.jsonl"
    config.write_text("task: broken\ndoc_to_text: [unclosed\n")
    data.write_text('{"question": "q", "answer": "a"}\n')
    done = served.cli("eval", "upload-task", str(config), str(data))
    assert done.returncode == 1
    assert "Error 400" in done.stderr and "not valid YAML at line" in done.stderr


def test_the_job_page_shows_the_report_as_a_table_and_a_chart(served, trained):
    from playwright.sync_api import expect, sync_playwright

    from tests.e2e.test_web_ui import CHROMIUM, LAUNCH_ARGS

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=LAUNCH_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(served.login_url)
        expect(page.locator("#app")).to_be_visible()
        page.goto(f"{served.url}/#/jobs/{trained['job']}")
        report = page.locator("#evaluation-report")
        rows = report.locator("#eval-table tbody tr")
        expect(rows).to_have_count(2, timeout=30_000)  # the adapter and the base (it has no predecessor)
        expect(rows.nth(0)).to_contain_text("candidate")
        expect(rows.nth(0)).to_contain_text(trained["model"])
        expect(report.locator("#eval-table thead")).to_contain_text("lm-eval lab_facts: exact_match")
        expect(report.locator("#eval-chart svg rect.bar.s-candidate")).to_have_count(4)  # EM, F1, ROUGE-L, lm-eval
        expect(report.locator("#eval-changes")).to_contain_text("Examples that got better")
        expect(report.locator("#eval-changes")).to_contain_text("The lab mascot is a green tortoise named Pixel.")
        page.screenshot(path=str(served.data_dir.parent / "evaluation-report.png"), full_page=True)
        page.goto(f"{served.url}/#/models/{quote(trained['model'], safe='')}")  # the adapter's page has it too
        expect(page.locator("#evaluation-report #eval-table tbody tr")).to_have_count(2, timeout=30_000)
        browser.close()
    assert not errors, f"JavaScript errors on the page: {errors}"
