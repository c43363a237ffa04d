"""Child processes that must not outlive what they serve: a training run, the NATS server.

Below every layer (no adaptery import): the agent, training's launcher and messaging's nats-server launch all
start children, and none of them may depend on another for it.
"""

from __future__ import annotations

import ctypes
import signal
import subprocess
import sys

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent() -> None:
    """In a child, before exec: if its parent dies (even by SIGKILL), the child is killed too."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def kill_and_reap(child: subprocess.Popen) -> int:
    """End `child` if it still runs and wait for it, so no process (or zombie) is left; returns its exit code."""
    if child.poll() is None:
        child.kill()
    return child.wait()
