"""The audit log: security-relevant actions, append-only, in one hash chain.

Each row stores the hash of the row before it and the hash of its own canonical content plus that link,
so changing, removing or reordering any row breaks the chain from that row on; `verify` names the first
broken row (`adaptery audit verify`). Appenders lock the chain's head row, so rows from several server
processes still form one line. Call `record(session, who, action, ...)` inside the transaction that does
the action: the row commits (or rolls back) with it.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from adaptery.auth.principal import Principal
from adaptery.db import models as m
from adaptery.db.session import Database
from adaptery.services.errors import ServiceError

GENESIS_HASH = "0" * 64
HEAD_ID = 1
_CONTENT_FIELDS = (
    "seq",
    "created_at",
    "tenant_id",
    "actor_user_id",
    "actor",
    "actor_key_id",
    "action",
    "target",
    "outcome",
    "detail",
    "ip",
)


def canonical(row: m.AuditEvent) -> bytes:
    content = {name: getattr(row, name) for name in _CONTENT_FIELDS}
    return json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def link_hash(prev_hash: str, row: m.AuditEvent) -> str:
    return hashlib.sha256(prev_hash.encode() + b"\n" + canonical(row)).hexdigest()


def record(
    session: Session,
    who: Principal | None,
    action: str,
    *,
    target: str | None = None,
    outcome: str = "success",
    detail: dict[str, Any] | None = None,
    tenant_id: str | None = None,
    actor: str | None = None,
    ip: str | None = None,
) -> m.AuditEvent:
    """Append one event. `who` is the caller (None before sign-in: then give `actor` and maybe `tenant_id`)."""
    # The UPDATE takes the head row's lock (a write lock on SQLite) until this transaction ends.
    session.execute(update(m.AuditHead).where(m.AuditHead.id == HEAD_ID).values(seq=m.AuditHead.seq + 1))
    head = session.execute(select(m.AuditHead.seq, m.AuditHead.hash).where(m.AuditHead.id == HEAD_ID)).one()
    row = m.AuditEvent(
        seq=head.seq,
        created_at=round(time.time(), 6),
        tenant_id=tenant_id or (who.tenant_id if who else None),
        actor_user_id=who.user_id if who else None,
        actor=(who.username if who else actor),
        actor_key_id=who.api_key_id if who else None,
        action=action,
        target=target,
        outcome=outcome,
        detail=detail,
        ip=ip or (who.ip if who else None),
        prev_hash=head.hash,
    )
    row.hash = link_hash(head.hash, row)
    session.add(row)
    session.execute(update(m.AuditHead).where(m.AuditHead.id == HEAD_ID).values(hash=row.hash))
    session.flush()
    return row


@dataclass(frozen=True)
class Filters:
    """Which events to list: an actor (username), an action (exact, or a prefix ending in "." such as "job."),
    an outcome, a time window [since, until)."""

    actor: str | None = None
    action: str | None = None
    outcome: str | None = None
    since: float | None = None
    until: float | None = None

    def where(self) -> list[Any]:
        event = m.AuditEvent
        clauses: list[Any] = []
        if self.actor:
            clauses.append(event.actor == self.actor)
        if self.action and self.action.endswith("."):
            clauses.append(event.action.startswith(self.action, autoescape=True))
        elif self.action:
            clauses.append(event.action == self.action)
        if self.outcome:
            clauses.append(event.outcome == self.outcome)
        if self.since is not None:
            clauses.append(event.created_at >= self.since)
        if self.until is not None:
            clauses.append(event.created_at < self.until)
        return clauses


def list_events(
    session: Session, tenant_id: str, *, after: int | None = None, limit: int = 100, filters: Filters | None = None
) -> list[m.AuditEvent]:
    """A tenant's events, newest first (`after`: older than this seq, the cursor of the page before)."""
    query = select(m.AuditEvent).where(m.AuditEvent.tenant_id == tenant_id, *(filters or Filters()).where())
    if after is not None:
        query = query.where(m.AuditEvent.seq < after)
    return list(session.scalars(query.order_by(m.AuditEvent.seq.desc()).limit(limit)))


