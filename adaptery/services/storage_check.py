"""The blob store checked against the database: `adaptery storage check`.

Every blob a row names must be on disk, and with `verify` it must also authenticate under its tenant's key and
hash to its name. Files no row names are what a process killed between a commit and a delete leaves (blobs are
deleted only after the commit that stopped naming them, `blob_refs.release`), or an upload cut off before its
rename (`tmp/`). They are reported, and removed when asked, once older than a grace period: a blob is written
before the row that names it commits, so a young unreferenced file may be an upload still in flight.
Both blob formats are verified (version 1, from stores older than version 2: see `storage.crypto`).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import select

from adaptery.db import models as m
from adaptery.db.session import Database
from adaptery.services.blob_refs import references
from adaptery.storage.blobs import CHUNK, BlobStore
from adaptery.storage.crypto import TamperedError

GRACE_SECONDS = 3600.0


@dataclass(frozen=True)
class BlobProblem:
    tenant_id: str
    sha256: str
    problem: str
    used_by: tuple[str, ...]


@dataclass
class StorageReport:
    tenants: int = 0
    referenced: int = 0
    verified: int = 0
    problems: list[BlobProblem] = field(default_factory=list)
    unreferenced: list[Path] = field(default_factory=list)
    unreferenced_bytes: int = 0
    young: int = 0  # unreferenced but within the grace period: left alone
    removed: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def _authenticates(blobs: BlobStore, tenant_id: str, sha256: str) -> str | None:
    """None if the blob decrypts and hashes to its name, else what is wrong."""
    digest = hashlib.sha256()
    try:
        with blobs.open(tenant_id, sha256) as source:
            for chunk in iter(lambda: source.read(CHUNK), b""):
                digest.update(chunk)
    except TamperedError as exc:
        return f"does not authenticate ({exc})"
    if digest.hexdigest() != sha256:
        return f"its content hashes to {digest.hexdigest()}"
    return None


def check_storage(
    db: Database,
    blobs: BlobStore,
    *,
    verify: bool = False,
    remove_unreferenced: bool = False,
    grace_seconds: float = GRACE_SECONDS,
    progress: Callable[[int, int], None] | None = None,
) -> StorageReport:
    """Check every tenant's blobs; `progress(done, total)` is called per referenced blob."""
    with db.system() as s:
        tenants = sorted(s.scalars(select(m.Tenant.id)))
        uses = {tenant_id: references(s, tenant_id) for tenant_id in tenants}
    report = StorageReport(tenants=len(tenants), referenced=sum(len(u) for u in uses.values()))
    now = time.time()

    def unreferenced(path: Path) -> None:
        try:
            stat = path.stat()
        except FileNotFoundError:
            return  # an upload finished (or was cleaned up) while we looked
        if now - stat.st_mtime < grace_seconds:
            report.young += 1
            return
        report.unreferenced.append(path)
        report.unreferenced_bytes += stat.st_size
        if remove_unreferenced:
            path.unlink(missing_ok=True)
            report.removed += 1

    done = 0
    for tenant_id in tenants:
        known = set()
        for sha, used_by in sorted(uses[tenant_id].items()):
            path = blobs.path(tenant_id, sha)
            known.add(path)
            problem = None
            if not path.is_file():
                problem = "missing from storage"
            elif verify:
                problem = _authenticates(blobs, tenant_id, sha)
                report.verified += 1
            if problem is not None:
                report.problems.append(BlobProblem(tenant_id, sha, problem, tuple(used_by)))
            done += 1
            if progress is not None:
                progress(done, report.referenced)
        for path in sorted((blobs.root / "tenants" / tenant_id).glob("*/*")):
            if path not in known and path.is_file():
                unreferenced(path)
    for path in sorted(blobs.root.joinpath("tmp").glob("*")):
        if path.is_file():
            unreferenced(path)
    return report
