"""A request's stop wakes its reader where it waits, rather than being polled twenty times a second."""

from __future__ import annotations

import asyncio
import queue
import threading
import time

from adaptery.engine.stopping import POLL_SECONDS, WAKE, StopSignal, listening, listening_on_loop


class CountingQueue(queue.Queue):
    """Counts the reader's waits: each is a wake-up of its thread."""

    def __init__(self) -> None:
        super().__init__()
        self.waits = 0

    def get(self, block: bool = True, timeout: float | None = None):  # noqa: ANN201
        self.waits += 1
        return super().get(block, timeout)


def test_a_stop_signal_is_a_should_stop_and_is_set_once() -> None:
    stop = StopSignal()
    assert stop() is False and not stop.is_set()
    items: queue.Queue = queue.Queue()
    with listening(stop, items):
        stop.set()
        stop.set()  # a second stop (the client gone, then a cancel) wakes nobody twice
    assert stop() is True
    assert items.get_nowait() is WAKE
    assert items.empty()


def test_a_reader_waiting_on_its_queue_hears_the_stop_at_once_without_polling() -> None:
    stop, items = StopSignal(), CountingQueue()
    heard: list[object] = []

    def reader() -> None:
        with listening(stop, items, longest=60) as timeout:
            assert timeout == 60  # it may wait as long as its own deadlines allow
            while not stop():
                heard.append(items.get(timeout=timeout))

    thread = threading.Thread(target=reader)
    thread.start()
    items.put("token")
    threading.Event().wait(0.3)  # a polling reader would have woken six times by now
    stop.set()
    thread.join(timeout=10)
    assert not thread.is_alive(), "the stop did not wake the reader"
    assert heard == ["token", WAKE]
    assert items.waits == 2  # one wait for the token, one that the stop ended


def test_a_stop_set_before_the_reader_listens_is_heard_and_a_finished_reader_is_forgotten() -> None:
    stop, items = StopSignal(), queue.Queue()
    stop.set()
    with listening(stop, items):
        assert items.get_nowait() is WAKE
    later = StopSignal()
    with listening(later, items):
        pass
    later.set()  # the reader has gone: nothing is left on its queue
    assert items.empty()


def test_any_other_should_stop_is_polled() -> None:
    with listening(lambda: False, queue.Queue(), longest=60) as timeout:
        assert timeout == POLL_SECONDS


def test_a_reader_on_an_event_loop_hears_a_stop_set_on_another_thread_and_ticks_for_its_deadlines() -> None:
    async def read() -> tuple[list[object], float]:
        stop, items = StopSignal(), asyncio.Queue()
        heard: list[object] = []
        with listening_on_loop(stop, items, longest=0.2):
            items.put_nowait("token")
            heard.append(await items.get())
            started = time.monotonic()
            heard.append(await items.get())  # nothing came: the tick, for the reader's deadlines
            ticked = time.monotonic() - started
            threading.Thread(target=stop.set).start()  # a client gone, heard on the loop's thread
            while (item := await items.get()) is WAKE and not stop():
                pass
            heard.append(item)
        return heard, ticked

    heard, ticked = asyncio.run(read())
    assert heard == ["token", WAKE, WAKE]
    assert 0.15 < ticked < 2


def test_a_reader_on_an_event_loop_polls_any_other_should_stop_and_leaves_no_timer() -> None:
    async def read() -> float:
        stopped = [False]
        items: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        loop.call_later(0.12, stopped.__setitem__, 0, True)
        started = time.monotonic()
        with listening_on_loop(lambda: stopped[0], items, longest=60):
            while await items.get() is WAKE and not stopped[0]:
                pass
        waited = time.monotonic() - started
        await asyncio.sleep(POLL_SECONDS * 3)
        assert items.empty()  # its ticks ended with it
        return waited

    assert asyncio.run(read()) < 1  # polled every POLL_SECONDS, not every 60 s
