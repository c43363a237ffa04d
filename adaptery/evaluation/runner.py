"""Child-process entry point of an evaluation job: ``python -m adaptery.evaluation.runner SPEC.json``.

The protocol is the training runner's (adaptery/training/runner.py): stdout carries only JSON events, one a line:
``{"type": "message", "message"}`` for people, ``{"type": "progress", "done", "total"}`` as examples are scored,
then ``{"type": "result", ...}`` and exit code 0, or ``{"type": "error", "message"}`` and exit code 1.

SPEC.json is one of two kinds:

- ``held_out``: ``base_model`` (a local directory), ``models`` (``[{"label", "model", "adapter_dir"|null}]``,
  null being the base itself), ``evaluation_file`` (chat JSONL), ``split`` (``{"fraction", "seed"}`` to
  evaluate only what a job set aside, or null), ``max_new_tokens``, ``max_seq_length``, ``max_examples``,
  ``record_limits`` ({max_bytes, max_depth}). The result has each model's ``summary``, every example's
  answers and scores (`heldout.example_rows`), and each model's ``usage`` (requests, prompt and completion
  tokens of its generated answers), which the control plane charges to the usage ledger.
- ``lm_eval``: ``task`` (the task's name), ``task_dir`` (its YAML and data, written by the agent), ``api_base``
  (the platform's /v1), ``models`` (``[{"label", "model"}]``), ``limit``. EleutherAI's harness scores each model
  through the platform's own chat completions API (its ``local-chat-completions`` model type), with the Hugging
  Face hub switched off: the task's data is a local JSON file. The API key is in the OPENAI_API_KEY environment
  variable (the harness reads it there), never in the spec.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any

from adaptery.training.runner import _claim_stdout, _Emitter, _thread_count

OFFLINE_ENVIRONMENT = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_EVALUATE_OFFLINE": "1",
}


def run_held_out(spec: dict[str, Any], emit: _Emitter) -> dict[str, Any]:
    import torch

    from adaptery.data.untrusted import RecordLimits
    from adaptery.engine.loading import load_causal_lm
    from adaptery.evaluation import heldout

    torch.manual_seed(0)
    torch.set_num_threads(_thread_count())
    limits = RecordLimits(**spec["record_limits"])
    examples = heldout.read_evaluation_set(
        Path(spec["evaluation_file"]), limits, max_examples=int(spec["max_examples"])
    )
    if spec.get("split"):
        examples = heldout.held_out_split(examples, float(spec["split"]["fraction"]), int(spec["split"]["seed"]))
    emit({"type": "message", "message": f"Evaluating {len(spec['models'])} model(s) on {len(examples)} example(s)"})
    model, tokenizer = load_causal_lm(spec["base_model"])
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    total = len(examples) * len(spec["models"])
    scored: list[heldout.ModelScores] = []
    peft_model = None
    for index, entry in enumerate(spec["models"]):
        label, adapter_dir = entry["label"], entry.get("adapter_dir")
        if adapter_dir is None:
            scorer = model if peft_model is None else peft_model.get_base_model()
            context = peft_model.disable_adapter() if peft_model is not None else _nothing()
        else:
            from peft import PeftModel

            if peft_model is None:
                peft_model = PeftModel.from_pretrained(model, adapter_dir, adapter_name=label)
            else:
                peft_model.load_adapter(adapter_dir, adapter_name=label)
            peft_model.set_adapter(label)
            peft_model.eval()
            scorer, context = peft_model, _nothing()
        done_before = index * len(examples)
        with context:
            scores = heldout.score_model(
                label,
                scorer,
                tokenizer,
                examples,
                max_new_tokens=int(spec["max_new_tokens"]),
                max_seq_length=int(spec["max_seq_length"]),
                on_progress=lambda done, base=done_before: emit(
                    {"type": "progress", "done": base + done, "total": total}
                ),
            )
        scored.append(scores)
        emit({"type": "message", "message": f"Scored {label} ({entry['model']})"})
    return {
        "kind": "held_out",
        "models": {
            s.label: {"model": e["model"], **heldout.summary(s)} for s, e in zip(scored, spec["models"], strict=True)
        },
        "examples": heldout.example_rows(examples, scored),
        "usage": {s.label: s.usage() for s in scored},  # charged to the ledger by the control plane
    }


class _nothing:  # noqa: N801 - a context manager that does nothing, named as the context it stands for
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def task_manager(task_dir: str | Path):  # noqa: ANN201 (lm_eval's TaskManager, imported late)
    """The harness's tasks: only the tenant's own file, never its built-ins. A task the tenant named 'hellaswag'
    is theirs; the harness's own (a hub dataset, Python helpers) is not even indexed."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(task_dir), include_defaults=False)


def run_lm_eval(spec: dict[str, Any], emit: _Emitter) -> dict[str, Any]:
    os.environ.update(OFFLINE_ENVIRONMENT)
    from lm_eval import simple_evaluate

    task, models = spec["task"], spec["models"]
    manager = task_manager(spec["task_dir"])
    if task not in manager.all_tasks:
        raise ValueError(f"the task '{task}' was not found in its task file")
    results: dict[str, Any] = {}
    for done, entry in enumerate(models, start=1):
        out = simple_evaluate(
            model="local-chat-completions",
            model_args={
                "model": entry["model"],
                "base_url": f"{spec['api_base'].rstrip('/')}/chat/completions",
                "num_concurrent": 1,
                "max_retries": 2,
                "tokenizer_backend": "none",
                "timeout": 120,
            },
            tasks=[task],
            task_manager=manager,
            apply_chat_template=True,
            limit=spec.get("limit"),
            log_samples=False,
            random_seed=0,
            numpy_random_seed=0,
            torch_random_seed=0,
            fewshot_random_seed=0,
        )
        scores = (out or {}).get("results", {}).get(task, {})
        # The harness names a score "metric,filter" ("exact_match,none"); beside them are "alias" and "sample_len".
        numbers = {name: value for name, value in scores.items() if "," in name and isinstance(value, int | float)}
        metrics = {name.split(",")[0]: value for name, value in numbers.items() if "_stderr" not in name}
        stderr = {name.split(",")[0][: -len("_stderr")]: v for name, v in numbers.items() if "_stderr" in name}
        results[entry["label"]] = {
            "model": entry["model"],
            "metrics": metrics,
            "stderr": stderr,
            "documents": scores.get("sample_len"),
        }
        emit({"type": "progress", "done": done, "total": len(models)})
        emit({"type": "message", "message": f"lm-eval {task}: {entry['label']} {metrics}"})
    return {"kind": "lm_eval", "task": task, "models": results}


def main(argv: list[str]) -> int:
    events = _claim_stdout()
    emit = _Emitter(events)
    try:
        spec = json.loads(Path(argv[1]).read_text())
        run = run_lm_eval if spec.get("kind") == "lm_eval" else run_held_out
        emit({"type": "message", "message": "Evaluation started"})
        emit({"type": "result", **run(spec, emit)})
        return 0
    except Exception as exc:  # noqa: BLE001 - the agent reports it; the traceback goes to stderr
        traceback.print_exc()
        emit({"type": "error", "message": f"{type(exc).__name__}: {exc}"})
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
