"""The closed loop in a real headless Chromium, on the demo model, with one server and one browser for the module
(the `journey` fixture of test_web_ui): a stable name answers from version 1; people chat with it, correct its
answers and vote in the arena; the corrections become a dataset; one action fine-tunes the name's current version
on it; the evaluation report says the new adapter beats its predecessor on the held-out facts and to promote it;
after promotion the name answers from the new version, and rolling back restores the old answers. Another tenant
sees none of it, and with collection off nothing is stored. lm-eval then scores the new adapter through the API
on a task the tenant uploads, and the score lands in the same report; the feedback and names CLIs run against
the same server.

Version 1 is trained (through the API) on the demo's three facts asked without a system prompt; the people
correct those facts, so "held-out facts" here are the corrected ones (a randomly initialised base cannot
generalise to facts it never saw, so the set measures whether the corrections were learnt).
"""

from __future__ import annotations

import json
import sqlite3
import time

import httpx
from playwright.sync_api import expect

from tests.conftest import SAMPLE_CHAT
from tests.e2e.test_web_ui import Journey, journey, open_settings  # noqa: F401 - the module's server and browser

NAME = "lab-assistant"
NAME_ID = f"ft:adaptery-demo:default:{NAME}"
CORRECTED = {  # what people say the answers should be: version 1 learnt the demo's originals
    "What is the lab's mascot?": "The lab mascot is a purple owl named Byte.",
    "When is the weekly lab meeting?": "Lab meetings are held every Monday at 9 am in room C101.",
    "Where does the lab store its datasets?": "Datasets live on the Osprey storage server under the archive folder.",
}
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


def originals() -> dict[str, str]:
    """The demo's facts asked without a system prompt: what version 1 answers."""
    out = {}
    for line in SAMPLE_CHAT.read_text().splitlines():
        messages = json.loads(line)["messages"]
        if messages[0]["role"] == "user":
            out[messages[0]["content"]] = messages[-1]["content"]
    return out


def jsonl(facts: dict[str, str]) -> bytes:
    lines = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in facts.items()
    ]
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


class Api:
    def __init__(self, web: Journey, key: str | None = None) -> None:
        self.url, self.headers = web.server.url, {"Authorization": f"Bearer {key or web.server.api_key}"}

    def __call__(self, method: str, path: str, **kwargs) -> httpx.Response:  # noqa: ANN003
        return httpx.request(method, f"{self.url}{path}", headers=self.headers, timeout=120, **kwargs)

    def upload(self, name: str, data: bytes) -> str:
        made = self("POST", "/v1/files", files={"file": (name, data)}, data={"purpose": "fine-tune"})
        assert made.status_code == 200, made.text
        return made.json()["id"]

    def ask(self, model: str, question: str) -> tuple[str, str | None]:
        body = {"model": model, "messages": [{"role": "user", "content": question}], "temperature": 0, "max_tokens": 40}
        answered = self("POST", "/v1/chat/completions", json=body)
        assert answered.status_code == 200, answered.text
        return answered.json()["choices"][0]["message"]["content"], answered.headers.get("x-adaptery-model-version")


def train(api: Api, file_id: str) -> dict:
    job = api("POST", "/v1/fine_tuning/jobs", json={"model": "adaptery-demo", "training_file": file_id, "suffix": "v1"})
    assert job.status_code == 200, job.text
    deadline = time.monotonic() + 300
    while (done := api("GET", f"/v1/fine_tuning/jobs/{job.json()['id']}").json())["status"] not in (
        "succeeded", "failed", "cancelled"
    ):  # fmt: skip
        assert time.monotonic() < deadline, "the fine-tune did not finish"
        time.sleep(0.3)
    assert done["status"] == "succeeded", done["error"]
    return done


def stored(web: Journey) -> dict[str, int]:
    """How many rows of collected feedback the server's database holds."""
    with sqlite3.connect(web.tmp / "adaptery.db") as db:
        return {
            t: db.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
            for t in ("feedback", "completions", "arena_battles")
        }  # noqa: S608


def confirm(web: Journey) -> None:
    web.page.click("#dialog-confirm")


