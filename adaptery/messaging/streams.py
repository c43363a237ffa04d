"""Putting an agent's stream back together: messages in sequence, each once, until the end marker.

Core NATS delivers one publisher's messages on one subject in order, or not at all (a message in flight
during a reconnect is lost). So the rule is strict: a message with the next sequence number is delivered,
one already seen (a duplicate) is dropped, one past the next is a gap, which ends the stream with an error
rather than a silently mangled answer. Nothing after the end marker counts.
"""

from __future__ import annotations

from typing import Any


class StreamBroken(RuntimeError):
    """The stream cannot be completed: a message was lost, or the agent stopped sending."""


class StreamReassembly:
    def __init__(self) -> None:
        self.next_seq = 0
        self.ended = False

    def accept(self, message: dict[str, Any]) -> dict[str, Any] | None:
        """The message if it is the next one, None if it adds nothing (a duplicate, or anything after the end);
        StreamBroken for a gap or a message without a sequence number."""
        seq = message.get("seq")
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
            raise StreamBroken(f"a stream message without a valid sequence number: {seq!r}")
        if self.ended or seq < self.next_seq:
            return None
        if seq > self.next_seq:
            raise StreamBroken(f"message {self.next_seq} of the stream was lost (received {seq} next)")
        self.next_seq += 1
        if message.get("end"):
            self.ended = True
        return message


class StreamInvalid(StreamBroken):
    """The agent broke the protocol: what it claims cannot be true of an honest engine's output."""


FINISH_REASONS = frozenset({"stop", "length", "tool_calls", "content_filter"})
WIRE_OVERHEAD_BYTES = 64 * 1024  # the accepted message, keepalives, the end marker: what is not tokens


def _count(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise StreamInvalid(f"{what} must be a non-negative integer, not {value!r}")
    return value


class StreamAccount:
    """What one choice's stream delivered, counted on this side, never taken from the agent's word.

    Each delta carries the number of tokens behind it (`tokens`); the control plane adds them up, and that sum is
    what is billed (the end marker's `usage` is checked for shape and otherwise ignored). The claims are bounded
    by what an honest engine can produce: at most `max_tokens` tokens, at most `max_bytes_per_token` UTF-8 bytes
    of text per token counted so far (text held back for a stop sequence comes out later, so the bound is on the
    running totals), at most one logprob entry per token, no more deltas than tokens (+ the tail and the
    finish), and at most a fixed number of bytes on the wire per token allowed. Any violation is StreamInvalid;
    the delta that breaks a bound is not delivered, so `tokens` is always what the client received.
    """

    def __init__(self, max_tokens: int, max_bytes_per_token: int, top_logprobs: int = 0, logprobs: bool = False):
        self.max_tokens = max_tokens
        self.max_bytes_per_token = max_bytes_per_token
        self.tokens = 0
        self.text_bytes = 0
        self.logprob_entries = 0
        self.deltas = 0
        self.wire_bytes = 0
        # one logprob entry: its token (escaped in JSON, up to 6 characters a byte), its bytes, and its alternatives
        entry = 12 * max_bytes_per_token + 64
        per_token = 6 * max_bytes_per_token + 64 + ((2 + top_logprobs) * entry if logprobs else 0)
        self.max_wire_bytes = WIRE_OVERHEAD_BYTES + max_tokens * per_token
        self.finished = False

    def received(self, size: int) -> None:
        """Every message counts against the request's wire budget (a flood of padding is a violation)."""
        self.wire_bytes += size
        if self.wire_bytes > self.max_wire_bytes:
            raise StreamInvalid(f"the stream exceeded {self.max_wire_bytes} bytes for max_tokens {self.max_tokens}")

    def delta(self, message: dict[str, Any]) -> tuple[str, str | None, list[dict[str, Any]] | None]:
        """A delta's text, finish reason and logprobs once its claims are checked; StreamInvalid otherwise."""
        if self.finished:
            raise StreamInvalid("a delta after the one that finished the choice")
        tokens = self.tokens + _count(message.get("tokens"), "a delta's tokens")
        text, finish, logprobs = message.get("text"), message.get("finish_reason"), message.get("logprobs")
        if not isinstance(text, str):
            raise StreamInvalid("a delta's text must be a string")
        if finish is not None and finish not in FINISH_REASONS:
            raise StreamInvalid(f"unknown finish_reason {str(finish)[:32]!r}")
        if logprobs is not None and (not isinstance(logprobs, list) or not all(isinstance(e, dict) for e in logprobs)):
            raise StreamInvalid("a delta's logprobs must be a list of entries")
        if tokens > self.max_tokens:
            raise StreamInvalid(f"the agent sent {tokens} tokens, more than max_tokens {self.max_tokens}")
        text_bytes = self.text_bytes + len(text.encode("utf-8", "surrogatepass"))
        if text_bytes > tokens * self.max_bytes_per_token:
            raise StreamInvalid(
                f"{text_bytes} bytes of text for {tokens} tokens: more than {self.max_bytes_per_token} bytes a token"
            )
        entries = self.logprob_entries + len(logprobs or [])
        if entries > tokens:
            raise StreamInvalid(f"{entries} logprob entries for {tokens} tokens")
        if self.deltas + 1 > tokens + 2:
            raise StreamInvalid(f"{self.deltas + 1} deltas for {tokens} tokens")
        self.tokens, self.text_bytes, self.logprob_entries = tokens, text_bytes, entries
        self.deltas += 1
        self.finished = finish is not None
        return text, finish, logprobs

    def end(self, message: dict[str, Any]) -> None:
        """The end marker: its usage, if any, must be well formed; the count is ours."""
        usage = message.get("usage")
        if usage is None:
            return
        if not isinstance(usage, dict):
            raise StreamInvalid("the end marker's usage must be an object")
        for name in ("prompt_tokens", "completion_tokens"):
            if name in usage:
                _count(usage[name], f"the end marker's usage.{name}")
