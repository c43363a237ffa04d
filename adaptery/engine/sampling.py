"""Turning logits into the next token, and text into what the client may see so far."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class Constraint:
    """What a request's output must match (`engine.constraints`): a grammar in llguidance's Lark dialect,
    `%json {schema}` embedding a JSON Schema. Plain data, so it travels with the request to any engine."""

    grammar: str


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    top_k: int = 0  # 0: no limit
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: bool = False
    top_logprobs: int = 0
    constraint: Constraint | None = None
    logit_bias: dict[int, float] = field(default_factory=dict)  # OpenAI's: token id -> added to its logit

    def __post_init__(self) -> None:
        # Over the agent protocol the params arrive as JSON: token ids as object keys (strings), the constraint as an
        # object.
        object.__setattr__(self, "logit_bias", {int(k): float(v) for k, v in (self.logit_bias or {}).items()})
        if isinstance(self.constraint, dict):
            object.__setattr__(self, "constraint", Constraint(**self.constraint))


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # the most likely alternatives (token id, logprob), best first


def apply_logit_bias(logits: torch.Tensor, params: SamplingParams) -> None:
    """Add the request's `logit_bias` to one sequence's logits ((vocab,)), in place, before anything reads them
    (greedy, sampling, logprobs), as OpenAI does: -100 bans a token, 100 all but forces it."""
    if params.logit_bias:
        ids = torch.tensor(list(params.logit_bias), dtype=torch.long)
        logits[ids] += torch.tensor(list(params.logit_bias.values()), dtype=logits.dtype)


def penalize(logits: torch.Tensor, params: SamplingParams, counts: dict[int, int]) -> torch.Tensor:
    """OpenAI's presence and frequency penalties over the tokens generated so far."""
    if not counts or (params.presence_penalty == 0 and params.frequency_penalty == 0):
        return logits
    ids = torch.tensor(list(counts), dtype=torch.long)
    seen = torch.tensor(list(counts.values()), dtype=logits.dtype)
    logits = logits.clone()
    logits[ids] -= seen * params.frequency_penalty + params.presence_penalty
    return logits


def sample(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None, counts: dict[int, int]
) -> tuple[int, TokenLogprob | None]:
    """The next token for one sequence (logits: fp32 (vocab,)), and its logprobs when asked for.

    Logprobs are those of the model's distribution after penalties, before temperature/top-k/top-p.
    """
    logits = penalize(logits, params, counts)
    token = next_token(logits, params, generator)
    if not params.logprobs:
        return token, None
    logprobs = torch.log_softmax(logits, dim=-1)
    top: list[tuple[int, float]] = []
    if params.top_logprobs:
        values, ids = torch.topk(logprobs, params.top_logprobs)
        top = list(zip(ids.tolist(), values.tolist(), strict=True))
    return token, TokenLogprob(token, float(logprobs[token]), top)


def next_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """logits: (vocab,) for the last position. Temperature 0 is greedy decoding."""
    if params.temperature <= 0:
        return int(torch.argmax(logits))
    scaled = logits.float() / params.temperature
    if 0 < params.top_k < scaled.shape[-1]:
        # exactly k tokens, ties broken as argmax breaks them (bf16 logits tie often)
        keep = torch.topk(scaled, params.top_k).indices
        scaled = torch.full_like(scaled, float("-inf")).scatter_(0, keep, scaled[keep])
    probs = torch.softmax(scaled, dim=-1)
    if not bool(torch.isfinite(probs).all()):  # a temperature so small that scaling overflows: its limit, greedy
        return int(torch.argmax(logits))
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < params.top_p  # always keeps the top token
        sorted_probs = torch.where(keep, sorted_probs, torch.zeros_like(sorted_probs))
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


class Detokenizer:
    """The text of a growing list of token ids, decoded a few ids at a time, as vLLM and TGI do it: each new
    token decodes only the ids since the last complete piece of text (a byte-level tokenizer may split one
    character over several tokens), not the whole output again, which was quadratic in its length."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""
        self._prefix = 0  # ids[_prefix:_read] decode to the end of `text`, for context
        self._read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token: int) -> str:
        """The text `token` completes (often "", while a character is incomplete)."""
        self.ids.append(token)
        before = self._decode(self.ids[self._prefix : self._read])
        after = self._decode(self.ids[self._prefix :])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        new = after[len(before) :]
        self._prefix, self._read = self._read, len(self.ids)
        self.text += new
        return new

    def rest(self) -> str:
        """Text of ids not yet completed (an incomplete character's bytes dropped), at the end."""
        before = self._decode(self.ids[self._prefix : self._read])
        return self._decode(self.ids[self._prefix :])[len(before) :].rstrip("\ufffd")


def releasable(text: str, stop: list[str]) -> tuple[str, bool]:
    """The part of `text` safe to send, and whether a stop sequence ended it.

    Text that could be the start of a stop sequence, or an incomplete UTF-8 character, is held
    back until the next tokens decide. A caller streaming passes only the text not yet sent: no stop
    sequence can start in what was sent (its start would have been held back).
    """
    for sequence in stop:
        at = text.find(sequence)
        if at != -1:
            return text[:at], True
    hold = 0
    for sequence in stop:
        for length in range(min(len(sequence) - 1, len(text)), 0, -1):
            if text.endswith(sequence[:length]):
                hold = max(hold, length)
                break
    if text.endswith("\ufffd"):
        hold = max(hold, 1)
    return text[: len(text) - hold], False
