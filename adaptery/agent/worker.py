"""The agent loop: lease a job over NATS, fetch its files, train it in a child process, report, finish.

The agent never touches the database and never accepts a connection: everything goes through its
`AgentLink`. The child process is the fault boundary: a crash or out-of-memory in training ends that
process, and the agent reports the cause and carries on with the next job. Checkpoints the trainer
writes are uploaded as they appear, so another agent can continue the job if this one dies.
"""

from __future__ import annotations

import json
import logging
import queue as stdlib_queue
import resource
import shutil
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from adaptery.agent.backends import Backend, LocalBackend, TrainingRun
from adaptery.agent.bases import BaseStore
from adaptery.agent.link import AgentLink, LinkDown
from adaptery.messaging.protocol import ADAPTER_FILES, Assignment, BlobRef, RemoteError
from adaptery.process import kill_and_reap
from adaptery.storage.modes import private_dir
from adaptery.training.spec import LoraHyperparameters

log = logging.getLogger("adaptery.agent")
T = TypeVar("T")
CANCELLED_EXIT_CODE = 3
PAUSED_EXIT_CODE = 4
CANCEL_GRACE_SECONDS = 10.0
PAUSE_GRACE_SECONDS = 120.0  # saving a checkpoint of a large model takes a while
CANCEL_FILE, PAUSE_FILE = "CANCEL", "PAUSE"
# A transient fault (the control plane restarting, its database locked) is retried, the pause doubling from the
# first to the longest, for at most RETRY_FOR_SECONDS: a trained adapter is worth two minutes of asking.
RETRY_FIRST_SECONDS = 1.0
RETRY_LONGEST_SECONDS = 15.0
RETRY_FOR_SECONDS = 120.0


def is_transient(exc: BaseException) -> bool:
    """A fault that may pass where the job is put together: the disk (full, an I/O error), the link, a retryable
    reply. Anything else (a refusal, a bug) would fail the same way again."""
    if isinstance(exc, RemoteError):
        return exc.retryable
    return isinstance(exc, OSError)  # LinkDown is a ConnectionError, so an OSError too


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        name = signal.Signals(-returncode).name
        hint = " (killed: out of memory?)" if returncode == -signal.SIGKILL else ""
        return f"the training process was stopped by {name}{hint}"
    return f"the training process exited with code {returncode}"


def local_base_model(assignment: Assignment, models_dir: Path) -> str:
    """The base model where this agent can load it: the server's path or hub id, or for the demo model
    this agent's own copy (built deterministically, so it equals the server's)."""
    ref = assignment.base_model_ref
    if Path(ref).is_dir():
        return ref
    from adaptery.engine.demo_model import DEMO_MODEL_ID, ensure_demo_model  # torch: imported only when needed

    return str(ensure_demo_model(models_dir)) if assignment.base_model == DEMO_MODEL_ID else ref


class CheckpointUploads:
    """Uploads checkpoints in order, beside the supervision loop (which keeps heartbeating meanwhile).

    Every checkpoint's adapter is kept (the per-epoch list); when uploads fall behind the trainer,
    only the newest pending one also carries its resumable state (optimizer, schedule, RNG), which is
    all a resumed attempt needs.
    """

    def __init__(self, link: AgentLink, job_id: str, attempt: int | None = None) -> None:
        self.link = link
        self.job_id = job_id
        self.attempt = attempt
        self._pending: list[dict[str, Any]] = []
        self._busy = False
        self._closed = False
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"uploads-{job_id}")
        self._thread.start()

    def submit(self, event: dict[str, Any]) -> None:
        with self._changed:
            self._pending.append(event)
            self._changed.notify()

    def idle(self) -> bool:
        with self._changed:
            return not self._pending and not self._busy

    def close(self, timeout: float = 60.0) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify()
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._changed:
                while not self._pending and not self._closed:
                    self._changed.wait()
                if not self._pending:
                    return
                event = self._pending.pop(0)
                newest = not self._pending
                self._busy = True
            try:
                self._upload(event, full=newest)
            finally:
                with self._changed:
                    self._busy = False

    def _upload(self, event: dict[str, Any], *, full: bool) -> None:
        path = Path(str(event.get("path", "")))
        if not path.is_dir():
            log.warning("job %s: checkpoint directory %s is missing", self.job_id, path)
            return
        body = {
            "step": event.get("step"),
            "epoch": event.get("epoch"),
            "metrics": event.get("metrics") or {},
            "attempt": self.attempt,
        }
        try:
            files = sorted(p for p in path.iterdir() if p.is_file() and (full or p.name in ADAPTER_FILES))
            body["files"] = {p.name: self.link.upload(self.job_id, p, self.attempt) for p in files}
            self.link.job_call(self.job_id, "checkpoint", body)
        except (LinkDown, RemoteError) as exc:  # a later checkpoint will do; training goes on
            log.warning("job %s: checkpoint of step %s not kept: %s", self.job_id, event.get("step"), exc)


