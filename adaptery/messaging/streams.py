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
