"""Federated fine-tuning on Flower's deployment engine: a SuperLink (TLS, node authentication) and three
SuperNodes as real processes on loopback, one round of secure aggregation, and site 3 killed mid-round
(after it shared its keys, before its masked input): the aggregate must still be exactly the sum of the
two survivors' contributions, and nothing the coordinator received may be one site's update in clear.

One federation is run for the module (~2 minutes of wall time, most of it Flower's polling)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from adaptery.federated import deploy, secagg
from adaptery.federated.apps import CoordinatorJob, SiteConfig
from tests.conftest import SAMPLE_CHAT, free_port

pytestmark = pytest.mark.timeout(600)

LORA = {"rank": 4, "alpha": 8, "local_steps": 2, "batch_size": 2, "max_seq_length": 96, "learning_rate": 0.01}


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory, demo_model_dir: Path):
    root = tmp_path_factory.mktemp("federation")
    lines = SAMPLE_CHAT.read_text().splitlines()
    slices = {1: lines[0:3], 2: lines[3:5], 3: lines[5:6]}  # different sizes: FedAvg weights differ
    roster, sites = {}, {}
    for site, records in slices.items():
        home = root / f"site{site}"
        key = deploy.new_identity_key(home / "identity.key")
        roster[str(site)] = deploy.public_key_of(key)
        (home / "data.jsonl").write_text("\n".join(records) + "\n")
        sites[site] = home
    (root / "roster.json").write_text(json.dumps(roster))
    coordinator = root / "coordinator"
    port = free_port()
    link = deploy.start_superlink(coordinator / "flwr", "127.0.0.1", port, coordinator / "tls", root / "superlink.log")
    homes = [coordinator / "flwr"] + [home / "flwr" for home in sites.values()]
    try:
        deploy.wait_listening("127.0.0.1", port, link, timeout=120)
        deploy.register_sites(coordinator / "flwr", [home / "identity.pub" for home in sites.values()])
        for site, home in sites.items():
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
        deadline = time.monotonic() + 420
        while time.monotonic() < deadline:
            events = deploy.read_progress(out)
            if not killed and any(e.get("stage") == "share" for e in events):
                deploy.stop_flower(sites[3] / "flwr")  # site 3 goes away after sharing its keys
                killed = True
            if events and events[-1].get("event") in ("done", "failed"):
                break
            time.sleep(0.2)
        logs = "\n".join(p.read_text(errors="replace")[-3000:] for p in sorted(root.glob("*.log")))
        assert events and events[-1].get("event") == "done", f"{events}\n{logs}"
        yield {"out": out, "sites": sites, "events": events, "killed": killed}
    finally:
        for home in homes:
            deploy.stop_flower(home)


def contribution(site_home: Path) -> np.ndarray:
    (path,) = (site_home / "work").glob("contribution-*-round1.npy")
    return np.load(path)


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


def test_coordinator_produces_an_ordinary_adapter(federation, demo_model_dir: Path):
    adapter = federation["out"] / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == LORA["rank"]
    weights = load_file(adapter / "adapter_model.safetensors")
    b_norm = sum(float(np.abs(v).sum()) for k, v in weights.items() if "lora_B" in k)
    assert b_norm > 0  # B starts at zero: the aggregated update is in it
    assert not list(adapter.glob("*.bin"))
