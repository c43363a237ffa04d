"""A request's stop, heard by whoever waits on a queue for the request's next item, without polling for it.

Every request is read on a thread that waits on a queue (the engine's events, an agent's stream, vLLM's chunks),
and every such reader must also end soon after its request is stopped (a client gone, a cancel from the control
plane). Polling the stop with a short timeout costs each waiting request a wake-up twenty times a second, ~65 us
of CPU each on these machines: with 64 requests in flight that is a tenth of a core, on the server and on every
agent. A `StopSignal` instead puts `WAKE` on the queues of those listening when it is set, so a reader waits on
its queue alone and still hears the stop at once:

    with listening(should_stop, items) as timeout:
        item = items.get(timeout=timeout)   # WAKE: look at should_stop()

`should_stop` may also be any callable (a test's lambda): then the reader polls it, every `POLL_SECONDS`.

A reader on an event loop (the server's relay of an agent's stream) waits on an `asyncio.Queue` instead, with
`listening_on_loop`: the stop reaches it from any thread, and a timer puts `WAKE` on its queue every `longest`
seconds for its deadlines, so no wait needs a timeout of its own (in Python 3.11 each `wait_for` is a task).
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any, Protocol

POLL_SECONDS = 0.05  # how often a plain callable is asked
WAKE: Any = object()  # what a StopSignal puts on a listening queue


class _Waking(Protocol):
    def put_nowait(self, item: Any) -> None: ...


class StopSignal:
    """Set once, from any thread; calling it says whether it is set (so it is a `should_stop`)."""

    def __init__(self) -> None:
        self._set = False
        self._lock = threading.Lock()
        self._queues: list[_Waking] = []

    def __call__(self) -> bool:
        return self._set

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        with self._lock:
            if self._set:
                return
            self._set = True
            listeners = list(self._queues)
        for items in listeners:
            items.put_nowait(WAKE)

    def listen(self, items: _Waking) -> None:
        with self._lock:
            self._queues.append(items)
            already = self._set
        if already:
            items.put_nowait(WAKE)

    def forget(self, items: _Waking) -> None:
        with self._lock, contextlib.suppress(ValueError):
            self._queues.remove(items)


@contextlib.contextmanager
def listening(should_stop: Callable[[], bool], items: queue.Queue[Any], longest: float = 1.0) -> Iterator[float]:
    """While inside, a stop wakes a reader of `items` (with `WAKE`); gives how long one wait on `items` may be:
    `longest` (the reader's own deadlines' granularity) for a StopSignal, `POLL_SECONDS` for any other callable."""
    if not isinstance(should_stop, StopSignal):
        yield min(longest, POLL_SECONDS)
        return
    should_stop.listen(items)
    try:
        yield longest
    finally:
        should_stop.forget(items)


class _FromAnyThread:
    """An asyncio queue's `put_nowait` as a StopSignal, set on any thread, may call it."""

    def __init__(self, loop: asyncio.AbstractEventLoop, items: asyncio.Queue[Any]) -> None:
        self.loop, self.items = loop, items

    def put_nowait(self, item: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is left to wake
            self.loop.call_soon_threadsafe(self.items.put_nowait, item)


@contextlib.contextmanager
def listening_on_loop(
    should_stop: Callable[[], bool], items: asyncio.Queue[Any], longest: float = 1.0
) -> Iterator[None]:
    """`listening` for a reader on the running event loop: a stop, and a tick every `longest` seconds
    (`POLL_SECONDS` for a plain callable, which is then polled), put `WAKE` on `items`."""
    loop = asyncio.get_running_loop()
    every = longest if isinstance(should_stop, StopSignal) else min(longest, POLL_SECONDS)
    waking = _FromAnyThread(loop, items)
    timer: asyncio.TimerHandle | None = None

    def tick() -> None:
        nonlocal timer
        items.put_nowait(WAKE)
        timer = loop.call_later(every, tick)

    timer = loop.call_later(every, tick)
    if isinstance(should_stop, StopSignal):
        should_stop.listen(waking)
    try:
        yield
    finally:
        timer.cancel()
        if isinstance(should_stop, StopSignal):
            should_stop.forget(waking)
