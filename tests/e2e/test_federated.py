"""Federated fine-tuning on Flower's deployment engine: a SuperLink (TLS, node authentication) and three
SuperNodes as real processes on loopback, one round of secure aggregation, and site 3 killed mid-round
(after it shared its keys, before its masked input): the aggregate must still be exactly the sum of the
two survivors' contributions, and nothing the coordinator received may be one site's update in clear.

The federation is the platform's: sites 1 and 3 are added by key out of band, site 2 joins with an
invitation token by running `adaptery fed join` as a process (its key made there, its SuperLink and
roster from its signed check-ins), and the coordinator's progress is reported to the platform as it comes.

One federation is run for the module (~2 minutes of wall time, most of it Flower's polling)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn
from safetensors.numpy import load_file

from adaptery.api.app import create_app
from adaptery.engine.demo_model import DEMO_MODEL_ID
from adaptery.federated import deploy, join, secagg
from adaptery.federated.apps import CoordinatorJob, SiteConfig
from adaptery.platform import Platform
from tests.conftest import REPO, SAMPLE_CHAT, free_port
from tests.integration.conftest import make_settings

pytestmark = pytest.mark.timeout(600)

LORA = {"rank": 4, "alpha": 8, "local_steps": 2, "batch_size": 2, "max_seq_length": 96, "learning_rate": 0.01}


def wait_for(condition, what: str, timeout: float = 60.0):  # noqa: ANN001, ANN201 - a predicate and its value
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def platform_server(tmp_path_factory: pytest.TempPathFactory, demo_model_dir: Path) -> Iterator[tuple[str, dict]]:
    """The coordinating platform, in this process, behind a real HTTP port (the joining site is another process)."""
    tmp = tmp_path_factory.mktemp("fed-platform")
    platform = Platform(make_settings(tmp, f"sqlite:///{tmp / 'adaptery.db'}", demo_model_dir, embedded_agent=False))
    first = platform.prepare()
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(platform), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="fed-platform", daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, "the platform to listen")
        yield f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {first.api_key}"}
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory, demo_model_dir: Path, platform_server):
    url, auth = platform_server
    api = httpx.Client(base_url=url, headers=auth, timeout=60)
    root = tmp_path_factory.mktemp("federation")
    lines = SAMPLE_CHAT.read_text().splitlines()
    slices = {1: lines[0:3], 2: lines[3:5], 3: lines[5:6]}  # different sizes: FedAvg weights differ
    sites = {}
    for site, records in slices.items():
        home = root / f"site{site}"
        home.mkdir()
        (home / "data.jsonl").write_text("\n".join(records) + "\n")
        sites[site] = home
    fed_id = api.post("/api/federations", json={"name": "e2e", "base_model": DEMO_MODEL_ID}).json()["id"]

    def add_out_of_band(site: int) -> None:
        key = deploy.new_identity_key(sites[site] / "identity.key")
        body = {"name": f"site-{site}", "public_key": deploy.public_key_of(key)}
        assert api.post(f"/api/federations/{fed_id}/sites", json=body).json()["number"] == site

    add_out_of_band(1)
    token = api.post(f"/api/federations/{fed_id}/invitations", json={"name": "site-2"}).json()["token"]
    joined = subprocess.Popen(
        [sys.executable, "-m", "adaptery.cli", "fed", "join", "--server", url, "--token", token,
         "--data", str(sites[2] / "data.jsonl"), "--base-model", str(demo_model_dir), "--work-dir", str(sites[2]),
         "--runtime-port", str(free_port()), "--check-in-every", "0.5"],
        stdout=(root / "join.log").open("wb"), stderr=subprocess.STDOUT, cwd=REPO,
    )  # fmt: skip
    coordinator = root / "coordinator"
    homes = [coordinator / "flwr"] + [home / "flwr" for home in sites.values()]
    try:
        port = free_port()  # the SuperLink starts while site 2 joins; sites learn of it only once it is published
        link = deploy.start_superlink(
            coordinator / "flwr", "127.0.0.1", port, coordinator / "tls", root / "superlink.log"
        )
        wait_for(lambda: len(api.get(f"/api/federations/{fed_id}").json()["sites"]) == 2, "site 2 to join", 120)
        add_out_of_band(3)
        deploy.wait_listening("127.0.0.1", port, link, timeout=120)
        roster = api.get(f"/api/federations/{fed_id}/roster").json()  # as `fed coordinator --federation` does
        (root / "roster.json").write_text(json.dumps(roster))
        keys = []
        for site in roster:
            keys.append(root / f"site-{site}.pub")
            keys[-1].write_text(roster[site] + "\n")
        deploy.register_sites(coordinator / "flwr", keys)
        published = api.put(
            f"/api/federations/{fed_id}/coordinator",
            json={"superlink": f"127.0.0.1:{port}", "superlink_ca": (coordinator / "tls" / "ca.pem").read_text(),
                  "rounds": 1, "sites": [1, 2, 3]},
        )  # fmt: skip
        assert published.status_code == 200 and published.json() == roster, published.text
        for site in (1, 3):
            home = sites[site]
            config = SiteConfig(
                site=site,
                key_path=str(home / "identity.key"),
                roster_path=str(root / "roster.json"),
                data_path=str(home / "data.jsonl"),
                base_dir=str(demo_model_dir),
                work_dir=str(home / "work"),
            )
            config.save(home / "site.json")
            deploy.start_supernode(
                home / "flwr",
                f"127.0.0.1:{port}",
                coordinator / "tls" / "ca.pem",
                home / "identity.key",
                home / "site.json",
                free_port(),
                root / f"supernode-{site}.log",
            )
        out = coordinator / "out"
        job = CoordinatorJob(
            federation="e2e",
            base_dir=str(demo_model_dir),
            roster_path=str(root / "roster.json"),
            out_dir=str(out),
            rounds=1,
            threshold=2,
            lora=LORA,
            min_sites=3,
            stage_timeout=60,
        )
        job.save(coordinator / "job.json")
        deploy.start_run(coordinator / "flwr", deploy.write_app(coordinator / "app"), coordinator / "job.json")
        killed = False
        reported = 0
        deadline = time.monotonic() + 420
        while time.monotonic() < deadline:
            events = deploy.read_progress(out)
            for event in events[reported:]:  # as `adaptery fed coordinator --federation` reports them
                assert api.post(f"/api/federations/{fed_id}/events", json=event).status_code == 200
            reported = len(events)
            if not killed and any(e.get("stage") == "share" for e in events):
                deploy.stop_flower(sites[3] / "flwr")  # site 3 goes away after sharing its keys
                killed = True
            if events and events[-1].get("event") in ("done", "failed"):
                break
            time.sleep(0.2)
        logs = "\n".join(p.read_text(errors="replace")[-3000:] for p in sorted(root.rglob("*.log")))
        assert events and events[-1].get("event") == "done", f"{events}\n{logs}"
        record = api.get(f"/api/federations/{fed_id}").json()
        yield {
            "out": out, "sites": sites, "events": events, "killed": killed, "record": record, "root": root,
            "api": api, "id": fed_id,
        }  # fmt: skip
    finally:
        for home in homes:
            deploy.stop_flower(home)
        joined.terminate()
        joined.wait(timeout=30)
        api.close()


def contribution(site_home: Path) -> np.ndarray:
    (path,) = site_home.glob("*/contribution-*-round1.npy")  # work/ (set up here) or contributions/ (`fed join`)
    return np.load(path)


def test_a_site_joined_by_invitation_takes_part_and_the_platform_records_the_round(federation):
    record = federation["record"]
    site2 = federation["sites"][2]
    assert [(s["number"], s["joined"]) for s in record["sites"]] == [(1, False), (2, True), (3, False)]
    membership = join.Membership.load(site2)
    assert membership.number == 2 and membership.federation_id == record["id"]
    assert (site2 / "identity.pub").read_text().split()[:2] == record["sites"][1]["public_key"].split()[:2]
    assert contribution(site2).any()  # it trained on its own slice, and its masked input was summed (next tests)
    join_log = (federation["root"] / "join.log").read_text()
    assert "Joined e2e as site 2" in join_log and "site 3:" in join_log  # the roster's fingerprints, shown
    assert record["status"] == "done" and record["rounds"] == 1
    (first,) = record["history"]
    assert first["survivors"] == [1, 2] and first["loss"] > 0
    assert [s["status"] for s in record["sites"]][2] == "dropped"


def test_round_survives_a_site_dropping_mid_round(federation):
    transcript = np.load(federation["out"] / "transcript" / "round-1.npz")
    assert federation["killed"]
    assert list(transcript["survivors"]) == [1, 2]
    assert list(transcript["dropped"]) == [3]  # it shared keys, then its masked input never came
    (round_event,) = [e for e in federation["events"] if e.get("event") == "round"]
    assert round_event["survivors"] == [1, 2] and np.isfinite(round_event["loss"])


def test_aggregate_is_the_plain_sum_of_the_survivors(federation):
    transcript = np.load(federation["out"] / "transcript" / "round-1.npz")
    sites = federation["sites"]
    plain = contribution(sites[1]) + contribution(sites[2])  # what each survivor kept of its own upload
    frac_bits = secagg.frac_bits_for(3, 1.0)
    assert np.array_equal(transcript["aggregate"], secagg.decode(plain, frac_bits))  # exact, not merely close
    assert transcript["aggregate"][-1] > 0  # the summed FedAvg weight


def test_coordinator_never_held_a_single_site_update(federation):
    transcript = np.load(federation["out"] / "transcript" / "round-1.npz")
    sites = federation["sites"]
    received = {int(name.split("-")[1]): transcript[name] for name in transcript.files if name.startswith("masked-")}
    assert sorted(received) == [1, 2]  # the dropped site sent nothing the coordinator kept
    for site, vector in received.items():
        own = contribution(sites[site])
        assert np.mean(vector == own) < 0.01  # mostly zeros in clear (untrained rows): masked, nothing equal
        difference = (vector - own).astype(np.uint32)  # the mask: uniform over the ring
        counts = np.bincount((difference >> 28).astype(np.int64), minlength=16)
        expected = len(difference) / 16
        assert float(np.sum((counts - expected) ** 2 / expected)) < 45
    revealed = {int(k): v for k, v in json.loads(str(transcript["revealed"])).items()}
    for reply in revealed.values():
        assert not set(reply["b"]) & set(reply["s"])  # never both kinds of share for one site
        assert reply["b"] == [1, 2] and reply["s"] == [3]


def test_coordinator_produces_an_ordinary_adapter_the_platform_serves(federation, demo_model_dir: Path):
    adapter = federation["out"] / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == LORA["rank"]
    weights = load_file(adapter / "adapter_model.safetensors")
    b_norm = sum(float(np.abs(v).sum()) for k, v in weights.items() if "lora_B" in k)
    assert b_norm > 0  # B starts at zero: the aggregated update is in it
    assert not list(adapter.glob("*.bin"))

    api = federation["api"]  # what `fed coordinator --register-base` does: import it, link it to the federation
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zipped:
        for file in adapter.iterdir():
            zipped.write(file, file.name)
    imported = api.post(
        "/api/models/import", params={"base_model": DEMO_MODEL_ID, "suffix": "fed"}, content=archive.getvalue()
    )
    assert imported.status_code == 200, imported.text
    model = imported.json()["id"]
    linked = api.post(f"/api/federations/{federation['id']}/events", json={"event": "adapter", "model": model})
    assert linked.json()["adapter"] == model
    reply = api.post(
        "/v1/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
    )
    assert reply.status_code == 200, reply.text
    assert reply.json()["model"] == model and reply.json()["usage"]["completion_tokens"] > 0
