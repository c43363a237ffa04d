"""vLLM's server never outlives its agent: an agent killed with `kill -9` once left it running, the model in memory
(a GPU's memory on a GPU box), so the next agent's vLLM could not start beside it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from adaptery.agent.lifeline import start_tied

SLEEPER = "import os, sys, time; open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(600)"


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z")  # a zombie is gone


def wait_for(predicate, seconds: float) -> bool:  # noqa: ANN001
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_the_command_dies_with_the_process_that_started_it_even_by_sigkill(tmp_path: Path) -> None:
    pid_file = tmp_path / "server.pid"
    starter = subprocess.Popen(  # stands for the agent: starts the "server", then is killed with SIGKILL
        [sys.executable, "-c", "import sys, time\nfrom adaptery.agent.lifeline import start_tied\n"
         f"start_tied([sys.executable, '-c', {SLEEPER!r}, {str(pid_file)!r}], None)\ntime.sleep(600)"],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )  # fmt: skip
    try:
        assert wait_for(lambda: pid_file.exists() and pid_file.read_text(), 30), "the server did not start"
        server = int(pid_file.read_text())
        assert alive(server)
        time.sleep(0.5)
        assert alive(server)  # the lifeline holds it while its starter lives
        starter.kill()
        starter.wait()
        assert wait_for(lambda: not alive(server), 30), "the server outlived the process that started it"
    finally:
        starter.kill()


def test_a_stop_of_the_group_ends_it_and_the_exit_status_is_the_commands(tmp_path: Path) -> None:
    pid_file = tmp_path / "server.pid"
    process, lifeline = start_tied([sys.executable, "-c", SLEEPER, str(pid_file)], subprocess.DEVNULL)
    try:
        assert wait_for(lambda: pid_file.exists() and pid_file.read_text(), 30)
        os.killpg(process.pid, signal.SIGTERM)  # as VllmServer.stop does: the lifeline follows its command out
        assert process.wait(timeout=30) == -signal.SIGTERM
        server = int(pid_file.read_text())
        assert not alive(server)
    finally:
        os.close(lifeline)
    process, lifeline = start_tied([sys.executable, "-c", SLEEPER, str(pid_file)], subprocess.DEVNULL)
    try:
        assert wait_for(lambda: pid_file.exists() and pid_file.read_text() != str(server), 30)
        os.kill(int(pid_file.read_text()), signal.SIGKILL)  # the server alone killed (as the e2e test does)
        assert process.wait(timeout=30) == -signal.SIGKILL
    finally:
        os.close(lifeline)
    process, lifeline = start_tied([sys.executable, "-c", "raise SystemExit(3)"], subprocess.DEVNULL)
    try:
        assert process.wait(timeout=30) == 3  # a server that exits by itself: its status, as before
    finally:
        os.close(lifeline)
