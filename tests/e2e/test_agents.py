"""Standalone agents over NATS: they hold their own credentials, take jobs from the queue, and a job
whose agent is killed mid-training is continued by another agent from its latest checkpoint."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import httpx
import psutil
import pytest

from tests.conftest import SAMPLE_CHAT, prepare_data_dir, start_server, stop_server

FAST_LEASES = {
    "ADAPTERY_JOB_LEASE_SECONDS": "4",
    "ADAPTERY_JOB_HEARTBEAT_SECONDS": "1",
    "ADAPTERY_AGENT_POLL_SECONDS": "0.3",
}


def enroll(server, name: str) -> str:
    done = server.cli("agents", "create", name)
    assert done.returncode == 0, done.stderr
    return re.search(r"^ADAPTERY_AGENT_CREDENTIALS=(\S+)$", done.stdout, re.M).group(1)


def start_agent(server, credentials: str, log_dir, name: str) -> subprocess.Popen:
    log = (log_dir / f"{name}.log").open("w")
    # Only what an agent on another machine would have: no database URL, its own work dir.
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADAPTERY_")}
    env.update(FAST_LEASES, ADAPTERY_DATA_DIR=str(log_dir / name))
    nats_url = (server.data_dir / "nats" / "url").read_text()
    return subprocess.Popen(
        [sys.executable, "-m", "adaptery.cli", "agent", "--credentials", credentials, "--nats-url", nats_url],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def get_job(server, headers, job_id) -> dict:
    return httpx.get(f"{server.url}/v1/fine_tuning/jobs/{job_id}", headers=headers).json()


def events_of(server, headers, job_id) -> list[str]:
    data = httpx.get(f"{server.url}/v1/fine_tuning/jobs/{job_id}/events?limit=1000", headers=headers).json()["data"]
    return [e["message"] for e in reversed(data)]


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def checkpoint_steps(messages: list[str]) -> list[int]:
    return [int(m.group(1)) for text in messages if (m := re.match(r"Checkpoint saved at step (\d+)", text))]


def training_processes_of(pid: int) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            if "adaptery.training.runner" in " ".join(process.info["cmdline"] or []) and process.ppid() == pid:
                found.append(process)
        except psutil.NoSuchProcess:
            continue
    return found


def create_job(server, headers, n_epochs: int) -> dict:
    file = httpx.post(
        f"{server.url}/v1/files",
        headers=headers,
        files={"file": SAMPLE_CHAT.open("rb")},
        data={"purpose": "fine-tune"},
    ).json()
    return httpx.post(
        f"{server.url}/v1/fine_tuning/jobs",
        headers=headers,
        json={"model": "adaptery-demo", "training_file": file["id"], "hyperparameters": {"n_epochs": n_epochs}},
    ).json()


def wait_until_finished(server, headers, job_id, timeout: float = 240) -> dict:
    try:
        return wait_for(
            lambda: (j := get_job(server, headers, job_id))["status"] in ("succeeded", "failed", "cancelled") and j,
            timeout,
            "the job to finish",
        )
    except AssertionError as exc:  # say where it stood: the job, its last events, the server's last lines
        job = get_job(server, headers, job_id)
        events = "\n".join(events_of(server, headers, job_id)[-15:])
        log = server.log_path.read_text()[-4000:]
        raise AssertionError(f"{exc}; job {job['status']}\n{events}\n--- server log ---\n{log}") from None


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_killed_agents_job_resumes_from_its_checkpoint_on_another_agent(tmp_path, database_url, demo_model_dir):
    data_dir = prepare_data_dir(tmp_path / "data", demo_model_dir)
    server = start_server(data_dir, database_url, extra_env={"ADAPTERY_EMBEDDED_AGENT": "false", **FAST_LEASES})
    agents: list[subprocess.Popen] = []
    try:
        headers = {"Authorization": f"Bearer {server.api_key}"}
        first = enroll(server, "agent-a")
        job = create_job(server, headers, n_epochs=30)
        # Wrong credentials are refused by the NATS server itself (checked while agent-a starts beside it).
        nats_url = (server.data_dir / "nats" / "url").read_text()
        wrong = first.split(":")[0] + ":not-the-secret"
        refused = subprocess.Popen(
            [sys.executable, "-m", "adaptery.cli", "agent", "--credentials", wrong, "--nats-url", nats_url],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "ADAPTERY_DATA_DIR": str(tmp_path / "refused"), "COLUMNS": "250"},
        )
        agents.append(refused)
        agents.append(start_agent(server, first, tmp_path, "agent-a"))
        a = agents[-1]
        second = enroll(server, "agent-b")
        refused_output = refused.communicate(timeout=60)[0]
        assert refused.returncode == 1 and "Cannot join the platform" in refused_output, refused_output
        assert "authorization" in refused_output, refused_output  # refused, not left to time out
        wait_for(lambda: checkpoint_steps(events_of(server, headers, job["id"])), 120, "a first checkpoint")
        assert any("agent agent-a" in m for m in events_of(server, headers, job["id"]))
        listed = httpx.get(f"{server.url}/api/admin/agents", headers=headers).json()["data"]
        row = next(x for x in listed if x["name"] == "agent-a")
        assert row["state"] == "busy" and row["current_job"] == job["id"] and row["last_heartbeat_at"]

        children = training_processes_of(a.pid)
        os.kill(a.pid, signal.SIGKILL)
        a.wait()
        # its training process dies with it: the job is never trained twice at once
        wait_for(
            lambda: not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children),
            10,
            "the orphaned training process to end",
        )
        saved_before_kill = max(checkpoint_steps(events_of(server, headers, job["id"])))

        agents.append(start_agent(server, second, tmp_path, "agent-b"))
        done = wait_until_finished(server, headers, job["id"])
        assert done["status"] == "succeeded", done["error"]
        messages = events_of(server, headers, job["id"])
        assert "Agent agent-a stopped heartbeating; job requeued" in messages
        resumed = next(m for m in messages if "attempt 2, agent agent-b" in m)
        step = int(re.search(r"resuming from step (\d+)", resumed).group(1))
        # Not from zero: from the newest checkpoint whose full state (optimizer, RNG) was uploaded; when
        # uploads lag the trainer, the ones in between keep only their adapter.
        assert 0 < step <= saved_before_kill
        assert any(f"resuming at step {step}" in m for m in messages)  # the trainer itself continued there
        checkpoints = httpx.get(f"{server.url}/v1/fine_tuning/jobs/{job['id']}/checkpoints", headers=headers).json()
        assert checkpoints["data"][0]["fine_tuned_model_checkpoint"] == done["fine_tuned_model"]
        assert checkpoints["data"][1]["fine_tuned_model_checkpoint"].endswith(
            f":ckpt-step-{checkpoints['data'][1]['step_number']}"
        )
    finally:
        for agent in agents:
            if agent.poll() is None:
                agent.send_signal(signal.SIGTERM)
                agent.wait(timeout=30)
        stop_server(server)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_job_survives_the_server_being_killed_mid_training(tmp_path, database_url, demo_model_dir):
    data_dir = prepare_data_dir(tmp_path / "data", demo_model_dir)
    server = start_server(data_dir, database_url, extra_env=FAST_LEASES)
    headers = {"Authorization": f"Bearer {server.api_key}"}
    try:
        job = create_job(server, headers, n_epochs=30)
        wait_for(lambda: checkpoint_steps(events_of(server, headers, job["id"])), 120, "a first checkpoint")
        nats_server = [p for p in psutil.Process(server.process.pid).children() if "nats-server" in p.name()]
        nats_url = (data_dir / "nats" / "url").read_text()
        server.process.kill()
        server.process.wait()
        # the embedded agent's training and the NATS server die with it
        wait_for(lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in nats_server), 10, "")
    finally:
        stop_server(server)

    restarted = start_server(data_dir, database_url, extra_env=FAST_LEASES)
    restarted.api_key = server.api_key
    # the same NATS address as before, so standalone agents reconnect by themselves
    assert (data_dir / "nats" / "url").read_text() == nats_url
    try:
        done = wait_until_finished(restarted, headers, job["id"])
        assert done["status"] == "succeeded", done["error"]
        messages = events_of(restarted, headers, job["id"])
        assert sum("Fine-tuning job started" in m for m in messages) == 2
        assert re.search(r"attempt 2, agent embedded-\S+, resuming from step [1-9]", " ".join(messages))
        models = httpx.get(f"{restarted.url}/v1/models", headers=headers).json()["data"]
        assert [m["id"] for m in models].count(done["fine_tuned_model"]) == 1
    finally:
        stop_server(restarted)
