"""The native engine against PEFT: token-identical greedy decoding per method, mixed batches equal
to each request alone, preemption, cancellation, sampling options, and the transformers path."""

from __future__ import annotations

import itertools
import json
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from engine_helpers import collect, engine_tokens, make_adapter, reference_greedy
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from adaptery.engine import batching, lora_kernel
from adaptery.engine.batching import BatchEngine
from adaptery.engine.embeddings import EmbeddingModel
from adaptery.engine.generation import AdapterRejected, AdapterSpec, GenerationTimedOut, InferenceEngine, Usage
from adaptery.engine.kvcache import PagedKVCache
from adaptery.engine.lora import LoraBatch, SlotBuffers, prepare_adapter
from adaptery.engine.native import SITES, NativeLlama
from adaptery.engine.native import _bf16_dot_products as native_bf16_dot_products
from adaptery.engine.native import _linear as native_linear
from adaptery.engine.native import _rms as native_rms
from adaptery.engine.native import _rotate as native_rotate
from adaptery.engine.sampling import SamplingParams

PROMPTS = ["Hello there, how are you", "The capital of France is", "<|user|>What does an adapter do?<|end|>"]
STEPS = 10


@pytest.fixture(scope="module")
def engine(demo_model_dir: Path):
    # adapters held exact (fp32): these tests compare the engine's arithmetic with PEFT's token for token
    eng = InferenceEngine(
        dtype="float32", kv_cache_mb=8, adapter_cache_mb=64, max_batch=16, max_lora_rank=32, adapter_dtype="float32"
    )
    eng.base("demo", str(demo_model_dir))
    yield eng
    eng.stop()


