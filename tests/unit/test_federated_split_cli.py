"""`adaptery fed split-coordinator` and `adaptery fed split-site`: the coordinator as its own process and the site
through the CLI train a few steps over the authenticated socket and both write the same, whole adapter, one the
platform's import accepts; bad input is refused before anything starts."""

from __future__ import annotations

import multiprocessing
import re
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from adaptery.cli.main import app
from adaptery.data.chat_template import TemplateBudget
from adaptery.services.adapter_io import check_adapter
from adaptery.settings import Settings
from tests.conftest import SAMPLE_CHAT

ENV = {"COLUMNS": "200"}
KEY = "0123456789abcdef" * 4


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_cli(args: list[str], log: str) -> None:
    """A forked process running the CLI, its output in `log` (forked: a fresh interpreter takes 15-40 s here)."""
    torch.set_num_threads(1)
    sys.stdout = sys.stderr = open(log, "w", buffering=1)  # noqa: SIM115 - the process's whole life
    app(args, prog_name="adaptery")


def listening_port(log: Path, process: multiprocessing.Process) -> int:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.is_alive():
        found = re.search(r"listening on 127\.0\.0\.1:(\d+)", log.read_text() if log.exists() else "")
        if found:
            return int(found.group(1))
        time.sleep(0.05)
    raise AssertionError(f"the coordinator did not start listening: {log.read_text()}")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_split_commands_train_and_write_one_adapter_the_platform_imports(demo_model_dir, tmp_path):
    key, wrong = tmp_path / "split.key", tmp_path / "wrong.key"
    key.write_text(KEY + "\n")
    wrong.write_text(KEY[::-1] + "\n")
    log = tmp_path / "coordinator.log"
    coordinator = [
        "fed", "split-coordinator", "--base-model", str(demo_model_dir), "--listen", "127.0.0.1:0",
        "--key-file", str(key), "--out", str(tmp_path / "coordinator-out"), "--split-layer", "2",
        "--lora", '{"rank": 4, "alpha": 8, "learning_rate": 0.01}',
    ]  # fmt: skip
    context = multiprocessing.get_context("fork")
    process = context.Process(target=run_cli, args=(coordinator, str(log)))
    process.start()
    try:
        port = listening_port(log, process)
        site = [
            "fed", "split-site", "--coordinator", f"127.0.0.1:{port}", "--data", str(SAMPLE_CHAT),
            "--base-model", str(demo_model_dir), "--epochs", "1", "--batch-size", "2",
        ]  # fmt: skip
        runner = CliRunner()
        refused = runner.invoke(app, [*site, "--key-file", str(wrong), "--out", str(tmp_path / "x")], env=ENV)
        assert refused.exit_code == 1 and "refused the key" in refused.output
        result = runner.invoke(app, [*site, "--key-file", str(key), "--out", str(tmp_path / "site-out")], env=ENV)
        assert result.exit_code == 0, result.output
        assert re.search(r"3 steps, last loss \d+\.\d{4}", result.output)
        process.join(timeout=60)
        assert process.exitcode == 0, log.read_text()
    finally:
        process.kill()
    assert "3 steps; adapter:" in log.read_text()

    site_weights = load_file(tmp_path / "site-out" / "adapter_model.safetensors")
    coordinator_weights = load_file(tmp_path / "coordinator-out" / "adapter_model.safetensors")
    assert set(site_weights) == set(coordinator_weights) and len(site_weights) == 4 * 4 * 2  # every layer's q/k/v/o
    for name, tensor in site_weights.items():
        assert torch.equal(tensor, coordinator_weights[name])
        if ".lora_B." in name:  # both halves trained (B starts at zero)
            assert tensor.abs().sum() > 0, name
    settings = Settings()  # the platform's import (POST /api/models/import) checks the adapter thus
    config = check_adapter(
        tmp_path / "site-out",
        demo_model_dir,
        max_rank=settings.max_lora_rank,
        max_json_bytes=settings.max_json_bytes,
        template_budget=TemplateBudget.from_settings(settings),
    )
    assert config["r"] == 4 and config["peft_type"] == "LORA"


def test_split_commands_refuse_bad_input_before_starting(demo_model_dir, tmp_path):
    key = tmp_path / "split.key"
    key.write_text(KEY)
    runner = CliRunner()
    coordinator = ["fed", "split-coordinator", "--base-model", str(demo_model_dir), "--key-file", str(key)]
    out = ["--out", str(tmp_path / "out")]
    for extra, message in (
        (["--split-layer", "4"], "split_layer must be between 1 and 3"),
        (["--split-layer", "0"], "split_layer must be between 1 and 3"),
        (["--lora", '{"rank": 4, "dropout": 0.1}'], "unknown split settings: ['dropout']"),
        (["--listen", "nowhere"], "'nowhere' is not HOST:PORT"),
    ):
        result = runner.invoke(app, [*coordinator, *out, *extra], env=ENV)
        assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "out").exists()

    bad_data = tmp_path / "bad.jsonl"
    bad_data.write_text('{"messages": [{"role": "wizard", "content": "hi"}]}\n')
    short = tmp_path / "short.key"
    short.write_text("secret")
    site = ["fed", "split-site", "--base-model", str(demo_model_dir), *out]
    unreachable = ["--coordinator", f"127.0.0.1:{free_port()}"]
    for extra, code, message in (
        (["--data", str(tmp_path / "missing.jsonl"), "--key-file", str(key), *unreachable], 2, "does not exist"),
        (["--data", str(bad_data), "--key-file", str(key), *unreachable], 2, "wizard"),
        (["--data", str(SAMPLE_CHAT), "--key-file", str(short), *unreachable], 2, "a key needs at least 32"),
        (["--data", str(SAMPLE_CHAT), "--key-file", str(key), *unreachable], 1, "Cannot reach the coordinator"),
    ):
        result = runner.invoke(app, [*site, *extra], env=ENV)
        assert result.exit_code == code and message in result.output, result.output
    assert not (tmp_path / "out").exists()
