"""Inference on agents, with real processes: a server and two infer agents on the demo model (one torch thread
each). Requests share the agents, an adapter is served where it is resident, an agent killed before its first
token costs the client nothing, one killed mid-stream ends the stream with an error event (and the next request
goes to the other), a client that goes away frees its slot at once, and a tenant-scoped agent serves only its
tenant. One set-up for the module: the agents are killed in the last tests, in order."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import httpx
import pytest

from adaptery.engine.demo_model import SPECIAL_TOKENS
from tests.conftest import prepare_data_dir, start_server, stop_server
from tests.unit.engine_helpers import make_adapter

# The demo model's end tokens (its tokenizer numbers the special tokens first), banned where a test needs a stream
# still running when it looks: a random model may end after a few tokens, and where depends on the CPU (bf16 on one
# with bf16 dot products, fp32 elsewhere).
NO_END = {str(SPECIAL_TOKENS.index(token)): -100 for token in ("<|eos|>", "<|end|>")}
ANNOUNCE = {"ADAPTERY_AGENT_ANNOUNCE_SECONDS": "0.5", "ADAPTERY_AGENT_ANNOUNCE_MISSED": "3"}


def enroll(server, name: str, *extra: str) -> str:
    done = server.cli("agents", "create", name, *extra)
    assert done.returncode == 0, done.stdout + done.stderr
    return re.search(r"^ADAPTERY_AGENT_CREDENTIALS=(\S+)$", done.stdout, re.M).group(1)


def start_infer_agent(server, credentials: str, work: Path, name: str, base_dir: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADAPTERY_")}
    env.update(ANNOUNCE, ADAPTERY_DATA_DIR=str(work / name), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "adaptery.cli", "agent", "--credentials", credentials, "--roles", "infer"]
    command += ["--nats-url", (server.data_dir / "nats" / "url").read_text(), "--threads", "1"]
    command += ["--base", f"adaptery-demo={base_dir}"]
    log = (work / f"{name}.log").open("w")
    return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


class Fabric:
    def __init__(self, server, headers, agents, credentials, other_headers, work, base_dir) -> None:
        self.server = server
        self.credentials = credentials
        self.work = work
        self.base_dir = base_dir
        self.headers = headers
        self.agents = agents  # name -> process
        self.names = {name: token.split(":")[0] for name, token in credentials.items()}  # name -> agent id
        self.other_headers = other_headers  # a second tenant's key

    def listed(self, headers=None) -> dict[str, dict]:
        rows = httpx.get(f"{self.server.url}/api/admin/agents", headers=headers or self.headers).json()["data"]
        return {row["name"]: row for row in rows}

    def served(self) -> dict[str, int]:
        """Requests each agent has served, from its own announcements (their `served` count)."""
        snapshot = self.snapshot()
        return {name: snapshot.get(agent_id, {}).get("served", 0) for name, agent_id in self.names.items()}

    def served_after(self, before: dict[str, int], requests: int) -> dict[str, int]:
        """The counts once the agents have announced `requests` more served than `before`."""

        def enough() -> dict[str, int] | None:
            now = self.served()
            return now if sum(now.values()) - sum(before.values()) >= requests else None

        return wait_for(enough, 10, f"{requests} requests to be announced as served")

    def snapshot(self) -> dict[str, dict]:
        rows = httpx.get(f"{self.server.url}/api/admin/agents", headers=self.headers).json()["data"]
        return {row["id"]: row for row in rows}

    def chat(self, model: str = "adaptery-demo", headers=None, **body) -> httpx.Response:
        payload = {"model": model, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8, **body}
        return httpx.post(
            f"{self.server.url}/v1/chat/completions", headers=headers or self.headers, json=payload, timeout=60
        )


@pytest.fixture(scope="module")
def fabric(tmp_path_factory, demo_model_dir):
    work = tmp_path_factory.mktemp("fabric")
    data_dir = prepare_data_dir(work / "data", demo_model_dir)
    env = {"ADAPTERY_EMBEDDED_AGENT": "false", "ADAPTERY_INFERENCE_STREAM_IDLE_SECONDS": "2", **ANNOUNCE}
    server = start_server(data_dir, f"sqlite:///{work / 'adaptery.db'}", extra_env=env)
    agents: dict[str, subprocess.Popen] = {}
    try:
        headers = {"Authorization": f"Bearer {server.api_key}"}
        other = server.cli("tenants", "create", "otherlab", "--owner", "olga")
        assert other.returncode == 0, other.stdout + other.stderr
        other_key = re.search(r"^ADAPTERY_API_KEY=(\S+)$", other.stdout, re.M).group(1)
        # infer-a serves only the first tenant; infer-b the whole platform
        credentials = {
            "infer-a": enroll(server, "infer-a", "--tenant", "default"),
            "infer-b": enroll(server, "infer-b"),
        }
        for name, token in credentials.items():
            agents[name] = start_infer_agent(server, token, work, name, demo_model_dir)
        other_headers = {"Authorization": f"Bearer {other_key}"}
        fabric = Fabric(server, headers, agents, credentials, other_headers, work, demo_model_dir)
        wait_for(lambda: all(row["bases"] == ["adaptery-demo"] for row in fabric.listed().values()), 120, "both agents")
        yield fabric
    finally:
        for process in agents.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=30)
        stop_server(server)


@pytest.fixture(scope="module")
def adapter_model(fabric, demo_model_dir, tmp_path_factory) -> str:
    out = make_adapter(demo_model_dir, tmp_path_factory.mktemp("adapter") / "a", seed=3)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in out.iterdir():
            if path.suffix in (".safetensors", ".json"):
                archive.write(path, path.name)
    response = httpx.post(
        f"{fabric.server.url}/api/models/import",
        params={"base_model": "adaptery-demo", "suffix": "fabric"},
        content=buffer.getvalue(),
        headers=fabric.headers,
        timeout=60,
    )
    assert response.status_code == 200, response.text
    return response.json()["id"]


def test_two_infer_agents_share_the_load_and_are_listed_live(fabric):
    before = fabric.served()
    results: list[httpx.Response] = []
    threads = [threading.Thread(target=lambda: results.append(fabric.chat(max_tokens=16))) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [r.status_code for r in results] == [200] * 8, [r.text for r in results]
    usage = results[0].json()["usage"]
    assert usage["prompt_tokens"] > 0 and usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    after = fabric.served_after(before, 8)
    assert all(after[name] > before[name] for name in fabric.names), (before, after)
    row = fabric.listed()["infer-b"]
    assert row["state"] in ("idle", "busy") and row["roles"] == ["infer"] and not row["lost"]
    assert row["last_heartbeat_at"] > time.time() - 5
    listed = fabric.server.cli("agents", "list")
    assert listed.returncode == 0 and "infer-a" in listed.stdout and "adaptery-demo" in listed.stdout, listed.stdout


def test_an_adapter_is_served_from_the_agent_that_holds_it(fabric, adapter_model):
    first = fabric.chat(adapter_model)
    assert first.status_code == 200, first.text
    holders = wait_for(
        lambda: [n for n, row in fabric.listed().items() if any(row["adapters"][t] for t in ("active", "memory"))],
        10,
        "the adapter to be announced as resident",
    )
    assert len(holders) == 1
    before = fabric.served()
    for _ in range(4):
        assert fabric.chat(adapter_model).status_code == 200
    after = fabric.served_after(before, 4)
    assert after[holders[0]] - before[holders[0]] == 4, (holders, before, after)


def test_another_tenants_requests_never_reach_a_tenant_scoped_agent(fabric):
    before = fabric.served()
    for _ in range(4):
        response = fabric.chat(headers=fabric.other_headers)
        assert response.status_code == 200, response.text
    after = fabric.served_after(before, 4)
    assert after["infer-a"] == before["infer-a"] and after["infer-b"] - before["infer-b"] == 4
    # and the other tenant's admin view shows no tenant-scoped agent of the first tenant
    assert "infer-a" not in fabric.listed(fabric.other_headers)


def test_a_client_that_disconnects_frees_the_agents_slot_at_once(fabric):
    payload = {
        "model": "adaptery-demo",
        "messages": [{"role": "user", "content": "tell me a long story"}],
        "max_tokens": 1000,
        "stream": True,
        "temperature": 1.0,
        "seed": 7,
        "logit_bias": NO_END,
    }
    with (
        httpx.Client(timeout=60) as client,
        client.stream("POST", f"{fabric.server.url}/v1/chat/completions", headers=fabric.headers, json=payload) as r,
    ):
        lines = r.iter_lines()
        assert any(line.startswith("data: ") and '"content":"' in line and '"content":""' not in line for line in lines)
        busy = wait_for(
            lambda: [n for n, row in fabric.listed().items() if row["running"] >= 1], 5, "the agent running it"
        )
    # the connection is closed: the control plane cancels the request on the agent, which drops it
    wait_for(lambda: fabric.listed()[busy[0]]["running"] == 0, 3, "the running count to drop")


def test_an_agent_killed_before_its_first_token_costs_the_client_nothing(fabric, adapter_model):
    holder = next(n for n, row in fabric.listed().items() if any(row["adapters"][t] for t in ("active", "memory")))
    process = fabric.agents[holder]
    process.send_signal(signal.SIGSTOP)  # frozen: the request reaches it but no token comes back
    try:
        results: list[httpx.Response] = []
        thread = threading.Thread(target=lambda: results.append(fabric.chat(adapter_model)))
        thread.start()
        time.sleep(0.5)
        process.kill()
        process.wait()
        thread.join(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert results and results[0].status_code == 200, results and results[0].text
    assert results[0].json()["choices"][0]["finish_reason"] in ("stop", "length")
    assert "before the first token; sending the request elsewhere" in fabric.server.log()
    wait_for(lambda: fabric.listed()[holder]["state"] == "lost", 5, "the killed agent to be marked lost")
    # it comes back, and is no longer lost once it announces itself
    fabric.agents[holder] = start_infer_agent(
        fabric.server, fabric.credentials[holder], fabric.work, f"{holder}-again", fabric.base_dir
    )
    wait_for(lambda: fabric.listed()[holder]["state"] != "lost", 120, "the agent to come back")


def test_an_agent_killed_mid_stream_ends_it_with_an_error_and_the_next_request_goes_to_the_other(fabric):
    payload = {
        "model": "adaptery-demo",
        "messages": [{"role": "user", "content": "go on"}],
        "max_tokens": 1000,
        "logit_bias": NO_END,
    }
    events: list[str] = []
    streaming = None
    with (
        httpx.Client(timeout=60) as client,
        client.stream(
            "POST", f"{fabric.server.url}/v1/chat/completions", headers=fabric.headers, json={**payload, "stream": True}
        ) as response,
    ):
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            events.append(line[6:])
            if len(events) == 2:  # the role chunk, then a first token: find who streams it, freeze it, kill it
                streaming = wait_for(
                    lambda: [n for n, row in fabric.listed().items() if row["running"] >= 1], 20, "the streaming agent"
                )[0]
                fabric.agents[streaming].send_signal(signal.SIGSTOP)
                fabric.agents[streaming].kill()
                fabric.agents[streaming].wait()
    last = json.loads(events[-1])
    assert "error" in last and "lost" in last["error"]["message"], events[-3:]
    assert "[DONE]" not in events
    other = next(name for name in fabric.names if name != streaming)
    before = fabric.served()[other]
    response = fabric.chat()
    assert response.status_code == 200, response.text
    wait_for(lambda: fabric.served()[other] == before + 1, 5, "the other agent to serve the next request")
