"""Benchmark: our trainer against a plain transformers + PEFT training loop, same model, same data.

    .venv/bin/python bench/train.py --json-out train.json

Builds the demo base model (random Llama; `--hidden-size`/`--layers` for a larger one) and a
seeded synthetic chat dataset (`--records` conversations, 5-160-word answers, so lengths vary the
way real data does). Then, in a fresh process each (so peak RSS is each side's own), interleaved
`--repeats` times:

- plain: the textbook loop: `get_peft_model` with the same LoraConfig, a shuffling DataLoader of
  the same tokenised examples padded per batch, AdamW, a linear schedule, gradient clipping at 1.0,
  `save_pretrained` at the end;
- adaptery: `adaptery.training.trainer.train` on the same spec (its epoch checkpoint included);
- adaptery, packed: the same with `packing=True` (examples packed into rows of max_seq_length).

Both sides use the same torch thread count (`--threads`, default: the runner's, all CPUs but one:
on 2 cores, competing threads slow training 25-40x). Reported per side (medians): real (non-padding)
tokens per second of the training loop (from its first step to its last, model loading excluded),
the whole run's wall time, peak RSS, and the useful-token ratio: real tokens / tokens computed,
padding included. Goals: adaptery ÷ plain ≥ 1.0 in tokens/s; packed useful-token ratio ≥ 0.95.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# The demo tokenizer was trained on the shipped corpus; these words are in it, so tokens ≈ words.
WORDS = [
    *("the", "lab", "model", "data", "adapter", "training", "token", "answer", "question", "result"),
    *("sample", "method", "rank", "layer", "weight", "batch", "epoch", "loss", "learning", "rate"),
    *("curve", "value", "team", "paper", "graph", "node", "cluster", "queue", "job", "checkpoint"),
    *("resume", "pause", "cancel", "metric", "event", "tenant", "file", "upload", "record", "format"),
]


def write_dataset(path: Path, records: int, seed: int) -> None:
    rng = random.Random(seed)
    lines = []
    for _ in range(records):
        question = " ".join(rng.choices(WORDS, k=rng.randint(4, 20))).capitalize() + "?"
        answer = " ".join(rng.choices(WORDS, k=rng.randint(5, 160))).capitalize() + "."
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        if rng.random() < 0.3:
            messages.insert(0, {"role": "system", "content": "You answer for the lab."})
        lines.append(json.dumps({"messages": messages}))
    path.write_text("\n".join(lines) + "\n")


# --- workers (each in its own process) ---------------------------------------------------------------


def run_plain(config: dict[str, Any]) -> dict[str, Any]:
    import torch
    from peft import LoraConfig, get_peft_model
    from torch.utils.data import DataLoader
    from transformers import get_linear_schedule_with_warmup, set_seed

    from adaptery.engine.loading import load_causal_lm
    from adaptery.training.data import IGNORE_INDEX, load_chat_dataset

    started = time.perf_counter()
    model, tokenizer = load_causal_lm(config["model"])
    model.config.use_cache = False
    examples = load_chat_dataset(Path(config["data"]), tokenizer, max_seq_length=config["max_seq_length"]).examples
    set_seed(config["seed"])
    lora = LoraConfig(
        task_type="CAUSAL_LM",
        r=config["rank"],
        lora_alpha=2 * config["rank"],
        lora_dropout=0.0,
        target_modules="all-linear",
    )
    model = get_peft_model(model, lora)
    model.train()

    def collate(batch: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(ex["input_ids"]) for ex in batch)
        pads = {"input_ids": tokenizer.pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX}
        return {
            key: torch.tensor([ex[key] + [pad] * (width - len(ex[key])) for ex in batch]) for key, pad in pads.items()
        }

    loader = DataLoader(
        examples,
        batch_size=config["batch_size"],
        shuffle=True,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(config["seed"]),
    )
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=config["learning_rate"], weight_decay=0.0)
    schedule = get_linear_schedule_with_warmup(optimizer, 0, len(loader) * config["epochs"])
    real = computed = 0
    loop_started, cpu_started = time.perf_counter(), time.process_time()
    for _ in range(config["epochs"]):
        for batch in loader:
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            real += int(batch["attention_mask"].sum())
            computed += batch["input_ids"].numel()
            last_loss = loss.item()
    loop_seconds, cpu_seconds = time.perf_counter() - loop_started, time.process_time() - cpu_started
    model.save_pretrained(config["out"])
    return {
        "real_tokens": real,
        "loop_seconds": loop_seconds,
        "loop_cpu_seconds": cpu_seconds,
        "wall_seconds": time.perf_counter() - started,
        "useful_token_ratio": real / computed,
        "final_loss": last_loss,
    }


def run_adaptery(config: dict[str, Any]) -> dict[str, Any]:
    from adaptery.engine.demo_model import FINETUNE_DEFAULTS
    from adaptery.training.spec import LoraHyperparameters, TrainingSpec
    from adaptery.training.trainer import train

    started = time.perf_counter()
    spec = TrainingSpec(
        base_model=config["model"],
        training_file=Path(config["data"]),
        output_dir=Path(config["out"]),
        checkpoint_every_steps=10**6,  # the end-of-epoch checkpoint still happens (and is timed)
        hyperparameters=LoraHyperparameters(
            **{
                **FINETUNE_DEFAULTS,
                "n_epochs": config["epochs"],
                "batch_size": config["batch_size"],
                "learning_rate": config["learning_rate"],
                "lora_r": config["rank"],
                "lora_alpha": 2 * config["rank"],
                "lora_dropout": 0.0,
                "max_seq_length": config["max_seq_length"],
                "seed": config["seed"],
                "packing": config["packing"],
            }
        ),
    )
    marks: dict[str, tuple[float, float]] = {}

    def on_event(event: dict[str, Any]) -> None:
        now = (time.perf_counter(), time.process_time())
        if event["type"] == "message" and event["message"].startswith("Training "):
            marks["begin"] = now
        elif event["type"] == "metrics":
            marks["end"] = now

    result = train(spec, on_event)
    return {
        "real_tokens": result.trained_tokens,
        "loop_seconds": marks["end"][0] - marks["begin"][0],
        "loop_cpu_seconds": marks["end"][1] - marks["begin"][1],
        "wall_seconds": time.perf_counter() - started,
        "useful_token_ratio": result.useful_token_ratio,
        "final_loss": result.train_loss,
        "steps": result.steps,
    }


def worker(side: str, config: dict[str, Any]) -> None:
    import torch

    torch.set_num_threads(config["threads"])
    outcome = run_plain(config) if side == "plain" else run_adaptery(config)
    outcome["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    outcome["tokens_per_second"] = outcome["real_tokens"] / outcome["loop_seconds"]
    # Per CPU-second too: on a shared machine, wall time also counts the time other processes ran.
    outcome["tokens_per_cpu_second"] = outcome["real_tokens"] / outcome["loop_cpu_seconds"]
    print(json.dumps(outcome))


# --- the comparison ------------------------------------------------------------------------------------


def measure(side: str, config: dict[str, Any]) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, __file__, "--worker", side, "--config", json.dumps(config)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"{side} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    numbers = [key for key, value in runs[0].items() if isinstance(value, int | float)]
    return {key: statistics.median(run[key] for run in runs) for key in numbers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", choices=["plain", "adaptery"], help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--records", type=int, default=240)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-seq-length", type=int, default=512)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None, help="torch threads on both sides")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, json.loads(args.config))
        return

    from adaptery.engine.demo_model import FINETUNE_DEFAULTS, build_demo_model
    from adaptery.training.runner import _thread_count

    threads = args.threads or _thread_count()
    with tempfile.TemporaryDirectory(prefix="bench-train-") as scratch:
        root = Path(scratch)
        model = build_demo_model(root / "model", hidden_size=args.hidden_size, num_layers=args.layers)
        data = root / "train.jsonl"
        write_dataset(data, args.records, args.seed)
        config = {
            "model": str(model),
            "data": str(data),
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "max_seq_length": args.max_seq_length,
            "rank": args.rank,
            "learning_rate": FINETUNE_DEFAULTS["learning_rate"],
            "seed": args.seed,
            "threads": threads,
        }
        sides = {"plain": ("plain", False), "adaptery": ("adaptery", False), "adaptery, packed": ("adaptery", True)}
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in sides}
        for repeat in range(args.repeats):  # interleaved, so machine noise hits every side alike
            for name, (side, packing) in sides.items():
                out = root / f"out-{name.replace(', ', '-')}-{repeat}"
                runs[name].append(measure(side, {**config, "packing": packing, "out": str(out)}))
    medians = {name: median_of(results) for name, results in runs.items()}
    plain = medians["plain"]
    result = {
        "config": {**{k: v for k, v in config.items() if k not in ("model", "data")}, "records": args.records},
        "model": {"hidden_size": args.hidden_size, "layers": args.layers},
        "medians": medians,
        "runs": runs,
        "speedup_vs_plain": {name: medians[name]["tokens_per_second"] / plain["tokens_per_second"] for name in medians},
        "cpu_speedup_vs_plain": {
            name: medians[name]["tokens_per_cpu_second"] / plain["tokens_per_cpu_second"] for name in medians
        },
        "rss_vs_plain": {name: medians[name]["peak_rss_mib"] / plain["peak_rss_mib"] for name in medians},
        "packed_useful_token_ratio": medians["adaptery, packed"]["useful_token_ratio"],
    }
    print(json.dumps(result, indent=2))
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2) + "\n")
    print()
    print(
        f"{args.records} chat records, {args.epochs} epoch, batch {args.batch_size}, max length "
        f"{args.max_seq_length}, LoRA rank {args.rank} on all linear layers, Llama width {args.hidden_size} "
        f"× {args.layers} layers, {threads} torch thread(s), median of {args.repeats}"
    )
    print()
    print(
        "| side | real tokens/s | × plain | tokens/CPU-s | × plain | loop s | wall s | peak RSS MiB | × plain "
        "| useful-token ratio |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, row in medians.items():
        print(
            f"| {name} | {row['tokens_per_second']:,.0f} | {result['speedup_vs_plain'][name]:.2f} | "
            f"{row['tokens_per_cpu_second']:,.0f} | {result['cpu_speedup_vs_plain'][name]:.2f} | "
            f"{row['loop_seconds']:.1f} | {row['wall_seconds']:.1f} | {row['peak_rss_mib']:,.0f} | "
            f"{result['rss_vs_plain'][name]:.2f} | {row['useful_token_ratio']:.3f} |"
        )


if __name__ == "__main__":
    main()
