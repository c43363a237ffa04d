"""Benchmark of structured outputs: what a JSON schema costs a shared batch, and each grammar engine's mask.

1. Throughput of the engine's batched step: a batch of 32 requests where half carry a JSON schema
   (`response_format` json_schema: llguidance masks their rows) against the same 32 unconstrained, in the same
   run, rounds alternating; goal: constrained / free >= 0.90. The schema (an object holding an array of
   at least 64 strings) cannot complete within the budget, so both sides generate the same number of tokens
   (a schema the random model could close early left the batch half empty and measured that). On a shared
   machine other loads swing single rounds by 2-3x, so the best round of each side is the headline (the
   median is printed too), and the time the step spends in the masks is measured directly: its share of the
   constrained rounds' time is what the schema costs the batch, whatever the machine's noise.
2. The per-token mask cost of each grammar engine tried, llguidance and xgrammar, on the same schema and the
   same token sequence: the schema's compile time, then µs per token to fill one request's mask, and per step
   for 16 requests' masks at once (llguidance on its thread pool, xgrammar one after another).

The model is a random-initialised Llama (width 512, 4 layers by default) with a byte-level BPE tokenizer
trained on the text shipped with the project (tests/data, adaptery/samples), target vocabulary 32k: mask costs
grow with the vocabulary, so the vocabulary it reached is printed with the figures.

    .venv/bin/python bench/structured.py --quick     # a smoke run
    .venv/bin/python bench/structured.py             # the measurement
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import llguidance.torch as lltorch
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from adaptery.engine.batching import BatchEngine
from adaptery.engine.constraints import Grammars, json_grammar
from adaptery.engine.native import NativeLlama
from adaptery.engine.sampling import SamplingParams

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = {
    "type": "object",
    # at least 64 tags: no output of 64 tokens completes it, so constrained requests run as long as free ones
    "properties": {"title": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}, "minItems": 64}},
    "required": ["title", "tags"],
    "additionalProperties": False,
}
SAMPLE = {"title": "The lab's cluster", "tags": ["gpu", "slurm", "fine-tuning", "adapters", "lora"] * 13}


def shipped_texts() -> list[str]:
    files = [*ROOT.glob("tests/data/**/*.json*"), *ROOT.glob("adaptery/samples/*")]
    return [path.read_text(encoding="utf-8", errors="ignore") for path in files if path.is_file()]


def build_tokenizer(vocab: int) -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|end|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    backend.train_from_iterator(shipped_texts(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|end|>")


def throughput(engine: BatchEngine, prompts: list[list[int]], constrained: bool, max_tokens: int) -> float:
    """Generated tokens per second of the batch (every request runs to `max_tokens`: EOS is not a token the
    random model picks within the budget, and the schema cannot end sooner)."""
    free = SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=0)
    schema = SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=0, constraint=json_grammar(SCHEMA))
    started = time.perf_counter()
    requests = [engine.submit(p, schema if constrained and i % 2 else free, None, None) for i, p in enumerate(prompts)]
    tokens = 0
    for request in requests:
        while request.events.get(timeout=600).finish is None:
            tokens += 1
    return tokens / (time.perf_counter() - started)


def token_ids(tokenizer: PreTrainedTokenizerFast) -> list[int]:
    return tokenizer(json.dumps(SAMPLE), add_special_tokens=False)["input_ids"]


def llguidance_costs(tokenizer: PreTrainedTokenizerFast, vocab: int, ids: list[int]) -> dict:
    grammars = Grammars(tokenizer, vocab, {tokenizer.eos_token_id})
    grammars.matcher(json_grammar(SCHEMA))  # builds the tokenizer, once per base model
    started = time.perf_counter()
    matcher = grammars.matcher(json_grammar(SCHEMA))
    compile_ms = (time.perf_counter() - started) * 1e3
    bitmask = lltorch.allocate_token_bitmask(16, vocab)
    single = []
    for token in ids:
        started = time.perf_counter()
        lltorch.fill_next_token_bitmask(matcher, bitmask, 0)
        single.append(time.perf_counter() - started)
        matcher.consume_token(token)
    matchers = [grammars.matcher(json_grammar(SCHEMA)) for _ in range(16)]
    batch = []
    for token in ids:
        started = time.perf_counter()
        lltorch.fill_next_token_bitmask_par(grammars.executor, [(m, i) for i, m in enumerate(matchers)], bitmask)
        batch.append(time.perf_counter() - started)
        for m in matchers:
            m.consume_token(token)
    return {"compile_ms": compile_ms, "us_per_token": statistics.median(single) * 1e6,
            "us_per_step_16": statistics.median(batch) * 1e6}  # fmt: skip


def xgrammar_costs(tokenizer: PreTrainedTokenizerFast, vocab: int, ids: list[int]) -> dict:
    try:
        import xgrammar as xgr  # the comparison only: `pip install -e '.[bench]'` (it pulls triton)
    except ImportError:
        return {"skipped": "xgrammar is not installed: pip install -e '.[bench]'"}
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab, stop_token_ids=[tokenizer.eos_token_id])
    compiler = xgr.GrammarCompiler(info, cache_enabled=False)
    started = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False, separators=(", ", ": "))
    compile_ms = (time.perf_counter() - started) * 1e3
    bitmask = xgr.allocate_token_bitmask(16, vocab)
    matcher = xgr.GrammarMatcher(compiled)
    single = []
    for token in ids:
        started = time.perf_counter()
        matcher.fill_next_token_bitmask(bitmask, 0)
        single.append(time.perf_counter() - started)
        matcher.accept_token(token)
    matchers = [xgr.GrammarMatcher(compiled) for _ in range(16)]
    batch = []
    for token in ids:
        started = time.perf_counter()
        for i, m in enumerate(matchers):
            m.fill_next_token_bitmask(bitmask, i)
        batch.append(time.perf_counter() - started)
        for m in matchers:
            m.accept_token(token)
    return {"compile_ms": compile_ms, "us_per_token": statistics.median(single) * 1e6,
            "us_per_step_16": statistics.median(batch) * 1e6}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 layers, 16 tokens, one round")
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--vocab", type=int, default=32000, help="the tokenizer's target vocabulary")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=None, help="tokens per request (default 64; quick: 16)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds, sides alternating (default 3; quick: 1)")
    args = parser.parse_args()
    layers = args.layers or (2 if args.quick else 4)
    max_tokens = args.tokens or (16 if args.quick else 64)
    rounds = args.rounds or (1 if args.quick else 3)

    tokenizer = build_tokenizer(args.vocab)
    vocab = -(-len(tokenizer) // 64) * 64
    config = LlamaConfig(vocab_size=vocab, hidden_size=args.width, intermediate_size=args.width * 8 // 3 // 64 * 64,
                         num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=8,
                         max_position_embeddings=512, eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    torch.manual_seed(0)
    hf = LlamaForCausalLM(config).float().eval()
    engine = BatchEngine("bench", NativeLlama(hf, torch.float32, 512), set(), max_rank=8, kv_cache_bytes=256 << 20,
                         adapter_cache_bytes=1 << 24, max_batch=args.batch,
                         grammars=Grammars(tokenizer, vocab, {tokenizer.eos_token_id})).start()  # fmt: skip
    words = ["Describe", "the", "lab's", "cluster", "and", "its", "adapters", "in", "JSON"]
    prompts = [tokenizer(" ".join(words[: 3 + i % 7]))["input_ids"] for i in range(args.batch)]
    masking = {"seconds": 0.0}
    mask = engine.grammars.mask

    def timed_mask(logits: torch.Tensor, rows: list) -> None:
        started = time.perf_counter()
        mask(logits, rows)
        masking["seconds"] += time.perf_counter() - started

    engine.grammars.mask = timed_mask
    constrained_seconds = 0.0
    try:
        throughput(engine, prompts[:4], True, 4)  # warm-up: the grammar tokenizer, the kernels
        masking["seconds"] = 0.0
        runs: dict[str, list[float]] = {"free": [], "half_constrained": []}
        for round_ in range(rounds):
            for side in ("free", "half_constrained") if round_ % 2 == 0 else ("half_constrained", "free"):
                started = time.perf_counter()
                runs[side].append(throughput(engine, prompts, side != "free", max_tokens))
                if side == "half_constrained":  # the only rounds that call the masks
                    constrained_seconds += time.perf_counter() - started
            print("round", round_, {k: round(v[-1]) for k, v in runs.items()}, flush=True)
    finally:
        engine.stop()
    free, constrained = (max(runs[k]) for k in ("free", "half_constrained"))
    median_free, median_constrained = (statistics.median(runs[k]) for k in ("free", "half_constrained"))
    mask_share = masking["seconds"] / constrained_seconds
    ids = token_ids(tokenizer)
    engines = {"llguidance": llguidance_costs(tokenizer, vocab, ids), "xgrammar": xgrammar_costs(tokenizer, vocab, ids)}
    result = {
        "vocab": vocab, "width": args.width, "layers": layers, "batch": args.batch, "tokens_per_request": max_tokens,
        "rounds": rounds, "free_tokens_per_s": free, "half_constrained_tokens_per_s": constrained,
        "ratio": constrained / free, "goal": 0.90, "median_ratio": median_constrained / median_free,
        "mask_share_of_constrained_time": mask_share, "runs": runs, "grammar_engines": engines,
        "mask_tokens_measured": len(ids),
    }  # fmt: skip
    print(json.dumps(result, indent=2))
    print()
    print(f"| batch of {args.batch}, vocab {vocab} | tokens/s |")
    print("| --- | --- |")
    print(f"| all free (best round; median {median_free:.0f}) | {free:.0f} |")
    print(f"| half with a JSON schema, llguidance (best round; median {median_constrained:.0f}) | {constrained:.0f} |")
    medians = median_constrained / median_free
    print(f"| ratio, best rounds (goal >= 0.90; medians: {medians:.3f}) | {constrained / free:.3f} |")
    print(f"| time in the masks / time of the constrained rounds | {mask_share:.4f} |")
    print()
    print("| grammar engine | schema compile, ms | mask, µs/token (1 request) | masks of 16 requests, µs/step |")
    print("| --- | --- | --- | --- |")
    for name, cost in engines.items():
        if "skipped" in cost:
            print(f"| {name} | {cost['skipped']} | | |")
        else:
            print(f"| {name} | {cost['compile_ms']:.2f} | {cost['us_per_token']:.1f} | {cost['us_per_step_16']:.1f} |")


if __name__ == "__main__":
    with tempfile.TemporaryDirectory():
        main()
