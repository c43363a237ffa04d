"""A guard for an interpreter bug: ``ast.parse`` on CPython 3.11.0–3.11.7 and 3.12.0–3.12.1 keeps its recursion
depth in one interpreter-wide counter (https://github.com/python/cpython/issues/106905). When a garbage collection
inside one parse runs a finalizer that parses too (3.11's traceback formatting parses source lines, so an
unraisable exception logged during GC does), or lets another thread parse, the first parse fails with
``SystemError: AST constructor recursion depth mismatch``. Jinja's lexer (chat templates, in the server's threads)
and pytest's assertion rewriting both parse, so the platform and its tests met it.

On those versions ``ast.parse`` runs one at a time and without the collector; elsewhere nothing changes.
"""

from __future__ import annotations

import ast
import functools
import gc
import sys
import threading
from collections.abc import Callable
from typing import Any

AFFECTED = (3, 11) <= sys.version_info[:3] < (3, 11, 8) or (3, 12) <= sys.version_info[:3] < (3, 12, 2)
_lock = threading.RLock()


def serialised(parse: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(parse)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        with _lock:
            collecting = gc.isenabled()
            gc.disable()
            try:
                return parse(*args, **kwargs)
            finally:
                if collecting:
                    gc.enable()

    guarded.__adaptery_guarded__ = True  # type: ignore[attr-defined]
    return guarded


def guard_ast_parse() -> None:
    if AFFECTED and not getattr(ast.parse, "__adaptery_guarded__", False):
        ast.parse = serialised(ast.parse)
