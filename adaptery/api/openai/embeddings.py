"""/v1/embeddings from the dedicated embedding model."""

from __future__ import annotations

import base64
from typing import Any, Literal

from fastapi import APIRouter, Depends
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict

from adaptery.api.deps import platform, principal
from adaptery.auth.policy import check_model, require
from adaptery.auth.principal import Principal
from adaptery.platform import Platform
from adaptery.services import limits
from adaptery.services.errors import InvalidRequest, NotFound

router = APIRouter(prefix="/v1", tags=["inference"])
MAX_INPUTS = 2048


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None


@router.post("/embeddings")
async def create_embeddings(
    body: EmbeddingRequest, who: Principal = Depends(principal), p: Platform = Depends(platform)
) -> dict[str, Any]:
    require(who, "infer")
    if body.model not in (p.embeddings.name, f"sentence-transformers/{p.embeddings.name}"):
        raise NotFound(
            f"The model '{body.model}' does not exist or is not an embedding model (use '{p.embeddings.name}').",
            param="model",
            code="model_not_found",
        )
    check_model(who, p.embeddings.name, param="model")
    texts = [body.input] if isinstance(body.input, str) else body.input
    if not texts:
        raise InvalidRequest("input must not be empty", param="input")
    if not all(isinstance(t, str) for t in texts):
        raise InvalidRequest("token-id input is not supported; send strings", param="input")
    if len(texts) > MAX_INPUTS:
        raise InvalidRequest(f"at most {MAX_INPUTS} inputs per request", param="input")
    for i, text in enumerate(texts):
        if not text:
            raise InvalidRequest(f"input[{i}] is empty", param="input")
    if body.dimensions is not None and body.dimensions != p.embeddings.dimensions:
        raise InvalidRequest(
            f"{p.embeddings.name} produces {p.embeddings.dimensions} dimensions; it cannot give {body.dimensions}",
            param="dimensions",
        )
    tokens = sum(await run_in_threadpool(p.embeddings.count_tokens, texts))
    most = p.settings.embeddings_max_request_tokens
    if tokens > most:
        raise InvalidRequest(
            f"the inputs hold {tokens} tokens, more than the {most} one request may (each input counts at most "
            "what the model reads); send them in several requests",
            param="input",
            code="too_many_tokens",
        )
    held = await run_in_threadpool(
        limits.reserve, p.db, who, prompt_tokens=tokens, max_tokens=0, hold_seconds=p.settings.inference_hold_seconds,
        model=p.embeddings.name, kind="embeddings", prices=p.settings.usage_prices,
    )  # fmt: skip
    failed = True
    try:
        vectors = await run_in_threadpool(p.embeddings.embed, texts)
        failed = False
    finally:
        await run_in_threadpool(limits.settle, p.db, held, prompt_tokens=tokens, completion_tokens=0, failed=failed)
    data = []
    for i, vector in enumerate(vectors.float().cpu()):
        if body.encoding_format == "base64":
            embedding: Any = base64.b64encode(vector.numpy().astype("<f4").tobytes()).decode()
        else:
            embedding = vector.tolist()
        data.append({"object": "embedding", "index": i, "embedding": embedding})
    return {
        "object": "list",
        "data": data,
        "model": body.model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
