"""/api/datasets: upload in any supported format, then validate, curate and version."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.orm import Session

from adaptery.api.deps import DB_INT_MAX, platform, principal
from adaptery.api.openai.objects import file_object
from adaptery.api.uploads import receive_body
from adaptery.auth.policy import require
from adaptery.auth.principal import Principal
from adaptery.db import models as m
from adaptery.platform import Platform
from adaptery.services import audit, blob_refs, datasets
from adaptery.services.errors import InvalidRequest
from adaptery.services.files import safe_filename
from adaptery.storage.crypto import DataKey

router = APIRouter(prefix="/api/datasets", tags=["datasets"])
# A version number the database can hold (a larger one was a 500: an integer SQLite cannot bind).
VersionNumber = Annotated[int, Path(ge=1, le=2**31 - 1, description="The version's number, from 1")]


def version_object(version: m.DatasetVersion, key: DataKey, training_file: m.File | None = None) -> dict[str, Any]:
    return {
        "id": version.id,
        "object": "dataset.version",
        "dataset_id": version.dataset_id,
        "version": version.number,
        "parent_version": version.parent_number,
        "operation": version.operation,
        "params": version.params,
        "status": version.status,
        "error": version.error,
        "progress": version.progress,
        "format": version.format,
        "source_filename": version.source_filename,
        "source_sha256": version.source_sha256,
        "sha256": version.sha256,
        "bytes": version.bytes,
        "records": version.records,
        "stats": version.stats,
        "report": datasets.open_report(key, version.report, version.id),
        "created_at": int(version.created_at),
        "finished_at": int(version.finished_at) if version.finished_at else None,
        "training_file": training_file.id if training_file else None,  # the file it was exported as, if it was
    }


def dataset_object(
    dataset: m.Dataset, versions: list[m.DatasetVersion], key: DataKey, exported: dict[int, m.File] | None = None
) -> dict[str, Any]:
    exported = exported or {}
    return {
        "id": dataset.id,
        "object": "dataset",
        "name": dataset.name,
        "description": dataset.description,
        "source": dataset.source,
        "license": dataset.license,
        "contains_protected_data": dataset.contains_protected_data,
        "created_at": int(dataset.created_at),
        "updated_at": int(dataset.updated_at),
        "versions": [version_object(v, key, exported.get(v.number)) for v in versions],
    }


def _dataset_body(s: Session, dataset: m.Dataset, key: DataKey) -> dict[str, Any]:
    versions = datasets.versions_of(s, dataset)
    return dataset_object(dataset, versions, key, datasets.exported_files(s, dataset, versions))


class Card(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str | None = Field(None, min_length=1, max_length=128)
    description: str | None = Field(None, max_length=20_000)
    source: str | None = Field(None, max_length=2_000)
    license: str | None = Field(None, max_length=128)
    contains_protected_data: bool | None = None


class DedupRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    threshold: float = 0.8
    num_perm: int = Field(128, ge=1, le=DB_INT_MAX)
    near: bool = True


class ScrubRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kinds: list[str] | None = None


class SplitRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    validation_fraction: float = 0.1
    seed: int = Field(42, ge=-(2**63), le=DB_INT_MAX)


class ExportRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    allow_invalid: bool = False


async def _upload(
    request: Request,
    p: Platform,
    who: Principal,
    *,
    dataset_ref: str | None,
    name: str | None,
    fmt: str | None,
    mapping: str | None,
    filename: str | None,
    model: str | None,
) -> dict[str, Any]:
    require(who, "upload")
    parsed_mapping = datasets.parse_mapping(mapping)
    blob = await receive_body(request, p, who.tenant_id)
    try:
        with p.db.tenant(who.tenant_id) as s:
            if dataset_ref is None:
                dataset = datasets.create_dataset(s, who, name=name or safe_filename(filename), card={})
            else:
                dataset = datasets.get_dataset(s, dataset_ref)
            version = datasets.add_upload(
                s,
                dataset,
                blob,
                filename=safe_filename(filename) if filename else None,
                fmt=fmt,
                mapping=parsed_mapping,
                model=model,
            )
            body = _dataset_body(s, dataset, p.keyring.data_key(who.tenant_id))
            audit.record(s, who, "dataset.upload", target=dataset.id, detail={"version": version.number})
    except Exception:
        with p.db.system() as system:
            blob_refs.release(system, p.blobs, who.tenant_id, blob.sha256)  # the upload failed as a whole
        raise
    done = p.submit_version(who.tenant_id, version.id)
    if dataset_ref is not None:
        return body
    # The upload that creates a dataset answers once its records are read: a file that gives none leaves no
    # empty dataset behind, and the uploader is told why (a 400 naming the file).
    await asyncio.wrap_future(done)
    reason = await run_in_threadpool(p.undo_failed_creation, who.tenant_id, body["id"])
    if reason is not None:
        raise InvalidRequest(reason, param="file", code="invalid_file")
    with p.db.tenant(who.tenant_id) as s:
        return _dataset_body(s, datasets.get_dataset(s, body["id"]), p.keyring.data_key(who.tenant_id))


@router.post("", status_code=202)
async def upload_dataset(
    request: Request,
    name: Annotated[str | None, Query(max_length=128)] = None,
    format: Annotated[str | None, Query(description="Override detection: " + ", ".join(datasets.FORMATS))] = None,
    mapping: Annotated[str | None, Query(description="CSV/TSV columns, e.g. prompt=question,response=answer")] = None,
    filename: Annotated[str | None, Query(max_length=255)] = None,
    model: Annotated[str | None, Query(description="Base model whose tokenizer and context validate records")] = None,
    who: Principal = Depends(principal),
    p: Platform = Depends(platform),
) -> dict:
    """Create a dataset from the raw request body (the file's bytes). The answer comes once version 1's records
    are read and checked; a file that gives no valid record is a 400 and leaves no dataset behind."""
    return await _upload(
        request,
        p,
        who,
        dataset_ref=None,
        name=name,  # none given: the file's own name, stripped of any path (`_upload`)
        fmt=format,
        mapping=mapping,
        filename=filename,
        model=model,
    )


@router.post("/{dataset_id}/versions", status_code=202)
async def upload_version(
    dataset_id: str,
    request: Request,
    format: str | None = None,
    mapping: str | None = None,
    filename: str | None = None,
    model: str | None = None,
    who: Principal = Depends(principal),
    p: Platform = Depends(platform),
) -> dict:
    """Upload a new file as the next version of an existing dataset."""
    return await _upload(
        request, p, who, dataset_ref=dataset_id, name=None, fmt=format, mapping=mapping, filename=filename, model=model
    )


@router.get("")
def list_datasets(who: Principal = Depends(principal), p: Platform = Depends(platform)) -> dict:
    key = p.keyring.data_key(who.tenant_id)
    with p.db.tenant(who.tenant_id) as s:
        return {
            "object": "list",
            "data": [_dataset_body(s, d, key) for d in datasets.list_datasets(s)],
        }


@router.get("/{dataset_id}")
def get_dataset(dataset_id: str, who: Principal = Depends(principal), p: Platform = Depends(platform)) -> dict:
    with p.db.tenant(who.tenant_id) as s:
        dataset = datasets.get_dataset(s, dataset_id)
        return _dataset_body(s, dataset, p.keyring.data_key(who.tenant_id))


@router.patch("/{dataset_id}")
def update_card(
    dataset_id: str, card: Card, who: Principal = Depends(principal), p: Platform = Depends(platform)
) -> dict:
    require(who, "upload")
    with p.db.tenant(who.tenant_id) as s:
        changes = card.model_dump(exclude_unset=True)
        dataset = datasets.update_card(s, datasets.get_dataset(s, dataset_id), changes)
        audit.record(s, who, "dataset.update", target=dataset_id, detail={"fields": sorted(changes)})
        return _dataset_body(s, dataset, p.keyring.data_key(who.tenant_id))


@router.delete("/{dataset_id}")
def delete_dataset(dataset_id: str, who: Principal = Depends(principal), p: Platform = Depends(platform)) -> dict:
    require(who, "upload")
    with p.db.tenant(who.tenant_id) as s:
        dataset = datasets.get_dataset(s, dataset_id)
        shas = datasets.delete_dataset(s, dataset)
        audit.record(s, who, "dataset.delete", target=dataset_id)
    with p.db.system() as system:
        for sha256 in set(shas):
            blob_refs.release(system, p.blobs, who.tenant_id, sha256)
    return {"id": dataset.id, "object": "dataset", "deleted": True}


@router.get("/{dataset_id}/versions/{number}")
def get_version(
    dataset_id: str, number: VersionNumber, who: Principal = Depends(principal), p: Platform = Depends(platform)
) -> dict:
    with p.db.tenant(who.tenant_id) as s:
        version = datasets.get_version(s, datasets.get_dataset(s, dataset_id), number)
        return version_object(version, p.keyring.data_key(who.tenant_id))


@router.get("/{dataset_id}/versions/{number}/records")
def preview_records(
    dataset_id: str,
    number: VersionNumber,
    offset: Annotated[int, Query(ge=0, le=2**63 - 1)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
    who: Principal = Depends(principal),
    p: Platform = Depends(platform),
) -> dict:
    with p.db.tenant(who.tenant_id) as s:
        version = datasets.ready_version(s, datasets.get_dataset(s, dataset_id), number)
        # Reading records is reading the data (a hospital's audit must show who looked): each page is one event.
        audit.record(s, who, "dataset.read", target=dataset_id, detail={"version": number, "offset": offset})
    return {
        "object": "list",
        "data": datasets.preview(p.blobs, version, offset=offset, limit=limit),
        "offset": offset,
        "total": version.records,
    }


@router.get("/{dataset_id}/versions/{number}/content")
def version_content(
    dataset_id: str, number: VersionNumber, who: Principal = Depends(principal), p: Platform = Depends(platform)
) -> StreamingResponse:
    """The version's normalised records as chat JSONL."""
    with p.db.tenant(who.tenant_id) as s:
        dataset = datasets.get_dataset(s, dataset_id)
        version = datasets.ready_version(s, dataset, number)
        audit.record(s, who, "dataset.download", target=dataset.id, detail={"version": number})
    return StreamingResponse(
        p.blobs.iter_bytes(who.tenant_id, version.sha256),
        media_type="application/jsonl",
        headers={"Content-Disposition": f'attachment; filename="{dataset.id}-v{version.number}.jsonl"'},
    )


def _operation(
    p: Platform, who: Principal, dataset_id: str, number: VersionNumber, operation: str, params: dict
) -> dict:
    require(who, "upload")
    with p.db.tenant(who.tenant_id) as s:
        dataset = datasets.get_dataset(s, dataset_id)
        created = datasets.start_operation(s, dataset, number, operation, params)
        detail = {"version": number, "new_versions": [v.number for v in created]}
        audit.record(s, who, f"dataset.{operation}", target=dataset_id, detail=detail)
        key = p.keyring.data_key(who.tenant_id)
        body = {"object": "list", "data": [version_object(v, key) for v in created]}
    for version in created:
        p.submit_version(who.tenant_id, version.id)
    return body


@router.post("/{dataset_id}/versions/{number}/dedup", status_code=202)
def dedup(
    dataset_id: str,
    number: VersionNumber,
    body: DedupRequest,
    who: Principal = Depends(principal),
    p: Platform = Depends(platform),
) -> dict:
    """Remove exact and near duplicates (MinHash LSH at `threshold` Jaccard) into a new version."""
    return _operation(p, who, dataset_id, number, "dedup", body.model_dump())


@router.post("/{dataset_id}/versions/{number}/scrub", status_code=202)
def scrub(
    dataset_id: str,
    number: VersionNumber,
    body: ScrubRequest,
    who: Principal = Depends(principal),
    p: Platform = Depends(platform),
) -> dict:
    """Redact personal data (emails, phones, IPs, cards, national ids, secrets in URLs) into a new version."""
    return _operation(p, who, dataset_id, number, "scrub", body.model_dump(exclude_none=True))


@router.post("/{dataset_id}/versions/{number}/split", status_code=202)
def split(
    dataset_id: str,
    number: VersionNumber,
    body: SplitRequest,
    who: Principal = Depends(principal),
    p: Platform = Depends(platform),
) -> dict:
    """A seeded train/validation split: two new versions."""
    return _operation(p, who, dataset_id, number, "split", body.model_dump())


@router.post("/{dataset_id}/versions/{number}/validate")
def validate(
    dataset_id: str,
    number: VersionNumber,
    model: str | None = None,
    who: Principal = Depends(principal),
    p: Platform = Depends(platform),
) -> dict:
    """Check a version against a base model: every record must fit its context (its own tokenizer)."""
    with p.db.tenant(who.tenant_id) as s:
        version = datasets.ready_version(s, datasets.get_dataset(s, dataset_id), number)
    budget = p.token_budget(model)
    return datasets.validate_for_model(p.blobs, version, budget)


@router.post("/{dataset_id}/versions/{number}/export")
def export(
    dataset_id: str,
    number: VersionNumber,
    body: ExportRequest,
    who: Principal = Depends(principal),
    p: Platform = Depends(platform),
) -> dict:
    """Make the version a fine-tuning file (`/v1/files`, purpose fine-tune) to train on."""
    require(who, "upload")
    with p.db.tenant(who.tenant_id) as s:
        record = datasets.export_version(
            s, datasets.get_dataset(s, dataset_id), number, allow_invalid=body.allow_invalid
        )
        detail = {"version": number, "file": record.id, "allow_invalid": body.allow_invalid}
        audit.record(s, who, "dataset.export", target=dataset_id, detail=detail)
        return file_object(record)
