"""Request bodies that are files: streamed into the blob store, never all in memory, 413 past the limit."""

from __future__ import annotations

from fastapi import Request

from adaptery.platform import Platform
from adaptery.services import limits
from adaptery.services.errors import TooLarge
from adaptery.storage.blobs import BlobTooLarge, StoredBlob


async def receive_body(request: Request, p: Platform, tenant_id: str) -> StoredBlob:
    """The raw request body as a blob of `tenant_id` (sealed with its data key); a declared or actual size over
    the limit is a 413 with nothing kept."""
    with p.db.system() as s:
        limit = limits.upload_limit(s, tenant_id, p.settings.max_upload_bytes)
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise TooLarge(f"The upload is larger than the limit of {limit} bytes.", param="file")
    try:
        return await p.blobs.put_async_stream(tenant_id, request.stream(), max_bytes=limit)
    except BlobTooLarge as exc:
        raise TooLarge(f"The upload is larger than the limit of {exc.limit} bytes.", param="file") from exc
