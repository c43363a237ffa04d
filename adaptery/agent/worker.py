"""The agent loop: lease a job, train it in a child process, report, finish.

The child process is the fault boundary: a crash or out-of-memory in training ends that process,
and the agent reports the cause and carries on with the next job.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import queue as stdlib_queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from adaptery.services.queue import Assignment, JobQueue

log = logging.getLogger("adaptery.agent")
CANCELLED_EXIT_CODE = 3
CANCEL_GRACE_SECONDS = 10.0
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with_parent() -> None:
    """In the child, before exec: if the agent dies (even by SIGKILL), its training dies too,
    so a job whose lease expired is never trained twice at once."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def default_agent_id(kind: str) -> str:
    return f"{kind}-{socket.gethostname()}-{os.getpid()}"


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        name = signal.Signals(-returncode).name
        hint = " (killed: out of memory?)" if returncode == -signal.SIGKILL else ""
        return f"the training process was stopped by {name}{hint}"
    return f"the training process exited with code {returncode}"


class Agent:
    def __init__(
        self,
        job_queue: JobQueue,
        work_dir: Path,
        *,
        agent_id: str,
        heartbeat_seconds: float,
        poll_seconds: float,
    ) -> None:
        self.queue = job_queue
        self.work_dir = work_dir
        self.agent_id = agent_id
        self.heartbeat_seconds = heartbeat_seconds
        self.poll_seconds = poll_seconds
        self.stopping = threading.Event()

    def run(self) -> None:
        log.info("agent %s started", self.agent_id)
        while not self.stopping.is_set():
            try:
                assignment = self.queue.lease(self.agent_id)
            except Exception:  # a database hiccup must not end the agent
                log.exception("leasing a job failed")
                assignment = None
            if assignment is None:
                self.stopping.wait(self.poll_seconds)
                continue
            try:
                self.run_job(assignment)
            except Exception as exc:
                log.exception("job %s failed in the agent", assignment.job_id)
                self.queue.fail(assignment.job_id, self.agent_id, f"agent error: {exc}")
        log.info("agent %s stopped", self.agent_id)

    def stop(self) -> None:
        self.stopping.set()

    def _write_spec(self, assignment: Assignment, job_dir: Path) -> Path:
        args = assignment.arguments
        spec = {
            "base_model": assignment.base_model_ref,
            "training_file": str(assignment.training_file),
            "validation_file": str(assignment.validation_file) if assignment.validation_file else None,
            "output_dir": str(job_dir / "adapter"),
            "hyperparameters": {
                "n_epochs": args["n_epochs"],
                "batch_size": args["batch_size"],
                "learning_rate": args["learning_rate"],
                "lora_r": args["lora_r"],
                "lora_alpha": args["lora_alpha"],
                "lora_dropout": args["lora_dropout"],
                "target_modules": args["target_modules"],
                "seed": args["seed"],
            },
        }
        path = job_dir / "spec.json"
        path.write_text(json.dumps(spec, indent=2))
        return path

    def run_job(self, assignment: Assignment) -> None:
        job_dir = self.work_dir / "jobs" / assignment.job_id / f"attempt-{assignment.attempt}"
        shutil.rmtree(job_dir, ignore_errors=True)
        job_dir.mkdir(parents=True)
        spec_path = self._write_spec(assignment, job_dir)
        stderr_path = job_dir / "stderr.log"
        with stderr_path.open("wb") as stderr:
            child = subprocess.Popen(
                [sys.executable, "-m", "adaptery.training.runner", str(spec_path)],
                stdout=subprocess.PIPE,
                stderr=stderr,
                stdin=subprocess.DEVNULL,
                env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
                preexec_fn=_die_with_parent,
            )
            outcome = self._supervise(assignment, child, job_dir)
        if outcome["state"] == "succeeded":
            model_id = self.queue.succeed(assignment.job_id, self.agent_id, job_dir / "adapter", outcome["result"])
            log.info("job %s succeeded: %s", assignment.job_id, model_id)
        elif outcome["state"] == "failed":
            message = outcome.get("message") or self._stderr_tail(stderr_path) or "training failed"
            self.queue.fail(assignment.job_id, self.agent_id, message)
        elif outcome["state"] == "released":
            self.queue.release(assignment.job_id, self.agent_id, "the agent is shutting down")
        shutil.rmtree(job_dir.parent, ignore_errors=True)

    def _supervise(self, assignment: Assignment, child: subprocess.Popen, job_dir: Path) -> dict[str, Any]:
        lines: stdlib_queue.Queue[bytes | None] = stdlib_queue.Queue()

        def pump() -> None:
            for raw in child.stdout:
                lines.put(raw)
            lines.put(None)

        threading.Thread(target=pump, daemon=True, name=f"pump-{assignment.job_id}").start()
        outcome: dict[str, Any] = {"state": "failed"}
        next_beat = time.monotonic() + self.heartbeat_seconds
        cancel_deadline: float | None = None
        finished_output = False
        while True:
            batch, ended = self._drain(lines, timeout=0.5)
            finished_output = finished_output or ended
            events = []
            for event in batch:
                kind = event.get("type")
                if kind == "result":
                    outcome = {"state": "succeeded", "result": event}
                elif kind == "error":
                    outcome = {"state": "failed", "message": event.get("message")}
                elif kind == "cancelled" and outcome["state"] != "released":
                    outcome = {"state": "cancelled"}
                else:
                    events.append(event)
            if events:
                self.queue.report(assignment.job_id, self.agent_id, events)
            if finished_output and child.poll() is not None:
                break
            now = time.monotonic()
            if self.stopping.is_set() and cancel_deadline is None:
                outcome = {"state": "released"}
                child.terminate()
                cancel_deadline = now + CANCEL_GRACE_SECONDS
            if now >= next_beat and cancel_deadline is None:
                next_beat = now + self.heartbeat_seconds
                verdict = self.queue.heartbeat(assignment.job_id, self.agent_id)
                if verdict != "continue":
                    log.info("job %s: %s; stopping its training", assignment.job_id, verdict)
                    (job_dir / "adapter").mkdir(parents=True, exist_ok=True)
                    (job_dir / "adapter" / "CANCEL").touch()
                    outcome = {"state": "cancelled"}
                    cancel_deadline = now + CANCEL_GRACE_SECONDS
            if cancel_deadline is not None and now > cancel_deadline and child.poll() is None:
                child.kill()
        returncode = child.wait()
        if outcome["state"] == "succeeded" and returncode != 0:
            outcome = {"state": "failed", "message": describe_exit(returncode)}
        elif outcome["state"] == "failed" and not outcome.get("message") and returncode != 0:
            outcome["message"] = describe_exit(returncode)
        elif outcome["state"] == "cancelled" and returncode not in (0, CANCELLED_EXIT_CODE):
            log.info("job %s: training stopped with %s after cancel", assignment.job_id, describe_exit(returncode))
        return outcome

    @staticmethod
    def _drain(lines: stdlib_queue.Queue, timeout: float) -> tuple[list[dict[str, Any]], bool]:
        events: list[dict[str, Any]] = []
        ended = False
        try:
            item = lines.get(timeout=timeout)
            while True:
                if item is None:
                    ended = True
                    break
                try:
                    events.append(json.loads(item))
                except json.JSONDecodeError:
                    log.debug("training output: %s", item.decode(errors="replace").rstrip())
                item = lines.get_nowait()
        except stdlib_queue.Empty:
            pass
        return events, ended

    @staticmethod
    def _stderr_tail(path: Path, limit: int = 800) -> str:
        text = path.read_text(errors="replace").strip() if path.exists() else ""
        return text[-limit:]
