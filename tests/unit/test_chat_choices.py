"""A request's choices on the event loop: the answer hook sees only a whole answer, in the same hand-off to the
thread pool as the settlement, and a stopped request (its client gone) keeps nothing."""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace

from adaptery.api.openai.chat import Prepared, _Choices
from adaptery.engine.generation import Delta, GenerationFailed
from adaptery.engine.sampling import SamplingParams


class Tokens:
    """An inference backend that answers `words`, one delta each, waiting `gap` seconds before each."""

    def __init__(self, words: list[str], gap: float = 0.0, fail_after: int | None = None) -> None:
        self.words, self.gap, self.fail_after = words, gap, fail_after

    async def generate(self, *args: object, should_stop, **kwargs: object):  # noqa: ANN001, ANN201
        for number, word in enumerate(self.words):
            await asyncio.sleep(self.gap)
            if should_stop():
                return
            if number == self.fail_after:
                raise GenerationFailed("the engine broke")
            yield Delta(word, "stop" if number == len(self.words) - 1 else None)


def run(backend: Tokens, *, n: int = 1, stop_after: int | None = None) -> tuple[list, list, list[int]]:
    """(what the reader got, what the hook got, the threads the hook and the settlement ran on)."""
    hooked: list[list[str]] = []
    threads: list[int] = []
    platform = SimpleNamespace(inference=backend, db=None)  # no reservation: settling touches no database

    def on_answer(texts: list[str]) -> None:
        threads.append(threading.get_ident())
        hooked.append(texts)

    async def read() -> list:
        job = Prepared("m", "base", "base", None, [1, 2], SamplingParams(max_tokens=8), n=n)
        choices = _Choices(platform, job, streamed=True, on_answer=on_answer)
        got: list = []
        try:
            async for index, delta in choices.deltas():
                got.append((index, delta.text))
                if stop_after is not None and len(got) == stop_after:
                    choices.stop()  # the client went away
        except GenerationFailed as exc:
            got.append(str(exc))
        await asyncio.sleep(0.05)
        return got

    got = asyncio.run(read())
    return got, hooked, threads


def test_a_whole_answer_reaches_the_hook_once_off_the_event_loop() -> None:
    got, hooked, threads = run(Tokens(["Hel", "lo", "!"]), n=2)
    assert sorted(got) == [(0, "!"), (0, "Hel"), (0, "lo"), (1, "!"), (1, "Hel"), (1, "lo")]
    assert hooked == [["Hello!", "Hello!"]]  # once, for every choice, after the last ended
    assert threads and threads[0] != threading.get_ident()  # on the pool, not on the loop's thread


def test_a_stopped_or_failed_answer_is_not_given_to_the_hook() -> None:
    got, hooked, _ = run(Tokens(["a", "b", "c", "d"], gap=0.02), stop_after=1)
    assert got == [(0, "a")] and hooked == []  # half an answer, its client gone: nothing is kept
    got, hooked, _ = run(Tokens(["a", "b", "c"], fail_after=1))
    assert got == [(0, "a"), "the engine broke"] and hooked == []
