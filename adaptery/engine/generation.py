"""The inference engine's front: one object the platform talks to, whatever path serves a model.

- **native**: Llama-family models on the CPU run in `batching.BatchEngine` (continuous batching,
  paged KV cache, heterogeneous multi-LoRA batches; LoRA, rsLoRA and DoRA adapters natively).
- **transformers**: other architectures, non-CPU devices, and adapters the native path does not
  implement (LoHa, LoKr, IA3, exotic LoRA options) run through transformers + PEFT, one request at
  a time per base (`fallback.TransformersBase`).

`generate` streams text deltas for every path alike; `describe()` says which path each base and
adapter uses. Every request ends by its deadline (`request_timeout_s` after it was submitted) on either
path, and a prompt's text is measured against the context before any template or tokenizer runs on it.
"""

from __future__ import annotations

import functools
import json
import logging
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from adaptery.data.chat_template import TemplateBudget, chat_text, stored_chat_template, template_messages
from adaptery.engine.batching import BatchEngine, Event
from adaptery.engine.constraints import Grammars, UnsupportedConstraint
from adaptery.engine.constraints import check as check_constraint
from adaptery.engine.fallback import TransformersBase
from adaptery.engine.loading import load_causal_lm
from adaptery.engine.lora import AdapterInfo, AdapterRejected, inspect_adapter
from adaptery.engine.metrics import EngineMetrics
from adaptery.engine.native import MODULE_SITE, NativeLlama, check_quantization, native_support
from adaptery.engine.sampling import Constraint, Detokenizer, SamplingParams, TokenLogprob, releasable
from adaptery.engine.stopping import WAKE, listening
from adaptery.engine.tool_calls import ToolFormat, response_template_format, tool_format
from adaptery.settings import Settings

log = logging.getLogger("adaptery.engine")
__all__ = [
    "AdapterRejected",
    "AdapterSpec",
    "Delta",
    "EngineUnavailable",
    "GenerationFailed",
    "GenerationTimedOut",
    "InferenceEngine",
    "PromptTooLong",
    "UnsupportedConstraint",
    "Usage",
]
MiB = 1024 * 1024


@functools.lru_cache(maxsize=1024)
def adapter_chat_template(adapter_dir: Path, max_json_depth: int) -> str | None:
    """The chat template saved beside an adapter (`data.chat_template.stored_chat_template`); None when absent."""
    stored = stored_chat_template(adapter_dir, max_json_depth=max_json_depth)
    return stored[0] if stored is not None else None


class PromptTooLong(ValueError):
    pass


class GenerationFailed(RuntimeError):
    """The engine ended a request with an error (the request's own: the engine goes on with the others)."""


class GenerationTimedOut(GenerationFailed):
    """The engine ended a request that was still running (or queued) at its deadline."""


class EngineUnavailable(GenerationFailed):
    """The engine itself is down or restarting (an infer agent's vLLM server died, say), not the request at
    fault: a request that has produced nothing yet may be served elsewhere."""


@dataclass
class Delta:
    text: str
    finish_reason: str | None = None
    # OpenAI chat-format logprob entries of the tokens behind this delta (when logprobs were asked for)
    logprobs: list[dict[str, Any]] | None = None


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(frozen=True)
class AdapterSpec:
    key: str  # content hash: the same bytes are loaded once
    path: Path
    # its files' blobs (name -> sha256), for an infer agent that fetches them by hash; None: local only
    files: dict[str, str] | None = field(default=None, compare=False, hash=False)


def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "float32":
        return torch.float32
    if dtype == "bfloat16":
        return torch.bfloat16
    if device != "cpu":
        return torch.bfloat16
    return torch.bfloat16 if cpu_has_bf16() else torch.float32