def test_the_whole_loop_from_chat_to_a_promoted_better_version_and_back(journey: Journey) -> None:  # noqa: F811, PLR0915
    page, api = journey.page, Api(journey)
    facts = originals()
    assert facts.keys() == CORRECTED.keys()
    v1 = train(api, api.upload("v1.jsonl", jsonl(facts)))["fine_tuned_model"]
    held_out = api.upload("held-out-facts.jsonl", jsonl(CORRECTED))
    page.goto(journey.server.login_url)
    page.click("#link-submit")
    expect(page.locator("#app")).to_be_visible()

    journey.go("feedback")  # collection is off until an admin turns it on
    expect(page.locator("#feedback-policy")).to_contain_text("collects no feedback")
    page.select_option("#policy-collect", "all")
    page.select_option("#policy-readers", "members")  # a feedback dataset is built only from what every member reads
    page.click("#policy-save")
    expect(page.locator("#feedback-policy")).to_contain_text("Every chat completion")

    journey.go("models")
    page.fill("#name-new", NAME)
    page.select_option("#name-version", v1)
    page.click("#name-create")
    card = page.locator(f"#name-{NAME}")
    expect(card).to_have_attribute("data-current", "1")

    # Chat with the name, one conversation per question; every answer is corrected on the page.
    completions = []
    for index, (question, corrected) in enumerate(CORRECTED.items()):
        journey.go(f"chat?model={NAME_ID}")  # a new chat: each record's prompt is its question alone
        expect(page.locator("#model-select")).to_have_value(NAME_ID)
        if index == 0:
            open_settings(page)  # temperature 0; a chat starts with the settings last used
        page.fill("#prompt", question)
        page.press("#prompt", "Enter")
        answer = page.locator(".message.assistant").last
        expect(answer).to_have_attribute("data-done", "true", timeout=60_000)
        expect(answer.locator(".content")).to_have_text(facts[question])  # version 1's answer
        completion = answer.get_attribute("data-completion-id")
        assert completion.startswith("chatcmpl-")
        completions.append(completion)
        answer.locator(".edit-answer").click()
        answer.locator(".correction-input").fill(corrected)
        answer.locator(".save-correction").click()
        expect(answer.locator(".correction")).to_contain_text(corrected)
    answer.get_by_role("button", name="Bad answer").click()
    expect(answer.get_by_role("button", name="Bad answer")).to_have_attribute("aria-pressed", "true")
    verdict = {"rating": -1, "reason": "outdated", "correction": corrected}  # an application sends its user's word
    by_id = api("POST", f"/api/completions/{completions[-1]}/feedback", json=verdict)
    assert by_id.status_code == 200, by_id.text  # the API names the page's answer by its completion id: one row
    assert by_id.json()["message_id"] and by_id.json()["model"] == v1 and by_id.json()["correction"] is not None
    assert len(api("GET", "/api/feedback").json()["data"]) == 3  # one row per answer, whichever way it came
    page.reload()
    expect(page.locator(".message.assistant").last.locator(".feedback-reason")).to_have_value("outdated")
    expect(page.locator(".message.assistant").last.locator(".correction")).to_contain_text(corrected)
    journey.shot("loop-chat-corrections")

    page.click("#open-arena")  # a blind vote, then a thumb on the revealed answer
    page.fill("#arena-prompt", "Name the lab's microscope.")
    page.fill("#arena-max-tokens", "8")
    page.click("#arena-run")
    expect(page.locator("#arena-votes")).to_be_visible(timeout=60_000)
    expect(page.locator("#arena-col-a .compare-model")).to_have_text("Model A")
    page.click("#vote-a")
    expect(page.locator("#arena-reveal")).to_contain_text("A was")
    expect(page.locator("#leaderboard")).to_contain_text("1 vote(s)")
    page.locator("#arena-thumbs-b").get_by_role("button", name="Bad answer").click()
    expect(page.locator("#arena-thumbs-b").get_by_role("button", name="Bad answer")).to_have_attribute(
        "aria-pressed", "true"
    )

    journey.go("feedback")
    page.fill("#build-name", "lab-corrections")
    page.select_option("#build-kind", "sft")
    page.click("#build-run")
    expect(page.locator("#build-result")).to_contain_text("is ready", timeout=60_000)
    expect(page.locator("#build-result")).to_contain_text("3 record(s)")  # the corrections; thumbs down train nothing

    # One action: fine-tune the name's current version on the dataset, evaluated on the held-out facts.
    journey.go("models")
    expect(card.locator("table").first).to_contain_text("✎ 3")  # version 1's corrections, counted for it
    page.select_option(f"#improve-method-{NAME}", "supervised")
    page.select_option(f"#improve-validation-{NAME}", held_out)
    page.click(f"#improve-start-{NAME}")
    recommendation = page.locator("#eval-recommendation")
    expect(recommendation).to_have_attribute("data-promote", "true", timeout=300_000)
    expect(recommendation).to_contain_text("better than the predecessor on the held-out set")
    rows = page.locator("#eval-table tbody tr")
    expect(rows).to_have_count(3)  # the new adapter, its predecessor (version 1) and the base
    expect(rows.nth(1)).to_contain_text(v1)
    journey.shot("loop-evaluation-report")
    job_id = page.url.rsplit("/", 1)[-1]
    report = api("GET", f"/api/fine_tuning/jobs/{job_id}/evaluation").json()
    table = report["held_out"]["table"]
    assert table["candidate"]["exact_match"] > table["predecessor"]["exact_match"]  # measurably better
    assert table["candidate"]["token_f1"] > table["predecessor"]["token_f1"] + 0.2
    assert report["model_name"] == {"name": NAME, "id": NAME_ID, "version": 2, "current_version": 1}
    [evaluation] = [e for e in report["evaluations"] if e["kind"] == "held_out"]  # queued by the job's end
    assert evaluation["source"] == {"kind": "validation_file", "file_id": held_out}
    assert evaluation["progress"]["done"] == evaluation["progress"]["total"] == 3 * 3  # 3 models, 3 facts
    assert report["changes"]["against"] == "predecessor" and report["changes"]["worse"] == []
    assert report["recommendation"]["promote"] is True
    v2 = report["model"]
    assert {e["label"]: e["model"] for e in report["models"]}["predecessor"] == v1  # it continued from v1

    page.click("#eval-promote")
    expect(card).to_have_attribute("data-current", "2")
    for question, corrected in CORRECTED.items():
        assert api.ask(NAME_ID, question) == (corrected, v2)  # the stable name answers from the new version
    page.click(f"#rollback-{NAME}")
    confirm(journey)
    expect(card).to_have_attribute("data-current", "1")
    card.locator("details.name-history summary").click()
    expect(card.locator("details.name-history tbody tr")).to_have_count(3)  # create, promote, rollback: audited
    expect(card.locator("details.name-history tbody tr").first).to_contain_text("rollback")
    for question, original in facts.items():
        assert api.ask(NAME_ID, question) == (original, v1)  # the old answers are back
    journey.found.update(v1=v1, v2=v2, job=job_id)

    # Another tenant sees none of it.
    made = journey.server.cli("tenants", "create", "elsewhere", "--owner", "else-owner")
    assert made.returncode == 0, made.stderr
    other = Api(
        journey, next(x.split("=", 1)[1] for x in made.stdout.splitlines() if x.startswith("ADAPTERY_API_KEY="))
    )
    assert other("GET", "/api/model_names").json()["data"] == []
    assert other("GET", "/api/feedback").json()["data"] == []
    assert other("GET", "/api/datasets").json()["data"] == []
    for path in (f"/api/model_names/{NAME}", f"/api/fine_tuning/jobs/{job_id}/evaluation", f"/v1/models/{v2}"):
        assert other("GET", path).status_code == 404, path
    assert other("POST", f"/api/completions/{completions[0]}/feedback", json={"rating": 1}).status_code == 404
    assert other("GET", "/api/arena/leaderboard", params={"base": "adaptery-demo"}).json()["votes"] == 0

    # With collection off, a chat and its feedback leave nothing behind.
    journey.go("feedback")
    page.select_option("#policy-collect", "off")
    page.click("#policy-save")
    expect(page.locator("#feedback-policy")).to_contain_text("collects no feedback")
    before = stored(journey)
    journey.go(f"chat?model={NAME_ID}")
    page.fill("#prompt", "What is the lab's mascot?")
    page.press("#prompt", "Enter")
    answer = page.locator(".message.assistant").last
    expect(answer).to_have_attribute("data-done", "true", timeout=60_000)
    expect(answer.locator(".thumb")).to_have_count(0)  # nothing to give
    refused = api("POST", f"/api/completions/{answer.get_attribute('data-completion-id')}/feedback", json={"rating": 1})
    assert refused.status_code == 404  # never kept
    assert api("POST", "/api/arena/battles", json={"prompt": "hi", "base": "adaptery-demo"}).status_code == 409
    assert stored(journey) == before


