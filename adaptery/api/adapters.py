"""/api/models: adapters out (a PEFT zip) and in (a PEFT zip trained elsewhere)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Depends, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from adaptery.api.deps import platform, principal
from adaptery.api.openai.objects import model_object
from adaptery.api.uploads import receive_body
from adaptery.auth.policy import require
from adaptery.auth.principal import Principal
from adaptery.engine.loading import resolve_model_path
from adaptery.platform import Platform
from adaptery.services import adapter_io, audit, blob_refs, models
from adaptery.services.errors import InvalidRequest

router = APIRouter(prefix="/api/models", tags=["models"])
SUFFIX_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"


@router.get("/{model_id}/download")
def download_adapter(model_id: str, who: Principal = Depends(principal), p: Platform = Depends(platform)):  # noqa: ANN201
    """The adapter as a zip of its PEFT directory, loadable by `PeftModel.from_pretrained` unchanged."""
    with p.db.tenant(who.tenant_id) as s:
        ref = models.get_model(s, model_id, viewer=who)
        if ref.adapter is not None:
            audit.record(s, who, "model.download", target=model_id)
    if ref.adapter is None:
        raise InvalidRequest("Base models are not downloadable here; only adapters are.", param="model")
    name = quote(ref.adapter.id.replace(":", "_") + ".zip")
    return StreamingResponse(
        adapter_io.zip_adapter(p.blobs, ref.adapter),
        media_type="application/zip",
        headers={"Content-Disposition": f"attachment; filename*=UTF-8''{name}", "X-Content-SHA256": ref.adapter.sha256},
    )


@router.post("/import")
async def import_adapter(
    request: Request,
    base_model: Annotated[str, Query(description="The base model the adapter was trained on")],
    suffix: Annotated[str | None, Query(pattern=SUFFIX_PATTERN)] = None,
    who: Principal = Depends(principal),
    p: Platform = Depends(platform),
) -> dict:
    """Register a PEFT LoRA adapter (a zip of its directory, safetensors only) as a model of your tenant."""
    require(who, "fine_tune")
    with p.db.tenant(who.tenant_id) as s:
        ref = models.get_model(s, base_model, param="base_model")
    if ref.adapter is not None:
        raise InvalidRequest("base_model must be a base model, not an adapter", param="base_model")
    blob = await receive_body(request, p, who.tenant_id)
    work = Path(tempfile.mkdtemp(dir=p.scratch, prefix="import-"))  # transient plaintext: never in the data dir
    try:
        zip_path = work / "adapter.zip"
        await run_in_threadpool(p.blobs.copy_to, who.tenant_id, blob.sha256, zip_path)
        adapter_dir = await run_in_threadpool(
            adapter_io.unpack_adapter, zip_path, work / "adapter", max_bytes=p.settings.max_adapter_bytes
        )
        base_dir = resolve_model_path(ref.base.ref, offline=p.settings.offline)

        def register() -> dict:  # checks that read weights and render a template: off the event loop
            with p.db.tenant(who.tenant_id) as s:
                adapter = adapter_io.import_adapter(
                    s,
                    p.blobs,
                    tenant_id=who.tenant_id,
                    tenant_name=who.tenant_name,
                    base=ref.base,
                    base_dir=base_dir,
                    suffix=suffix,
                    adapter_dir=adapter_dir,
                    max_rank=p.settings.max_lora_rank,
                    max_json_bytes=p.settings.max_json_bytes,
                    template_budget=p.engine.template_budget,
                )
                body = model_object(models.get_model(s, adapter.id))
                adapter.created_by = who.user_id  # whoever imports it owns it, as for a job's adapter
                audit.record(s, who, "model.import", target=adapter.id, detail={"base_model": base_model})
            return body

        return await run_in_threadpool(register)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        with p.db.system() as system:
            blob_refs.release(system, p.blobs, who.tenant_id, blob.sha256)  # the zip is not kept, only its files