class Heartbeats:
    """Keeps a job's lease alive from the moment it is leased (fetching inputs included) until it ends,
    on its own thread so nothing the agent does meanwhile can let the lease lapse. `verdict` is the
    control plane's latest word; a notification from it triggers a beat at once."""

    def __init__(
        self, link: AgentLink, job_id: str, every: float, lease_seconds: float | None, attempt: int | None = None
    ) -> None:
        self.link = link
        self.job_id = job_id
        self.attempt = attempt  # the lease this agent holds is this attempt's; a later one's is not
        self.every = every
        self.lease_seconds = lease_seconds
        self.verdict = "continue"
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"heartbeat-{job_id}")

    def __enter__(self) -> Heartbeats:
        self.link.nudged.clear()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stopped.set()
        self.link.nudged.set()  # wake it
        self._thread.join(timeout=30)

    def _run(self) -> None:
        last_answer = time.monotonic()
        while True:
            self.link.nudged.wait(self.every)
            self.link.nudged.clear()
            if self._stopped.is_set():
                return
            try:
                reply = self.link.job_call(self.job_id, "heartbeat", {"attempt": self.attempt})
                verdict = reply.get("verdict", "continue")
            except (LinkDown, RemoteError) as exc:
                # Keep training: the control plane may be restarting; if the lease expires meanwhile,
                # the next heartbeat that gets through says "lost".
                log.info("job %s: heartbeat not answered (%s)", self.job_id, exc)
                if self.lease_seconds and time.monotonic() - last_answer > self.lease_seconds:
                    # Cut off (revoked, or a partition) past the lease: the job is back in the queue by now.
                    log.warning("job %s: no contact for longer than the lease; giving the job up", self.job_id)
                    self.verdict = "lost"
                continue
            last_answer = time.monotonic()
            if verdict != "continue":
                self.verdict = verdict


