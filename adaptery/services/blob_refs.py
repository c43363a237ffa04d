"""Blobs are shared by content across tenants; one is removed only when nothing names it any more."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from adaptery.db import models as m
from adaptery.storage.blobs import BlobStore


def release(system: Session, blobs: BlobStore, sha256: str) -> bool:
    """Delete the blob if no file and no adapter of any tenant still uses it; True if deleted."""
    system.flush()
    if system.scalar(select(func.count()).select_from(m.File).where(m.File.sha256 == sha256)):
        return False
    if any(sha256 in manifest.values() for manifest in system.scalars(select(m.Adapter.manifest))):
        return False
    blobs.delete(sha256)
    return True
