"""An island's NATS leaf node (`adaptery island up`): the same nats-server binary, dialing out to the hub's
leafnode port over mutual TLS with the island's certificate, and serving the island's agents on loopback.

Nothing connects into an island: the leaf dials out and its own listener is on 127.0.0.1 only, mutual TLS too
(certificates of the platform CA; the leaf's own certificate serves it, made for 127.0.0.1). nats-server
redials a lost hub every second by itself, and the island's agents stay connected to their leaf meanwhile, so a
short hub outage or link cut costs only the messages in flight (which the protocol's requests retry).
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
from pathlib import Path

from adaptery.agent.process import die_with_parent
from adaptery.messaging import protocol
from adaptery.messaging.identity import IdentityDir
from adaptery.messaging.server import READY_SECONDS, nats_server_binary

CONNECTED_LINE = b"Leafnode connection created"
# How often a leaf redials a lost hub (nats-server's default is 1 s; a hub restart then heals in 0.5-1.9 s here):
# a dial to a hub that is down costs nothing worth saving.
RECONNECT = "250ms"


class IslandLeaf:
    def __init__(self, directory: Path, *, hub_url: str, port: int) -> None:
        self.store = IdentityDir(directory)
        self.hub_url = hub_url
        self.port = port
        self.process: subprocess.Popen | None = None

    @property
    def config_path(self) -> Path:
        return self.store.directory / "leaf.conf"

    @property
    def log_path(self) -> Path:
        return self.store.directory / "leaf.log"

    @property
    def url(self) -> str:
        return f"tls://127.0.0.1:{self.port}"

    def _write_config(self) -> None:
        files = {
            "cert_file": str(self.store.cert_path),
            "key_file": str(self.store.key_path),
            "ca_file": str(self.store.ca_path),
            "timeout": 5,
        }
        me = self.store.identity()
        config = (
            f"server_name: {json.dumps('island-' + me.agent_id)}\n"
            f"listen: {json.dumps(f'127.0.0.1:{self.port}')}\n"
            f"max_payload: {protocol.MAX_PAYLOAD}\n"
            f"tls: {json.dumps({**files, 'verify': True})}\n"
            f"leafnodes: {json.dumps({'reconnect': RECONNECT, 'remotes': [{'urls': [self.hub_url], 'tls': files}]})}\n"
        )
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(config)
        tmp.chmod(0o600)
        tmp.replace(self.config_path)

    def start(self) -> None:
        self._write_config()
        log_file = self.log_path.open("ab")
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
                tail = self.log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"the island's nats-server exited with code {self.process.returncode}:\n{tail}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), 0.5):
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"the island's nats-server did not listen on {self.url} within {READY_SECONDS:.0f} s")

    def connections_to_hub(self) -> int:
        """How many times the leaf has connected to the hub (its log says each)."""
        try:
            return self.log_path.read_bytes().count(CONNECTED_LINE)
        except OSError:
            return 0

    def reload(self) -> None:
        """A renewed certificate is presented from the next connection on."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGHUP)

    def request_stop(self) -> None:
        """Ask the leaf to stop, without waiting (safe in a signal handler; `wait` returns once it has)."""
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
