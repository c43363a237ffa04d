"""Runs a command that must not outlive the process that started it, whatever way that process ends.

    python lifeline.py FD -- COMMAND...

The agent starts vLLM's server through this (with the interpreter of vLLM's environment: this file imports nothing
but the standard library), as the leader of a new process group, and keeps the write end of a pipe whose read end
is FD. The command runs in the lifeline's group; when the pipe reads end of file (every holder of its write end is
gone: the agent exited, crashed or was killed with SIGKILL) the lifeline ends the group, SIGTERM and, after a grace,
SIGKILL. An agent killed with `kill -9` once left its vLLM server running with the model in memory (on a GPU box,
most of the GPU's memory), and the next agent's vLLM could not start beside it.

The lifeline exits with the command's exit status, or by the signal that killed it (so the agent sees its server die
as before); SIGTERM sent to the
group (the agent's own stop) reaches the command, and the lifeline, ignoring it, follows the command out.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

GRACE_SECONDS = 20.0  # after SIGTERM, how long the group has before SIGKILL


def start_tied(command: list[str], output: Any, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, int]:
    """`command` (its interpreter first: it runs this file too) as a new process group led by the lifeline, which
    ends the group when the calling process is gone, however it ended. Returns the lifeline's process (its exit
    status is the command's) and the write end of its pipe, to close once the command was stopped."""
    read_end, write_end = os.pipe()  # neither end is inherited by anything else this process starts
    try:
        process = subprocess.Popen(
            [command[0], __file__, str(read_end), "--", *command],
            stdout=output,
            stderr=subprocess.STDOUT,
            env=env,
            pass_fds=(read_end,),
            start_new_session=True,  # the lifeline, the server, its engine and workers: stopped together
        )
    except BaseException:
        os.close(write_end)
        raise
    finally:
        os.close(read_end)
    return process, write_end


def _end_group_when_closed(fd: int, child: subprocess.Popen) -> None:
    while os.read(fd, 4096):  # the starter never writes: anything read is ignored; b"" is its end
        pass
    if child.poll() is not None:
        return
    group = os.getpgid(0)
    os.killpg(group, signal.SIGTERM)
    deadline = time.monotonic() + GRACE_SECONDS
    while child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    os.killpg(group, signal.SIGKILL)  # the lifeline too: nothing of the group is left


def main(argv: list[str]) -> int:
    if len(argv) < 4 or argv[2] != "--":
        print("usage: lifeline.py FD -- COMMAND...", file=sys.stderr)
        return 2
    fd = int(argv[1])
    child = subprocess.Popen(argv[3:])  # in this group; FD is not passed on
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the group's SIGTERM is for the command; the lifeline follows it
    threading.Thread(target=_end_group_when_closed, args=(fd, child), daemon=True).start()
    code = child.wait()
    if code < 0:  # killed by a signal: the lifeline ends by the same one, so its starter reads the same status
        with contextlib.suppress(OSError, ValueError):  # SIGKILL and SIGSTOP have no handler to reset
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main(sys.argv))
