"""int8 base-weight quantization (torchao): its speed in the engine and its quality cost.

Quality: perplexity of a held-out sample under the model in the compute dtype and with its seven
projections quantized the same way the engine does (torchao `Int8DynamicActivationInt8WeightConfig`:
per-channel int8 weights, per-token int8 activations; embeddings, norms and LM head untouched), plus
the mean KL divergence between the two next-token distributions and how often their top tokens agree.
`--model DIR --text FILE` measures a real Hugging Face model on a real text; without them (no model
hub here) it measures the random-initialised bench model (bench/engine.py) on a sample drawn from that
model itself, which shows how far quantization moves the distribution but not a language model's
perplexity. Speed: engine throughput on the base model, same requests, both variants alternating.

    .venv/bin/python bench/quant.py                       # random bench model, bf16
    .venv/bin/python bench/quant.py --model DIR --text held_out.txt --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).parent))
from engine import build_model, run_engine, workload  # noqa: E402  (bench/engine.py)

from adaptery.engine.batching import BatchEngine  # noqa: E402
from adaptery.engine.native import NativeLlama  # noqa: E402

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def quantized_copy(model: torch.nn.Module) -> torch.nn.Module:
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    clone = type(model)(model.config).to(next(model.parameters()).dtype).eval()
    clone.load_state_dict(model.state_dict())

    def projection(module: torch.nn.Module, name: str) -> bool:
        return isinstance(module, torch.nn.Linear) and name.endswith(TARGETS)

    quantize_(clone, Int8DynamicActivationInt8WeightConfig(), filter_fn=projection)
    return clone


def quality(reference: torch.nn.Module, quantized: torch.nn.Module, samples: list[list[int]]) -> dict:
    nll = {"reference": 0.0, "int8": 0.0}
    kl, agree, count = 0.0, 0, 0
    with torch.inference_mode():
        for ids in samples:
            x = torch.tensor([ids])
            ref = F.log_softmax(reference(input_ids=x).logits[0, :-1].float(), -1)
            q8 = F.log_softmax(quantized(input_ids=x).logits[0, :-1].float(), -1)
            target = x[0, 1:]
            nll["reference"] -= float(ref.gather(1, target[:, None]).sum())
            nll["int8"] -= float(q8.gather(1, target[:, None]).sum())
            kl += float((ref.exp() * (ref - q8)).sum())
            agree += int((ref.argmax(-1) == q8.argmax(-1)).sum())
            count += len(target)
    ppl_ref, ppl_q = math.exp(nll["reference"] / count), math.exp(nll["int8"] / count)
    return {
        "tokens": count,
        "perplexity_reference": ppl_ref,
        "perplexity_int8": ppl_q,
        "perplexity_increase_pct": (ppl_q / ppl_ref - 1) * 100,
        "mean_kl_nats": kl / count,
        "top1_agreement_pct": agree / count * 100,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="a Hugging Face Llama-family model directory")
    parser.add_argument("--text", type=Path, default=None, help="held-out text for the perplexity")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--samples", type=int, default=4, help="held-out sequences drawn (random model only)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 2)
    dtype = getattr(torch, args.dtype)
    if args.model:
        hf = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        ids = tokenizer(args.text.read_text(encoding="utf-8"))["input_ids"]
        samples = [ids[i : i + 256] for i in range(0, min(len(ids), 256 * 16) - 1, 256)]
        source = f"{args.model} on {args.text}"
    else:
        hf = build_model(1024, 8, 8192)
        generator = torch.Generator().manual_seed(7)
        with torch.inference_mode():  # held-out sample: drawn from the reference model at temperature 1
            ids = torch.randint(10, 8192, (args.samples, 8), generator=generator)
            out = hf.generate(ids, max_new_tokens=120, do_sample=True, top_k=0, temperature=1.0, pad_token_id=0,
                              eos_token_id=None)  # fmt: skip
        samples = out.tolist()
        source = "random-initialised bench model (width 1024, 8 layers), sample drawn from the model itself"
    model = hf.to(dtype)
    result: dict = {"source": source, "dtype": args.dtype, "method": "torchao Int8DynamicActivationInt8WeightConfig"}
    result["quality"] = quality(model, quantized_copy(model), samples)
    print(json.dumps(result["quality"]), flush=True)
    engines = {
        name: BatchEngine(
            name,
            NativeLlama(model, dtype, 1024, quantize=q),
            set(),
            max_rank=16,
            kv_cache_bytes=256 << 20,
            adapter_cache_bytes=1 << 30,
        ).start()  # fmt: skip
        for name, q in (("reference", None), ("int8", "int8"))
    }
    vocab = model.config.vocab_size
    reqs = workload(args.requests, 200.0, (16, 64), (16, 48), vocab, seed=1)
    runs: dict[str, list[float]] = {name: [] for name in engines}
    for engine in engines.values():
        run_engine(engine, reqs[:8], [])
    for round_ in range(args.repeats):
        for name in ("reference", "int8") if round_ % 2 == 0 else ("int8", "reference"):
            runs[name].append(run_engine(engines[name], reqs, [])["tokens_per_s"])
    for engine in engines.values():
        engine.stop()
    result["engine_tokens_per_s"] = {name: statistics.median(v) for name, v in runs.items()}
    result["engine_tokens_per_s_repeats"] = runs
    result["speedup"] = result["engine_tokens_per_s"]["int8"] / result["engine_tokens_per_s"]["reference"]
    print(json.dumps(result, indent=2))
    q = result["quality"]
    print(f"\n| {args.dtype} | tokens/s | perplexity | KL (nats) | top-1 agreement |\n| --- | --- | --- | --- | --- |")
    print(f"| reference | {result['engine_tokens_per_s']['reference']:.0f} | {q['perplexity_reference']:.2f} | – | – |")
    q8 = f"{q['perplexity_int8']:.2f} ({q['perplexity_increase_pct']:+.2f}%)"
    print(f"| int8 (torchao) | {result['engine_tokens_per_s']['int8']:.0f} | {q8} | {q['mean_kl_nats']:.4f} "
          f"| {q['top1_agreement_pct']:.1f}% |")  # fmt: skip


if __name__ == "__main__":
    main()
