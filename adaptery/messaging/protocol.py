"""Subjects and message shapes between agents and the control plane.

An agent publishes only under `adaptery.agent.<its id>.>` (its NATS permissions say so), so the
control plane knows who asks from the subject alone. All are request/reply:

| subject (after `adaptery.agent.<agent>.`) | request | reply |
| --- | --- | --- |
| `lease` | `{"kinds"?: ["evaluation"], "capabilities"?}` | `{"assignment": {...} or null, "evaluation"?: {...}}` |
| `job.<job>.heartbeat` | `{"attempt"}` | `{"verdict": "continue" / "cancel" / "pause" / "lost"}` |
| `job.<job>.events` | `{"events": [...], "attempt"}` (the trainer's own) | `{}` |
| `job.<job>.download` | `{"sha256", "offset"}` | the blob's bytes from offset, at most CHUNK_BYTES |
| `job.<job>.upload` | bytes; headers upload id, offset, and on the last chunk the sha256 | `{}` / `{"sha256"}` |
| `job.<job>.checkpoint` | `{"step", "epoch", "metrics", "files": {name: sha256}, "attempt"}` | `{"checkpoint": id}` |
| `job.<job>.finish` | `{"state", "message"?, "result"?, "files"?, "attempt"}` | `{"model"?}` |
| `announce` | an infer agent's `Announcement` (every few seconds, and at once on a change) | `{}` |
| `adapter` | `{"request_id", "sha256", "offset"}`: a blob the agent's open infer request names | as a download |
| `transfer` | `{"purpose": "job"/"request", "id", "method", "sha256", "bytes"?, "attempt"?}` | `{"url", "expires_at"}`|

`base` (`{"base_id"}`) answers `{"files": {name: {"sha256", "bytes", "url"}}}`: a base model's files (configs,
tokenizer, safetensors weights only) with a presigned URL each, for an enrolled agent that fetches its bases.

An agent enrolled by certificate moves blobs with `transfer` only: the reply is a presigned HTTPS URL (a path on
the platform's server, `auth/transfers.py`) for that one blob, method and piece of work, valid for minutes; the
bus's `download`, `upload` and `adapter` are for password agents on the platform's loopback (the embedded one).

An agent that lists `"evaluation"` in its lease request's `kinds` may be given an evaluation instead of a
fine-tuning job (only when none is waiting for it): `evaluation` is the evaluation's assignment
(`services.evaluation_queue.EvaluationQueue._assignment`), its id starts with `evaljob-`, and it uses the job verbs
heartbeat, events (`{"type": "progress"|"message"}`), download and finish (`{"state", "result"?, "message"?,
"attempt"}`), never upload or checkpoint.

A lease request's `capabilities` says what the agent's training device has: `{"accelerator": "cpu" | "cuda",
"memory_gb": GiB}` (a GPU's own memory on a CUDA agent, the machine's on a CPU one). The control plane hands it only
jobs whose `requirements` it meets (`services.job_requirements`); an agent that sends none gets only jobs that ask
for no accelerator and no memory.

`attempt` is the assignment's: the lease it names is the one the request acts under, and a request from an
attempt that is over is refused (a heartbeat hears "lost"), even if the job was leased again to the same agent
id. A request without it (an agent from before) is fenced by the agent id alone.

The control plane publishes `{"job_id", "action"}` on `adaptery.notify.<agent>` when a job is cancelled
or paused, so the agent acts at once rather than at its next heartbeat. Every reply is JSON except a
download's; an error is `{"error": message, "retryable": bool}` with the same in the ERROR_HEADER and
RETRYABLE_HEADER (which a download's error carries too). A refusal (not your job, invalid, not found) is
final; a fault that may pass (the database locked or restarting, an unexpected error) is retryable, and the
agent asks again after a pause rather than give up on work it has done.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

PREFIX = "adaptery.agent"
CONTROL_SUBSCRIPTION = f"{PREFIX}.*.>"
CONTROL_QUEUE_GROUP = "adaptery-control"
MAX_PAYLOAD = 1024 * 1024  # NATS's default
CHUNK_BYTES = 512 * 1024  # well under MAX_PAYLOAD, headers included
REQUEST_SECONDS = 30.0

# What a checkpoint keeps once a newer one exists: enough to serve or fork it, not to resume it.
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")

UPLOAD_HEADER = "Adaptery-Upload"
OFFSET_HEADER = "Adaptery-Offset"
SHA256_HEADER = "Adaptery-Sha256"
ERROR_HEADER = "Adaptery-Error"
RETRYABLE_HEADER = "Adaptery-Retryable"
ATTEMPT_HEADER = "Adaptery-Attempt"  # an upload chunk's body is the bytes: the attempt it is sent under goes here


EVALUATION_KIND = "evaluation"
EVALUATION_PREFIX = "evaljob-"


def is_evaluation(job_id: str) -> bool:
    return job_id.startswith(EVALUATION_PREFIX)


def agent_subject(agent_id: str, *parts: str) -> str:
    return ".".join((PREFIX, agent_id, *parts))


def job_subject(agent_id: str, job_id: str, verb: str) -> str:
    return agent_subject(agent_id, "job", job_id, verb)


def notify_subject(agent_id: str) -> str:
    return f"adaptery.notify.{agent_id}"


def inbox_prefix(agent_id: str) -> str:
    """Each agent's replies arrive under its own inbox, which no other agent may subscribe to."""
    return f"_INBOX_{agent_id}"


