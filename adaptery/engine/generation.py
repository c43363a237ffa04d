"""The foundation's inference path: one copy of each base model, adapters attached through PEFT.

Requests on the same base run one at a time under that base's lock, switching the active adapter
per request. The multi-adapter batching engine replaces this path; its interface stays.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel
from transformers import DynamicCache

from adaptery.engine.loading import load_causal_lm
from adaptery.engine.sampling import SamplingParams, next_token, releasable

log = logging.getLogger("adaptery.engine")


class PromptTooLong(ValueError):
    pass


@dataclass
class Delta:
    text: str
    finish_reason: str | None = None


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(frozen=True)
class AdapterSpec:
    key: str  # content hash: the same bytes are loaded once
    path: Path


class _LoadedBase:
    def __init__(self, ref: str, device: str, dtype: torch.dtype, max_adapters: int) -> None:
        self.model, self.tokenizer = load_causal_lm(ref, dtype=dtype, device=device)
        self.peft: PeftModel | None = None
        self.adapters: OrderedDict[str, None] = OrderedDict()
        self.max_adapters = max_adapters
        self.lock = threading.Lock()
        self.context = int(getattr(self.model.config, "max_position_embeddings", 2048))
        eos = {self.tokenizer.eos_token_id}
        generation_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        eos.update(generation_eos if isinstance(generation_eos, list) else [generation_eos])
        self.eos_ids = {e for e in eos if e is not None}

    @contextmanager
    def activated(self, adapter: AdapterSpec | None) -> Iterator[torch.nn.Module]:
        """The module to run for this request, with only its adapter active (lock held)."""
        if adapter is None:
            if self.peft is None:
                yield self.model
            else:
                with self.peft.disable_adapter():  # LoRA layers are injected into the base in place
                    yield self.peft
            return
        name = "a" + adapter.key[:24]
        if self.peft is None:
            self.peft = PeftModel.from_pretrained(self.model, str(adapter.path), adapter_name=name)
            self.peft.eval()
        elif name not in self.adapters:
            self.peft.load_adapter(str(adapter.path), adapter_name=name)
        self.adapters[name] = None
        self.adapters.move_to_end(name)
        while len(self.adapters) > self.max_adapters:
            evicted, _ = self.adapters.popitem(last=False)
            self.peft.delete_adapter(evicted)
        self.peft.set_adapter(name)
        yield self.peft


class InferenceEngine:
    def __init__(self, device: str = "auto", max_adapters_per_base: int = 16) -> None:
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        self.dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
        self.max_adapters = max_adapters_per_base
        self._bases: dict[str, _LoadedBase] = {}
        self._loading = threading.Lock()

    def base(self, base_id: str, ref: str) -> _LoadedBase:
        with self._loading:
            if base_id not in self._bases:
                log.info("loading base model %s from %s", base_id, ref)
                self._bases[base_id] = _LoadedBase(ref, self.device, self.dtype, self.max_adapters)
            return self._bases[base_id]

    def chat_prompt(self, base_id: str, ref: str, messages: list[dict[str, str]]) -> list[int]:
        tokenizer = self.base(base_id, ref).tokenizer
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    def text_prompt(self, base_id: str, ref: str, prompt: str) -> list[int]:
        return self.base(base_id, ref).tokenizer(prompt)["input_ids"]

    def check_fits(self, base_id: str, ref: str, prompt_ids: list[int], max_tokens: int) -> None:
        context = self.base(base_id, ref).context
        if len(prompt_ids) + max_tokens > context:
            raise PromptTooLong(
                f"This model's maximum context length is {context} tokens. However, you requested "
                f"{len(prompt_ids) + max_tokens} tokens ({len(prompt_ids)} in the messages, {max_tokens} in the "
                "completion). Please reduce the length of the messages or completion."
            )

    def generate(
        self,
        base_id: str,
        ref: str,
        adapter: AdapterSpec | None,
        prompt_ids: list[int],
        params: SamplingParams,
        usage: Usage,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> Iterator[Delta]:
        """Stream the completion of `prompt_ids` as text deltas; the last delta has a finish_reason."""
        loaded = self.base(base_id, ref)
        self.check_fits(base_id, ref, prompt_ids, params.max_tokens)
        usage.prompt_tokens = len(prompt_ids)
        generator = None
        if params.seed is not None:
            generator = torch.Generator().manual_seed(params.seed)
        with loaded.lock, torch.inference_mode(), loaded.activated(adapter) as model:
            cache = DynamicCache()
            input_ids = torch.tensor([prompt_ids], device=self.device)
            generated: list[int] = []
            sent = ""
            finish = "length"
            for _ in range(params.max_tokens):
                if should_stop():
                    finish = "stop"
                    break
                logits = model(input_ids=input_ids, past_key_values=cache, use_cache=True).logits[0, -1]
                token = next_token(logits, params, generator)
                if token in loaded.eos_ids:
                    finish = "stop"
                    break
                generated.append(token)
                usage.completion_tokens = len(generated)
                text = loaded.tokenizer.decode(generated, skip_special_tokens=True)
                visible, stopped = releasable(text, params.stop)
                if len(visible) > len(sent):
                    yield Delta(visible[len(sent) :])
                    sent = visible
                if stopped:
                    finish = "stop"
                    break
                input_ids = torch.tensor([[token]], device=self.device)
            else:
                text = loaded.tokenizer.decode(generated, skip_special_tokens=True)
                tail = text[len(sent) :].rstrip("\ufffd")
                if tail and not any(s in text for s in params.stop):
                    yield Delta(tail)
        yield Delta("", finish)