class Agent:
    def __init__(
        self,
        link: AgentLink,
        work_dir: Path,
        *,
        name: str,
        heartbeat_seconds: float,
        poll_seconds: float,
        models_dir: Path,
        backend: Backend | None = None,
        bases: BaseStore | None = None,
    ) -> None:
        self.link = link
        self.bases = bases  # an enrolled agent fetches a base that is not on this machine from the platform
        self.backend = backend or LocalBackend()
        self.work_dir = work_dir
        self.name = name
        self.heartbeat_seconds = heartbeat_seconds
        self.poll_seconds = poll_seconds
        self.models_dir = models_dir
        self.stopping = threading.Event()

    @property
    def agent_id(self) -> str:
        return self.link.agent_id

    def run(self) -> None:
        log.info("agent %s (%s) started", self.name, self.agent_id)
        try:
            forgotten = self.backend.forget_orphans(self.agent_id)
        except Exception as exc:  # the scheduler away: its orphans' leases lapse all the same
            log.warning("could not look for training left behind by an earlier run: %s", exc)
        else:
            if forgotten:
                log.warning("cancelled %d job(s) an earlier run of this agent left in %s", forgotten, self.backend.name)
        while not self.stopping.is_set():
            try:
                work = self.link.lease_work(self.backend.capabilities())
            except (LinkDown, RemoteError) as exc:  # the control plane restarting must not end the agent
                log.info("leasing a job failed: %s", exc)
                work = {}
            data = work.get("assignment")
            if data is None and isinstance(work.get("evaluation"), dict):
                self._evaluate(work["evaluation"])
                continue
            if data is None:
                self.stopping.wait(self.poll_seconds)
                continue
            assignment = Assignment.from_json(data)
            try:
                self.run_job(assignment)
            except Exception as exc:
                log.exception("job %s failed in the agent", assignment.job_id)
                failed = {"state": "failed", "message": f"agent error: {exc}", "attempt": assignment.attempt}
                self._finish(assignment.job_id, failed)
        log.info("agent %s stopped", self.name)

    def stop(self) -> None:
        self.stopping.set()

    def _evaluate(self, evaluation: dict[str, Any]) -> None:
        """Run an evaluation (adaptery/agent/evaluation.py); whatever goes wrong is reported as its failure."""
        from adaptery.agent.evaluation import run_evaluation

        evaluation_id, attempt = str(evaluation.get("evaluation_id")), evaluation.get("attempt")
        try:
            run_evaluation(self, evaluation)
        except Exception as exc:
            log.exception("evaluation %s failed in the agent", evaluation_id)
            self._finish(evaluation_id, {"state": "failed", "message": f"agent error: {exc}", "attempt": attempt})

    def _retrying(self, job_id: str, what: str, call: Callable[[], T]) -> T:
        """`call()`, asked again after a transient fault (the control plane away or restarting, a retryable
        error reply) with a doubling pause, within RETRY_FOR_SECONDS; a refusal, or the fault past them, is raised."""
        deadline = time.monotonic() + RETRY_FOR_SECONDS
        pause = RETRY_FIRST_SECONDS
        while True:
            try:
                return call()
            except (LinkDown, RemoteError) as exc:
                final = isinstance(exc, RemoteError) and not exc.retryable
                if final or time.monotonic() + pause > deadline:
                    raise
                log.info("job %s: %s failed (%s); asking again in %.1f s", job_id, what, exc, pause)
                time.sleep(pause)
                pause = min(pause * 2, RETRY_LONGEST_SECONDS)

    def _finish(self, job_id: str, body: dict[str, Any]) -> dict[str, Any]:
        """Report the end of an attempt; retried while the fault may pass (the control plane restarting)."""
        try:
            return self._retrying(job_id, "reporting its end", lambda: self.link.job_call(job_id, "finish", body))
        except (LinkDown, RemoteError) as exc:  # unreported, its lease expires and the control plane requeues it
            log.warning("job %s: could not report its end (%s): %s", job_id, body.get("state"), exc)
            return {}

    def _fetch_inputs(self, assignment: Assignment, job_dir: Path) -> dict[str, Any]:
        """The job's files, into its own directory (wiped when the attempt ends, whatever the outcome)."""
        job, attempt = assignment.job_id, assignment.attempt

        def fetch(blob: BlobRef, target: Path) -> Path:
            return self.link.download(job, blob.sha256, blob.bytes, target, attempt)

        inputs: dict[str, Any] = {"training_file": fetch(assignment.training_file, job_dir / "data" / "train.jsonl")}
        if assignment.validation_file is not None:
            inputs["validation_file"] = fetch(assignment.validation_file, job_dir / "data" / "validation.jsonl")
        if assignment.checkpoint is not None:
            resume = job_dir / f"resume-step-{assignment.checkpoint.step}"
            for name, blob in assignment.checkpoint.files.items():
                fetch(blob, resume / name)
            inputs["resume_from"] = resume
        if assignment.init_adapter is not None:
            start = job_dir / "init-adapter"
            for name, blob in assignment.init_adapter.items():
                fetch(blob, start / name)
            inputs["init_adapter"] = start
        return inputs

    def _base_model(self, assignment: Assignment) -> str:
        if self.bases is not None and not Path(assignment.base_model_ref).is_dir():
            return str(self.bases.ensure(self.link, assignment.base_model))
        return local_base_model(assignment, self.models_dir)

    def _write_spec(self, assignment: Assignment, job_dir: Path, inputs: dict[str, Any]) -> Path:
        args = assignment.arguments
        spec: dict[str, Any] = {
            "base_model": self._base_model(assignment),
            "training_file": str(inputs["training_file"]),
            "validation_file": str(inputs["validation_file"]) if "validation_file" in inputs else None,
            "output_dir": str(job_dir / "adapter"),
            "checkpoint_dir": str(job_dir / "checkpoints"),
            "hyperparameters": {k: v for k, v in args.items() if k in LoraHyperparameters.model_fields},
        }
        for key in ("resume_from", "init_adapter"):
            if key in inputs:
                spec[key] = str(inputs[key])
        spec["method"] = assignment.method
        if assignment.checkpoint_every_steps:
            spec["checkpoint_every_steps"] = assignment.checkpoint_every_steps
        path = job_dir / "spec.json"
        path.write_text(json.dumps(spec, indent=2))
        return path

    def run_job(self, assignment: Assignment) -> None:
        job_dir = self.work_dir / "jobs" / assignment.job_id / f"attempt-{assignment.attempt}"
        shutil.rmtree(job_dir, ignore_errors=True)
        private_dir(job_dir)  # its data, checkpoints and adapter are the job's tenant's: 0700, wiped at its end
        beats = Heartbeats(
            self.link, assignment.job_id, self.heartbeat_seconds, assignment.lease_seconds, assignment.attempt
        )
        with beats:
            try:
                self._run_attempt(assignment, job_dir, beats)
            finally:
                shutil.rmtree(job_dir.parent, ignore_errors=True)

    def _run_attempt(self, assignment: Assignment, job_dir: Path, beats: Heartbeats) -> None:
        try:
            inputs = self._fetch_inputs(assignment, job_dir)
            spec_path = self._write_spec(assignment, job_dir, inputs)
        except Exception as exc:
            if not is_transient(exc):
                raise
            # A full disk, an I/O error or the control plane away says nothing about the job: it goes back to the
            # queue (the control plane fails it once its attempts are spent), and this agent waits a moment.
            log.warning("job %s: could not be prepared here (%s); giving it back", assignment.job_id, exc)
            reason = f"agent {self.name} could not prepare it: {exc}"
            self._finish(
                assignment.job_id,
                {"state": "released", "message": reason, "fault": True, "attempt": assignment.attempt},
            )
            self.stopping.wait(self.poll_seconds)
            return
        job, attempt = assignment.job_id, assignment.attempt
        refusal = self.backend.refusal(assignment)
        if refusal is not None:
            self._finish(job, {"state": "failed", "message": refusal, "attempt": attempt})
            return
        stderr_path = job_dir / "stderr.log"
        # What the training used, as this machine measures it: its processes' CPU time (the local backend's are
        # this agent's children; a Slurm job's CPU is counted by Slurm, so only its wall time shows here).
        used_before, started = resource.getrusage(resource.RUSAGE_CHILDREN), time.monotonic()
        child = self.backend.start(assignment, spec_path, job_dir, stderr_path)
        outcome = self._supervise(assignment, child, job_dir, beats)
        compute = _compute_used(used_before, started, accelerator=bool(outcome.get("result", {}).get("accelerator")))
        if outcome["state"] == "succeeded":
            adapter = job_dir / "adapter"
            files = self._retrying(job, "uploading its adapter", lambda: self.link.upload_dir(job, adapter, attempt))
            result = {"state": "succeeded", "result": outcome["result"], "files": files, "attempt": attempt}
            reply = self._finish(job, {**result, "compute": compute})
            log.info("job %s succeeded: %s", job, reply.get("model"))
        elif outcome["state"] == "failed":
            message = outcome.get("message") or self._stderr_tail(stderr_path) or "training failed"
            self._finish(job, {"state": "failed", "message": message, "attempt": attempt, "compute": compute})
        elif outcome["state"] in ("paused", "released", "cancelled"):
            stopped = {"state": outcome["state"], "message": "the agent is shutting down", "attempt": attempt}
            self._finish(job, {**stopped, "compute": compute})

    def _supervise(
        self, assignment: Assignment, child: TrainingRun, job_dir: Path, beats: Heartbeats
    ) -> dict[str, Any]:
        lines: stdlib_queue.Queue[bytes | None] = stdlib_queue.Queue()
        job = assignment.job_id

        def pump() -> None:
            for raw in child.stdout:
                lines.put(raw)
            lines.put(None)

        threading.Thread(target=pump, daemon=True, name=f"pump-{job}").start()
        uploads = CheckpointUploads(self.link, job, assignment.attempt)
        try:
            outcome = self._follow(assignment, child, job_dir, beats, lines, uploads)
        finally:
            # Whatever ends the job (an error reaching the control plane included), its training ends with it:
            # never a child still running beside the next job while its directory is deleted.
            returncode = kill_and_reap(child)
            uploads.close()
        ended = child.ending or describe_exit(returncode)  # a scheduler's word on how it ended comes first
        if outcome["state"] == "succeeded" and returncode != 0:
            outcome = {"state": "failed", "message": ended}
        elif outcome["state"] == "failed" and not outcome.get("message") and returncode != 0:
            outcome["message"] = ended
        elif outcome["state"] == "paused" and returncode != PAUSED_EXIT_CODE:
            outcome = {"state": "failed", "message": f"pausing failed: {ended}"}
        elif outcome["state"] == "cancelled" and returncode not in (0, CANCELLED_EXIT_CODE):
            log.info("job %s: training stopped with %s after cancel", job, describe_exit(returncode))
        return outcome

    def _follow(
        self,
        assignment: Assignment,
        child: TrainingRun,
        job_dir: Path,
        beats: Heartbeats,
        lines: stdlib_queue.Queue[bytes | None],
        uploads: CheckpointUploads,
    ) -> dict[str, Any]:
        """Relay the trainer's events and act on the control plane's verdict until the child is done."""
        job = assignment.job_id
        outcome: dict[str, Any] = {"state": "failed"}
        stop_deadline: float | None = None
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
                elif kind == "cancelled" and outcome["state"] not in ("released", "paused"):
                    outcome = {"state": "cancelled"}
                elif kind == "paused":
                    outcome = {"state": "paused"}
                elif kind == "checkpoint":
                    uploads.submit(event)
                else:
                    events.append(event)
            if events:
                self._report(job, events, assignment.attempt)
            if finished_output and child.poll() is not None and uploads.idle():
                break
            now = time.monotonic()
            if self.stopping.is_set() and stop_deadline is None:
                outcome = {"state": "released"}
                child.terminate()
                stop_deadline = now + CANCEL_GRACE_SECONDS
            verdict = beats.verdict
            if verdict != "continue" and stop_deadline is None:
                if verdict == "pause":
                    log.info("job %s: pausing at the next step", job)
                    self._signal_file(job_dir, PAUSE_FILE)
                    stop_deadline = now + PAUSE_GRACE_SECONDS
                elif verdict in ("cancel", "lost"):
                    log.info("job %s: %s; stopping its training", job, verdict)
                    self._signal_file(job_dir, CANCEL_FILE)
                    outcome = {"state": "cancelled"}
                    stop_deadline = now + CANCEL_GRACE_SECONDS
            if stop_deadline is not None and now > stop_deadline and child.poll() is None:
                child.kill()
        return outcome

    def _report(self, job_id: str, events: list[dict[str, Any]], attempt: int) -> None:
        try:
            self.link.job_call(job_id, "events", {"events": events, "attempt": attempt})
        except (LinkDown, RemoteError) as exc:  # progress lost from the job's events; its training goes on
            log.info("job %s: %d event(s) not delivered (%s)", job_id, len(events), exc)

    @staticmethod
    def _signal_file(job_dir: Path, name: str) -> None:
        (job_dir / "adapter").mkdir(parents=True, exist_ok=True)
        (job_dir / "adapter" / name).touch()

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


def _compute_used(before: resource.struct_rusage, started: float, *, accelerator: bool) -> dict[str, float]:
    """What a job's training process used, measured here: its CPU seconds (user + system, from the rusage of
    reaped children: one job at a time runs under an agent), its wall seconds, and those as accelerator seconds
    when it trained on one."""
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    wall = time.monotonic() - started
    return {
        "cpu_seconds": round(max(cpu, 0.0), 6),
        "wall_seconds": round(wall, 6),
        "accelerator_seconds": round(wall, 6) if accelerator else 0.0,
    }