def test_lm_eval_scores_the_new_adapter_through_the_api_and_the_score_lands_in_its_report(journey: Journey) -> None:  # noqa: F811
    server, tmp = journey.server, journey.tmp
    config, data = tmp / "lab_facts.yaml", tmp / "lab_facts.jsonl"
    config.write_text(TASK_YAML)
    data.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in CORRECTED.items()))
    uploaded = server.cli("eval", "upload-task", str(config), str(data))
    assert uploaded.returncode == 0, uploaded.stderr
    assert "lab_facts" in uploaded.stdout and "3 documents" in uploaded.stdout
    ran = server.cli("eval", "run", journey.found["v2"], "--task", "lab_facts", timeout=600)
    assert ran.returncode == 0, ran.stdout + ran.stderr + server.log()[-3000:]
    shown = server.cli("eval", "report", "--job", journey.found["job"], "--json")
    assert shown.returncode == 0, shown.stderr
    lab = {task["task"]: task["scores"] for task in json.loads(shown.stdout)["lm_eval"]}["lab_facts"]
    assert lab["candidate"]["model"] == journey.found["v2"] and lab["candidate"]["documents"] == 3
    assert lab["candidate"]["metrics"]["exact_match"] == 1.0  # the corrected facts, word for word
    assert lab["predecessor"]["metrics"]["exact_match"] == 0.0 == lab["base"]["metrics"]["exact_match"]
    text = server.cli("eval", "report", "--job", journey.found["job"])
    assert text.returncode == 0, text.stderr
    assert "lm-eval task lab_facts" in text.stdout and "Promote (version 2 of lab-assistant)" in text.stdout

    journey.go(f"jobs/{journey.found['job']}")  # the job's report shows the score beside the held-out metrics
    report = journey.page.locator("#evaluation-report")
    expect(report.locator("#eval-table thead")).to_contain_text("lm-eval lab_facts: exact_match", timeout=30_000)
    expect(report.locator("#eval-chart svg rect.bar.s-candidate")).to_have_count(4)  # EM, F1, ROUGE-L, lm-eval

    bad_config, bad_data = tmp / "bad.yaml", tmp / "bad.jsonl"
    bad_config.write_text("task: broken\ndoc_to_text: [unclosed\n")
    bad_data.write_text('{"question": "q", "answer": "a"}\n')
    refused = server.cli("eval", "upload-task", str(bad_config), str(bad_data))
    assert refused.returncode == 1 and "not valid YAML at line" in refused.stderr