class _Base:
    def __init__(self, engine: InferenceEngine, base_id: str, ref: str) -> None:
        self.ref = ref
        self.lock = threading.Lock()
        model, self.tokenizer = load_causal_lm(ref, dtype=torch.float32, device="cpu")
        self.context = int(getattr(model.config, "max_position_embeddings", 2048))
        eos = {self.tokenizer.eos_token_id}
        generation_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos.update(generation_eos if isinstance(generation_eos, list) else [generation_eos])
        self.eos_ids = {e for e in eos if e is not None}
        self.dtype = engine.dtype
        self.vocab = int(model.get_output_embeddings().weight.shape[0])  # the logits' width
        self.grammars = Grammars(self.tokenizer, self.vocab, self.eos_ids)
        reason = native_support(model.config) if engine.device == "cpu" else f"device {engine.device}"
        self.path_reason = reason
        self.native: BatchEngine | None = None
        self._fallback: TransformersBase | None = None
        if reason is None:
            self.path = "native"
            self.native = BatchEngine(
                base_id,
                NativeLlama(model, engine.dtype, self.context, quantize=engine.quantize),
                self.eos_ids,
                max_rank=engine.max_lora_rank,
                kv_cache_bytes=engine.kv_cache_bytes,
                adapter_cache_bytes=engine.adapter_cache_bytes,
                max_batch=engine.max_batch,
                max_step_tokens=engine.max_step_tokens,
                metrics=engine.metrics,
                adapter_dtype=engine.adapter_dtype,
                request_timeout=engine.request_timeout_s,
                grammars=self.grammars,
            ).start()
            del model
        else:
            self.path = "transformers"
            model.to(dtype=engine.dtype if engine.device != "cpu" else torch.float32, device=engine.device)
            self._fallback = TransformersBase(model)
        log.info("base model %s serves on the %s path (%s)", base_id, self.path, reason or "Llama family")

    def fallback(self) -> TransformersBase:
        with self.lock:
            if self._fallback is None:  # a native base asked for a PEFT-only adapter: a transformers copy
                model, _ = load_causal_lm(self.ref, dtype=torch.float32, device="cpu")
                self._fallback = TransformersBase(model)
            return self._fallback


def held_adapter_dtype(setting: str) -> torch.dtype:
    """The dtype adapters are held in on the fused kernel, from ADAPTERY_ENGINE_ADAPTER_DTYPE. "auto" is bf16: on a
    float32 engine the rounding moves a chosen token's logprob by ~1e-3 and flips greedy choices only at near-ties
    (bench/adapter_dtype.py), for half the bytes each distinct adapter streams per step."""
    return torch.bfloat16 if setting == "auto" else getattr(torch, setting)


