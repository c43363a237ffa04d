"""The ast.parse guard (adaptery/_cpython.py): a parse that a garbage collection interrupts with another parse.

CI failed on it twice (pytest rewriting an import, the hygiene tests' own parses) while finalizers of earlier tests'
closed event loops ran. The case below makes it certain on an affected interpreter.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from adaptery._cpython import AFFECTED

INTERRUPTED_PARSES = textwrap.dedent(
    """
    import ast, gc, sys
    if sys.argv[1] == "guarded":
        import adaptery  # noqa: F401 - installs the guard
    SOURCE = "\\n".join(f"def f{i}(a, b):\\n    return [a + b * {i} for _ in range(3)]" for i in range(3000))

    class ParsesWhenCollected:
        def __init__(self):
            self.cycle = self

        def __del__(self):
            ast.parse("x = (1 +\\n 2)")

    gc.set_threshold(50)
    failures = 0
    for _ in range(5):
        for _ in range(200):
            ParsesWhenCollected()
        try:
            ast.parse(SOURCE)
        except SystemError:
            failures += 1
    print(failures)
    """
)


def failures(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", INTERRUPTED_PARSES, mode], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return int(done.stdout)


@pytest.mark.skipif(not AFFECTED, reason="this interpreter counts each parse's depth on its own")
def test_the_bug_is_there_without_the_guard() -> None:
    assert failures("bare") > 0


def test_a_parse_interrupted_by_a_collection_that_parses_succeeds() -> None:
    assert failures("guarded") == 0
