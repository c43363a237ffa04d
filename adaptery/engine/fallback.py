"""The transformers path: models outside the native Llama family, and PEFT types the native path does
not implement (LoHa, LoKr, IA3, LoRA variants with exotic options).

Correct but slower: one request at a time per base model, under a lock, with PEFT switching the
active adapter per request (each adapter loaded once, an LRU of them kept). A request's deadline counts
its wait for the lock too: one that cannot finish by it ends with finish "timeout", as on the native path.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import PeftConfig, PeftModel
from transformers import DynamicCache, PreTrainedModel

from adaptery.engine.batching import Event, deadline_message
from adaptery.engine.constraints import Grammars
from adaptery.engine.sampling import SamplingParams, apply_logit_bias, sample


class TransformersBase:
    def __init__(self, model: PreTrainedModel, max_adapters: int = 16) -> None:
        self.model = model
        self.peft: PeftModel | None = None
        self.adapters: OrderedDict[str, None] = OrderedDict()
        self.max_adapters = max_adapters
        self.lock = threading.Lock()

    @contextmanager
    def activated(self, key: str | None, path: Path | None) -> Iterator[torch.nn.Module]:
        """The module to run for this request, with only its adapter active (lock held)."""
        if key is None:
            if self.peft is None:
                yield self.model
            else:
                with self.peft.disable_adapter():  # PEFT layers are injected into the base in place
                    yield self.peft
            return
        name = "a" + key[:24]
        peft_type = PeftConfig.from_pretrained(str(path)).peft_type
        if self.peft is not None and self.peft.peft_type != peft_type:
            # one PeftModel holds adapters of one type: switching type unloads the others first
            self.model = self.peft.unload()
            self.peft = None
            self.adapters.clear()
        if self.peft is None:
            self.adapters.clear()
            self.peft = PeftModel.from_pretrained(self.model, str(path), adapter_name=name)
            self.peft.eval()
        elif name not in self.adapters:
            self.peft.load_adapter(str(path), adapter_name=name)
        self.adapters[name] = None
        self.adapters.move_to_end(name)
        while len(self.adapters) > self.max_adapters:
            evicted, _ = self.adapters.popitem(last=False)
            self.peft.delete_adapter(evicted)
        self.peft.set_adapter(name)
        yield self.peft

    def events(
        self,
        key: str | None,
        path: Path | None,
        prompt_ids: list[int],
        params: SamplingParams,
        eos_ids: set[int],
        should_stop: Callable[[], bool],
        timeout: float | None = None,
        grammars: Grammars | None = None,
    ) -> Iterator[Event]:
        """The request's tokens as events; with a constraint in `params`, `grammars` masks every step."""
        matcher = grammars.matcher(params.constraint) if grammars is not None and params.constraint else None
        deadline = time.perf_counter() + timeout if timeout is not None else float("inf")
        generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        device = next(self.model.parameters()).device
        counts: dict[int, int] = {}
        if not self.lock.acquire(timeout=-1 if timeout is None else timeout):
            yield Event(finish="timeout", error=deadline_message(timeout))
            return
        try:
            with torch.inference_mode(), self.activated(key, path) as model:
                cache = DynamicCache()
                input_ids = torch.tensor([prompt_ids], device=device)
                for _ in range(params.max_tokens):
                    if should_stop():
                        return
                    if time.perf_counter() > deadline:
                        yield Event(finish="timeout", error=deadline_message(timeout))
                        return
                    logits = model(input_ids=input_ids, past_key_values=cache, use_cache=True).logits[0, -1]
                    logits = logits.float().cpu()
                    apply_logit_bias(logits, params)
                    if matcher is not None:
                        grammars.mask(logits.unsqueeze(0), [(matcher, 0)])
                    token, logprob = sample(logits, params, generator, counts)
                    if token in eos_ids:
                        yield Event(finish="stop")
                        return
                    counts[token] = counts.get(token, 0) + 1
                    yield Event(token=token, logprob=logprob)
                    if matcher is not None and (not matcher.consume_token(token) or matcher.is_stopped()):
                        yield Event(finish="stop")
                        return
                    input_ids = torch.tensor([[token]], device=device)
        finally:
            self.lock.release()
        yield Event(finish="length")