@pytest.fixture(scope="module")
def adapters(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    made = {kind: make_adapter(demo_model_dir, root / kind, kind, rank=8, seed=i) for i, kind in
            enumerate(["lora", "rslora", "dora"])}  # fmt: skip
    made["lora_qv_r4"] = make_adapter(demo_model_dir, root / "qv", "lora", rank=4, seed=7, targets=["q_proj", "v_proj"])
    made["lora_r16"] = make_adapter(demo_model_dir, root / "r16", "lora", rank=16, seed=8)
    made["dora_r4"] = make_adapter(demo_model_dir, root / "dora4", "dora", rank=4, seed=9)
    made["rslora_r12"] = make_adapter(demo_model_dir, root / "rs12", "rslora", rank=12, seed=10)
    made["lora_mlp"] = make_adapter(
        demo_model_dir, root / "mlp", "lora", rank=8, seed=11, targets=["down_proj", "up_proj"]
    )
    return made


def _prompt(engine: InferenceEngine, text: str) -> list[int]:
    return engine.text_prompt("demo", "", text)


def _events(request: batching.Request, timeout: float = 60) -> list[batching.Event]:
    """A request's token events, up to its finish."""
    events = []
    while (event := request.events.get(timeout=timeout)).finish is None:
        events.append(event)
    assert event.finish != "error", event.error
    return events


@pytest.mark.parametrize("kind", ["lora", "rslora", "dora"])
def test_greedy_matches_peft_merged(engine, adapters, demo_model_dir, kind):
    native = engine.base("demo", "").native
    eos = engine.base("demo", "").eos_ids
    for text in PROMPTS:
        prompt = _prompt(engine, text)
        got = engine_tokens(native, prompt, (kind, adapters[kind]), max_tokens=STEPS)
        assert got == reference_greedy(demo_model_dir, adapters[kind], prompt, STEPS, eos), (kind, text)
    assert engine.check_adapter(AdapterSpec(kind, adapters[kind])).native


def test_base_model_matches_transformers(engine, demo_model_dir):
    eos = engine.base("demo", "").eos_ids
    prompt = _prompt(engine, PROMPTS[0])
    got = engine_tokens(engine.base("demo", "").native, prompt, None, max_tokens=STEPS)
    assert got == reference_greedy(demo_model_dir, None, prompt, STEPS, eos)


def test_mixed_batch_of_eight_adapters_and_base_equals_each_alone(engine, adapters):
    native = engine.base("demo", "").native
    jobs = [(name, path) for name, path in adapters.items()] + [None]
    assert len(jobs) == 9
    prompts = [_prompt(engine, PROMPTS[i % len(PROMPTS)] + " " * (i % 3)) for i in range(len(jobs))]
    alone = [engine_tokens(native, prompt, job, max_tokens=STEPS) for prompt, job in zip(prompts, jobs, strict=True)]
    steps_before = native.steps
    requests = [
        native.submit(prompt, SamplingParams(max_tokens=STEPS, temperature=0.0), *(job or (None, None)))
        for prompt, job in zip(prompts, jobs, strict=True)
    ]
    together = [collect(r) for r in requests]
    assert together == alone
    # they really shared steps: far fewer than running them one after another
    assert native.steps - steps_before < sum(len(t) for t in alone)


def test_preemption_recomputes_and_loses_nothing(demo_model_dir, adapters):
    # a KV cache of 12 blocks (192 tokens) for 6 requests of ~60 tokens each: some must be preempted
    eng = InferenceEngine(dtype="float32", max_batch=8, max_lora_rank=32)
    try:
        base = eng.base("demo", str(demo_model_dir))
        per_token = len(base.native.model.layers) * 2 * base.native.model.kv_size * 4
        tight = InferenceEngine(dtype="float32", max_batch=8, max_lora_rank=32, kv_cache_mb=1)
        tight.kv_cache_bytes = per_token * 16 * 12
        native = tight.base("demo", str(demo_model_dir)).native
        assert native.cache.num_blocks == 12
        prompts = [_prompt(eng, (PROMPTS[i % 3] + " again") * 3)[:30] for i in range(6)]
        jobs = [("lora", adapters["lora"]), None, ("dora", adapters["dora"]), None, ("lora", adapters["lora"]), None]
        alone = [engine_tokens(base.native, p, j, max_tokens=30) for p, j in zip(prompts, jobs, strict=True)]
        requests = [
            native.submit(p, SamplingParams(max_tokens=30, temperature=0.0), *(j or (None, None)))
            for p, j in zip(prompts, jobs, strict=True)
        ]
        assert [collect(r) for r in requests] == alone
        assert native.metrics.preemptions.labels("demo")._value.get() > 0
        assert native.cache.used_blocks == 0
        tight.stop()
    finally:
        eng.stop()


def test_chunked_prefill_of_a_long_prompt(demo_model_dir):
    eng = InferenceEngine(dtype="float32", max_batch=4, max_step_tokens=8)
    try:
        native = eng.base("demo", str(demo_model_dir)).native
        prompt = _prompt(eng, " ".join(PROMPTS) * 2)
        assert len(prompt) > 24  # several chunks of 8 tokens minus decodes
        eos = eng.base("demo", "").eos_ids
        assert engine_tokens(native, prompt, None, max_tokens=6) == reference_greedy(
            demo_model_dir, None, prompt, 6, eos
        )
    finally:
        eng.stop()


def test_cancel_frees_the_slot_at_once(engine):
    native = engine.base("demo", "").native
    request = native.submit(_prompt(engine, PROMPTS[0]), SamplingParams(max_tokens=500, temperature=0.0), None, None)
    request.events.get(timeout=30)  # it is running
    request.cancel()
    deadline = time.time() + 5
    while (native.running or native.cache.used_blocks) and time.time() < deadline:
        time.sleep(0.01)
    assert not native.running and native.cache.used_blocks == 0


def test_generate_stops_when_the_client_goes_away(engine):
    stop = {"now": False}
    deltas = engine.generate(
        "demo", "", None, _prompt(engine, PROMPTS[1]), SamplingParams(max_tokens=400, temperature=0.0), Usage(),
        should_stop=lambda: stop["now"],
    )  # fmt: skip
    next(deltas)
    stop["now"] = True
    assert list(deltas)[-1].finish_reason == "stop"
    native = engine.base("demo", "").native
    deadline = time.time() + 5
    while native.running and time.time() < deadline:
        time.sleep(0.01)
    assert not native.running


def test_a_prompt_the_engine_cannot_run_is_refused_at_submit(engine):
    # an empty prompt was admitted to the batch, never scheduled, and spun the engine thread for ever
    native = engine.base("demo", "").native
    params = SamplingParams(max_tokens=4, temperature=0.0)
    for prompt, why in [([], "empty"), ([native.model.vocab], "vocabulary"), ([-1], "vocabulary")]:
        with pytest.raises(ValueError, match=why):
            native.submit(prompt, params, None, None)
    assert not native.running and not native.waiting and not native.incoming
    assert len(engine_tokens(native, _prompt(engine, PROMPTS[0]), None, max_tokens=3)) == 3


def test_a_request_past_its_deadline_is_ended_and_its_slot_freed(demo_model_dir):
    # one batch slot: the first request runs, the second waits behind it, and both outstay a 1 s deadline
    eng = InferenceEngine(dtype="float32", kv_cache_mb=8, max_batch=1, request_timeout_s=1.0)
    try:
        native = eng.base("demo", str(demo_model_dir)).native
        prompt = _prompt(eng, PROMPTS[0])
        native.eos_ids = set()  # only the deadline can end them before ~1000 tokens (seconds on a CPU)
        params = SamplingParams(max_tokens=eng.base("demo", "").context - len(prompt), temperature=0.0)
        running, queued = (native.submit(prompt, params, None, None) for _ in range(2))
        for request in (running, queued):
            while (event := request.events.get(timeout=30)).finish is None:
                pass
            assert event.finish == "timeout" and "deadline of 1 s" in event.error, event
        assert not native.running and not native.waiting and native.cache.used_blocks == 0
        assert native.metrics.requests.labels("demo", "native", "timeout")._value.get() == 2
        assert len(engine_tokens(native, prompt, None, max_tokens=3)) == 3  # a new request has a deadline of its own
    finally:
        eng.stop()


def test_generate_raises_when_the_engine_ends_a_request_at_its_deadline(demo_model_dir):
    eng = InferenceEngine(dtype="float32", kv_cache_mb=8, request_timeout_s=0.5)
    try:
        eng.base("demo", str(demo_model_dir)).native.eos_ids = set()
        prompt = _prompt(eng, PROMPTS[0])
        deltas = eng.generate("demo", "", None, prompt, SamplingParams(max_tokens=900, temperature=0.0), Usage())
        with pytest.raises(GenerationTimedOut, match="deadline"):
            list(deltas)
    finally:
        eng.stop()


def test_a_request_whose_sampling_fails_ends_alone(engine, monkeypatch):
    # a failure in one request's sampling used to fail the whole step: every tenant's requests in the batch
    native = engine.base("demo", "").native
    prompt = _prompt(engine, PROMPTS[0])
    alone = engine_tokens(native, prompt, None, max_tokens=STEPS)
    real = batching.sample

    def failing(logits, params, generator, counts):  # noqa: ANN001, ANN202 - sample()'s signature
        if params.seed == 13 and sum(counts.values()) >= 2:  # by now the other request shares the batch
            raise RuntimeError("sampling blew up")
        return real(logits, params, generator, counts)

    monkeypatch.setattr(batching, "sample", failing)
    doomed = native.submit(
        prompt, SamplingParams(max_tokens=STEPS, temperature=0.0, logprobs=True, seed=13), None, None
    )
    bystander = native.submit(prompt, SamplingParams(max_tokens=STEPS, temperature=0.0), None, None)
    with pytest.raises(RuntimeError, match="sampling blew up"):
        collect(doomed)
    assert collect(bystander) == alone
    assert not native.running and native.cache.used_blocks == 0


def test_sampling_options(engine):
    prompt = _prompt(engine, PROMPTS[0])
    native = engine.base("demo", "").native
    greedy = engine_tokens(native, prompt, None, max_tokens=STEPS)

    def run(**params):
        return engine_tokens(native, prompt, None, **{"max_tokens": STEPS, **params})

    assert run(temperature=1.0, top_k=1) == greedy
    assert run(temperature=1.0, seed=5) == run(temperature=1.0, seed=5)
    assert run(temperature=1.5, seed=5) != run(temperature=1.5, seed=6)
    # a strong frequency penalty forbids repeating any token
    repeated = run(max_tokens=40)
    penalized = run(max_tokens=40, frequency_penalty=2.0, presence_penalty=2.0)
    assert len(set(penalized)) >= len(set(repeated))
    assert penalized != repeated or len(set(repeated)) == len(repeated)
    request = native.submit(
        prompt, SamplingParams(max_tokens=3, temperature=0.0, logprobs=True, top_logprobs=3), None, None
    )
    events = []
    while (event := request.events.get(timeout=30)).finish is None:
        events.append(event)
    for event in events:
        assert event.logprob.token_id == event.token
        assert event.logprob.top[0] == (event.token, pytest.approx(event.logprob.logprob))
        assert len(event.logprob.top) == 3 and event.logprob.logprob <= 0


def test_rank_above_the_limit_is_refused(engine, demo_model_dir, tmp_path):
    big = make_adapter(demo_model_dir, tmp_path / "r64", "lora", rank=64)
    with pytest.raises(AdapterRejected, match="rank 64 is above this server's maximum LoRA rank of 32"):
        engine.check_adapter(AdapterSpec("big", big))


@pytest.mark.parametrize("kind", ["loha", "lokr", "ia3"])
def test_other_peft_types_through_peft(engine, demo_model_dir, tmp_path, kind):
    adapter = make_adapter(demo_model_dir, tmp_path / kind, kind, rank=4, seed=3)
    info = engine.check_adapter(AdapterSpec(kind, adapter))
    assert not info.native and "through PEFT" in info.path_reason
    prompt = _prompt(engine, PROMPTS[2])
    deltas = list(engine.generate("demo", "", AdapterSpec(kind, adapter), prompt,
                                  SamplingParams(max_tokens=STEPS, temperature=0.0), Usage()))  # fmt: skip
    eos = engine.base("demo", "").eos_ids
    expected = reference_greedy(demo_model_dir, adapter, prompt, STEPS, eos, merge=False)
    tokenizer = engine.base("demo", "").tokenizer
    assert "".join(d.text for d in deltas) == tokenizer.decode(expected, skip_special_tokens=True)
    assert engine.describe()["adapters"][kind]["served"] == info.path_reason


def _tiny(config_cls, model_cls, **extra):
    config = config_cls(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, **extra,
    )  # fmt: skip
    torch.manual_seed(0)
    return model_cls(config).eval()


@pytest.mark.parametrize(
    ("config_cls", "model_cls", "extra"),
    [
        (Qwen2Config, Qwen2ForCausalLM, {}),
        (Qwen3Config, Qwen3ForCausalLM, {"head_dim": 32}),
        (MistralConfig, MistralForCausalLM, {"sliding_window": None}),
    ],
)
def test_other_llama_family_architectures_match_transformers(config_cls, model_cls, extra):
    hf = _tiny(config_cls, model_cls, **extra)
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.5)  # Qwen2's q/k/v biases start at zero; make them count
    native = BatchEngine("t", NativeLlama(hf, torch.float32, 128), set(), max_rank=8, kv_cache_bytes=1 << 20,
                         adapter_cache_bytes=1 << 20).start()  # fmt: skip
    try:
        prompt = [5, 17, 42, 9, 3, 77]
        ids, expected = list(prompt), []
        with torch.inference_mode():
            for _ in range(8):
                token = int(hf(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
                expected.append(token)
                ids.append(token)
        assert engine_tokens(native, prompt, None, max_tokens=8) == expected
    finally:
        native.stop()


def test_non_llama_models_use_the_transformers_path(demo_model_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=4, n_positions=256)
    config.eos_token_id = tokenizer.eos_token_id
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    tokenizer.save_pretrained(tmp_path / "gpt2")
    eng = InferenceEngine(dtype="float32")
    try:
        base = eng.base("gpt2", str(tmp_path / "gpt2"))
        assert base.path == "transformers" and "not in the native Llama family" in base.path_reason
        usage = Usage()
        deltas = list(eng.generate("gpt2", "", None, eng.text_prompt("gpt2", "", "Hello"),
                                   SamplingParams(max_tokens=5, temperature=0.0), usage))  # fmt: skip
        assert deltas[-1].finish_reason in ("stop", "length") and usage.completion_tokens <= 5
        assert eng.describe()["bases"]["gpt2"]["path"] == "transformers"
        eng.request_timeout_s = 0.3  # one request at a time: waiting for the others counts toward the deadline
        prompt = eng.text_prompt("gpt2", "", "Hello")
        with base.fallback().lock, pytest.raises(GenerationTimedOut, match="deadline"):
            list(eng.generate("gpt2", "", None, prompt, SamplingParams(max_tokens=5), Usage()))
    finally:
        eng.stop()


def test_lora_runs_in_the_fused_kernel_when_it_builds(engine):
    native = engine.base("demo", "").native
    if lora_kernel.load() is None:  # no C compiler on this machine: the PyTorch path serves (tested below)
        assert native.lora_path.startswith("PyTorch")
    else:
        assert native.lora_path == "fused C kernel" and native.slots.kernel is not None


def test_pytorch_lora_path_matches_peft_and_mixes(demo_model_dir, adapters, monkeypatch):
    monkeypatch.setenv("ADAPTERY_LORA_KERNEL", "0")
    eng = InferenceEngine(dtype="float32", kv_cache_mb=8, adapter_cache_mb=64, max_batch=16, max_lora_rank=32)
    try:
        base = eng.base("demo", str(demo_model_dir))
        native = base.native
        assert native.lora_path.startswith("PyTorch") and native.slots.kernel is None
        prompt = _prompt(eng, PROMPTS[1])
        for kind in ["lora", "rslora", "dora", "lora_qv_r4"]:
            got = engine_tokens(native, prompt, (kind, adapters[kind]), max_tokens=STEPS)
            assert got == reference_greedy(demo_model_dir, adapters[kind], prompt, STEPS, base.eos_ids), kind
        jobs = [(name, path) for name, path in adapters.items()] + [None]
        prompts = [_prompt(eng, PROMPTS[i % len(PROMPTS)] + " " * (i % 3)) for i in range(len(jobs))]
        alone = [engine_tokens(native, p, job, max_tokens=6) for p, job in zip(prompts, jobs, strict=True)]
        requests = [native.submit(p, SamplingParams(max_tokens=6, temperature=0.0), *(job or (None, None)))
                    for p, job in zip(prompts, jobs, strict=True)]  # fmt: skip
        assert [collect(r) for r in requests] == alone
    finally:
        eng.stop()


def test_a_kernel_that_fails_to_build_falls_back_to_pytorch(demo_model_dir, monkeypatch, tmp_path):
    monkeypatch.setattr(lora_kernel, "_loaded", {})
    monkeypatch.setenv("ADAPTERY_KERNEL_CACHE", str(tmp_path / "kernels"))
    monkeypatch.setenv("CC", "/bin/false")  # a compiler that fails
    assert lora_kernel.load() is None
    hf = _tiny(Qwen2Config, Qwen2ForCausalLM)
    native = BatchEngine("t", NativeLlama(hf, torch.float32, 128), set(), max_rank=8, kv_cache_bytes=1 << 20,
                         adapter_cache_bytes=1 << 20).start()  # fmt: skip
    try:
        assert native.slots.kernel is None and native.lora_path.startswith("PyTorch")
        assert engine_tokens(native, [5, 17, 42], None, max_tokens=3)
    finally:
        native.stop()
    with pytest.raises(RuntimeError, match="kernel was required"):
        BatchEngine("t", NativeLlama(hf, torch.float32, 128), set(), max_rank=8, kv_cache_bytes=1 << 20,
                    adapter_cache_bytes=1 << 20, lora_kernel=True)  # fmt: skip


KERNEL_COUNTS = [3, 1, 9, 1, 12, 5]  # tiles of 1-4 rows of one adapter; without tiles, >= 8 rows go to matmuls


def _kernel_outputs(model, adapters, kernel, adapter_dtype, counts, dtype):
    """Per site: (base, base + LoRA) for 2 base rows and then `counts` rows per adapter of mixed ranks."""
    names = ["lora", "rslora", "lora_qv_r4", "lora_r16", "rslora_r12", "dora"][: len(counts)]  # partial targets too
    slots = SlotBuffers(model, 8, 32, kernel, adapter_dtype)
    for name in names:
        slots.activate(prepare_adapter(name, adapters[name], model, 32, slots.dtype))
    token_slots = torch.tensor([s for s, c in enumerate(counts) for _ in range(c)], dtype=torch.int32)
    generator = torch.Generator().manual_seed(0)
    outs = {}
    for site in SITES:
        x = torch.randn(2 + len(token_slots), model.site_in[site], generator=generator).to(dtype)
        base = torch.randn(x.shape[0], sum(model.site_out[site]), generator=generator).to(dtype)
        out = base.clone()
        LoraBatch(slots, 2, counts, token_slots).apply(1, site, x, out)
        outs[site] = (base.float(), out.float())
    return outs


@pytest.mark.parametrize("path", ["kernel", "pytorch"])
def test_an_adapter_moved_into_a_freed_slot_computes_what_it_did(demo_model_dir, adapters, path):
    """Deactivating an adapter moves the last slot's adapter into the hole (the kernel's slots are addresses
    of the adapters' own tensors, the PyTorch path's a copy): every adapter left computes the same sums."""
    kernel = lora_kernel.load() if path == "kernel" else None
    if path == "kernel" and kernel is None:
        pytest.skip("no C compiler here")
    hf = AutoModelForCausalLM.from_pretrained(demo_model_dir, dtype=torch.float32)
    model = NativeLlama(hf, torch.float32, 64)
    slots = SlotBuffers(model, 4, 32, kernel)
    names = ["lora", "lora_r16", "rslora_r12", "lora_qv_r4"]
    for name in names:
        slots.activate(prepare_adapter(name, adapters[name], model, 32, slots.dtype))
    x = torch.randn(len(names), model.site_in["qkv"], generator=torch.Generator().manual_seed(1))

    def lora_of(keys: list[str]) -> dict[str, torch.Tensor]:  # one row per adapter, rows in slot order
        out = torch.zeros(len(keys), sum(model.site_out["qkv"]))
        order = sorted(keys, key=slots.slot_of)
        rows = x[[names.index(k) for k in order]]
        token_slots = torch.tensor([slots.slot_of(k) for k in order], dtype=torch.int32)
        LoraBatch(slots, 0, [1] * len(keys), token_slots).apply(0, "qkv", rows, out)
        return dict(zip(order, out, strict=True))

    before = lora_of(names)
    assert slots.deactivate("lora") == {3: 0}  # the last slot's adapter moved into slot 0
    assert slots.slot_of("lora_qv_r4") == 0 and slots.keys == ["lora_qv_r4", "lora_r16", "rslora_r12"]
    after = lora_of(names[1:])
    for name in names[1:]:
        torch.testing.assert_close(after[name], before[name], atol=1e-6, rtol=1e-6)
    assert all(before[name].abs().max() > 0.01 for name in names)  # lora_qv_r4, the one moved, too


@pytest.mark.parametrize("build", ["native", "portable"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_kernel_and_pytorch_path_compute_the_same_lora(demo_model_dir, adapters, dtype, build):
    library = lora_kernel.load(portable=build == "portable")
    if library is None:
        pytest.skip("no C compiler here: the fused kernel cannot be built (the PyTorch path is tested above)")
    hf = AutoModelForCausalLM.from_pretrained(demo_model_dir, dtype=torch.float32)
    model = NativeLlama(hf, dtype, 64)
    fused = _kernel_outputs(model, adapters, library, None, KERNEL_COUNTS, dtype)
    reference = _kernel_outputs(model, adapters, None, None, KERNEL_COUNTS, dtype)
    for site, (base, out) in fused.items():
        assert torch.equal(out[:2], base[:2])  # base rows untouched
        assert (out[2:] - base[2:]).abs().max() > 0.01  # the adapters did something
        # bf16: the kernel rounds once (fp32 sum + base), the PyTorch path twice, and the portable build's
        # matmuls for long runs round the rank-sized middle too; a bf16 step near 4 is 0.03
        atol, rtol = (1e-5, 1e-5) if dtype == torch.float32 else (0.08, 0.02)
        torch.testing.assert_close(
            out, reference[site][1], atol=atol, rtol=rtol, msg=lambda m, site=site: f"{site}: {m}"
        )


@pytest.mark.parametrize("build", ["native", "portable"])
@pytest.mark.parametrize(
    "dtype, adapter_dtype",
    [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16)],
    ids=["fp32", "bf16", "fp32-bf16-adapters"],
)
def test_the_kernel_on_widths_and_ranks_that_fit_no_vector(build, dtype, adapter_dtype):
    """Odd widths (tails shorter than a vector), ranks that fill no register block, skipped rows and runs of
    every tile size, against the sums written out in float64."""
    library = lora_kernel.load(portable=build == "portable")
    if library is None:
        pytest.skip("no C compiler here")
    generator = torch.Generator().manual_seed(3)
    d_in, offsets, max_rank, ranks = 101, [0, 37, 50, 69], 16, [5, 16, 12, 1, 7]
    slots = [0, 1, 1, -1, 2, 2, 2, 3, 4, 4, 4, 4, 4, 4, 4, 0, -1, 1]
    shrink = torch.randn(len(ranks), max_rank, 3, d_in, generator=generator).to(adapter_dtype)
    expand = torch.randn(len(ranks), max_rank, offsets[-1], generator=generator).to(adapter_dtype)
    x = torch.randn(len(slots), d_in, generator=generator).to(dtype)
    out = torch.randn(len(slots), offsets[-1], generator=generator).to(dtype)
    expected = out.double()
    for row, slot in enumerate(slots):
        if slot < 0:
            continue
        r = ranks[slot]
        u = torch.einsum("i,kpi->kp", x[row].double(), shrink[slot, :r].double())  # (rank, projection)
        for p in range(3):
            lo, hi = offsets[p], offsets[p + 1]
            expected[row, lo:hi] += u[:, p] @ expand[slot, :r, lo:hi].double()
    result = out.clone()
    lora_kernel.site(
        library, x, result, torch.tensor(slots, dtype=torch.int32), torch.tensor(ranks, dtype=torch.int32),
        lora_kernel.addresses(shrink), lora_kernel.addresses(expand), torch.tensor(offsets, dtype=torch.int64),
        max_rank, adapter_dtype,
    )  # fmt: skip
    skipped = [row for row, slot in enumerate(slots) if slot < 0]
    assert torch.equal(result[skipped], out[skipped])
    atol = 1e-4 if dtype == torch.float32 else 0.1  # bf16: the one rounding of outputs up to ~20
    torch.testing.assert_close(result.double(), expected, atol=atol, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5)


@pytest.mark.parametrize("build", ["native", "portable"])
def test_an_adapter_s_weights_are_converted_in_one_pass_as_torch_converts_them(build):
    """`convert_weights`, every source and target dtype, straight and transposed (B's layout), scaled or not, widths
    with and without a tail shorter than a vector, into a slice of a wider array: torch's `(source * scale).to(dtype)`
    bit for bit, ties to even included, the columns beside the slice untouched; bf16 copied unscaled keeps its bits."""
    library = lora_kernel.load(portable=build == "portable")
    if library is None:
        pytest.skip("no C compiler here")
    import numpy as np

    def bits(tensor: torch.Tensor) -> np.ndarray:  # as the loader holds bf16: its bits as uint16
        return tensor.view(torch.int16).numpy().view(np.uint16) if tensor.dtype == torch.bfloat16 else tensor.numpy()

    generator = torch.Generator().manual_seed(5)
    for rows, cols in [(3, 16), (5, 37), (16, 1)]:
        for source_dtype, target_dtype in itertools.product([torch.float32, torch.bfloat16], repeat=2):
            for transposed, scale in itertools.product([False, True], [None, 0.37]):
                source = torch.randn(*((cols, rows) if transposed else (rows, cols)), generator=generator)
                source.view(-1)[:2] = torch.tensor([1.0 + 2**-8, 1.0 + 3 * 2**-8])  # halfway between two bf16 values
                source = source.to(source_dtype)
                view = source.T if transposed else source
                wide = torch.full((rows, cols + 3), 7.0, dtype=target_dtype)
                target = bits(wide)[:, 1 : cols + 1]
                lora_kernel.convert_weights(library, bits(source).T if transposed else bits(source),
                                            source_dtype == torch.bfloat16, target, scale)  # fmt: skip
                expected = view.float() if scale is None else view.float() * torch.tensor(scale, dtype=torch.float32)
                case = (rows, cols, source_dtype, target_dtype, transposed, scale)
                assert torch.equal(wide[:, 1 : cols + 1], expected.to(target_dtype)), case
                assert (wide[:, 0] == 7).all() and (wide[:, cols + 1 :] == 7).all(), case
    nan = np.array([[0x7F81, 0xFF85]], np.uint16)  # signalling NaNs' bits: copied, not quietened
    copied = np.zeros((1, 2), np.uint16)
    lora_kernel.convert_weights(library, nan, True, copied)
    assert copied.tolist() == [[0x7F81, 0xFF85]]


@pytest.mark.parametrize(
    "dtype, adapter_dtype",
    [(torch.float32, None), (torch.bfloat16, None), (torch.float32, torch.bfloat16)],
    ids=["fp32", "bf16", "fp32-bf16-adapters"],
)
def test_the_tiled_kernel_and_the_portable_build_agree(demo_model_dir, adapters, dtype, adapter_dtype):
    """The tiles (AVX-512 or AVX2, whichever this CPU has) against the portable loops, row by row, on the same
    buffers."""
    library, portable = lora_kernel.load(), lora_kernel.load(portable=True)
    if library is None or portable is None or not lora_kernel.tiled(library):
        pytest.skip("needs a C compiler and a CPU with AVX2 and FMA or AVX-512")
    assert not lora_kernel.tiled(portable)
    hf = AutoModelForCausalLM.from_pretrained(demo_model_dir, dtype=torch.float32)
    model = NativeLlama(hf, dtype, 64)
    counts = [1, 2, 3, 4, 7, 1]  # every tile size, and a run cut into 4 + 3
    tiled = _kernel_outputs(model, adapters, library, adapter_dtype, counts, dtype)
    rows = _kernel_outputs(model, adapters, portable, adapter_dtype, counts, dtype)
    for site in SITES:
        # summation order differs; in bf16 the one rounding of each output can land a step apart
        atol = 1e-5 if dtype == torch.float32 else 0.04
        torch.testing.assert_close(
            tiled[site][1], rows[site][1], atol=atol, rtol=1e-4, msg=lambda m, site=site: f"{site}: {m}"
        )


def test_adapters_load_while_their_requests_queue(demo_model_dir, adapters):
    eng = InferenceEngine(dtype="float32", kv_cache_mb=8, adapter_cache_mb=64, max_batch=1, max_lora_rank=32)
    try:
        native = eng.base("demo", str(demo_model_dir)).native
        prompt = _prompt(eng, PROMPTS[0])
        first = native.submit(prompt, SamplingParams(max_tokens=30, temperature=0.0), None, None)
        first.events.get(timeout=30)  # the only batch slot is taken
        queued = native.submit(prompt, SamplingParams(max_tokens=2, temperature=0.0), "lora", adapters["lora"])
        deadline = time.time() + 10
        while "lora" not in native.store.memory and time.time() < deadline:
            time.sleep(0.01)
        assert "lora" in native.store.memory and native.running and native.running[0].adapter_key is None
        assert native.store.misses == 1 and native.store.loads == 1
        collect(first)
        assert len(collect(queued)) == 2
        again = native.submit(prompt, SamplingParams(max_tokens=1, temperature=0.0), "lora", adapters["lora"])
        collect(again)
        assert native.store.hits == 1 and native.store.loads == 1
    finally:
        eng.stop()


def test_int8_base_weights_through_torchao(demo_model_dir, adapters):
    pytest.importorskip("torchao", reason="int8 quantization is the optional extra adaptery[int8]")
    hf = AutoModelForCausalLM.from_pretrained(demo_model_dir, dtype=torch.float32)
    with pytest.raises(ValueError, match="unknown quantization 'int4'"):
        NativeLlama(hf, torch.float32, 128, quantize="int4")
    models = {q: NativeLlama(hf, torch.float32, 128, quantize=q) for q in (None, "int8")}
    assert type(models["int8"].layers[0].wqkv).__name__ == "Int8Tensor"
    prompt = [5, 17, 42, 9, 3, 77, 12]
    tops = {}
    for q, model in models.items():
        native = BatchEngine(
            "q", model, set(), max_rank=16, kv_cache_bytes=1 << 20, adapter_cache_bytes=1 << 24
        ).start()
        try:
            request = native.submit(prompt, SamplingParams(max_tokens=1, temperature=0.0, logprobs=True,
                                                           top_logprobs=5), None, None)  # fmt: skip
            tops[q] = request.events.get(timeout=30).logprob.top
            # LoRA and DoRA adapters on top of int8 weights (DoRA's norms from the dequantized weights)
            for kind in ("lora", "dora"):
                assert len(engine_tokens(native, prompt, (kind, adapters[kind]), max_tokens=4)) == 4
        finally:
            native.stop()
    assert tops["int8"][0][0] == tops[None][0][0]  # same top token, log-probabilities within int8 noise
    assert abs(tops["int8"][0][1] - tops[None][0][1]) < 0.1


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_bf16_adapters_serve_an_fp32_model_exactly_when_bf16_holds_them(demo_model_dir, adapters, tmp_path, kind):
    """ADAPTERY_ENGINE_ADAPTER_DTYPE=bfloat16 on an fp32 engine: the adapter's weights are rounded to bf16 once,
    everything else stays fp32. With weights that bf16 holds exactly, the tokens are PEFT's, so the only
    difference the setting makes is that rounding."""
    if lora_kernel.load() is None:
        pytest.skip("bf16 adapters for an fp32 model need the fused kernel (no C compiler here)")
    from safetensors.torch import load_file, save_file

    rounded = tmp_path / kind
    shutil.copytree(adapters[kind], rounded)
    weights = rounded / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    save_file({k: v.to(torch.bfloat16).float() if "lora_" in k else v for k, v in tensors.items()}, str(weights))
    hf = AutoModelForCausalLM.from_pretrained(demo_model_dir, dtype=torch.float32)
    native = BatchEngine("demo", NativeLlama(hf, torch.float32, 256), set(), max_rank=32, kv_cache_bytes=8 << 20,
                         adapter_cache_bytes=64 << 20, adapter_dtype=torch.bfloat16).start()  # fmt: skip
    try:
        assert native.describe()["adapters"]["dtype"] == "bfloat16"
        tokenizer = AutoTokenizer.from_pretrained(demo_model_dir)
        for text in PROMPTS:
            prompt = tokenizer(text)["input_ids"]
            got = engine_tokens(native, prompt, (kind, rounded), max_tokens=STEPS)
            assert got == reference_greedy(demo_model_dir, rounded, prompt, STEPS, set()), text
        # the same adapter unrounded is served too, a rounding away from PEFT's fp32 numbers
        assert len(engine_tokens(native, prompt, ("raw", adapters[kind]), max_tokens=STEPS)) == STEPS
    finally:
        native.stop()


def test_the_adapter_dtype_setting_reaches_the_engine(demo_model_dir, monkeypatch):
    from pydantic import ValidationError

    from adaptery.settings import Settings

    monkeypatch.delenv("ADAPTERY_ENGINE_ADAPTER_DTYPE", raising=False)
    assert Settings().engine_adapter_dtype == "auto"
    monkeypatch.setenv("ADAPTERY_ENGINE_ADAPTER_DTYPE", "float32")
    assert Settings().engine_adapter_dtype == "float32"
    monkeypatch.setenv("ADAPTERY_ENGINE_ADAPTER_DTYPE", "float16")
    with pytest.raises(ValidationError, match="engine_adapter_dtype"):
        Settings()
    # auto holds adapters in bf16 on the fused kernel, float32 keeps them exact; the PyTorch path computes in fp32
    for setting, on_kernel in (("auto", "bfloat16"), ("bfloat16", "bfloat16"), ("float32", "float32")):
        eng = InferenceEngine(dtype="float32", kv_cache_mb=8, adapter_cache_mb=64, adapter_dtype=setting)
        try:
            eng.base("demo", str(demo_model_dir))
            held = eng.base("demo", "").native.describe()["adapters"]["dtype"]
            assert held == (on_kernel if lora_kernel.load() is not None else "float32"), setting
        finally:
            eng.stop()


def test_bf16_held_adapters_move_a_chosen_tokens_logprob_by_little(demo_model_dir, adapters):
    """The rounding's effect on outputs, bounded: the same greedy requests on fp32-held and bf16-held adapters
    agree on each chosen token's logprob within 0.1 up to their first difference, and differ at all only where the
    exact engine's two best tokens were within 0.2 of each other (a near-tie). These test adapters (A and B ~ N(0,
    0.08)) change the model far more than trained ones, and the rounding's effect grows with the adapter's: at
    bench/engine.py's N(0, 0.02) the differences are ~1e-3 (bench/adapter_dtype.py)."""
    if lora_kernel.load() is None:
        pytest.skip("bf16-held adapters need the fused kernel (no compiler here)")
    params = SamplingParams(max_tokens=STEPS, temperature=0.0, logprobs=True, top_logprobs=2)
    outputs = {}
    for held in ("float32", "bfloat16"):
        eng = InferenceEngine(dtype="float32", kv_cache_mb=8, adapter_cache_mb=64, max_lora_rank=32, adapter_dtype=held)
        try:
            native = eng.base("demo", str(demo_model_dir)).native
            outputs[held] = [
                [(e.token, e.logprob) for e in _events(native.submit(_prompt(eng, text), params, name, path))]
                for name, path in adapters.items()
                for text in PROMPTS
            ]
        finally:
            eng.stop()
    compared = 0
    for exact, rounded in zip(outputs["float32"], outputs["bfloat16"], strict=True):
        for (token, logprob), (other, other_logprob) in zip(exact, rounded, strict=True):
            if token != other:
                top = logprob.top
                assert top[0][1] - top[1][1] < 0.2, (top, other)
                break
            assert abs(logprob.logprob - other_logprob.logprob) < 0.1
            compared += 1
    assert compared >= len(outputs["float32"]) * STEPS // 2  # most tokens were compared, not skipped past


@pytest.mark.parametrize("stored", [torch.float32, torch.bfloat16], ids=["fp32-file", "bf16-file"])
def test_an_adapter_prepared_in_bf16_holds_torch_s_rounding_of_its_scaled_fp32_weights(
    demo_model_dir, tmp_path, stored
):
    """prepare_adapter converts each tensor on its way in (no whole fp32 copy converted afterwards): shrink rows are
    the file's A rounded to bf16 (a bf16 file's copied as they are), expand rows B^T x scaling computed in fp32, then
    rounded to nearest even as torch rounds; ties and neighbours of ties included."""
    hf = AutoModelForCausalLM.from_pretrained(demo_model_dir)
    native = NativeLlama(hf, torch.float32, 64)
    path = make_adapter(demo_model_dir, tmp_path / "a", seed=3)
    weights = tmp_path / "a" / "adapter_model.safetensors"
    from safetensors.torch import load_file, save_file

    tensors = load_file(weights)
    name = next(n for n in tensors if n.endswith("layers.0.self_attn.q_proj.lora_A.weight"))
    tie = torch.tensor([1.0 + 2**-8, 1.0 + 3 * 2**-8, -(1.0 + 2**-8), 1.0 + 2**-8 + 2**-20], dtype=torch.float32)
    tensors[name].view(-1)[:4] = tie  # exactly halfway between two bf16 values (twice), and just past one
    save_file({n: t.to(stored).contiguous() for n, t in tensors.items()}, weights)
    tensors = load_file(weights)
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    scaling = config["lora_alpha"] / config["r"]
    exact = prepare_adapter("a", path, native, 32, torch.float32)
    rounded = prepare_adapter("a", path, native, 32, torch.bfloat16)
    for site in SITES:
        assert rounded.shrink[site].dtype == torch.bfloat16
        assert torch.equal(rounded.shrink[site], exact.shrink[site].to(torch.bfloat16))
        assert torch.equal(rounded.expand[site], exact.expand[site].to(torch.bfloat16))
    layer0 = exact.shrink["qkv"][0, :, 0]  # (rank, d_in): q_proj's A in layer 0
    assert torch.equal(layer0, tensors[name].float())
    b = tensors[name.replace("lora_A", "lora_B")].float()
    assert torch.equal(exact.expand["qkv"][0, :, : b.shape[0]], (b.T * torch.tensor(scaling, dtype=torch.float32)))


def test_a_bf16_adapter_is_rounded_by_the_engine_s_own_library_without_looking_it_up_again(
    demo_model_dir, adapters, monkeypatch
):
    """An engine's model holds the C library: each load rounds with it (lora_kernel.load() costs ~0.6 ms a call, an
    eighth of a cold load), and gets what the looked-up library gives. A model without one still looks it up."""
    from adaptery.engine import lora as lora_module

    library = lora_kernel.load()
    if library is None:
        pytest.skip("the C library cannot build here")
    hf = AutoModelForCausalLM.from_pretrained(demo_model_dir)
    native = NativeLlama(hf, torch.float32, 64)
    looked_up = prepare_adapter("a", adapters["lora_qv_r4"], native, 32, torch.bfloat16)  # kernel None: load()
    native.kernel = library
    calls = []
    monkeypatch.setattr(lora_module.lora_kernel, "load", lambda *a, **k: calls.append(a) or library)
    held = prepare_adapter("a", adapters["lora_qv_r4"], native, 32, torch.bfloat16)
    assert calls == []
    for site in SITES:
        assert torch.equal(held.shrink[site], looked_up.shrink[site])
        assert torch.equal(held.expand[site], looked_up.expand[site])
    native.kernel = None
    prepare_adapter("a", adapters["lora_qv_r4"], native, 32, torch.bfloat16)
    assert len(calls) == 1


def test_an_adapter_prepared_by_the_c_library_equals_the_numpy_path(demo_model_dir, adapters, tmp_path, monkeypatch):
    """Every kind of adapter (ranks, rsLoRA's scaling, DoRA, partial targets; files in fp32 and in bf16), held in fp32
    and in bf16: the library's one-pass conversion gives exactly the numpy path's tensors."""
    library = lora_kernel.load()
    if library is None:
        pytest.skip("the C library cannot build here")
    from safetensors.torch import load_file, save_file

    hf = AutoModelForCausalLM.from_pretrained(demo_model_dir)
    with_c, numpy_only = NativeLlama(hf, torch.float32, 64), NativeLlama(hf, torch.float32, 64)
    with_c.kernel = library
    paths = dict(adapters)
    bf16_file = shutil.copytree(adapters["rslora_r12"], tmp_path / "bf16-file")
    weights = bf16_file / "adapter_model.safetensors"
    save_file({n: t.to(torch.bfloat16) for n, t in load_file(weights).items()}, weights)
    paths["rslora_r12 in bf16"] = bf16_file
    for (name, path), dtype in itertools.product(paths.items(), [torch.float32, torch.bfloat16]):
        with monkeypatch.context() as patch:  # numpy's own rounding: no library for this model to find
            patch.setattr(lora_kernel, "load", lambda *a, **k: None)
            expected = prepare_adapter(name, path, numpy_only, 32, dtype)
        got = prepare_adapter(name, path, with_c, 32, dtype)
        for site in SITES:
            assert torch.equal(got.shrink[site], expected.shrink[site]), (name, dtype, site)
            assert torch.equal(got.expand[site], expected.expand[site]), (name, dtype, site)
        assert (got.magnitude is None) == (expected.magnitude is None), name


def test_an_adapter_training_some_projections_is_prepared_with_zeros_for_the_rest_whatever_memory_it_gets(
    demo_model_dir, adapters, monkeypatch
):
    """prepare_adapter leaves its arrays uninitialised and zeroes the projections the adapter does not train: memory
    handed back full of NaNs (as reused memory may be) still gives q/v's own rows and zeros for k, o, gate/up, down."""
    from adaptery.engine import lora as lora_module

    empty = lora_module.np.empty

    def garbage(shape, dtype=float, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        out = empty(shape, dtype, *args, **kwargs)
        out.fill(0xFFFF if out.dtype == lora_module.np.uint16 else float("nan") if out.dtype.kind == "f" else 1)
        return out  # 0xFFFF: a bf16 NaN's bits

    monkeypatch.setattr(lora_module.np, "empty", garbage)
    hf = AutoModelForCausalLM.from_pretrained(demo_model_dir)
    native = NativeLlama(hf, torch.float32, 64)
    for dtype in (torch.float32, torch.bfloat16):
        prepared = prepare_adapter("qv", adapters["lora_qv_r4"], native, 32, dtype)
        q, k, v = native.site_out["qkv"]
        assert prepared.shrink["qkv"][:, :, 0].abs().sum() > 0 and prepared.shrink["qkv"][:, :, 2].abs().sum() > 0
        assert torch.equal(prepared.shrink["qkv"][:, :, 1], torch.zeros_like(prepared.shrink["qkv"][:, :, 1]))
        assert torch.equal(prepared.expand["qkv"][:, :, q : q + k], torch.zeros_like(prepared.expand["qkv"][:, :, :k]))
        for site in ("o", "gate_up", "down"):
            assert not prepared.shrink[site].any() and not prepared.expand[site].any(), site
        assert all(not t.isnan().any() for t in [*prepared.shrink.values(), *prepared.expand.values()])


def test_serve_refuses_int8_where_torchao_is_missing(tmp_path):
    try:
        import torchao  # noqa: F401

        pytest.skip("torchao is installed here: int8 can start")
    except ImportError:
        pass
    from typer.testing import CliRunner

    from adaptery.cli.main import app

    env = {"ADAPTERY_ENGINE_QUANTIZE": "int8", "ADAPTERY_DEMO_MODEL": "false", "COLUMNS": "200"}
    result = CliRunner().invoke(app, ["serve", "--data-dir", str(tmp_path / "data")], env=env)
    assert result.exit_code == 2, result.output
    assert "Cannot start: int8 quantization needs torchao: pip install 'adaptery[int8]'" in result.output


def _stepped_engine(max_batch: int) -> BatchEngine:
    """A tiny engine without its thread (not started): the test steps it itself."""
    hf = _tiny(Qwen2Config, Qwen2ForCausalLM)
    return BatchEngine("fair", NativeLlama(hf, torch.float32, 128), set(), max_rank=8, kv_cache_bytes=1 << 20,
                       adapter_cache_bytes=1 << 20, max_batch=max_batch)  # fmt: skip


def _run_steps(native: BatchEngine, requests: dict[str, batching.Request], until: Callable[[dict], bool],
               limit: int) -> dict[str, int]:  # fmt: skip
    """Step until `until(finished)`; which step each request finished at."""
    finished: dict[str, int] = {}
    for step in range(limit):
        native.step()  # takes the submitted requests in first
        for name, request in requests.items():
            while not request.events.empty():
                if request.events.get().finish is not None:
                    finished[name] = step
        if until(finished):
            break
    return finished


def test_an_engine_runs_nothing_until_it_is_started():
    native = _stepped_engine(max_batch=2)
    try:
        request = native.submit([5, 17, 42], SamplingParams(max_tokens=2, temperature=0.0), None, None)
        assert "adaptery-engine-fair" not in {thread.name for thread in threading.enumerate()}
        assert native.steps == 0 and request.events.empty()
        assert native.start() is native
        assert len(collect(request)) == 2
        with pytest.raises(RuntimeError, match="already started"):
            native.start()
    finally:
        native.stop()
    idle = _stepped_engine(max_batch=2)
    waiting = idle.submit([5, 17, 42], SamplingParams(max_tokens=2, temperature=0.0), None, None)
    idle.stop()  # never started: its callers still hear that it stopped
    assert waiting.events.get(timeout=1).error == "the engine stopped"


def test_one_key_filling_the_batch_cannot_stall_another(demo_model_dir):
    # key b's 8 long requests fill a batch of 4; key a's short one used to wait until b's first 4 finished
    native = _stepped_engine(max_batch=4)
    try:
        long, short = SamplingParams(max_tokens=100, temperature=0.0), SamplingParams(max_tokens=3, temperature=0.0)
        requests = {f"b{i}": native.submit([5, 17, 42, 9, 3, 77], long, None, None, "b") for i in range(8)}
        _run_steps(native, requests, lambda _: False, limit=2)
        assert len(native.running) == 4 and len(native.waiting) == 4
        requests["a"] = native.submit([8, 1, 30], short, None, None, "a")
        finished = _run_steps(native, requests, lambda done: "a" in done, limit=10)
        assert "a" in finished and finished["a"] <= 4 and not any(name.startswith("b") for name in finished)
        assert native.metrics.preemptions.labels("fair")._value.get() == 1  # one slot freed for one request
        finished |= _run_steps(native, requests, lambda done: len(done) == 9, limit=1000)
        assert len(finished) == 9 and native.cache.used_blocks == 0
        b_order = sorted((name for name in finished if name.startswith("b")), key=lambda n: (finished[n], int(n[1:])))
        assert b_order == [f"b{i}" for i in range(8)]  # FIFO within a key, the preempted one recomputed in its place
    finally:
        native.store.close()


def test_a_single_key_is_never_preempted_for_fairness(demo_model_dir):
    native = _stepped_engine(max_batch=4)
    try:
        params = SamplingParams(max_tokens=20, temperature=0.0)
        requests = {f"b{i}": native.submit([5, 17, 42, 9, 3, 77], params, None, None, "b") for i in range(8)}
        finished = _run_steps(native, requests, lambda done: len(done) == 8, limit=200)
        assert len(finished) == 8 and native.metrics.preemptions.labels("fair")._value.get() == 0
        assert sorted(finished, key=lambda n: (finished[n], int(n[1:]))) == [f"b{i}" for i in range(8)]
    finally:
        native.store.close()


class _SlowEmbedder:
    """Stands in for the SentenceTransformer: records each batch; the first one holds until released."""

    max_seq_length = 256

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.started, self.release = threading.Event(), threading.Event()

    def encode(self, texts: list[str], **_: object) -> torch.Tensor:
        self.batches.append(list(texts))
        if len(self.batches) == 1:
            self.started.set()
            assert self.release.wait(timeout=30)
        return torch.zeros(len(texts), 4)


def test_a_second_embedding_request_runs_between_the_batches_of_a_long_one():
    # 70 inputs used to hold the model in one call; the other request's single input waited for all of them
    model = EmbeddingModel()
    fake = model._model = _SlowEmbedder()
    long = [f"a{i}" for i in range(70)]
    results: dict[str, torch.Tensor] = {}
    first = threading.Thread(target=lambda: results.update(long=model.embed(long)))
    first.start()
    assert fake.started.wait(timeout=30)
    second = threading.Thread(target=lambda: results.update(short=model.embed(["b0"])))
    second.start()
    deadline = time.time() + 5  # until the second request waits for its turn (a bound, not a pace)
    while not getattr(model, "_waiting", None) and time.time() < deadline:
        time.sleep(0.01)
    fake.release.set()
    first.join(timeout=30)
    second.join(timeout=30)
    assert fake.batches == [long[:32], ["b0"], long[32:64], long[64:]]
    assert results["long"].shape == (70, 4) and results["short"].shape == (1, 4)


def test_an_embedding_input_is_cut_to_what_the_model_reads_before_tokenising():
    model = EmbeddingModel(max_bytes_per_token=4)
    model._model = _SlowEmbedder()
    assert model.fit("x " * 4_000_000) == "x " * 512  # 256 tokens × 4 bytes
    assert model.fit("é" * 600) == "é" * 512  # 1024 bytes, cut at a character boundary
    assert model.fit("short") == "short"


def test_sampling_params_keep_their_logit_bias_and_constraint_across_the_agent_protocol() -> None:
    import dataclasses
    import json

    from adaptery.engine.sampling import Constraint

    sent = SamplingParams(logit_bias={5: -100.0, 17: 2.5}, constraint=Constraint('start: "yes" | "no"'))
    received = SamplingParams(**json.loads(json.dumps(dataclasses.asdict(sent))))  # JSON keys are strings
    assert received.logit_bias == {5: -100.0, 17: 2.5}
    assert received.constraint == Constraint('start: "yes" | "no"')  # an object the engine can compile, not a dict


def test_gathering_whole_blocks_gives_the_positions_of_those_blocks_in_table_order():
    """Decode attention reads the KV cache by block (kvcache.gather_blocks): the same keys and values, in the same
    order, as gathering each position of the blocks one by one, for tables whose blocks are out of order."""
    cache = PagedKVCache(2, 2, 4, torch.float32, budget_bytes=2 * 2 * 2 * 4 * 4 * 8 * 4, block_size=4)
    assert cache.num_blocks == 8
    torch.manual_seed(0)
    for layer in range(2):
        cache.keys[layer].copy_(torch.randn_like(cache.keys[layer]))
        cache.values[layer].copy_(torch.randn_like(cache.values[layer]))
    tables = [[5, 2, 7], [0, 6, 1]]
    blocks = torch.tensor(tables).reshape(-1)
    for layer in range(2):
        keys, values = cache.gather_blocks(layer, blocks)
        expected = cache.gather(layer, torch.cat([cache.positions(t, 0, 12) for t in tables]))
        assert keys.shape == (24, 2, 4)
        assert torch.equal(keys, expected[0]) and torch.equal(values, expected[1])


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this PyTorch has no oneDNN")
def test_projections_run_packed_for_onednn_and_compute_what_f_linear_does():
    """fp32 weights are reordered once for oneDNN (native._pack), bf16 ones too on a CPU with bf16 dot products; the
    projections give F.linear's products up to rounding, DoRA still reads the plain weights."""
    hf = _tiny(LlamaConfig, LlamaForCausalLM)
    native = NativeLlama(hf, torch.float32, 128)
    layer = native.layers[0]
    assert all(w.is_mkldnn for w in (layer.wqkv, layer.wo, layer.wgu, layer.wdown, native.lm_head))
    attn = hf.model.layers[0].self_attn
    assert torch.equal(native.base_weight("qkv", 1, 0), attn.k_proj.weight.detach())
    x = torch.randn(5, 64)
    expected = torch.nn.functional.linear(x, torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]))
    torch.testing.assert_close(native_linear(x, layer.wqkv), expected.detach())
    bf16 = NativeLlama(hf, torch.bfloat16, 128)
    # bf16 packed only where the CPU has bf16 dot products (AVX512_BF16 or AMX); F.linear's products either way
    assert bf16.layers[0].wqkv.is_mkldnn == native_bf16_dot_products()
    x = x.bfloat16()
    weight = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).detach().bfloat16()
    torch.testing.assert_close(native_linear(x, bf16.layers[0].wqkv), torch.nn.functional.linear(x, weight))


def _paged_case(dtype: torch.dtype, kv_heads: int = 2, group: int = 3, head_dim: int = 20, block_size: int = 4):
    """A pool of 16 blocks with random keys and values, and three sequences whose blocks are out of order."""
    cache = PagedKVCache(1, kv_heads, head_dim, dtype, budget_bytes=1, block_size=block_size)
    cache = PagedKVCache(1, kv_heads, head_dim, dtype, budget_bytes=cache.bytes // 2 * 16, block_size=block_size)
    assert cache.num_blocks == 16
    generator = torch.Generator().manual_seed(0)
    cache.keys[0].copy_(torch.randn(cache.keys[0].shape, generator=generator))
    cache.values[0].copy_(torch.randn(cache.values[0].shape, generator=generator))
    # lengths: one token, a whole number of blocks, a block and a bit; the padding rows name any block in range
    tables, lengths = [[9], [3, 14, 0], [7, 2, 11]], [1, 12, 6]
    blocks = torch.tensor([t + [15] * (3 - len(t)) for t in tables])
    # q as the model has it: a view of the fused qkv rows (row stride past the query heads)
    qkv = torch.randn(3, (kv_heads * group + 2 * kv_heads) * head_dim, generator=generator).to(dtype)
    q = qkv[:, : kv_heads * group * head_dim].view(3, kv_heads * group, head_dim)
    return cache, q, blocks, torch.tensor(lengths), tables


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("build", ["native", "portable"])
@pytest.mark.parametrize(
    ("dtype", "group", "head_dim"),
    [(torch.float32, 3, 20), (torch.bfloat16, 3, 20), (torch.float32, 10, 20), (torch.float32, 4, 64),
     (torch.bfloat16, 1, 76)],
    ids=["fp32", "bf16", "group10", "hd64", "bf16-hd76"],
)  # fmt: skip
def test_paged_decode_attention_reads_the_blocks_in_place_as_float64_attention_over_the_gathered_context(
    build, dtype, group, head_dim, threads
):
    """lora_kernel.paged_decode against attention in float64 over each sequence's positions gathered one by one:
    grouped-query heads (more than the kernel does at once, too), blocks out of order, head sizes no vector width
    divides and ones the value pass takes in wide chunks (64; 76 = one chunk of 64, one of 8, 4 columns alone), q a
    strided view. Three sequences on one thread are shared out a sequence at a time (its heads in turn), on two a head
    at a time."""
    library = lora_kernel.load(portable=build == "portable")
    if library is None:
        pytest.skip("no C compiler here: decode attention gathers the blocks instead (tested by the engine tests)")
    cache, q, blocks, lengths, tables = _paged_case(dtype, group=group, head_dim=head_dim)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = lora_kernel.paged_decode(library, q, cache.keys[0], cache.values[0], blocks, lengths, 4, 0.3)
    finally:
        torch.set_num_threads(before)
    assert out.shape == q.shape and out.dtype == dtype
    for i, (table, length) in enumerate(zip(tables, lengths.tolist(), strict=True)):
        keys, values = (t.double() for t in cache.gather(0, cache.positions(table, 0, length)))  # (length, kvh, hd)
        query = q[i].double().view(2, group, head_dim)  # (kvh, group, hd)
        probs = torch.softmax(torch.einsum("hgd,thd->hgt", query, keys) * 0.3, dim=-1)
        expected = torch.einsum("hgt,thd->hgd", probs, values).reshape(2 * group, head_dim)
        atol = 1e-6 if dtype == torch.float32 else 1e-2  # bf16: the output's one rounding
        torch.testing.assert_close(out[i].double(), expected, atol=atol, rtol=atol)


def test_paged_decode_attention_refuses_what_would_read_outside_the_pool():
    library = lora_kernel.load()
    if library is None:
        pytest.skip("no C compiler here")
    cache, q, blocks, lengths, _ = _paged_case(torch.float32)
    keys, values = cache.keys[0], cache.values[0]

    def call(**changed):  # noqa: ANN003, ANN202
        args = {"q": q, "keys": keys, "values": values, "blocks": blocks, "lengths": lengths, "block_size": 4}
        args.update(changed)
        return lora_kernel.paged_decode(library, scale=0.3, **args)

    with pytest.raises(ValueError, match="block ids"):
        call(blocks=blocks.masked_fill(blocks == 15, 16))
    with pytest.raises(ValueError, match="block ids"):
        call(blocks=blocks.masked_fill(blocks == 15, -1))
    with pytest.raises(ValueError, match="lengths"):
        call(lengths=torch.tensor([1, 13, 6]))  # three blocks of 4 hold 12
    with pytest.raises(ValueError, match="lengths"):
        call(lengths=torch.tensor([0, 12, 6]))
    with pytest.raises(ValueError, match="one row per query"):
        call(lengths=lengths[:2])
    with pytest.raises(TypeError, match="keys"):
        call(keys=keys.double())
    with pytest.raises(TypeError, match="blocks"):
        call(blocks=blocks.int())
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        call(q=q[:, :5])
    with pytest.raises(ValueError, match="whole blocks"):
        call(block_size=5)
    with pytest.raises(ValueError, match="contiguous"):
        call(values=values.transpose(0, 1).contiguous().transpose(0, 1))
    with pytest.raises(ValueError, match="adjacent"):
        call(q=torch.randn(3, 12, 20)[:, ::2])


@pytest.mark.parametrize("build", ["native", "portable"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_the_fused_residual_add_and_rms_norm_compute_what_the_pytorch_operators_do(build, dtype):
    """lora_kernel.add_rms_norm against x + delta then native._rms: x updated in place (strided rows), the norm's
    output new; no delta leaves x as it was. bf16 rounds where PyTorch rounds: equal but for the sum's order."""
    library = lora_kernel.load(portable=build == "portable")
    if library is None:
        pytest.skip("no C compiler here: the PyTorch operators run instead (tested by the engine tests)")
    generator = torch.Generator().manual_seed(3)
    wide = torch.randn(40, 300, generator=generator).to(dtype)
    original = wide.clone()
    x, delta = wide[:, 7:250], torch.randn(40, 243, generator=generator).to(dtype) * 3  # x's rows strided
    weight = (torch.rand(243, generator=generator) + 0.5).to(dtype)
    expected_x = x + delta
    expected = native_rms(expected_x, weight, 1e-5)
    out = lora_kernel.add_rms_norm(library, x, delta, weight, 1e-5)
    tolerance = {"atol": 1e-6, "rtol": 1e-6} if dtype == torch.float32 else {"atol": 0.0, "rtol": 0.0}
    torch.testing.assert_close(x, expected_x, **tolerance)  # in place, bit for bit
    torch.testing.assert_close(out, expected, **({"atol": 1e-6, "rtol": 1e-5} if dtype == torch.float32 else
                                                 {"atol": 1e-2, "rtol": 8e-3}))  # fmt: skip
    if dtype == torch.bfloat16:  # one bf16 step apart at most, and in very few places
        assert (out != expected).float().mean() < 0.01
    before = x.clone()
    torch.testing.assert_close(lora_kernel.add_rms_norm(library, x, None, weight, 1e-5), out, atol=0, rtol=0)
    assert torch.equal(x, before)
    assert wide[:, :7].equal(original[:, :7]) and wide[:, 250:].equal(original[:, 250:])  # only x's columns written


@pytest.mark.parametrize("build", ["native", "portable"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_the_fused_rotary_embedding_rotates_in_place_as_the_pytorch_operators_do(build, dtype):
    """lora_kernel.rotary on q and k heads inside the fused qkv rows (strided, v left alone) against native._rotate."""
    library = lora_kernel.load(portable=build == "portable")
    if library is None:
        pytest.skip("no C compiler here: the PyTorch operators run instead (tested by the engine tests)")
    generator = torch.Generator().manual_seed(4)
    qkv = torch.randn(9, 7 * 18, generator=generator).to(dtype)
    angles = torch.rand(9, 9, generator=generator) * 6
    cos, sin = (f(torch.cat((angles, angles), dim=-1)).to(dtype) for f in (torch.cos, torch.sin))
    qk = qkv[:, : 5 * 18].view(9, 5, 18)
    expected, untouched = native_rotate(qk, cos.unsqueeze(1), sin.unsqueeze(1)), qkv[:, 5 * 18 :].clone()
    lora_kernel.rotary(library, qk, cos, sin)
    exact = {"atol": 0.0, "rtol": 0.0} if dtype == torch.bfloat16 else {"atol": 1e-6, "rtol": 1e-6}
    torch.testing.assert_close(qk, expected, **exact)
    assert qkv[:, 5 * 18 :].equal(untouched)


@pytest.mark.parametrize("build", ["native", "portable"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_the_fused_silu_times_up_computes_what_the_pytorch_operators_do(build, dtype):
    """lora_kernel.silu_mul on fused gate/up rows (strided, a width no vector divides) against F.silu(gate) * up,
    over the whole range of the exponential and past it, where the polynomial's input is clamped."""
    library = lora_kernel.load(portable=build == "portable")
    if library is None:
        pytest.skip("no C compiler here: the PyTorch operators run instead (tested by the engine tests)")
    generator = torch.Generator().manual_seed(5)
    gate_up = torch.randn(33, 2 * 77 + 5, generator=generator)[:, : 2 * 77] * 4
    gate_up[0, :77] = torch.linspace(-120, 120, 77)  # both clamps, and every exponent between
    gate_up[1, :5] = torch.tensor([-87.4, -87.2, 87.2, 87.4, 0.0])
    gate_up = gate_up.to(dtype)
    gate, up = gate_up[:, :77], gate_up[:, 77:]
    expected = F.silu(gate) * up
    out = lora_kernel.silu_mul(library, gate_up)
    assert out.shape == (33, 77) and out.dtype == dtype and out.is_contiguous()
    if dtype == torch.float32:  # the exponential within 2 ulp; the quotient and product round as PyTorch's
        torch.testing.assert_close(out, expected, atol=1e-30, rtol=4e-7)
    else:  # a bf16 step at most, where the SiLU's fp32 value lies within 2 ulp of a rounding boundary
        torch.testing.assert_close(out, expected, atol=1e-30, rtol=8e-3)
        assert (out != expected).float().mean() < 0.01


def test_the_fused_elementwise_ops_refuse_what_would_reach_outside_their_tensors():
    library = lora_kernel.load()
    if library is None:
        pytest.skip("no C compiler here")
    x, weight = torch.randn(4, 8), torch.ones(8)
    with pytest.raises(ValueError, match="weight"):
        lora_kernel.add_rms_norm(library, x, None, torch.ones(9), 1e-5)
    with pytest.raises(ValueError, match="delta"):
        lora_kernel.add_rms_norm(library, x, torch.randn(3, 8), weight, 1e-5)
    with pytest.raises(TypeError, match="delta"):
        lora_kernel.add_rms_norm(library, x, torch.randn(4, 8).double(), weight, 1e-5)
    with pytest.raises(ValueError, match="last dimension"):
        lora_kernel.add_rms_norm(library, x.t(), None, torch.ones(4), 1e-5)
    with pytest.raises(ValueError, match="overlap"):
        lora_kernel.add_rms_norm(library, x.as_strided((4, 8), (2, 1)), None, weight, 1e-5)
    heads, cos = torch.randn(4, 2, 8), torch.ones(4, 8)
    with pytest.raises(ValueError, match="even head size"):
        lora_kernel.rotary(library, torch.randn(4, 2, 7), torch.ones(4, 7), torch.ones(4, 7))
    with pytest.raises(ValueError, match="must be"):
        lora_kernel.rotary(library, heads, cos[:3], cos[:3])
    with pytest.raises(TypeError, match="sin"):
        lora_kernel.rotary(library, heads, cos, cos.bfloat16())
    with pytest.raises(ValueError, match="adjacent"):
        lora_kernel.rotary(library, torch.randn(4, 4, 8)[:, ::2], cos, cos)
    with pytest.raises(ValueError, match="two halves"):
        lora_kernel.silu_mul(library, torch.randn(4, 7))
    with pytest.raises(ValueError, match="overlap"):
        lora_kernel.silu_mul(library, torch.randn(40).as_strided((4, 8), (3, 1)))
    with pytest.raises(TypeError, match="gate_up"):
        lora_kernel.silu_mul(library, torch.randn(4, 8).double())


def test_the_step_in_c_gives_the_pytorch_step_s_tokens(engine, adapters):
    """The engine with its C library (decode attention read from the blocks in place, residual adds, RMSNorms,
    rotary embeddings and SiLU x up fused) and without (gathered, then SDPA; PyTorch's operators): the same greedy
    tokens for a mixed batch of adapters and base, so prefill chunks and decodes share steps."""
    native = engine.base("demo", "").native
    assert native.model.kernel is not None or lora_kernel.load() is None
    assert native.describe()["kv_cache"]["decode_attention"].startswith("C" if native.model.kernel else "P")
    assert native.describe()["step"]["elementwise"].startswith("C" if native.model.kernel else "P")
    assert native.describe()["step"]["gemm"] == "oneDNN, weights packed" or not torch.backends.mkldnn.is_available()
    jobs = [("lora", adapters["lora"]), ("dora", adapters["dora"]), None, ("lora_r16", adapters["lora_r16"])]
    prompts = [_prompt(engine, PROMPTS[i % len(PROMPTS)] + " x" * i) for i in range(len(jobs))]

    def batch() -> list[list[int]]:
        params = SamplingParams(max_tokens=24, temperature=0.0)
        pairs = zip(prompts, jobs, strict=True)
        requests = [native.submit(prompt, params, *(job or (None, None))) for prompt, job in pairs]
        return [collect(r) for r in requests]

    in_place = batch()
    kernel, native.model.kernel = native.model.kernel, None
    try:
        gathered = batch()
    finally:
        native.model.kernel = kernel
    assert in_place == gathered
    assert all(len(tokens) == 24 for tokens in in_place)


def _safetensors_bytes(header: object, data: bytes = b"", length: int | None = None) -> bytes:
    encoded = json.dumps(header).encode() if not isinstance(header, bytes) else header
    return (len(encoded) if length is None else length).to_bytes(8, "little") + encoded + data


def test_an_adapter_file_is_read_as_the_safetensors_library_reads_it(tmp_path):
    """read_safetensors (the engine's loader) gives every tensor the library gives, bit for bit, in each dtype an
    adapter's weights come in, as read-only views of the file (nothing may write into a registered artifact)."""
    from safetensors.torch import load_file, save_file

    from adaptery.engine.lora import read_safetensors

    torch.manual_seed(0)
    tensors = {"a": torch.randn(4, 6), "b": torch.randn(3), "empty": torch.zeros(0, 5), "scalar": torch.tensor(2.5)}
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        path = tmp_path / f"{dtype}.safetensors"
        save_file({name: t.to(dtype) for name, t in tensors.items()}, path, metadata={"format": "pt"})
        expected, got = load_file(path), read_safetensors(path)
        assert got.keys() == expected.keys()
        for name, tensor in expected.items():
            array = got[name]
            assert array.shape == tuple(tensor.shape) and not array.flags.writeable
            bits = tensor.view(torch.int16) if dtype == torch.bfloat16 else tensor
            assert torch.equal(torch.from_numpy(array.copy()).view(bits.dtype), bits), (dtype, name)


MALFORMED_SAFETENSORS = {
    "empty file": b"",
    "shorter than its length": b"\x05\x00\x00",
    "header beyond the file": _safetensors_bytes({"a": {}}, length=10_000),
    "header over 100 MB": (200_000_000).to_bytes(8, "little") + b"{}",
    "header not JSON": _safetensors_bytes(b"{not json"),
    "header a list": _safetensors_bytes([1, 2]),
    "an integer dtype": _safetensors_bytes({"a": {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8),
    "an entry not an object": _safetensors_bytes({"a": 3}),
    "a negative dimension": _safetensors_bytes(
        {"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4
    ),
    "a shape not a list": _safetensors_bytes(
        {"a": {"dtype": "F32", "shape": "4", "data_offsets": [0, 16]}}, b"\0" * 16
    ),
    "bytes past the end": _safetensors_bytes({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8),
    "a range reversed": _safetensors_bytes({"a": {"dtype": "F32", "shape": [0], "data_offsets": [8, 4]}}, b"\0" * 8),
    "a negative offset": _safetensors_bytes({"a": {"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]}}, b"\0" * 8),
    "shape and bytes disagree": _safetensors_bytes(
        {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}}, b"\0" * 16
    ),
    "offsets not integers": _safetensors_bytes(
        {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0.0, 4.0]}}, b"\0" * 4
    ),
}


@pytest.mark.parametrize("case", list(MALFORMED_SAFETENSORS))
def test_a_malformed_adapter_file_is_refused_with_its_reason_never_read_out_of_bounds(case, tmp_path, demo_model_dir):
    """Whatever the header claims, the engine's loader raises AdapterRejected naming the file, before any view is
    made; and so does prepare_adapter for an adapter directory holding such a file (a 400 for the client)."""
    from adaptery.engine.lora import read_safetensors

    path = tmp_path / "adapter_model.safetensors"
    path.write_bytes(MALFORMED_SAFETENSORS[case])
    with pytest.raises(AdapterRejected, match="adapter_model.safetensors is not a valid safetensors file"):
        read_safetensors(path)
    adapter = make_adapter(demo_model_dir, tmp_path / "adapter", seed=1)
    shutil.copy(path, Path(adapter) / "adapter_model.safetensors")
    native = NativeLlama(AutoModelForCausalLM.from_pretrained(demo_model_dir), torch.float32, 64)
    with pytest.raises(AdapterRejected, match="not a valid safetensors file"):
        prepare_adapter("bad", Path(adapter), native, 32, torch.float32)