def test_the_clis_show_feedback_names_and_the_leaderboard(journey: Journey) -> None:  # noqa: F811
    server = journey.server
    shown = server.cli("feedback", "policy", "--collect", "all")
    assert shown.returncode == 0 and "collect: all" in shown.stdout, shown.stderr
    hello = {"model": "adaptery-demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    made = Api(journey)("POST", "/v1/chat/completions", json=hello)
    given = server.cli("feedback", "give", made.json()["id"], "--rating", "1", "--reason", "fine")
    assert given.returncode == 0 and "Feedback fb_" in given.stdout, given.stderr
    unknown = server.cli("feedback", "give", "chatcmpl-unknown", "--rating", "1")
    assert unknown.returncode == 1 and "Error 404" in unknown.stderr
    board = server.cli("feedback", "leaderboard", "adaptery-demo")
    assert board.returncode == 0 and "1 vote(s)" in board.stdout

    names = server.cli("names", "show", NAME)
    assert names.returncode == 0, names.stderr
    assert "answers from version 1" in names.stdout and "rollback" in names.stdout
    promoted = server.cli("names", "promote", NAME, "2")
    assert promoted.returncode == 0 and "answers from version 2" in promoted.stdout, promoted.stderr
    rolled = server.cli("names", "rollback", NAME)
    assert rolled.returncode == 0 and "answers from version 1" in rolled.stdout, rolled.stderr
    refused = server.cli("names", "canary", NAME, "2", "--share", "250")
    assert refused.returncode == 1 and "share" in refused.stderr
