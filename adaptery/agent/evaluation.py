"""An agent runs an evaluation it leased: fetch its data and adapters, score them in a child process, report.

The child is `adaptery.evaluation.runner` (the fault boundary, as training's runner is); its progress events are
relayed to the control plane as they come, and the lease is heartbeated throughout. An lm-eval run reaches the
platform's API with the short-lived key the assignment carries, handed to the child in its environment only.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue as stdlib_queue
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import yaml

from adaptery.agent.worker import Heartbeats, local_base_model
from adaptery.evaluation.runner import OFFLINE_ENVIRONMENT
from adaptery.process import die_with_parent, kill_and_reap

if TYPE_CHECKING:
    from adaptery.agent.worker import Agent

EVENTS_EVERY_SECONDS = 1.0
EXIT_GRACE_SECONDS = 30.0


def _fetch(agent: Agent, evaluation: dict[str, Any], blob: dict[str, Any], target: Path) -> Path:
    evaluation_id, attempt = evaluation["evaluation_id"], evaluation.get("attempt")
    return agent.link.download(evaluation_id, blob["sha256"], blob["bytes"], target, attempt)


def write_task(task: dict[str, Any], data_path: Path, task_dir: Path) -> None:
    """The harness's task YAML: the checked configuration, reading its documents from the local JSONL only."""
    config = {
        **task["config"],
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_path)}},
        "test_split": "test",
    }
    task_dir.mkdir(parents=True, exist_ok=True)
    (task_dir / f"{task['name']}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def _spec(agent: Agent, evaluation: dict[str, Any], work: Path) -> tuple[dict[str, Any], dict[str, str]]:
    data_dir = work / "data"  # the evaluation's own: wiped with it
    env: dict[str, str] = {}
    if evaluation["kind"] == "lm_eval":
        task = evaluation["task"]
        data = _fetch(agent, evaluation, task["data"], data_dir / "task.jsonl")
        write_task(task, data, work / "task")
        spec = {
            "kind": "lm_eval",
            "task": task["name"],
            "task_dir": str(work / "task"),
            "api_base": evaluation["api_base"],
            "models": [{"label": e["label"], "model": e["model"]} for e in evaluation["models"]],
            "limit": task.get("limit"),
        }
        env["OPENAI_API_KEY"] = evaluation["api_key"]
        return spec, env
    entries = []
    for entry in evaluation["models"]:
        adapter_dir = None
        if entry.get("files"):
            adapter_dir = work / "adapters" / entry["label"]
            for name, blob in entry["files"].items():
                _fetch(agent, evaluation, blob, adapter_dir / name)
        entries.append({"label": entry["label"], "model": entry["model"],
                        "adapter_dir": str(adapter_dir) if adapter_dir else None})  # fmt: skip
    blob = evaluation["evaluation_file"]
    base = SimpleNamespace(base_model=evaluation["base_model"], base_model_ref=evaluation["base_model_ref"])
    spec = {
        "kind": "held_out",
        "base_model": local_base_model(base, agent.models_dir),  # type: ignore[arg-type]
        "models": entries,
        "evaluation_file": str(_fetch(agent, evaluation, blob, data_dir / "evaluation.jsonl")),
        "split": evaluation.get("split"),
        **evaluation["params"],
    }
    return spec, env


def run_evaluation(agent: Agent, evaluation: dict[str, Any]) -> None:
    evaluation_id, attempt = evaluation["evaluation_id"], evaluation.get("attempt")
    work = agent.work_dir / "evaluations" / evaluation_id / f"attempt-{attempt}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    beats = Heartbeats(agent.link, evaluation_id, agent.heartbeat_seconds, evaluation.get("lease_seconds"), attempt)
    try:
        with beats:
            spec, env = _spec(agent, evaluation, work)
            (work / "spec.json").write_text(json.dumps(spec))
            outcome = _run_child(agent, evaluation_id, attempt, work, env, beats)
        if outcome is not None:
            agent._finish(evaluation_id, {**outcome, "attempt": attempt})
    finally:
        shutil.rmtree(work.parent, ignore_errors=True)


def _run_child(
    agent: Agent, evaluation_id: str, attempt: Any, work: Path, env: dict[str, str], beats: Heartbeats
) -> dict[str, Any] | None:
    stderr_path = work / "stderr.log"
    with stderr_path.open("ab") as stderr:
        child = subprocess.Popen(
            [sys.executable, "-m", "adaptery.evaluation.runner", str(work / "spec.json")],
            stdout=subprocess.PIPE,
            stderr=stderr,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **OFFLINE_ENVIRONMENT, **env},
            preexec_fn=die_with_parent,
            start_new_session=True,
        )
    lines: stdlib_queue.Queue[bytes | None] = stdlib_queue.Queue()

    def pump() -> None:
        for raw in child.stdout:
            lines.put(raw)
        lines.put(None)

    threading.Thread(target=pump, daemon=True, name=f"pump-{evaluation_id}").start()
    outcome: dict[str, Any] = {"state": "failed"}
    pending: list[dict[str, Any]] = []
    last_sent = 0.0
    try:
        ended = False
        while not ended:
            try:
                item = lines.get(timeout=0.5)
            except stdlib_queue.Empty:
                item = b""
            if item is None:
                ended = True
            elif item:
                try:
                    event = json.loads(item)
                except json.JSONDecodeError:
                    event = {}
                if event.get("type") == "result":
                    outcome = {"state": "succeeded", "result": {k: v for k, v in event.items() if k != "type"}}
                elif event.get("type") == "error":
                    outcome = {"state": "failed", "message": event.get("message")}
                elif event.get("type") in ("progress", "message"):
                    pending.append(event)
            if pending and (ended or time.monotonic() - last_sent > EVENTS_EVERY_SECONDS):
                agent._report(evaluation_id, pending, attempt)
                pending, last_sent = [], time.monotonic()
            if beats.verdict != "continue" or agent.stopping.is_set():
                child.kill()
                # Lost: another agent has it by now. Stopping: give it back to the queue.
                return None if beats.verdict != "continue" else {"state": "released", "message": "agent stopping"}
        with contextlib.suppress(subprocess.TimeoutExpired):  # its output ended: it is exiting
            child.wait(timeout=EXIT_GRACE_SECONDS)
    finally:
        returncode = kill_and_reap(child)
    if outcome["state"] == "succeeded" and returncode != 0:
        outcome = {"state": "failed", "message": f"the evaluation process exited with code {returncode}"}
    if outcome["state"] == "failed" and not outcome.get("message"):
        outcome["message"] = stderr_path.read_text(errors="replace")[-800:] or "the evaluation failed"
    return outcome
