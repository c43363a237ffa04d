"""Standalone agents: they take jobs from the queue, and a job whose agent is killed mid-training
goes back to the queue and is finished by another agent."""

from __future__ import annotations

import os
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


def start_agent(server, name: str, log_dir) -> subprocess.Popen:
    log = (log_dir / f"{name}.log").open("w")
    return subprocess.Popen(
        [sys.executable, "-m", "adaptery.cli", "agent", "--id", name],
        env={**server.env(), **FAST_LEASES},
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def events_of(server, headers, job_id) -> list[str]:
    data = httpx.get(f"{server.url}/v1/fine_tuning/jobs/{job_id}/events?limit=100", headers=headers).json()["data"]
    return [e["message"] for e in reversed(data)]


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def training_processes_of(pid: int) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            if "adaptery.training.runner" in " ".join(process.info["cmdline"] or []) and process.ppid() == pid:
                found.append(process)
        except psutil.NoSuchProcess:
            continue
    return found


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_killed_agents_job_is_requeued_and_finished_by_another_agent(tmp_path, database_url, demo_model_dir):
    data_dir = prepare_data_dir(tmp_path / "data", demo_model_dir)
    server = start_server(data_dir, database_url, extra_env={"ADAPTERY_EMBEDDED_AGENT": "false", **FAST_LEASES})
    agents: list[subprocess.Popen] = []
    try:
        headers = {"Authorization": f"Bearer {server.api_key}"}
        file = httpx.post(
            f"{server.url}/v1/files",
            headers=headers,
            files={"file": SAMPLE_CHAT.open("rb")},
            data={"purpose": "fine-tune"},
        ).json()
        job = httpx.post(
            f"{server.url}/v1/fine_tuning/jobs",
            headers=headers,
            json={"model": "adaptery-demo", "training_file": file["id"], "hyperparameters": {"n_epochs": 40}},
        ).json()

        agents.append(start_agent(server, "agent-a", tmp_path))
        first = agents[0]
        wait_for(lambda: training_processes_of(first.pid), 90, "agent-a to start training")
        children = training_processes_of(first.pid)
        assert any("agent agent-a" in m for m in events_of(server, headers, job["id"]))

        os.kill(first.pid, signal.SIGKILL)
        first.wait()
        # its training process dies with it: the job is never trained twice at once
        wait_for(
            lambda: not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children),
            10,
            "the orphaned training process to end",
        )

        agents.append(start_agent(server, "agent-b", tmp_path))
        done = wait_for(
            lambda: (
                (j := httpx.get(f"{server.url}/v1/fine_tuning/jobs/{job['id']}", headers=headers).json())["status"]
                in ("succeeded", "failed")
                and j
            ),
            240,
            "the job to finish",
        )
        assert done["status"] == "succeeded", done["error"]
        messages = events_of(server, headers, job["id"])
        assert "Agent agent-a stopped heartbeating; job requeued" in messages
        assert any("attempt 2, agent agent-b" in m for m in messages)
    finally:
        for agent in agents:
            if agent.poll() is None:
                agent.send_signal(signal.SIGTERM)
                agent.wait(timeout=30)
        stop_server(server)
