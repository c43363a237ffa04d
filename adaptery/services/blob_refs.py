"""Blobs are stored per tenant (sealed with its data key); one is removed when nothing of its tenant names it."""

from __future__ import annotations

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from adaptery.db import models as m
from adaptery.storage.blobs import BlobStore


def in_use(system: Session, tenant_id: str, sha256: str) -> bool:
    system.flush()
    files = select(func.count()).select_from(m.File).where(m.File.tenant_id == tenant_id)
    if system.scalar(files.where(m.File.sha256 == sha256)):
        return True
    versions = select(func.count()).select_from(m.DatasetVersion).where(m.DatasetVersion.tenant_id == tenant_id)
    if system.scalar(versions.where(or_(m.DatasetVersion.sha256 == sha256, m.DatasetVersion.source_sha256 == sha256))):
        return True
    adapters = system.scalars(select(m.Adapter.manifest).where(m.Adapter.tenant_id == tenant_id))
    if any(sha256 in manifest.values() for manifest in adapters):
        return True
    checkpoints = system.scalars(
        select(m.JobCheckpoint.manifest).where(
            m.JobCheckpoint.tenant_id == tenant_id, m.JobCheckpoint.manifest.is_not(None)
        )
    )
    if any(sha256 in manifest.values() for manifest in checkpoints):
        return True
    jobs = system.scalars(
        select(m.FineTuningJob.init_adapter).where(
            m.FineTuningJob.tenant_id == tenant_id, m.FineTuningJob.init_adapter.is_not(None)
        )
    )
    return any(sha256 in (manifest or {}).values() for manifest in jobs)


def release(system: Session, blobs: BlobStore, tenant_id: str, sha256: str | None) -> bool:
    """Delete the tenant's blob if no file, dataset version, adapter, checkpoint or job of it still uses it.

    Call it only once the change that stopped naming the blob is committed (in a session after that one): a
    file removed inside a transaction that then rolls back, or whose process is killed before the commit,
    leaves a row of record pointing at nothing. The other order costs at worst an unreferenced file.
    """
    if sha256 is None or in_use(system, tenant_id, sha256):
        return False
    blobs.delete(tenant_id, sha256)
    return True
