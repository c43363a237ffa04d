"""The agent's only line to the platform: a NATS connection it dials out, with blocking calls for the loop.

nats-py is asyncio; the agent loop and its training supervision are plain threads. The connection
lives in its own event loop thread, and each call here waits for its reply. nats-py reconnects by
itself; a call made while the server is away fails with `LinkDown`, which the loop treats as "try later".

Blobs move one of two ways. An agent enrolled by certificate (`transfers` given) asks the control plane for a
presigned URL per blob and moves the bytes over the platform's HTTPS (`agent/transfers.py`): never the bus. An
agent with a password runs on the platform's loopback only (the embedded one): its blobs come in chunks over the
bus, which needs no HTTP server (a `Platform` driven without one, as tests do).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import ssl
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nats
from nats.errors import AuthorizationError
from nats.errors import Error as NatsError

from adaptery.messaging import protocol
from adaptery.messaging.protocol import RemoteError

if TYPE_CHECKING:
    from adaptery.agent.transfers import HttpsTransfers

log = logging.getLogger("adaptery.agent.link")
ENROLLMENT_GRACE_SECONDS = 4.0


class LinkDown(ConnectionError):
    """The control plane could not be reached (it may be restarting)."""


class AgentLink:
    """`secret`: the password of an agent on loopback (the embedded one). `tls`: an enrolled agent's client
    context (`messaging.identity.IdentityDir.ssl_context`); its certificate is its only credential, and
    `tls_hostname` the name its server must prove (`Identity.tls_hostname`: its island leaf's). `transfers`: an
    enrolled agent's HTTPS client for blobs."""

    def __init__(
        self,
        url: str,
        agent_id: str,
        secret: str | None = None,
        *,
        tls: ssl.SSLContext | None = None,
        request_seconds: float = protocol.REQUEST_SECONDS,
        transfers: HttpsTransfers | None = None,
        tls_hostname: str | None = None,
    ):
        if (secret is None) == (tls is None):
            raise ValueError("an agent link signs in with a password or a certificate, one of them")
        self.url = url
        self.agent_id = agent_id
        self.secret = secret
        self.tls = tls
        self.request_seconds = request_seconds
        self.transfers = transfers
        self.tls_hostname = tls_hostname  # the server name to check, when not the URL's host (an island's leaf)
        self.nudged = threading.Event()  # set when the control plane says a job was cancelled or paused
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="adaptery-agent-link", daemon=True)
        self._nc: nats.NATS | None = None
        self._connect_error: Exception | None = None  # the last failure of the first connection, for its message
        # What `publish` was given and the sender task has not sent yet: (subject, data, batch or None)
        self._outgoing: list[tuple[str, bytes, tuple[str, str] | None]] = []
        self._outgoing_lock = threading.Lock()
        self._outgoing_ready = asyncio.Event()
        self._sender: asyncio.Task[None] | None = None
        self._closing = False

    def connect(self, timeout: float = 30.0, *, enrollment_grace: float = ENROLLMENT_GRACE_SECONDS) -> None:
        """Connect; wrong credentials are refused (nats-py raises its authorization error).

        A refusal is retried for `enrollment_grace` seconds: an agent enrolled a moment ago may knock before
        the platform has reloaded its NATS server's users (it applies enrollments within a second or two). An
        address nothing answers on is retried for `timeout` seconds, then LinkDown says what the last try met.
        """
        self._thread.start()
        deadline = time.monotonic() + enrollment_grace
        try:
            while True:
                try:
                    self._run(self._connect(), timeout)
                    return
                except AuthorizationError:
                    if time.monotonic() >= deadline:
                        raise
                    time.sleep(0.5)
                except TimeoutError as exc:  # nats-py kept retrying: say at what, not an empty timeout
                    last = self._connect_error
                    reason = f"{type(last).__name__}: {last}" if last is not None else "no answer"
                    raise LinkDown(f"no NATS server answered at {self.url} within {timeout:g} s ({reason})") from exc
        except Exception:
            self.close()
            raise

    async def _connect(self) -> None:
        connecting = True

        async def on_error(exc: Exception) -> None:
            # Reconnecting for ever, nats-py retries even a refused first connection, showing the refusal only to
            # this callback (as a plain error naming the violation): raise it, so that wrong credentials fail the
            # connect now, not when its timeout runs out. Later errors are quiet: nats-py logs every failed
            # reconnect otherwise.
            if connecting and (isinstance(exc, AuthorizationError) or "authorization violation" in str(exc).lower()):
                raise AuthorizationError from exc
            if connecting:
                self._connect_error = exc

        credentials: dict[str, Any] = {"user": self.agent_id, "password": self.secret}
        if self.tls:
            # TLS before anything else: a server that only leaves `tls_required` out of its INFO (an impostor on
            # the leaf's port, or on the path) would otherwise get the connection in plaintext, its certificate
            # never checked (an attacker's find)
            credentials = {"tls": self.tls, "tls_hostname": self.tls_hostname, "tls_handshake_first": True}
        nc = nats.NATS()
        try:
            await nc.connect(
                self.url,
                **credentials,
                name=self.agent_id,
                inbox_prefix=protocol.inbox_prefix(self.agent_id),
                allow_reconnect=True,
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.5,
                connect_timeout=5,
                error_cb=on_error,
            )
        except BaseException:
            with contextlib.suppress(Exception):  # the refused connection is half open
                await nc.close()
            raise
        connecting = False
        self._nc = nc

        async def on_notify(_msg) -> None:  # noqa: ANN001 - a nats Msg
            self.nudged.set()

        await self._nc.subscribe(protocol.notify_subject(self.agent_id), cb=on_notify)
        self._sender = asyncio.get_running_loop().create_task(self._send_outgoing())

    def _run(self, coroutine: Any, timeout: float) -> Any:
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        try:
            return future.result(timeout=timeout + 5)
        except TimeoutError:
            future.cancel()  # or it goes on (nats-py retries a connection for ever) after nobody waits for it
            raise

    def close(self) -> None:
        if self._sender is not None and not self._sender.done():
            with contextlib.suppress(Exception):  # what was published before, out first; a link gone loses it
                self._run(self._last_outgoing(), 5)
        if self._nc is not None and not self._nc.is_closed:
            with contextlib.suppress(Exception):  # closing a connection that is already gone
                self._run(self._nc.close(), 5)
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
        if self.transfers is not None:
            self.transfers.close()

    # --- requests ---------------------------------------------------------------------------------

    def _request(self, subject: str, data: bytes, headers: dict[str, str] | None = None) -> Any:
        if self._nc is None or not self._nc.is_connected:
            raise LinkDown(f"not connected to {self.url}")

        async def ask():  # noqa: ANN202
            return await self._nc.request(subject, data, timeout=self.request_seconds, headers=headers)

        try:
            reply = self._run(ask(), self.request_seconds)
        except (NatsError, TimeoutError) as exc:
            raise LinkDown(f"no answer from the control plane ({type(exc).__name__})") from exc
        error = protocol.remote_error(reply.headers)
        if error is not None:
            raise error
        return reply

    def call(self, subject: str, body: dict[str, Any]) -> dict[str, Any]:
        return protocol.decode(self._request(subject, protocol.encode(body)).data)

    def lease(self) -> dict[str, Any] | None:
        return self.call(protocol.agent_subject(self.agent_id, "lease"), {}).get("assignment")

    def lease_work(self, capabilities: dict[str, Any] | None = None) -> dict[str, Any]:
        """The next fine-tuning job (`assignment`) or, this agent running them too, an `evaluation`. `capabilities`
        (what its training device has) lets the control plane hand it jobs that ask for them."""
        body: dict[str, Any] = {"kinds": [protocol.EVALUATION_KIND]}
        if capabilities is not None:
            body["capabilities"] = capabilities
        return self.call(protocol.agent_subject(self.agent_id, "lease"), body)

    def job_call(self, job_id: str, verb: str, body: dict[str, Any]) -> dict[str, Any]:
        return self.call(protocol.job_subject(self.agent_id, job_id, verb), body)

    def download(self, job_id: str, sha256: str, size: int, target: Path, attempt: int | None = None) -> Path:
        """Fetch a blob of the job (or evaluation) leased to this agent to `target` (kept if already there with
        the right hash), under the lease of `attempt` (the assignment's): once that attempt is over, the control
        plane refuses: over HTTPS by a presigned URL for an enrolled agent, else in chunks over the bus."""
        if target.is_file() and target.stat().st_size == size and _sha256(target) == sha256:
            return target
        if self.transfers is not None:
            url = self.transfer_url("job", job_id, "GET", sha256, attempt=attempt)
            return self.transfers.download(url, sha256, size, target)
        body = {"attempt": attempt} if attempt is not None else {}
        return self._fetch(protocol.job_subject(self.agent_id, job_id, "download"), body, sha256, size, target)

    def download_adapter(self, request_id: str, sha256: str, target: Path) -> Path:
        """Fetch a blob of the adapter an infer request names (the control plane serves no other) to `target`."""
        if self.transfers is not None:
            url = self.transfer_url("request", request_id, "GET", sha256)
            return self.transfers.download(url, sha256, None, target)
        subject = protocol.agent_subject(self.agent_id, protocol.ADAPTER_VERB)
        return self._fetch(subject, {"request_id": request_id}, sha256, None, target)

    def transfer_url(
        self, purpose: str, work_id: str, method: str, sha256: str, *, attempt: int | None = None, size: int = 0
    ) -> str:
        """A presigned URL (a path on the platform's server) for one blob of work leased to this agent."""
        body: dict[str, Any] = {"purpose": purpose, "id": work_id, "method": method, "sha256": sha256}
        if attempt is not None:
            body["attempt"] = attempt
        if method == "PUT":
            body["bytes"] = size
        return str(self.call(protocol.agent_subject(self.agent_id, protocol.TRANSFER_VERB), body)["url"])

    def _fetch(self, subject: str, body: dict[str, Any], sha256: str, size: int | None, target: Path) -> Path:
        """Chunks until `size` bytes (or, size unknown, a short chunk), verified against `sha256`."""
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".part")
        digest = hashlib.sha256()
        with partial.open("wb") as handle:
            offset = 0
            while size is None or offset < size:
                chunk = self._request(subject, protocol.encode({**body, "sha256": sha256, "offset": offset})).data
                handle.write(chunk)
                digest.update(chunk)
                offset += len(chunk)
                if not chunk or (size is None and len(chunk) < protocol.CHUNK_BYTES):
                    break
        if (size is not None and offset != size) or digest.hexdigest() != sha256:
            partial.unlink(missing_ok=True)
            raise RemoteError(f"blob {sha256} arrived incomplete or damaged", retryable=True)
        partial.replace(target)
        return target

    # --- inference: messages the agent receives and streams back ------------------------------------

    def subscribe(self, subject: str, handler: Callable[[bytes], None]) -> None:
        """Call `handler(data)` on the link's loop for each message on `subject` (it must return quickly)."""
        if self._nc is None:
            raise LinkDown(f"not connected to {self.url}")

        async def on_message(msg) -> None:  # noqa: ANN001 - a nats Msg
            handler(msg.data)

        self._run(self._nc.subscribe(subject, cb=on_message), self.request_seconds)

    def publish(self, subject: str, body: dict[str, Any], *, batch: tuple[str, str] | None = None) -> None:
        """Send without waiting for the server, in the order of the calls (one sender task publishes them all on
        the one connection). `batch` = (a batch subject, this message's key in it): the messages given for the
        same batch subject before the sender gets to them leave together as one (`protocol.pack_stream_batch`),
        so the more threads publish at once, the fewer messages they cost."""
        nc = self._nc
        if nc is None or not nc.is_connected:
            raise LinkDown(f"not connected to {self.url}")
        data = protocol.encode(body)
        with self._outgoing_lock:
            wake = not self._outgoing
            self._outgoing.append((subject, data, batch))
        if wake:
            self._loop.call_soon_threadsafe(self._outgoing_ready.set)

    async def _send_outgoing(self) -> None:
        """The link's one sender: what `publish` queued, in order, batches packed (a message of its own when alone
        in its batch)."""
        while True:
            await self._outgoing_ready.wait()
            self._outgoing_ready.clear()
            with self._outgoing_lock:
                outgoing, self._outgoing = self._outgoing, []
                last = self._closing
            for subject, data in _packed(outgoing):
                try:
                    await self._nc.publish(subject, data)
                except Exception as exc:  # noqa: BLE001 - closed or reconnecting: the stream's reader notices
                    log.info("a message on %s was not sent: %s", subject, exc)
            if last:
                return

    async def _last_outgoing(self) -> None:
        with self._outgoing_lock:
            self._closing = True
        self._outgoing_ready.set()
        await self._sender

    def upload(self, job_id: str, path: Path, attempt: int | None = None) -> str:
        """Send a file under the lease of `attempt`; the control plane stores it as a blob of the job's tenant.
        Returns its sha256."""
        sha = _sha256(path)
        size = path.stat().st_size
        if self.transfers is not None:
            url = self.transfer_url("job", job_id, "PUT", sha, attempt=attempt, size=size)
            self.transfers.upload(url, path, size)
            return sha
        upload_id = uuid.uuid4().hex
        subject = protocol.job_subject(self.agent_id, job_id, "upload")
        with path.open("rb") as source:
            offset = 0
            while True:
                chunk = source.read(protocol.CHUNK_BYTES)
                last = offset + len(chunk) >= size
                headers = {protocol.UPLOAD_HEADER: upload_id, protocol.OFFSET_HEADER: str(offset)}
                if attempt is not None:
                    headers[protocol.ATTEMPT_HEADER] = str(attempt)
                if last:
                    headers[protocol.SHA256_HEADER] = sha
                self._request(subject, chunk, headers)
                offset += len(chunk)
                if last:
                    return sha

    def upload_dir(self, job_id: str, directory: Path, attempt: int | None = None) -> dict[str, str]:
        files = sorted(path for path in directory.iterdir() if path.is_file())
        return {path.name: self.upload(job_id, path, attempt) for path in files}


