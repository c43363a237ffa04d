"""scripts/gpu-check.sh in its --cpu smoke mode: the same code a lent GPU machine runs, less what needs CUDA, on a
tiny model with a small budget, so the script is not untested where no GPU is lent (bench/gpu_check.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu-check.sh"


def gpu_check(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=timeout)


def test_the_cpu_smoke_mode_trains_and_serves_and_says_why_the_rest_cannot_run(tmp_path) -> None:
    # Not the ddp part: its three more processes would double this test's cost, and the launcher it runs is tested
    # in test_training_distributed.py (the part itself: `scripts/gpu-check.sh --cpu`).
    out = tmp_path / "check.json"
    done = gpu_check("--cpu", "--parts", "lora,qlora,loftq,vllm", "--records", "4", "--json-out", str(out))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    parts = json.loads(out.read_text())["parts"]
    lora = parts["lora"]
    assert lora["status"] == "ok" and lora["steps"] == 2 and lora["served_on"] == "native", lora
    assert lora["matches_peft"] is True  # the engine's greedy answer is PEFT's (float32 on a CPU)
    assert "ddp" not in parts
    for name in ("qlora", "loftq", "vllm"):
        assert parts[name]["status"] == "skipped" and parts[name]["reason"].startswith("--cpu"), parts[name]
    assert "| lora | ok |" in done.stdout and "| vllm | skipped | --cpu" in done.stdout


def test_an_unknown_part_is_refused_with_the_parts_there_are() -> None:
    done = gpu_check("--cpu", "--parts", "lora,fsdp", timeout=120)
    assert done.returncode == 2
    assert "unknown part(s): fsdp; choose from lora, qlora, loftq, ddp, vllm" in done.stderr
