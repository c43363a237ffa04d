"""Turning logits into the next token, and text into what the client may see so far."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None


def next_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """logits: (vocab,) for the last position. Temperature 0 is greedy decoding."""
    if params.temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < params.top_p  # always keeps the top token
        sorted_probs = torch.where(keep, sorted_probs, torch.zeros_like(sorted_probs))
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


def releasable(text: str, stop: list[str]) -> tuple[str, bool]:
    """The part of `text` safe to send, and whether a stop sequence ended it.

    Text that could be the start of a stop sequence, or an incomplete UTF-8 character, is held
    back until the next tokens decide.
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
