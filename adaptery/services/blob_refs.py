"""Blobs are shared by content across tenants; one is removed only when nothing names it any more."""

from __future__ import annotations

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from adaptery.db import models as m
from adaptery.storage.blobs import BlobStore


def in_use(system: Session, sha256: str) -> bool:
    system.flush()
    if system.scalar(select(func.count()).select_from(m.File).where(m.File.sha256 == sha256)):
        return True
    versions = select(func.count()).select_from(m.DatasetVersion)
    if system.scalar(versions.where(or_(m.DatasetVersion.sha256 == sha256, m.DatasetVersion.source_sha256 == sha256))):
        return True
    return any(sha256 in manifest.values() for manifest in system.scalars(select(m.Adapter.manifest)))


def release(system: Session, blobs: BlobStore, sha256: str | None) -> bool:
    """Delete the blob if no file, dataset version or adapter of any tenant still uses it."""
    if sha256 is None or in_use(system, sha256):
        return False
    blobs.delete(sha256)
    return True
