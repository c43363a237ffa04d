"""The OpenAI contract validator accepts OpenAI-shaped bodies and rejects wrong ones.

Every schema the Adaptery API serves is exercised with realistic bodies (shaped like what
api.openai.com returns, with Adaptery ids/models) and with mutations that must fail.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from .openai_schema import (
    SPEC_PATH,
    assert_matches,
    assert_stream_chunk,
    component_schema,
    load_spec,
    schema_names,
    validation_errors,
)

CREATED = 1721764800

# --------------------------------------------------------------------------------------------
# Realistic bodies (functions, so every test gets a fresh copy to mutate)
# --------------------------------------------------------------------------------------------


def model() -> dict[str, Any]:
    return {"id": "llama-3.1-8b-instruct", "object": "model", "created": CREATED, "owned_by": "adaptery"}


def fine_tuned_model() -> dict[str, Any]:
    return {
        "id": "ft:llama-3.1-8b-instruct:acme:support-bot:ftjob-abc123",
        "object": "model",
        "created": CREATED + 3600,
        "owned_by": "acme",
        "shutdown_date": None,
    }


def list_models() -> dict[str, Any]:
    return {"object": "list", "data": [model(), fine_tuned_model()]}


def usage() -> dict[str, Any]:
    return {
        "prompt_tokens": 19,
        "completion_tokens": 10,
        "total_tokens": 29,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def chat_completion() -> dict[str, Any]:
    return {
        "id": "chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT",
        "object": "chat.completion",
        "created": CREATED,
        "model": "ft:llama-3.1-8b-instruct:acme:support-bot:ftjob-abc123",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "Hello! How can I assist you today?",
                    "refusal": None,
                    "annotations": [],
                },
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": usage(),
        "service_tier": "default",
        "system_fingerprint": "fp_adaptery_0_1_0",
    }


def chat_completion_minimal() -> dict[str, Any]:
    """Only the required fields (usage, service_tier, system_fingerprint, annotations omitted)."""
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": CREATED,
        "model": "llama-3.1-8b-instruct",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hi", "refusal": None},
                "logprobs": None,
                "finish_reason": "length",
            }
        ],
    }


def chat_completion_tool_call() -> dict[str, Any]:
    body = chat_completion()
    body["choices"][0]["message"] = {
        "role": "assistant",
        "content": None,
        "refusal": None,
        "tool_calls": [
            {
                "id": "call_abc123",
                "type": "function",
                "function": {"name": "get_current_weather", "arguments": '{"location": "Boston, MA"}'},
            }
        ],
    }
    body["choices"][0]["finish_reason"] = "tool_calls"
    return body


def token_logprob(token: str, logprob: float) -> dict[str, Any]:
    raw = list(token.encode())
    return {
        "token": token,
        "logprob": logprob,
        "bytes": raw,
        "top_logprobs": [
            {"token": token, "logprob": logprob, "bytes": raw},
            {"token": "<|eot|>", "logprob": -9.5, "bytes": None},
        ],
    }


def chat_completion_logprobs() -> dict[str, Any]:
    body = chat_completion()
    body["choices"][0]["logprobs"] = {
        "content": [token_logprob("Hello", -0.31725305), token_logprob("!", -0.02380986)],
        "refusal": None,
    }
    body["system_fingerprint"] = "fp_44709d6fcb"
    return body


def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-123",
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": "llama-3.1-8b-instruct",
        "system_fingerprint": "fp_adaptery_0_1_0",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
    }


def stream() -> list[dict[str, Any]]:
    """A whole stream as sent with stream_options.include_usage = true."""
    chunks = [
        chunk({"role": "assistant", "content": "", "refusal": None}),
        chunk({"content": "Hello"}),
        chunk({"content": "!"}),
        chunk({}, "stop"),
    ]
    for c in chunks:
        c["usage"] = None
    final = chunk({})
    final["choices"] = []
    final["usage"] = {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}
    return [*chunks, final]


def tool_call_chunk() -> dict[str, Any]:
    return chunk(
        {
            "tool_calls": [
                {
                    "index": 0,
                    "id": "call_abc123",
                    "type": "function",
                    "function": {"name": "get_current_weather", "arguments": ""},
                }
            ]
        }
    )


def embedding_response() -> dict[str, Any]:
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": 0, "embedding": [0.0023064255, -0.009327292, 0.015797347]},
            {"object": "embedding", "index": 1, "embedding": [-0.0028842222, 0, 1]},
        ],
        "model": "all-minilm-l6-v2",
        "usage": {"prompt_tokens": 8, "total_tokens": 8},
    }


def openai_file(file_id: str = "file-abc123", purpose: str = "fine-tune") -> dict[str, Any]:
    return {
        "id": file_id,
        "object": "file",
        "bytes": 120000,
        "created_at": CREATED,
        "filename": "support-dialogues.jsonl",
        "purpose": purpose,
        "status": "processed",
    }


def list_files() -> dict[str, Any]:
    first = openai_file("file-abc123")
    second = openai_file("file-abc456", "batch")
    second["expires_at"] = CREATED + 86400
    second["status_details"] = "ok"
    return {
        "object": "list",
        "data": [first, second],
        "first_id": "file-abc123",
        "last_id": "file-abc456",
        "has_more": False,
    }


def list_files_empty() -> dict[str, Any]:
    """first_id/last_id are required non-null strings even for an empty page."""
    return {"object": "list", "data": [], "first_id": "", "last_id": "", "has_more": False}


def delete_file() -> dict[str, Any]:
    return {"id": "file-abc123", "object": "file", "deleted": True}


def hyperparameters() -> dict[str, Any]:
    return {"batch_size": "auto", "learning_rate_multiplier": 0.5, "n_epochs": 3}


def fine_tuning_job() -> dict[str, Any]:
    """A running supervised (LoRA) job."""
    return {
        "object": "fine_tuning.job",
        "id": "ftjob-abc123",
        "model": "llama-3.1-8b-instruct",
        "created_at": CREATED,
        "finished_at": None,
        "fine_tuned_model": None,
        "organization_id": "org-acme",
        "result_files": [],
        "status": "running",
        "validation_file": None,
        "training_file": "file-abc123",
        "hyperparameters": hyperparameters(),
        "trained_tokens": None,
        "error": None,
        "seed": 42,
        "estimated_finish": CREATED + 1800,
        "integrations": None,
        "method": {"type": "supervised", "supervised": {"hyperparameters": hyperparameters()}},
        "metadata": {"project": "support-bot"},
    }


def fine_tuning_job_succeeded() -> dict[str, Any]:
    job = fine_tuning_job()
    job.update(
        status="succeeded",
        finished_at=CREATED + 1900,
        fine_tuned_model="ft:llama-3.1-8b-instruct:acme:support-bot:ftjob-abc123",
        result_files=["file-result1"],
        trained_tokens=5768,
        estimated_finish=None,
        integrations=[],
        metadata=None,
    )
    return job


def fine_tuning_job_failed() -> dict[str, Any]:
    job = fine_tuning_job()
    job.update(
        status="failed",
        finished_at=CREATED + 60,
        error={
            "code": "invalid_training_file",
            "message": "Line 3 is not valid JSON.",
            "param": "training_file",
        },
    )
    return job


def fine_tuning_job_queued_auto() -> dict[str, Any]:
    """Freshly created job: every hyperparameter "auto", validation file, W&B integration."""
    job = fine_tuning_job()
    auto = {"batch_size": "auto", "learning_rate_multiplier": "auto", "n_epochs": "auto"}
    job.update(
        status="queued",
        validation_file="file-val456",
        estimated_finish=None,
        hyperparameters=dict(auto),
        method={"type": "supervised", "supervised": {"hyperparameters": dict(auto)}},
        integrations=[{"type": "wandb", "wandb": {"project": "my-wandb-project", "entity": None, "name": None}}],
    )
    job.pop("metadata")
    return job


def fine_tuning_job_dpo() -> dict[str, Any]:
    job = fine_tuning_job()
    job["hyperparameters"] = {"batch_size": None, "learning_rate_multiplier": 1.0, "n_epochs": 1}
    job["method"] = {
        "type": "dpo",
        "dpo": {
            "hyperparameters": {
                "beta": 0.1,
                "batch_size": 8,
                "learning_rate_multiplier": 2,
                "n_epochs": "auto",
            }
        },
    }
    return job


def list_jobs() -> dict[str, Any]:
    return {"object": "list", "data": [fine_tuning_job(), fine_tuning_job_succeeded()], "has_more": False}


def job_event() -> dict[str, Any]:
    return {
        "object": "fine_tuning.job.event",
        "id": "ftevent-abc123",
        "created_at": CREATED,
        "level": "info",
        "message": "Created fine-tuning job",
        "data": {},
        "type": "message",
    }


def metrics_event() -> dict[str, Any]:
    return {
        "object": "fine_tuning.job.event",
        "id": "ftevent-abc124",
        "created_at": CREATED + 30,
        "level": "info",
        "message": "Step 10/100: training loss=1.23",
        "data": {"step": 10, "train_loss": 1.23, "total_steps": 100},
        "type": "metrics",
    }


def list_events() -> dict[str, Any]:
    warn = job_event() | {"id": "ftevent-abc125", "level": "warn", "message": "Low disk space"}
    bare = {k: v for k, v in job_event().items() if k not in ("data", "type")}
    bare |= {"id": "ftevent-abc126", "level": "error"}
    return {"object": "list", "data": [job_event(), metrics_event(), warn, bare], "has_more": True}


def checkpoint(step: int) -> dict[str, Any]:
    model_id = "ft:llama-3.1-8b-instruct:acme:support-bot:ftjob-abc123"
    return {
        "object": "fine_tuning.job.checkpoint",
        "id": f"ftckpt_step{step}",
        "created_at": CREATED + step,
        "fine_tuned_model_checkpoint": f"{model_id}:ckpt-step-{step}",
        "metrics": {
            "step": step,
            "train_loss": 0.5,
            "full_valid_loss": 0.134,
            "full_valid_mean_token_accuracy": 0.874,
        },
        "fine_tuning_job_id": "ftjob-abc123",
        "step_number": step,
    }


def list_checkpoints() -> dict[str, Any]:
    return {
        "object": "list",
        "data": [checkpoint(2000), checkpoint(1000)],
        "first_id": "ftckpt_step2000",
        "last_id": "ftckpt_step1000",
        "has_more": False,
    }


def list_checkpoints_empty() -> dict[str, Any]:
    return {"object": "list", "data": [], "first_id": None, "last_id": None, "has_more": False}


def error_response() -> dict[str, Any]:
    return {
        "error": {
            "message": "The model `gpt-banana` does not exist or you do not have access to it.",
            "type": "invalid_request_error",
            "param": None,
            "code": "model_not_found",
        }
    }


def error_response_null_code() -> dict[str, Any]:
    return {
        "error": {
            "message": "Incorrect API key provided.",
            "type": "invalid_request_error",
            "param": "model",
            "code": None,
        }
    }


def delete_model() -> dict[str, Any]:
    return {
        "id": "ft:llama-3.1-8b-instruct:acme:support-bot:ftjob-abc123",
        "object": "model",
        "deleted": True,
    }


VALID: list[tuple[str, Callable[[], Any]]] = [
    ("ListModelsResponse", list_models),
    ("Model", model),
    ("Model", fine_tuned_model),
    ("CreateChatCompletionResponse", chat_completion),
    ("CreateChatCompletionResponse", chat_completion_minimal),
    ("CreateChatCompletionResponse", chat_completion_tool_call),
    ("CreateChatCompletionResponse", chat_completion_logprobs),
    ("CreateChatCompletionStreamResponse", tool_call_chunk),
    ("CreateEmbeddingResponse", embedding_response),
    ("OpenAIFile", openai_file),
    ("ListFilesResponse", list_files),
    ("ListFilesResponse", list_files_empty),
    ("DeleteFileResponse", delete_file),
    ("FineTuningJob", fine_tuning_job),
    ("FineTuningJob", fine_tuning_job_succeeded),
    ("FineTuningJob", fine_tuning_job_failed),
    ("FineTuningJob", fine_tuning_job_queued_auto),
    ("FineTuningJob", fine_tuning_job_dpo),
    ("ListPaginatedFineTuningJobsResponse", list_jobs),
    ("FineTuningJobEvent", job_event),
    ("FineTuningJobEvent", metrics_event),
    ("ListFineTuningJobEventsResponse", list_events),
    ("ListFineTuningJobCheckpointsResponse", list_checkpoints),
    ("ListFineTuningJobCheckpointsResponse", list_checkpoints_empty),
    ("ErrorResponse", error_response),
    ("ErrorResponse", error_response_null_code),
    ("DeleteModelResponse", delete_model),
]


@pytest.mark.parametrize(("schema_name", "factory"), VALID, ids=[f"{s}-{f.__name__}" for s, f in VALID])
def test_valid_bodies_pass(schema_name: str, factory: Callable[[], Any]) -> None:
    assert_matches(schema_name, factory())


@pytest.mark.parametrize("index", range(len(stream())))
def test_every_chunk_of_a_stream_passes(index: int) -> None:
    assert_stream_chunk(stream()[index])


def test_valid_bodies_survive_a_json_round_trip() -> None:
    """What a client decodes from the wire (ints stay ints, 1.0 stays a float) still passes."""
    for schema_name, factory in VALID:
        assert_matches(schema_name, json.loads(json.dumps(factory())))


# --------------------------------------------------------------------------------------------
# Invalid bodies: one mutation of a valid body each
# --------------------------------------------------------------------------------------------

DELETE = object()


def mutate(body: Any, path: str, value: Any) -> Any:
    """Set (or, with ``DELETE``, remove) ``path`` (dot separated, list indexes as numbers) in a
    copy of ``body``."""
    body = copy.deepcopy(body)
    *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
    target = body
    for part in parents:
        target = target[part]
    if value is DELETE:
        del target[last]
    else:
        target[last] = value
    return body


def json_path(path: str, value: Any) -> str:
    """Where the report must point (or below): the mutated value, or its parent for a removed key."""
    parts = path.split(".")
    if value is DELETE:
        parts = parts[:-1]
    return "$" + "".join(f"[{p}]" if p.isdigit() else f".{p}" for p in parts)


# schema -> (factory, path, new value or DELETE); the report must name json_path(path, value)
INVALID: dict[str, list[tuple[Callable[[], Any], str, Any]]] = {
    "ListModelsResponse": [
        (list_models, "object", "models"),
        (list_models, "data", DELETE),
        (list_models, "data.1.owned_by", DELETE),
    ],
    "Model": [
        (model, "created", "2024-07-23T00:00:00Z"),
        (model, "created", 1721764800.5),
        (model, "object", "fine_tuned_model"),
        (model, "id", DELETE),
    ],
    "CreateChatCompletionResponse": [
        (chat_completion, "choices", DELETE),
        (chat_completion, "created", DELETE),
        (chat_completion, "object", "chat.completion.chunk"),
        (chat_completion, "choices.0.finish_reason", "eos"),
        (chat_completion, "choices.0.finish_reason", None),
        (chat_completion, "choices.0.logprobs", DELETE),
        (chat_completion, "choices.0.message.refusal", DELETE),
        (chat_completion, "choices.0.message.role", "user"),
        (chat_completion, "choices.0.message.content", [{"type": "text", "text": "hi"}]),
        (chat_completion, "choices.0.message.annotations", [{"type": "url_citation", "url_citation": {}}]),
        (chat_completion, "usage.total_tokens", DELETE),
        (chat_completion, "usage", None),
        (chat_completion, "system_fingerprint", None),
        (chat_completion, "service_tier", "premium"),
        (chat_completion, "choices.0.message.annotations", None),
        (chat_completion_tool_call, "choices.0.message.tool_calls", None),
        (chat_completion_tool_call, "choices.0.message.tool_calls.0.id", DELETE),
        (chat_completion_tool_call, "choices.0.message.tool_calls.0.function.arguments", {"x": 1}),
        (chat_completion_logprobs, "choices.0.logprobs.refusal", DELETE),
        (chat_completion_logprobs, "choices.0.logprobs.content.0.logprob", "-0.3"),
    ],
    "CreateChatCompletionStreamResponse": [
        (lambda: stream()[1], "object", "chat.completion"),
        (lambda: stream()[1], "choices.0.delta", DELETE),
        (lambda: stream()[1], "choices.0.finish_reason", DELETE),
        (lambda: stream()[1], "choices.0.index", DELETE),
        (lambda: stream()[3], "choices.0.finish_reason", "eos"),
        (lambda: stream()[0], "choices.0.delta.role", "bot"),
        (lambda: stream()[-1], "usage.prompt_tokens", DELETE),
        (lambda: stream()[0], "choices.0.delta.role", None),
        (tool_call_chunk, "choices.0.delta.tool_calls", None),
        (tool_call_chunk, "choices.0.delta.tool_calls.0.index", DELETE),
    ],
    "CreateEmbeddingResponse": [
        (embedding_response, "usage", DELETE),
        (embedding_response, "data.0.embedding", "AAAAAA=="),  # encoding_format=base64 is not in the schema
        (embedding_response, "data.0.object", "vector"),
        (embedding_response, "data.1.index", DELETE),
    ],
    "OpenAIFile": [
        (openai_file, "purpose", "training"),
        (openai_file, "status", "ready"),
        (openai_file, "status", DELETE),
        (openai_file, "bytes", "120000"),
        (openai_file, "expires_at", None),
    ],
    "ListFilesResponse": [
        (list_files, "first_id", None),
        (list_files, "has_more", DELETE),
        (list_files, "data.1.purpose", "banana"),
    ],
    "DeleteFileResponse": [
        (delete_file, "deleted", "true"),
        (delete_file, "object", "file.deleted"),
    ],
    "FineTuningJob": [
        (fine_tuning_job, "status", "banana"),
        (fine_tuning_job, "status", "completed"),
        (fine_tuning_job, "object", "fine_tuning.jobs"),
        (fine_tuning_job, "seed", DELETE),
        (fine_tuning_job, "seed", None),
        (fine_tuning_job, "error", DELETE),
        (fine_tuning_job, "error", {}),
        (fine_tuning_job, "organization_id", DELETE),
        (fine_tuning_job, "hyperparameters", DELETE),
        (fine_tuning_job, "hyperparameters", None),
        (fine_tuning_job, "hyperparameters.learning_rate_multiplier", 0),
        (fine_tuning_job, "hyperparameters.learning_rate_multiplier", -0.5),
        (fine_tuning_job, "hyperparameters.learning_rate_multiplier", "0.5"),
        (fine_tuning_job, "hyperparameters.learning_rate_multiplier", None),
        (fine_tuning_job, "hyperparameters.n_epochs", 0),
        (fine_tuning_job, "hyperparameters.n_epochs", 2.5),
        (fine_tuning_job, "hyperparameters.batch_size", 512),
        (fine_tuning_job, "method", None),
        (fine_tuning_job, "method.type", DELETE),
        (fine_tuning_job, "method.type", "lora"),
        (fine_tuning_job, "method.supervised.hyperparameters.learning_rate_multiplier", 0),
        (fine_tuning_job, "method.supervised.hyperparameters.batch_size", None),
        (fine_tuning_job, "result_files", None),
        (fine_tuning_job, "created_at", None),
        (fine_tuning_job, "metadata", {"epochs": 3}),
        (fine_tuning_job_failed, "error.message", None),
        (fine_tuning_job_dpo, "method.dpo.hyperparameters.beta", 0),
        (fine_tuning_job_dpo, "method.dpo.hyperparameters.beta", 2.5),
        (fine_tuning_job_queued_auto, "integrations.0.type", "mlflow"),
    ],
    "ListPaginatedFineTuningJobsResponse": [
        (list_jobs, "has_more", DELETE),
        (list_jobs, "data.1.status", "done"),
    ],
    "FineTuningJobEvent": [
        (job_event, "level", "debug"),
        (job_event, "level", "warning"),
        (job_event, "type", "log"),
        (job_event, "data", None),
        (job_event, "message", DELETE),
        (job_event, "object", "event"),
    ],
    "ListFineTuningJobEventsResponse": [
        (list_events, "data.1.level", "fatal"),
        (list_events, "object", "fine_tuning.job.events"),
    ],
    "ListFineTuningJobCheckpointsResponse": [
        (list_checkpoints, "data.0.metrics", DELETE),
        (list_checkpoints, "data.0.step_number", "2000"),
        (list_checkpoints, "data.1.metrics.train_loss", "0.5"),
        (list_checkpoints, "data.0.object", "fine_tuning.checkpoint"),
    ],
    "ErrorResponse": [
        (error_response, "error.param", DELETE),
        (error_response, "error.code", DELETE),
        (error_response, "error.code", 404),
        (error_response, "error", "model not found"),
    ],
    "DeleteModelResponse": [
        (delete_model, "deleted", DELETE),
        (delete_model, "id", None),
    ],
}
INVALID_CASES = [(schema, *case) for schema, cases in INVALID.items() for case in cases]


def _case_id(schema_name: str, factory: Callable[[], Any], path: str, value: Any) -> str:
    change = "deleted" if value is DELETE else f"={json.dumps(value)[:30]}"
    return f"{schema_name}-{path}{change}"


@pytest.mark.parametrize(
    ("schema_name", "factory", "path", "value"), INVALID_CASES, ids=[_case_id(*c) for c in INVALID_CASES]
)
def test_invalid_bodies_fail_and_the_report_points_at_the_field(
    schema_name: str, factory: Callable[[], Any], path: str, value: Any
) -> None:
    assert validation_errors(schema_name, factory()) == []  # the mutation alone breaks it
    with pytest.raises(AssertionError) as excinfo:
        assert_matches(schema_name, mutate(factory(), path, value))
    report = str(excinfo.value)
    assert f"OpenAI schema {schema_name!r}" in report
    expected = json_path(path, value)
    located = [line.strip(" -").split(": ", 1)[0] for line in report.splitlines()[1:]]
    assert any(loc == expected or loc.startswith((f"{expected}.", f"{expected}[")) for loc in located), report


@pytest.mark.parametrize(
    ("schema_name", "body"),
    [
        ("ErrorResponse", {"detail": "Not Found"}),  # FastAPI's default error body
        ("ListModelsResponse", [model()]),  # a bare list instead of the list envelope
        ("CreateChatCompletionResponse", {}),
        ("FineTuningJob", {"id": "ftjob-1", "status": "running"}),
    ],
    ids=["fastapi-detail", "bare-list", "empty-object", "partial-job"],
)
def test_wrong_shapes_fail(schema_name: str, body: Any) -> None:
    with pytest.raises(AssertionError):
        assert_matches(schema_name, body)


def test_stream_chunk_helper_rejects_a_full_completion() -> None:
    with pytest.raises(AssertionError, match="CreateChatCompletionStreamResponse"):
        assert_stream_chunk(chat_completion())


# --------------------------------------------------------------------------------------------
# The spec's quirks are handled
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0.5, 1e-06, 1, 2.0, 10, "auto"])
def test_exclusive_minimum_boolean_form_accepts_positive_learning_rates(value: Any) -> None:
    """``{"minimum": 0, "exclusiveMinimum": true}`` means > 0 (read as 2020-12 it meant > True)."""
    job = mutate(fine_tuning_job(), "hyperparameters.learning_rate_multiplier", value)
    job = mutate(job, "method.supervised.hyperparameters.learning_rate_multiplier", value)
    assert_matches("FineTuningJob", job)


def test_exclusive_minimum_is_numeric_after_normalisation() -> None:
    lr = component_schema("FineTuningJob")["properties"]["hyperparameters"]["properties"]["learning_rate_multiplier"]
    number = next(branch for branch in lr["oneOf"] if branch.get("type") == "number")
    assert number == {"type": "number", "exclusiveMinimum": 0}
    beta = component_schema("FineTuneDPOHyperparameters")["properties"]["beta"]
    number = next(branch for branch in beta["oneOf"] if branch.get("type") == "number")
    assert number == {"type": "number", "exclusiveMinimum": 0, "maximum": 2}


def test_nullable_true_allows_null() -> None:
    """Stream chunks use OpenAPI 3.0 ``nullable: true`` for finish_reason, logprobs and usage."""
    body = stream()[1]
    assert body["choices"][0]["finish_reason"] is None
    assert body["choices"][0]["logprobs"] is None
    assert body["usage"] is None
    assert_stream_chunk(body)
    body["choices"][0]["logprobs"] = {"content": None, "refusal": None}
    assert_stream_chunk(body)
    body["choices"][0]["logprobs"] = {"content": [token_logprob("Hi", -0.1)], "refusal": None}
    assert_stream_chunk(body)


def test_nullable_enum_still_rejects_other_values() -> None:
    finish_reason = component_schema("CreateChatCompletionStreamResponse")["properties"]["choices"]["items"][
        "properties"
    ]["finish_reason"]
    assert finish_reason["type"] == ["string", "null"]
    assert finish_reason["enum"] == ["stop", "length", "tool_calls", "content_filter", "function_call", None]
    with pytest.raises(AssertionError, match=r"\$\.choices\[0\]\.finish_reason"):
        assert_stream_chunk(mutate(stream()[1], "choices.0.finish_reason", "null"))


def test_nullable_marker_in_allof_makes_the_whole_allof_nullable() -> None:
    truncation = component_schema("CreateRunRequest")["properties"]["truncation_strategy"]
    assert truncation == {"anyOf": [{"allOf": [{"$ref": "#/components/schemas/TruncationObject"}]}, {"type": "null"}]}


def test_recursive_ref_is_resolved() -> None:
    """``CompoundFilter`` uses draft 2019-09 ``$recursiveRef``.  Left as is, the recursive branch
    of ``oneOf: [ComparisonFilter, {"$recursiveRef": "#"}]`` would accept anything: a comparison
    would match twice (rejected) and a broken nested filter would pass."""
    comparison = {"type": "eq", "key": "region", "value": "eu"}
    nested = {"type": "and", "filters": [comparison, {"type": "or", "filters": [comparison]}]}
    assert_matches("CompoundFilter", nested)
    with pytest.raises(AssertionError):
        assert_matches("CompoundFilter", {"type": "and", "filters": [{"type": "or", "filters": "nope"}]})


def test_format_is_not_asserted() -> None:
    """``format`` (``unixtime``, ``date``, ``uri`` ...) is an annotation only."""
    assert_matches("Model", model() | {"shutdown_date": "sometime next year"})


SCHEMA_MAP_KEYWORDS = ("properties", "patternProperties", "$defs", "dependentSchemas")
SCHEMA_LIST_KEYWORDS = ("allOf", "anyOf", "oneOf", "prefixItems")
SCHEMA_KEYWORDS = ("items", "additionalProperties", "not", "if", "then", "else", "contains", "propertyNames")


def subschemas(node: Any) -> list[Any]:
    if not isinstance(node, dict):
        return []
    found: list[Any] = []
    for key, value in node.items():
        if key in SCHEMA_MAP_KEYWORDS:
            found.extend(value.values())
        elif key in SCHEMA_LIST_KEYWORDS:
            found.extend(value)
        elif key in SCHEMA_KEYWORDS:
            found.append(value)
    return found


def test_extension_keys_nullable_and_discriminator_are_gone() -> None:
    standard = set(Draft202012Validator.VALIDATORS) | {
        "$schema", "$id", "$anchor", "$defs", "$comment", "$dynamicAnchor", "$vocabulary",
        "title", "description", "default", "deprecated", "readOnly", "writeOnly", "examples",
        "format", "contentMediaType", "contentEncoding", "contentSchema",
    }  # fmt: skip
    found: set[str] = set()
    pending = list(load_spec()["components"]["schemas"].values())
    while pending:
        node = pending.pop()
        found.update(node if isinstance(node, dict) else ())
        pending.extend(subschemas(node))
    assert found - standard == set()
    assert {"nullable", "discriminator", "$recursiveRef", "x-stainless-const", "example"}.isdisjoint(found)


def test_normalised_schemas_are_valid_draft_2020_12() -> None:
    """Every schema reachable from the ones Adaptery serves passes the 2020-12 metaschema."""
    pending = [name for name, _ in VALID] + ["CompoundFilter", "CreateRunRequest", "ContainerResource"]
    checked: set[str] = set()
    while pending:
        name = pending.pop()
        if name in checked:
            continue
        checked.add(name)
        schema = component_schema(name)
        Draft202012Validator.check_schema(schema)
        nodes = [schema]
        while nodes:
            node = nodes.pop()
            if isinstance(node, dict) and "$ref" in node:
                pending.append(node["$ref"].rsplit("/", 1)[-1])
            nodes.extend(subschemas(node))
    assert {"FineTuneDPOHyperparameters", "ChatCompletionTokenLogprob", "ComparisonFilter"} <= checked


# --------------------------------------------------------------------------------------------
# Reporting and loading
# --------------------------------------------------------------------------------------------


def test_report_lists_every_violation_with_its_path() -> None:
    job = fine_tuning_job()
    job["status"] = "banana"
    job["hyperparameters"]["learning_rate_multiplier"] = 0
    del job["seed"]
    with pytest.raises(AssertionError) as excinfo:
        assert_matches("FineTuningJob", job)
    report = str(excinfo.value)
    assert "(3 violations)" in report
    assert "$.status: 'banana' is not one of ['validating_files', 'queued', 'running'," in report
    assert "$: 'seed' is a required property" in report
    assert "$.hyperparameters.learning_rate_multiplier: 0 is not valid under any of the given schemas" in report
    # the rejected oneOf alternatives are spelled out below the anyOf/oneOf failure
    assert "    - $.hyperparameters.learning_rate_multiplier: 0 is less than or equal to the minimum of 0" in report
    assert "    - $.hyperparameters.learning_rate_multiplier: 0 is not one of ['auto']" in report


def test_validation_errors_is_empty_for_valid_bodies() -> None:
    assert validation_errors("FineTuningJob", fine_tuning_job()) == []
    assert validation_errors("FineTuningJob", {}) != []


def test_long_instances_are_shortened_in_the_report() -> None:
    body = chat_completion()
    body["choices"][0]["message"]["content"] = ["x" * 5000]
    problems = validation_errors("CreateChatCompletionResponse", body)
    assert problems
    assert all(len(line) < 400 for line in problems)


def test_unknown_schema_name_is_a_key_error() -> None:
    with pytest.raises(KeyError, match="ChatCompletionResponse"):
        assert_matches("ChatCompletionResponse", {})


def test_all_schemas_used_here_exist() -> None:
    names = set(schema_names())
    assert {name for name, _ in VALID} | set(INVALID) <= names


def test_spec_is_the_vendored_copy_and_loaded_once() -> None:
    assert SPEC_PATH.name == "openai-openapi.json"
    assert SPEC_PATH.with_name("openai-openapi.LICENSE").read_text(encoding="utf-8").startswith("The MIT License")
    spec = load_spec()
    assert spec["openapi"].startswith("3.1")
    assert load_spec() is spec
