"""/v1/files: uploads streamed into the blob store, OpenAI-compatible."""

from __future__ import annotations

from typing import Annotated, Literal
from urllib.parse import quote

from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from fastapi.responses import StreamingResponse

from adaptery.api.deps import platform, principal
from adaptery.api.openai.objects import file_object, page
from adaptery.auth.policy import require
from adaptery.auth.principal import Principal
from adaptery.data.untrusted import RecordLimits
from adaptery.platform import Platform
from adaptery.services import audit, blob_refs, files, limits
from adaptery.services.errors import TooLarge

router = APIRouter(prefix="/v1", tags=["files"])


@router.post("/files")
def create_file(
    request: Request,
    file: Annotated[UploadFile, File()],
    purpose: Annotated[str, Form()],
    who: Principal = Depends(principal),
    p: Platform = Depends(platform),
) -> dict:
    require(who, "upload")
    with p.db.system() as s:
        limit = limits.upload_limit(s, who.tenant_id, p.settings.max_upload_bytes)
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit + 64 * 1024:
        raise TooLarge(f"File is larger than the upload limit of {limit} bytes.", param="file")
    with p.db.tenant(who.tenant_id) as s, p.db.system() as system:
        record = files.upload(
            s,
            system,
            p.blobs,
            tenant_id=who.tenant_id,
            source=file.file,
            filename=file.filename,
            purpose=purpose,
            max_bytes=limit,
            limits=RecordLimits.from_settings(p.settings),
        )
        audit.record(s, who, "file.upload", target=record.id, detail={"bytes": record.bytes})
        return file_object(record)


@router.get("/files")
def list_files(
    purpose: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10000)] = 10000,
    after: str | None = None,
    order: Literal["asc", "desc"] = "desc",
    who: Principal = Depends(principal),
    p: Platform = Depends(platform),
) -> dict:
    with p.db.tenant(who.tenant_id) as s:
        rows, has_more = files.list_files(s, purpose=purpose, limit=limit, after=after, order=order)
        return page([file_object(r) for r in rows], has_more, with_ids=True)


@router.get("/files/{file_id}")
def retrieve_file(file_id: str, who: Principal = Depends(principal), p: Platform = Depends(platform)) -> dict:
    with p.db.tenant(who.tenant_id) as s:
        return file_object(files.get(s, file_id))


@router.delete("/files/{file_id}")
def delete_file(file_id: str, who: Principal = Depends(principal), p: Platform = Depends(platform)) -> dict:
    require(who, "upload")
    with p.db.tenant(who.tenant_id) as s:
        record = files.delete(s, file_id)
        audit.record(s, who, "file.delete", target=file_id)
    with p.db.system() as system:
        blob_refs.release(system, p.blobs, who.tenant_id, record.sha256)
    return {"id": record.id, "object": "file", "deleted": True}


@router.get("/files/{file_id}/content")
def file_content(
    file_id: str, who: Principal = Depends(principal), p: Platform = Depends(platform)
) -> StreamingResponse:
    with p.db.tenant(who.tenant_id) as s:
        record = files.get(s, file_id)
        audit.record(s, who, "file.download", target=file_id)
    return StreamingResponse(
        p.blobs.iter_bytes(who.tenant_id, record.sha256),
        media_type="application/octet-stream",
        headers={"Content-Disposition": f"attachment; filename*=UTF-8''{quote(record.filename)}"},
    )