# Inference on agents (issue 16). The control plane publishes a request `{"request_id", ...}` on
# `adaptery.infer.<agent>` and a cancellation `{"request_id"}` on `adaptery.infer.<agent>.cancel`; the agent
# streams its answer as messages `{"seq", ...}` on `adaptery.stream.<agent>.<request_id>`, the last one carrying
# `"end": true`. The agent's id is in every subject it may publish on, so a stream names its sender.
INFER_PREFIX = "adaptery.infer"
STREAM_PREFIX = "adaptery.stream"


# How long a TLS listener of ours (the hub's fabric port, an island's leaf) waits for a client to start TLS before
# it sends its INFO in the clear, for a client that does not start TLS first (nats-server's `handshake_first` as a
# duration). Enrolled agents always start TLS first, so no impostor can have them talk in the clear.
TLS_FIRST_FALLBACK = "250ms"


def infer_subject(agent_id: str) -> str:
    return f"{INFER_PREFIX}.{agent_id}"


def infer_cancel_subject(agent_id: str) -> str:
    return f"{INFER_PREFIX}.{agent_id}.cancel"


def stream_subject(agent_id: str, request_id: str) -> str:
    return f"{STREAM_PREFIX}.{agent_id}.{request_id}"


# Many streams in one message. A control plane's request ids are `<instance>.<key>` (its process's streams arrive
# on one subscription, `adaptery.stream.*.<instance>.*`); one whose requests say `batched` also reads
# `adaptery.stream.<agent>.<instance>.many`: the messages of several of its streams, as lines `<key> <message>`
# (a message is JSON, which has no raw newline), each stream's in its order. An agent's engine produces a token
# for every request in its batch at once, and every message costs the agent, the broker and the control plane
# about the same whatever it carries: one message a step for all the streams of one control plane, rather than
# one a stream. The agent's id in the subject vouches for every line (only it may publish there), and a line
# reaches only a stream of that agent.
STREAM_BATCH = "many"
STREAM_BATCH_BYTES = 256 * 1024  # a batch message is cut before it grows past this (NATS refuses past 1 MB)


def stream_batch_subject(agent_id: str, instance: str) -> str:
    return f"{STREAM_PREFIX}.{agent_id}.{instance}.{STREAM_BATCH}"


def pack_stream_batch(lines: list[tuple[str, bytes]]) -> bytes:
    return b"\n".join(key.encode() + b" " + data for key, data in lines)


def unpack_stream_batch(data: bytes) -> Iterator[tuple[str, bytes]]:
    """The batch's (key, message) lines; a line without a key is skipped (it can reach no stream)."""
    for line in data.split(b"\n"):
        key, space, message = line.partition(b" ")
        if space:
            yield key.decode("ascii", "replace"), message


ANNOUNCE_VERB = "announce"
ADAPTER_VERB = "adapter"
TRANSFER_VERB = "transfer"
BASE_VERB = "base"