def _packed(outgoing: list[tuple[str, bytes, tuple[str, str] | None]]) -> list[tuple[str, bytes]]:
    """The messages to publish for `outgoing`: each alone, except those of one batch subject, which go as one
    (cut at STREAM_BATCH_BYTES). A batch keeps its lines' order, so a stream's messages stay in theirs."""
    alone: list[tuple[str, bytes]] = []
    batches: dict[str, list[tuple[str, str, bytes]]] = {}
    for subject, data, batch in outgoing:
        if batch is None:
            alone.append((subject, data))
        else:
            batches.setdefault(batch[0], []).append((subject, batch[1], data))
    for batch_subject, lines in batches.items():
        if len(lines) == 1:
            alone.append((lines[0][0], lines[0][2]))
            continue
        part: list[tuple[str, bytes]] = []
        size = 0
        for _, key, data in lines:
            if part and size + len(data) > protocol.STREAM_BATCH_BYTES:
                alone.append((batch_subject, protocol.pack_stream_batch(part)))
                part, size = [], 0
            part.append((key, data))
            size += len(key) + len(data) + 2
        alone.append((batch_subject, protocol.pack_stream_batch(part)))
    return alone


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as source:
        for block in iter(lambda: source.read(1024 * 1024), b""):
            digest.update(block)
    return digest.hexdigest()
