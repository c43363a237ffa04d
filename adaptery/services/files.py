"""Uploaded files (`/v1/files`): streamed into the blob store, validated, listed, deleted."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import PurePath
from typing import BinaryIO

from sqlalchemy import select
from sqlalchemy.orm import Session

from adaptery.data.chat import validate_lines
from adaptery.data.untrusted import LineTooLong, RecordLimits, UntrustedJSONError, bounded_lines, loads
from adaptery.db import models as m
from adaptery.db.ids import new_id
from adaptery.services import blob_refs
from adaptery.services.errors import InvalidRequest, NotFound, TooLarge
from adaptery.storage.blobs import BlobStore, BlobTooLarge
from adaptery.training.data import DatasetError, read_preference_records

PURPOSES = ("fine-tune", "batch", "assistants", "vision", "user_data", "evals")


def _lines(blobs: BlobStore, tenant_id: str, sha256: str, limits: RecordLimits) -> Iterator[bytes | LineTooLong]:
    with blobs.open(tenant_id, sha256) as handle:
        yield from bounded_lines(handle, limits.max_bytes)


def _is_preference_file(blobs: BlobStore, tenant_id: str, sha256: str, limits: RecordLimits) -> bool:
    """OpenAI's DPO files hold preference pairs; the first record tells which kind a file is."""
    for raw in _lines(blobs, tenant_id, sha256, limits):
        if isinstance(raw, LineTooLong):
            return False
        if raw.strip():
            try:
                first = loads(raw.rstrip(b"\r\n"), max_depth=limits.max_depth)
            except UntrustedJSONError:
                return False
            return isinstance(first, dict) and "preferred_output" in first
    return False


def _validate_preferences(system: Session, blobs: BlobStore, tenant_id: str, sha256: str) -> int:
    try:
        with blobs.plaintext(tenant_id, sha256) as path:
            return len(read_preference_records(path))
    except DatasetError as exc:
        blob_refs.release(system, blobs, tenant_id, sha256)
        raise InvalidRequest(f"Invalid file format for preference fine-tuning: {exc}", param="file") from exc


def safe_filename(name: str | None) -> str:
    """Keep only the last path component: a name is a label, never a place on our disk."""
    base = PurePath((name or "").replace("\\", "/")).name.strip()
    return base[:255] or "upload"


def upload(
    session: Session,
    system: Session,
    blobs: BlobStore,
    *,
    tenant_id: str,
    source: BinaryIO,
    filename: str | None,
    purpose: str,
    max_bytes: int,
    limits: RecordLimits,
) -> m.File:
    if purpose not in PURPOSES:
        raise InvalidRequest(f"purpose must be one of {', '.join(PURPOSES)}", param="purpose")
    try:
        blob = blobs.put_file(tenant_id, source, max_bytes=max_bytes)
    except BlobTooLarge as exc:
        raise TooLarge(f"File is larger than the upload limit of {exc.limit} bytes.", param="file") from exc
    records = None
    if purpose == "fine-tune":
        if _is_preference_file(blobs, tenant_id, blob.sha256, limits):
            records = _validate_preferences(system, blobs, tenant_id, blob.sha256)
        else:
            report = validate_lines(_lines(blobs, tenant_id, blob.sha256, limits), limits)
            if not report.ok:
                blob_refs.release(system, blobs, tenant_id, blob.sha256)
                raise InvalidRequest(f"Invalid file format for fine-tuning: {report.summary()}", param="file")
            records = report.records
    record = m.File(
        id=new_id("file-"),
        filename=safe_filename(filename),
        purpose=purpose,
        bytes=blob.size,
        sha256=blob.sha256,
        records=records,
    )
    session.add(record)
    session.flush()
    return record


def get(session: Session, file_id: str) -> m.File:
    record = session.scalar(select(m.File).where(m.File.id == file_id))
    if record is None:
        raise NotFound(f"No such File object: {file_id}", param="id")
    return record


def list_files(
    session: Session, *, purpose: str | None, limit: int, after: str | None, order: str
) -> tuple[list[m.File], bool]:
    query = select(m.File)
    if purpose:
        query = query.where(m.File.purpose == purpose)
    descending = order != "asc"
    if after:
        cursor = get(session, after)
        query = query.where(
            m.File.created_at < cursor.created_at if descending else m.File.created_at > cursor.created_at
        )
    key = (m.File.created_at.desc(), m.File.id.desc()) if descending else (m.File.created_at, m.File.id)
    rows = list(session.scalars(query.order_by(*key).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def delete(session: Session, file_id: str) -> m.File:
    """Forget the file; its blob is released by the caller once this is committed."""
    record = get(session, file_id)
    session.delete(record)
    return record