@dataclass(frozen=True)
class InferRequest:
    """What an infer agent is asked to generate: the prompt already tokenised and checked by the control plane
    (so limits and usage are the control plane's own count), the sampling parameters, and the adapter by its
    content hash and blobs (fetched on demand with `ADAPTER_VERB`, verified by sha256, kept in the agent's cache)."""

    request_id: str
    base_id: str
    prompt_ids: list[int]
    params: dict[str, Any]  # engine.sampling.SamplingParams as a dict
    adapter_key: str | None = None
    adapter_files: dict[str, str] | None = None  # name -> sha256 (safetensors and its config only)
    fairness_key: str = ""  # opaque: the engine shares its batch fairly between keys (the control plane's tenants)
    # False: the client reads the answer whole (not streamed), so the agent may hold its deltas longer and send
    # them in fewer messages (`WHOLE_ANSWER_COALESCE_SECONDS`); the first still goes at once
    streamed: bool = True
    # True: the control plane reads this stream's messages from batch messages too (`stream_batch_subject`); an
    # agent that does not know them sends each alone, which it reads as well
    batched: bool = False

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> InferRequest:
        files = data.get("adapter_files")
        if files is not None and not (
            isinstance(files, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in files.items())
        ):
            raise ValueError("adapter_files must map file names to sha256 hashes")
        prompt = data["prompt_ids"]
        if not isinstance(prompt, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise ValueError("prompt_ids must be a list of token ids")
        return cls(
            request_id=str(data["request_id"]),
            base_id=str(data["base_id"]),
            prompt_ids=prompt,
            params=dict(data["params"]),
            adapter_key=data.get("adapter_key"),
            adapter_files=files,
            fairness_key=str(data.get("fairness_key") or ""),
            streamed=data.get("streamed", True) is not False,
            batched=data.get("batched") is True,
        )


# A stream's messages: `{"seq": 0, "accepted": true, "adapter_hit": bool}` at once, then `{"seq", "text",
# "finish_reason", "logprobs", "completion_tokens"}` per delta and a bare `{"seq"}` as a keepalive while nothing
# else is sent for STREAM_KEEPALIVE_SECONDS, and last `{"seq", "end": true, "usage": {...}}`, with `"error"` (and
# `"timeout": true` for a deadline) when the engine failed the request, and `"retryable": true` when the engine
# itself was down and nothing was streamed (the control plane serves the request elsewhere). A delta may hold many
# tokens (an agent sends what its engine has produced since its last delta in one message).
STREAM_KEEPALIVE_SECONDS = 0.5
# How long an agent may hold a not-streamed answer's deltas to send them together: far below the control plane's
# deadlines for a stalled stream, and one message a second instead of one a token costs the relay next to nothing.
WHOLE_ANSWER_COALESCE_SECONDS = 1.0


def agent_permissions(agent_id: str) -> dict[str, dict[str, list[str]]]:
    """Every subject an agent may use, all named by its id: the broker enforces them (user permissions here,
    account imports and exports for an island's agents)."""
    return {
        "publish": {"allow": [agent_subject(agent_id, ">"), f"{STREAM_PREFIX}.{agent_id}.>"]},
        "subscribe": {
            "allow": [
                f"{inbox_prefix(agent_id)}.>",
                notify_subject(agent_id),
                infer_subject(agent_id),
                infer_cancel_subject(agent_id),
            ]
        },
    }


def parse_subject(subject: str) -> tuple[str, str | None, str]:
    """(agent id, job id or None, verb) of a request subject."""
    parts = subject.split(".")
    if len(parts) == 4 and parts[:2] == ["adaptery", "agent"]:
        return parts[2], None, parts[3]
    if len(parts) == 6 and parts[:2] == ["adaptery", "agent"] and parts[3] == "job":
        return parts[2], parts[4], parts[5]
    raise ValueError(f"not an agent request subject: {subject}")


def encode(body: dict[str, Any]) -> bytes:
    return json.dumps(body, allow_nan=False).encode()


def decode(data: bytes) -> dict[str, Any]:
    body = json.loads(data or b"{}")
    if not isinstance(body, dict):
        raise ValueError("a message body must be a JSON object")
    return body


@dataclass(frozen=True)
class BlobRef:
    sha256: str
    bytes: int


@dataclass(frozen=True)
class CheckpointRef:
    id: str
    step: int
    files: dict[str, BlobRef]  # name -> blob


@dataclass(frozen=True)
class Assignment:
    """A leased job, as sent to its agent: blobs by hash (fetched over NATS), never server paths."""

    job_id: str
    tenant_id: str
    attempt: int
    base_model: str
    base_model_ref: str
    training_file: BlobRef
    validation_file: BlobRef | None
    arguments: dict[str, Any]  # the spec's hyperparameters
    method: str = "supervised"
    checkpoint_every_steps: int | None = None
    lease_seconds: float | None = None  # unheartbeated this long, the job is no longer this agent's
    checkpoint: CheckpointRef | None = None  # resume from it: this job's own latest resumable checkpoint
    init_adapter: dict[str, BlobRef] | None = None  # start from these adapter weights (extend, continue, fork)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Assignment:
        checkpoint = data.get("checkpoint")
        return cls(
            job_id=data["job_id"],
            tenant_id=data["tenant_id"],
            attempt=data["attempt"],
            base_model=data["base_model"],
            base_model_ref=data["base_model_ref"],
            training_file=BlobRef(**data["training_file"]),
            validation_file=BlobRef(**data["validation_file"]) if data.get("validation_file") else None,
            arguments=data["arguments"],
            method=data.get("method", "supervised"),
            checkpoint_every_steps=data.get("checkpoint_every_steps"),
            lease_seconds=data.get("lease_seconds"),
            checkpoint=CheckpointRef(
                id=checkpoint["id"],
                step=checkpoint["step"],
                files={name: BlobRef(**blob) for name, blob in checkpoint["files"].items()},
            )
            if checkpoint
            else None,
            init_adapter={name: BlobRef(**blob) for name, blob in data["init_adapter"].items()}
            if data.get("init_adapter")
            else None,
        )


class RemoteError(RuntimeError):
    """The control plane refused or failed a request; the message says why, `retryable` whether asking again
    may succeed (a refusal is final; a locked database, a restart or an unexpected fault may pass)."""

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


def error_reply(message: str, *, retryable: bool) -> tuple[bytes, dict[str, str]]:
    """The body and headers of an error reply."""
    headers = {ERROR_HEADER: message, RETRYABLE_HEADER: "true" if retryable else "false"}
    return encode({"error": message, "retryable": retryable}), headers


def remote_error(headers: dict[str, str] | None) -> RemoteError | None:
    """The error a reply carries, if it is one (a reply without the retryable header is a final refusal)."""
    message = (headers or {}).get(ERROR_HEADER)
    if not message:
        return None
    return RemoteError(message, retryable=(headers or {}).get(RETRYABLE_HEADER) == "true")
