"""An island's NATS leaf node (`adaptery island up`): the same nats-server binary, dialing out to the hub's
leafnode port over mutual TLS with the island's certificate, and serving the island's agents on loopback.

Nothing connects into an island: the leaf dials out and its own listener is on 127.0.0.1 only, mutual TLS too
(certificates of the platform CA; the leaf's own certificate serves it, under its island's name only,
`identity.leaf_server_name`, which the island's agents check: never 127.0.0.1, which any leaf could claim). nats-server
redials a lost hub every second by itself, and the island's agents stay connected to their leaf meanwhile, so a
short hub outage or link cut costs only the messages in flight (which the protocol's requests retry).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from adaptery.messaging import protocol
from adaptery.messaging.identity import IdentityDir
from adaptery.messaging.server import NatsProcess

CONNECTED_LINE = b"Leafnode connection created"
# How often a leaf redials a lost hub (nats-server's default is 1 s; a hub restart then heals in 0.5-1.9 s here):
# a dial to a hub that is down costs nothing worth saving.
RECONNECT = "250ms"


class IslandLeaf:
    def __init__(self, directory: Path, *, hub_url: str, port: int) -> None:
        self.store = IdentityDir(directory)
        self.hub_url = hub_url
        self.port = port
        self.nats = NatsProcess(self.store.directory, "leaf")

    @property
    def process(self) -> subprocess.Popen | None:
        return self.nats.process

    @property
    def url(self) -> str:
        return f"tls://127.0.0.1:{self.port}"

    def _config(self) -> str:
        files = {
            "cert_file": str(self.store.cert_path),
            "key_file": str(self.store.key_path),
            "ca_file": str(self.store.ca_path),
            "timeout": 5,
        }
        me = self.store.identity()
        return (
            f"server_name: {json.dumps('island-' + me.agent_id)}\n"
            f"listen: {json.dumps(f'127.0.0.1:{self.port}')}\n"
            f"max_payload: {protocol.MAX_PAYLOAD}\n"
            # its only clients are the island's enrolled agents, which start TLS first: no INFO in the clear at all
            f"tls: {json.dumps({**files, 'verify': True, 'handshake_first': True})}\n"
            f"leafnodes: {json.dumps({'reconnect': RECONNECT, 'remotes': [{'urls': [self.hub_url], 'tls': files}]})}\n"
        )

    def start(self) -> None:
        self.nats.write(self._config())
        self.nats.start()
        try:
            self.nats.wait_listening("127.0.0.1", self.port, self.url, what="the island's nats-server")
        except RuntimeError:
            self.stop()
            raise

    def connections_to_hub(self) -> int:
        """How many times the leaf has connected to the hub (its log says each)."""
        try:
            return self.nats.log_path.read_bytes().count(CONNECTED_LINE)
        except OSError:
            return 0

    def reload(self) -> None:
        """A renewed certificate is presented from the next connection on."""
        self.nats.reload()

    def request_stop(self) -> None:
        """Ask the leaf to stop, without waiting (safe in a signal handler; `wait` returns once it has)."""
        self.nats.request_stop()

    def wait(self) -> int:
        return self.nats.wait()

    def stop(self) -> None:
        self.nats.stop()
