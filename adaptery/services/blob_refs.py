"""Blobs are stored per tenant (sealed with its data key); one is removed when nothing of its tenant names it."""

from __future__ import annotations

from collections import defaultdict

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from adaptery.db import models as m
from adaptery.storage.blobs import BlobStore

# Every column that names a blob of its row's tenant, with how a person is told which row it is. `in_use` (before
# a blob is deleted) and `references` (the storage check) read these two lists alone: a new kind of row that holds
# blobs is added here, or its blobs are deleted under it.
_SHA_COLUMNS = (
    ("file {}", (m.File.id,), (m.File.sha256,)),
    (
        "dataset {} version {}",
        (m.DatasetVersion.dataset_id, m.DatasetVersion.number),
        (m.DatasetVersion.sha256, m.DatasetVersion.source_sha256),
    ),
    ("evaluation task {}", (m.EvaluationTask.name,), (m.EvaluationTask.data_sha256,)),
)
_MANIFESTS = (  # JSON objects of file name -> sha256
    ("model {} ({})", m.Adapter.id, m.Adapter.manifest),
    ("checkpoint {} ({})", m.JobCheckpoint.id, m.JobCheckpoint.manifest),
    ("starting adapter of job {} ({})", m.FineTuningJob.id, m.FineTuningJob.init_adapter),
)


def in_use(system: Session, tenant_id: str, sha256: str) -> bool:
    system.flush()
    for _, _, columns in _SHA_COLUMNS:
        model = columns[0].class_
        named = select(func.count()).select_from(model).where(model.tenant_id == tenant_id)
        if system.scalar(named.where(or_(*(column == sha256 for column in columns)))):
            return True
    for _, _, manifest in _MANIFESTS:
        model = manifest.class_
        manifests = system.scalars(select(manifest).where(model.tenant_id == tenant_id, manifest.is_not(None)))
        if any(sha256 in (value or {}).values() for value in manifests):
            return True
    return False


def references(system: Session, tenant_id: str) -> dict[str, list[str]]:
    """Every blob of the tenant that a row names, with the rows that name it ("file file-…", "checkpoint …")."""
    uses: dict[str, list[str]] = defaultdict(list)
    for label, ids, columns in _SHA_COLUMNS:
        model = columns[0].class_
        for row in system.execute(select(*ids, *columns).where(model.tenant_id == tenant_id)):
            for sha256 in set(row[len(ids) :]) - {None}:
                uses[sha256].append(label.format(*row[: len(ids)]))
    for label, row_id, manifest in _MANIFESTS:
        model = manifest.class_
        for ident, value in system.execute(select(row_id, manifest).where(model.tenant_id == tenant_id)):
            for name, sha256 in (value or {}).items():
                uses[sha256].append(label.format(ident, name))
    return uses


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
