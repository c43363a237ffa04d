"""`adaptery eval`: run evaluations of adapters and read their report (a client of /api/evaluations)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from adaptery.cli.client import api

eval_app = typer.Typer(help="Evaluate adapters: held-out metrics, lm-eval tasks, one report.", no_args_is_help=True)
console = Console(emoji=False)
METRICS = (("loss", "loss"), ("exact_match", "exact match"), ("token_f1", "token F1"), ("rouge_l", "ROUGE-L"),
           ("check_pass_rate", "checks passed"))  # fmt: skip


def _number(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, int | float) and not isinstance(value, bool) else "—"


def _progress(evaluation: dict) -> str:
    progress = evaluation.get("progress") or {}
    return f"{progress.get('done', 0)}/{progress.get('total', '?')} {progress.get('message', '')}"


def wait_for(evaluation_id: str, poll: float = 1.0) -> dict:
    """Follow an evaluation until it ends, showing its progress."""
    shown = None
    while True:
        evaluation = api("GET", f"/api/evaluations/{evaluation_id}")
        line = f"{evaluation['status']} {_progress(evaluation)}"
        if line != shown:
            console.print(escape(line))
            shown = line
        if evaluation["status"] in ("succeeded", "failed"):
            return evaluation
        time.sleep(poll)


@eval_app.command("run")
def run(
    model: str,
    file_id: Annotated[str | None, typer.Option("--file", help="A chat JSONL file id (default: held-out set)")] = None,
    task: Annotated[str | None, typer.Option(help="Run this uploaded lm-eval task instead")] = None,
    limit: Annotated[int | None, typer.Option(help="lm-eval: at most this many documents")] = None,
    wait: Annotated[bool, typer.Option(help="Follow it until it ends")] = True,
) -> None:
    """Queue an evaluation of MODEL (with its predecessor and base beside it)."""
    body: dict[str, Any] = {"model": model, "kind": "lm_eval" if task else "held_out"}
    if task:
        body |= {"task": task, "limit": limit}
    elif file_id:
        body["file_id"] = file_id
    evaluation = api("POST", "/api/evaluations", json=body)
    console.print(f"Queued {evaluation['id']}")
    if wait:
        done = wait_for(evaluation["id"])
        if done["status"] != "succeeded":
            typer.secho(f"Evaluation failed: {done.get('error')}", fg="red", err=True)
            raise typer.Exit(1)


@eval_app.command("report")
def report(
    job: Annotated[str | None, typer.Option(help="A fine-tuning job id")] = None,
    model: Annotated[str | None, typer.Option(help="An adapter's model id")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON")] = False,
    examples: Annotated[int, typer.Option(help="How many better and worse examples to show")] = 3,
) -> None:
    """The evaluation report of a job or an adapter: candidate, predecessor and base side by side."""
    if (job is None) == (model is None):
        typer.secho("Name one of --job or --model.", fg="red", err=True)
        raise typer.Exit(2)
    path = f"/api/fine_tuning/jobs/{job}/evaluation" if job else f"/api/models/{model}/evaluation"
    data = api("GET", path)
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    table = Table("", "model", *(title for _, title in METRICS), title="Held-out evaluation")
    held = (data.get("held_out") or {}).get("table", {})
    tasks = data.get("lm_eval", [])
    for entry in data.get("models", []):
        label = entry["label"]
        row = held.get(label, {})
        table.add_row(label, entry["model"], *(_number(row.get(key)) for key, _ in METRICS))
    if held:
        source = data["held_out"]["source"]
        console.print(table)
        console.print(f"held-out set: {source.get('kind')} {source.get('file_id', '')}")
        verdict, named = data.get("recommendation"), data.get("model_name")
        if verdict:
            what = f" (version {named['version']} of {named['name']})" if named else ""
            decision = "Promote" if verdict["promote"] else "Do not promote"
            console.print(escape(f"{decision}{what}: the new adapter is {verdict['reason']}."))
    else:
        console.print("No held-out evaluation has finished yet.")
    for task in tasks:
        scored = Table("", "model", "metric", "score", title=f"lm-eval task {task['task']}")
        for label, result in task["scores"].items():
            for metric, value in result.get("metrics", {}).items():
                scored.add_row(label, result.get("model", ""), metric, _number(value))
        console.print(scored)
    changes = data.get("changes") or {}
    for kind in ("better", "worse"):
        rows = changes.get(kind, [])[:examples]
        if rows:
            console.print(f"[bold]{kind.capitalize()} than the {changes.get('against')}[/bold] ({len(changes[kind])})")
        for row in rows:
            answer = row["models"]["candidate"]["answer"]
            console.print(escape(f"  line {row['line']}: {row['prompt']}\n    expected: {row['reference']}\n"
                                 f"    answered: {answer}"))  # fmt: skip
    for evaluation in data.get("evaluations", []):
        if evaluation["status"] not in ("succeeded",):
            console.print(escape(f"{evaluation['id']} ({evaluation['kind']}): {evaluation['status']} "
                                 f"{_progress(evaluation)} {evaluation.get('error') or ''}"))  # fmt: skip


@eval_app.command("upload-task")
def upload_task(config: Path, data: Path) -> None:
    """Upload an lm-eval task: its YAML and its JSONL documents (kept in your tenant, run with `eval run --task`)."""
    task = api("POST", "/api/evaluation_tasks", json={"config": config.read_text(), "data": data.read_text()})
    console.print(f"Task {task['name']} ({task['id']}): {task['records']} documents")


@eval_app.command("tasks")
def list_tasks() -> None:
    table = Table("name", "id", "documents")
    for task in api("GET", "/api/evaluation_tasks")["data"]:
        table.add_row(task["name"], task["id"], str(task["records"]))
    console.print(table)


@eval_app.command("keep-set")
def keep_set(model: str, file_id: str) -> None:
    """Keep FILE_ID beside MODEL as its evaluation set: the adapters that follow it are evaluated on it."""
    kept = api("PUT", f"/api/models/{model}/evaluation_set", json={"file_id": file_id})
    console.print(f"{kept['model']}: evaluation set {kept['file_id']}")