CSV_COLUMNS = ("seq", "created_at", "actor", "actor_user_id", "actor_key_id", "action", "target", "outcome", "ip",
               "detail", "hash")  # fmt: skip


def csv_lines(db: Database, tenant_id: str, filters: Filters, batch: int = 1000) -> Iterator[str]:
    """The tenant's whole log as CSV, oldest first, read in batches (each in its own short transaction)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    last = 0
    while True:
        with db.system() as s:
            query = select(m.AuditEvent).where(
                m.AuditEvent.tenant_id == tenant_id, m.AuditEvent.seq > last, *filters.where()
            )
            rows = list(s.scalars(query.order_by(m.AuditEvent.seq).limit(batch)))
            for row in rows:
                cells = event_object(row)
                cells["detail"] = json.dumps(row.detail, sort_keys=True) if row.detail is not None else ""
                writer.writerow(csv_cell(cells[name]) for name in CSV_COLUMNS)
        yield out.getvalue()
        out.seek(0)
        out.truncate()
        if len(rows) < batch:
            return
        last = rows[-1].seq


def csv_cell(value: Any) -> Any:
    """A cell a spreadsheet would run as a formula (a username or target starting "=", "+", "-", "@") is text."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return "" if value is None else value


def event_object(row: m.AuditEvent) -> dict[str, Any]:
    return {
        "object": "audit.event",
        "seq": row.seq,
        "created_at": row.created_at,
        "actor": row.actor,
        "actor_user_id": row.actor_user_id,
        "actor_key_id": row.actor_key_id,
        "action": row.action,
        "target": row.target,
        "outcome": row.outcome,
        "detail": row.detail,
        "ip": row.ip,
        "hash": row.hash,
    }


@dataclass(frozen=True)
class Verification:
    ok: bool
    rows: int
    first_broken_seq: int | None = None
    problem: str | None = None


def _rows(session: Session, batch: int = 1000) -> Iterator[m.AuditEvent]:
    last = 0
    while True:
        chunk = list(
            session.scalars(select(m.AuditEvent).where(m.AuditEvent.seq > last).order_by(m.AuditEvent.seq).limit(batch))
        )
        if not chunk:
            return
        yield from chunk
        last = chunk[-1].seq
        session.expunge_all()


def verify(session: Session) -> Verification:
    """Walk the chain from the start; the first row whose link or content does not check out is named."""
    expected_seq, prev_hash, count = 1, GENESIS_HASH, 0
    for row in _rows(session):
        count += 1
        if row.seq != expected_seq:
            return Verification(False, count, expected_seq, f"row {expected_seq} is missing (next is {row.seq})")
        if row.prev_hash != prev_hash:
            return Verification(False, count, row.seq, "its link to the previous row does not match")
        if link_hash(prev_hash, row) != row.hash:
            return Verification(False, count, row.seq, "its content was changed after it was written")
        prev_hash, expected_seq = row.hash, row.seq + 1
    head = session.execute(select(m.AuditHead.seq, m.AuditHead.hash).where(m.AuditHead.id == HEAD_ID)).one()
    if head.seq != expected_seq - 1 or head.hash != prev_hash:
        problem = f"rows after {expected_seq - 1} were removed (the head says {head.seq})"
        return Verification(False, count, expected_seq, problem)
    return Verification(True, count)


def sign_in(session: Session, username: str, outcome: object, *, ip: str | None) -> None:
    """A sign-in attempt (`outcome`: the new session, or the refusal); a failure is filed under the tenants of
    the account it tried, so their admins see it."""
    if not isinstance(outcome, ServiceError):
        record(session, outcome.principal, "auth.sign_in", target=username, ip=ip)
        return
    reason = outcome.code
    query = select(m.Membership.tenant_id).join(m.User, m.User.id == m.Membership.user_id)
    tenants = session.scalars(query.where(m.User.username == username)).all()
    for tenant_id in tenants or [None]:
        record(
            session,
            None,
            "auth.sign_in",
            target=username[:255],
            outcome="failure",
            detail={"reason": reason},
            tenant_id=tenant_id,
            actor=username[:64],
            ip=ip,
        )
