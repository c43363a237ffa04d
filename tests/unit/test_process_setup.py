"""The serving process's set-up (adaptery/engine/process_setup.py): which allocator it preloads, and the one
re-execution."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from adaptery.engine import process_setup
from adaptery.engine.process_setup import SetupError, loaded_allocator, plan


def libraries(tmp_path: Path, *names: str) -> tuple[str, ...]:
    tmp_path.mkdir(exist_ok=True)
    for name in names:
        (tmp_path / name).write_bytes(b"\x7fELF")
    return (str(tmp_path),)


def test_auto_prefers_tcmalloc_then_jemalloc_then_the_system(tmp_path, monkeypatch):
    monkeypatch.setattr(process_setup.ctypes.util, "find_library", lambda name: None)
    both = libraries(tmp_path / "both", "libtcmalloc_minimal.so.4", "libjemalloc.so.2")
    assert plan("auto", {}, library_dirs=both).allocator == "tcmalloc"
    only_je = libraries(tmp_path / "je", "libjemalloc.so.2")
    chosen = plan("auto", {}, library_dirs=only_je)
    assert chosen.allocator == "jemalloc" and chosen.env == {"LD_PRELOAD": str(tmp_path / "je" / "libjemalloc.so.2")}
    bare = plan("auto", {}, library_dirs=libraries(tmp_path / "none"))
    assert bare.allocator == "system" and bare.env == {} and "libjemalloc2" in bare.reason


def test_what_the_user_set_is_kept(tmp_path):
    dirs = libraries(tmp_path, "libjemalloc.so.2")
    mine = {"LD_PRELOAD": "/opt/my-hook.so"}
    chosen = plan("auto", mine, library_dirs=dirs)
    assert chosen.env == {"LD_PRELOAD": f"{tmp_path / 'libjemalloc.so.2'} /opt/my-hook.so"}
    again = plan("auto", {"LD_PRELOAD": str(tmp_path / "libjemalloc.so.2")},
                 library_dirs=dirs)  # fmt: skip
    assert again.env == {}  # nothing preloaded twice


def test_an_allocator_named_that_is_not_installed_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(process_setup.ctypes.util, "find_library", lambda name: None)
    with pytest.raises(SetupError, match="libtcmalloc_minimal.so.4 or libtcmalloc.so.4 is not installed"):
        plan("tcmalloc", {}, library_dirs=(str(tmp_path),))
    with pytest.raises(SetupError, match="no such library file"):
        plan(str(tmp_path / "missing.so"), {})
    assert plan("system", {}).env == {}


def test_the_allocator_is_read_from_the_memory_map():
    assert loaded_allocator("7f00-7f10 r-xp 0 08:01 12 /usr/lib/x86_64-linux-gnu/libjemalloc.so.2\n") == "jemalloc"
    assert loaded_allocator("7f00-7f10 r-xp 0 08:01 12 /usr/lib/x86_64-linux-gnu/libc.so.6\n") == "system"


REEXEC = """
import json, os, sys
from adaptery.engine import process_setup
before = os.getpid()
process_setup.reexec_if_needed(sys.argv[1])
print(json.dumps({"pid": before, "argv": sys.argv[1:], **process_setup.describe()}))
"""


@pytest.mark.skipif(process_setup.find_allocator("jemalloc") is None and process_setup.find_allocator("tcmalloc")
                    is None, reason="neither tcmalloc nor jemalloc is installed here")  # fmt: skip
def test_the_process_replaces_itself_once_with_the_allocator_loaded_and_its_own_arguments():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("_ADAPTERY_PROCESS", "OMP_", "LD_PRELOAD"))}
    child = subprocess.Popen([sys.executable, "-c", REEXEC, "auto", "--keep-me"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
    out, err = child.communicate(timeout=120)
    assert child.returncode == 0, err
    (line,) = out.splitlines()  # printed once: by the re-executed process
    got = json.loads(line)
    assert got["pid"] == child.pid  # replaced in place: whoever holds the pid still holds the server
    assert got["argv"] == ["auto", "--keep-me"] and got["set_up_by_adaptery"]
    assert got["allocator"] in ("tcmalloc", "jemalloc")
    assert got["cpus"] == len(os.sched_getaffinity(0))  # no core taken away from the process or its children