class InferenceEngine:
    def __init__(
        self,
        device: str = "auto",
        *,
        max_lora_rank: int = 64,
        dtype: str = "auto",
        kv_cache_mb: int = 512,
        adapter_cache_mb: int = 1024,
        max_batch: int = 32,
        max_step_tokens: int = 256,
        quantize: str | None = None,
        adapter_dtype: str = "auto",
        request_timeout_s: float | None = None,
        max_bytes_per_token: int = 32,
        template_budget: TemplateBudget | None = None,
    ) -> None:
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        self.quantize = quantize  # "int8": the native path's base weights through torchao (bench/quant.py)
        if quantize is not None:
            check_quantization(quantize)
        self.adapter_dtype = held_adapter_dtype(adapter_dtype)
        self.dtype = resolve_dtype(dtype, self.device)
        self.max_lora_rank = max_lora_rank
        self.kv_cache_bytes = kv_cache_mb * MiB
        self.adapter_cache_bytes = adapter_cache_mb * MiB
        self.max_batch = max_batch
        self.max_step_tokens = max_step_tokens
        self.request_timeout_s = request_timeout_s  # None: no deadline
        self.max_bytes_per_token = max_bytes_per_token
        # Every chat template renders within this, an adapter's own above all (`data.chat_template`).
        self.template_budget = template_budget or TemplateBudget.default()
        self.metrics = EngineMetrics()
        self._bases: dict[str, _Base] = {}
        self._adapters: dict[str, AdapterInfo] = {}
        self._loading = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> InferenceEngine:
        """The engine as `serve` embeds it and an infer agent hosts it: the same settings, one place."""
        return cls(
            settings.device,
            max_lora_rank=settings.max_lora_rank,
            dtype=settings.engine_dtype,
            kv_cache_mb=settings.engine_kv_cache_mb,
            adapter_cache_mb=settings.engine_adapter_cache_mb,
            max_batch=settings.engine_max_batch,
            quantize=None if settings.engine_quantize == "none" else settings.engine_quantize,
            adapter_dtype=settings.engine_adapter_dtype,
            template_budget=TemplateBudget.from_settings(settings),
            request_timeout_s=settings.engine_request_timeout_seconds,
            max_bytes_per_token=settings.engine_max_bytes_per_token,
        )

    def base(self, base_id: str, ref: str) -> _Base:
        with self._loading:
            if base_id not in self._bases:
                log.info("loading base model %s from %s", base_id, ref)
                self._bases[base_id] = _Base(self, base_id, ref)
            return self._bases[base_id]

    def chat_prompt(
        self,
        base_id: str,
        ref: str,
        messages: list[dict[str, Any]],
        adapter: AdapterSpec | None = None,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[int]:
        """Token ids of `messages` (canonical, `data.chat`: tool calls and results included) and `tools`
        formatted for generation. An adapter that stores its own chat template (training saves the tokenizer
        beside the adapter) is prompted exactly as it was trained."""
        loaded = self.base(base_id, ref)
        texts = [message["content"] for message in messages]
        texts += [call["function"]["arguments"] for message in messages for call in message.get("tool_calls") or []]
        self._refuse_oversized(loaded, [*texts, json.dumps(tools or [])])
        tokenizer = loaded.tokenizer
        text = chat_text(
            tokenizer,
            template_messages(messages),
            budget=self.template_budget,
            chat_template=self._template(adapter),
            add_generation_prompt=True,
            tools=tools,
        )
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    def _template(self, adapter: AdapterSpec | None) -> str | None:
        return adapter_chat_template(adapter.path, self.template_budget.max_json_depth) if adapter else None

    def tool_format(self, base_id: str, ref: str, adapter: AdapterSpec | None = None) -> ToolFormat | None:
        """How the model (its adapter's template, else its base's) writes tool calls; None: it renders no tools."""
        tokenizer = self.base(base_id, ref).tokenizer
        template = self._template(adapter) or getattr(tokenizer, "chat_template", None) or ""
        template = template if isinstance(template, str) else ""
        if "tools" not in template:
            return None
        return response_template_format(tokenizer) or tool_format(template)

    def check_constraint(self, constraint: Constraint) -> None:
        """UnsupportedConstraint (a client error) naming what the grammar engine cannot enforce."""
        check_constraint(constraint)

    def text_prompt(self, base_id: str, ref: str, prompt: str) -> list[int]:
        loaded = self.base(base_id, ref)
        self._refuse_oversized(loaded, [prompt])
        return loaded.tokenizer(prompt)["input_ids"]

    def _refuse_oversized(self, loaded: _Base, texts: list[str]) -> None:
        """PromptTooLong for text the context could not hold even at `max_bytes_per_token` bytes a token (a
        few bytes is usual), before a template or tokenizer spends anything on it: a 4 MB message once took
        450 MB of memory and 5.8 s to reach its context-length 400."""
        limit = loaded.context * self.max_bytes_per_token
        size = sum(len(text.encode("utf-8", "surrogatepass")) for text in texts)
        if size > limit:
            raise PromptTooLong(
                f"This model's maximum context length is {loaded.context} tokens, which cannot hold more than "
                f"{limit} bytes of text; the prompt is {size} bytes. Please reduce the length of the prompt."
            )

    def check_fits(self, base_id: str, ref: str, prompt_ids: list[int], max_tokens: int) -> None:
        loaded = self.base(base_id, ref)
        context = loaded.context
        total = len(prompt_ids) + max_tokens
        if total > context:
            raise PromptTooLong(
                f"This model's maximum context length is {context} tokens. However, you requested "
                f"{total} tokens ({len(prompt_ids)} in the messages, {max_tokens} in the "
                "completion). Please reduce the length of the messages or completion."
            )
        if loaded.native is not None and total > loaded.native.cache.capacity_tokens:
            raise PromptTooLong(
                f"This server's KV cache holds {loaded.native.cache.capacity_tokens} tokens; you requested {total} "
                f"({len(prompt_ids)} in the messages, {max_tokens} in the completion)."
            )

    def check_adapter(self, adapter: AdapterSpec) -> AdapterInfo:
        """How `adapter` will be served; AdapterRejected (a client error) when it cannot be."""
        info = self._adapters.get(adapter.key)
        if info is None:
            info = inspect_adapter(adapter.path, self.max_lora_rank, set(MODULE_SITE))
            self._adapters[adapter.key] = info
        return info

    def generate(
        self,
        base_id: str,
        ref: str,
        adapter: AdapterSpec | None,
        prompt_ids: list[int],
        params: SamplingParams,
        usage: Usage,
        should_stop: Callable[[], bool] = lambda: False,
        fairness_key: str = "",
        streamed: bool = True,
    ) -> Iterator[Delta]:
        """Stream the completion of `prompt_ids` as text deltas; the last delta has a finish_reason. The native
        engine shares its batch fairly between `fairness_key`s (opaque; the server passes the tenant). `streamed` is
        the engines' common interface (vLLM sends an answer nobody reads along in one piece): here each token is
        handed over as it is sampled either way, and an infer agent coalesces the deltas of an unstreamed answer."""
        loaded = self.base(base_id, ref)
        self.check_fits(base_id, ref, prompt_ids, params.max_tokens)
        info = self.check_adapter(adapter) if adapter is not None else None
        usage.prompt_tokens = len(prompt_ids)
        key, path = (adapter.key, adapter.path) if adapter is not None else (None, None)
        if loaded.native is not None and (info is None or info.native):
            events = self._native_events(loaded.native, key, path, prompt_ids, params, should_stop, fairness_key)
        else:
            events = loaded.fallback().events(
                key, path, prompt_ids, params, loaded.eos_ids, should_stop, self.request_timeout_s, loaded.grammars
            )
            self.metrics.requests.labels(base_id, "transformers", "served").inc()
        return self._deltas(loaded.tokenizer, events, params, usage, should_stop)

    @staticmethod
    def _native_events(
        engine: BatchEngine,
        key: str | None,
        path: Path | None,
        prompt_ids: list[int],
        params: SamplingParams,
        should_stop: Callable[[], bool],
        fairness_key: str,
    ) -> Iterator[Event]:
        request = engine.submit(prompt_ids, params, key, path, fairness_key)
        try:
            with listening(should_stop, request.events) as timeout:
                while True:
                    try:
                        event = request.events.get(timeout=timeout)
                    except queue.Empty:
                        event = WAKE
                    if event is WAKE:
                        if should_stop():
                            return
                        continue
                    yield event
                    if event.finish is not None:
                        return
        finally:
            request.cancel()  # no-op once finished; frees the slot when the consumer went away

    @staticmethod
    def _deltas(
        tokenizer: PreTrainedTokenizerBase,
        events: Iterator[Event],
        params: SamplingParams,
        usage: Usage,
        should_stop: Callable[[], bool],
    ) -> Iterator[Delta]:
        text = Detokenizer(tokenizer)
        pending: list[dict[str, Any]] = []
        sent = 0  # characters of text.text sent
        finish = "stop"
        ended = False  # by the engine (end of text, length): what was held back for a stop sequence is text
        try:
            for event in events:
                if event.finish == "timeout":
                    raise GenerationTimedOut(event.error)
                if event.finish == "error":
                    raise GenerationFailed(event.error or "generation failed")
                if event.finish is not None:
                    finish, ended = event.finish, True
                    break
                if should_stop():
                    break
                text.add(event.token)
                usage.completion_tokens = len(text.ids)
                if event.logprob is not None:
                    pending.append(_logprob_entry(tokenizer, event.logprob))
                visible, stopped = releasable(text.text[sent:], params.stop)
                if visible:
                    yield Delta(visible, logprobs=pending or None)
                    sent, pending = sent + len(visible), []
                if stopped:
                    finish = "stop"
                    break
            if ended:
                tail = text.text[sent:] + text.rest()
                if tail and not any(s in tail for s in params.stop):
                    yield Delta(tail, logprobs=pending or None)
                    pending = []
        finally:
            events.close()
        yield Delta("", finish, logprobs=pending or None)

    def describe(self) -> dict[str, Any]:
        bases = {}
        for base_id, loaded in list(self._bases.items()):
            bases[base_id] = {
                "path": loaded.path,
                "why": loaded.path_reason or "Llama-family architecture",
                "dtype": str(loaded.dtype).removeprefix("torch."),
                "quantized": loaded.native.model.quantize if loaded.native is not None else None,
                **(loaded.native.describe() if loaded.native is not None else {}),
            }
        adapters = {
            key: {"type": i.peft_type, "rank": i.rank, "served": i.path_reason} for key, i in self._adapters.items()
        }
        return {"device": self.device, "max_lora_rank": self.max_lora_rank, "bases": bases, "adapters": adapters}

    def stop(self) -> None:
        for loaded in self._bases.values():
            if loaded.native is not None:
                loaded.native.stop()


def _logprob_entry(tokenizer: PreTrainedTokenizerBase, logprob: TokenLogprob) -> dict[str, Any]:
    def item(token_id: int, value: float) -> dict[str, Any]:
        text = tokenizer.decode([token_id])
        return {"token": text, "logprob": value, "bytes": list(text.encode("utf-8"))}

    return {**item(logprob.token_id, logprob.logprob), "top_logprobs": [item(t, v) for t, v in logprob.top]}
