"""Stable model names: what clients call, while the adapter behind it changes.

A name `ft:<base>:<tenant>:<name>` (OpenAI's `ft:` shape, one segment short of an adapter's id, so neither can
be taken for the other) numbers adapters of its base as its versions and answers from its current one. Its
owner (whoever made it, or a tenant admin) promotes a version, rolls back to the one before, or sends a canary
share (0-100 %) of its requests to a candidate version; every change is a row of its history and an audit
record (the router writes those). Clients never change: chat and completions resolve the name at request time.

Rollback undoes the latest promotion still in effect: the history is replayed as a stack (create and promote
push a version, rollback pops one), so two rollbacks after two promotions return to the first version.

Canary. Request `r` goes to the candidate when `sha256(name, r)` falls in the first `share` % of 10,000
buckets: the same request id always lands on the same version (a test can check the split, a retry keeps its
answer's version), and over many ids the share is as configured. A viewer who may not see the candidate's
adapter is answered by the current version. Which version answered is kept per request (`ModelNameRequest`,
by completion id) and in the usage ledger (its `model` is the version's adapter), so a canary's feedback and
usage are counted apart.

A name is its tenant's: another tenant finds none of it (404), and an adapter of another tenant cannot be
promoted into a name (the tenant-filtered lookup does not find it). A viewer sees a name exactly when they may
see its current version (`models`), and the owner may promote only adapters they may see themselves.
"""

from __future__ import annotations

import hashlib
import math
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from adaptery.auth import policy
from adaptery.auth.principal import Principal
from adaptery.db import models as m
from adaptery.db.ids import new_id
from adaptery.services import datasets, finetuning, models
from adaptery.services.errors import Conflict, InvalidRequest, NotFound, PermissionDenied

if TYPE_CHECKING:
    from adaptery.settings import Settings

_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
BUCKETS = 10_000  # a canary share is resolved to 0.01 %


@dataclass(frozen=True)
class Version:
    number: int
    adapter_id: str
    adapter: m.Adapter | None  # None: deleted since
    job_id: str | None
    created_at: float


@dataclass(frozen=True)
class NameState:
    name: m.ModelName
    versions: list[Version]
    history: list[m.ModelNamePromotion]


@dataclass(frozen=True)
class Routed:
    """What answers one request for a name."""

    adapter: m.Adapter
    version: int
    canary: bool


def name_id(base_model: str, tenant_name: str, name: str) -> str:
    return f"ft:{base_model}:{tenant_name}:{name}"


def _not_found(ref: str) -> NotFound:
    return NotFound(f"No model name '{ref}' in your workspace", param="name", code="model_name_not_found")


def _sees(session: Session, viewer: Principal, name: m.ModelName) -> bool:
    if not policy.may_use_model(viewer, name.id):
        return False
    current = models.version_adapter(session, name, name.current_version)
    if current is None:  # nothing to hide behind: its owner and the tenant's admins
        return policy.may_share_adapter(viewer, created_by=name.created_by)
    return models.sees_version(viewer, current, models.shared_with(session, viewer))


def get_name(session: Session, ref: str, viewer: Principal) -> m.ModelName:
    """A name of the session's tenant by its short name or full id; another tenant's, or one `viewer` may not
    see, is not found."""
    column = m.ModelName.id if ref.startswith("ft:") else m.ModelName.name
    name = session.scalar(select(m.ModelName).where(column == ref))
    if name is None or not _sees(session, viewer, name):
        raise _not_found(ref)
    return name


def list_names(session: Session, viewer: Principal) -> list[m.ModelName]:
    names = session.scalars(select(m.ModelName).order_by(m.ModelName.name))
    return [name for name in names if _sees(session, viewer, name)]


def state(session: Session, name: m.ModelName) -> NameState:
    rows = session.scalars(
        select(m.ModelNameVersion).where(m.ModelNameVersion.name_id == name.id).order_by(m.ModelNameVersion.number)
    )
    versions = []
    for row in rows:
        adapter = session.get(m.Adapter, row.adapter_id)
        alive = adapter if adapter is not None and adapter.tenant_id == name.tenant_id else None
        versions.append(Version(row.number, row.adapter_id, alive, row.job_id, row.created_at))
    history = session.scalars(
        select(m.ModelNamePromotion).where(m.ModelNamePromotion.name_id == name.id).order_by(m.ModelNamePromotion.seq)
    )
    return NameState(name, versions, list(history))


def _require_owner(viewer: Principal, name: m.ModelName) -> None:
    if not policy.may_share_adapter(viewer, created_by=name.created_by):
        raise PermissionDenied("Only the name's creator or a tenant admin may change what it answers from.")


def _adapter_for(session: Session, viewer: Principal, adapter_id: str, base_model: str, param: str) -> m.Adapter:
    """An adapter `viewer` may see (another tenant's is not found), trained on `base_model`."""
    ref = models.get_model(session, adapter_id, param=param, viewer=viewer)
    if ref.name is not None or ref.adapter is None:
        raise InvalidRequest(f"'{adapter_id}' is not an adapter: a version is an adapter (ft:…)", param=param)
    if ref.adapter.base_model != base_model:
        raise InvalidRequest(
            f"The adapter {adapter_id} is trained on '{ref.adapter.base_model}'; this name serves '{base_model}': "
            "only adapters of the same base can be its versions",
            param=param,
        )
    return ref.adapter


def _version_row(session: Session, name: m.ModelName, **where: Any) -> m.ModelNameVersion | None:
    query = select(m.ModelNameVersion).where(m.ModelNameVersion.name_id == name.id)
    for column, value in where.items():
        query = query.where(getattr(m.ModelNameVersion, column) == value)
    return session.scalar(query)


def add_version(
    session: Session, name: m.ModelName, adapter: m.Adapter, *, added_by: str | None, job_id: str | None = None
) -> int:
    """The version number of `adapter` in `name`, numbering it next if it is not one yet."""
    row = _version_row(session, name, adapter_id=adapter.id)
    if row is not None:
        return row.number
    number = (
        session.scalar(select(func.max(m.ModelNameVersion.number)).where(m.ModelNameVersion.name_id == name.id)) or 0
    ) + 1
    session.add(
        m.ModelNameVersion(
            id=new_id("mnver_"),
            tenant_id=name.tenant_id,
            name_id=name.id,
            number=number,
            adapter_id=adapter.id,
            job_id=job_id or adapter.job_id,
            added_by=added_by,
        )
    )
    session.flush()
    return number


def _resolve_version(
    session: Session, viewer: Principal, name: m.ModelName, version: int | str
) -> tuple[int, m.Adapter]:
    """A version by number, or an adapter by id (numbered as the next version if it is not one yet)."""
    if isinstance(version, bool) or not isinstance(version, int | str) or version in ("", 0):
        raise InvalidRequest("version must be a version number or an adapter id (ft:…)", param="version")
    if isinstance(version, str) and not version.isdigit():
        adapter = _adapter_for(session, viewer, version, name.base_model, "version")
        return add_version(session, name, adapter, added_by=viewer.user_id), adapter
    number = int(version)
    row = _version_row(session, name, number=number)
    if row is None:
        raise NotFound(f"'{name.id}' has no version {number}", param="version", code="model_version_not_found")
    adapter = models.version_adapter(session, name, number)
    if adapter is None:
        raise InvalidRequest(
            f"Version {number} of '{name.id}' ({row.adapter_id}) was deleted; it cannot answer requests",
            param="version",
            code="model_version_deleted",
        )
    if not models.sees_adapter(viewer, adapter, models.shared_with(session, viewer)):
        raise NotFound(f"'{name.id}' has no version {number}", param="version", code="model_version_not_found")
    return number, adapter


def _log(
    session: Session,
    viewer: Principal,
    name: m.ModelName,
    action: str,
    *,
    from_version: int | None,
    to_version: int | None,
    share: float | None = None,
) -> m.ModelNamePromotion:
    seq = session.scalar(select(func.max(m.ModelNamePromotion.seq)).where(m.ModelNamePromotion.name_id == name.id)) or 0
    row = m.ModelNamePromotion(
        id=new_id("mnpro_"),
        tenant_id=name.tenant_id,
        name_id=name.id,
        seq=seq + 1,
        action=action,
        from_version=from_version,
        to_version=to_version,
        canary_share=share,
        actor_user_id=viewer.user_id,
        actor=viewer.username,
    )
    session.add(row)
    name.updated_at = time.time()
    session.flush()
    return row


def create_name(session: Session, viewer: Principal, *, name: str, version: str) -> m.ModelName:
    """A new name answering from `version` (an adapter id) as its version 1."""
    tenant = session.get(m.Tenant, viewer.tenant_id)
    short = name
    if name.startswith("ft:"):  # the full id is accepted, but only in the caller's own tenant
        parts = name.split(":")
        if len(parts) != 4 or parts[2] != tenant.name:
            raise InvalidRequest(
                f"A name's id is ft:<base>:{tenant.name}:<name>, in your own workspace; give just the <name> part",
                param="name",
            )
        short = parts[3]
    if not _NAME.match(short):
        raise InvalidRequest("name must be 1-64 letters, digits, '-', '_' or '.'", param="name")
    if not isinstance(version, str) or not version.startswith("ft:"):
        raise InvalidRequest("version must be the id of an adapter (ft:…) to answer from", param="version")
    first = models.get_model(session, version, param="version", viewer=viewer)
    if first.name is not None or first.adapter is None:
        raise InvalidRequest(f"'{version}' is not an adapter: a version is an adapter (ft:…)", param="version")
    full = name_id(first.adapter.base_model, tenant.name, short)
    if name.startswith("ft:") and full != name:
        raise InvalidRequest(
            f"The adapter {version} is trained on '{first.adapter.base_model}', not the base that '{name}' names",
            param="version",
        )
    if session.scalar(select(m.ModelName.id).where(m.ModelName.name == short)) is not None:
        # one answer whether the caller may see that name or not: nothing about its versions, owner or visibility
        raise Conflict(f"The name '{short}' is not available: choose another.", param="name", code="name_taken")
    row = m.ModelName(
        id=full, tenant_id=viewer.tenant_id, name=short, base_model=first.adapter.base_model, created_by=viewer.user_id
    )
    session.add(row)
    session.flush()
    row.current_version = add_version(session, row, first.adapter, added_by=viewer.user_id)
    _log(session, viewer, row, "create", from_version=None, to_version=row.current_version)
    return row


def promote(session: Session, viewer: Principal, ref: str, version: int | str) -> tuple[m.ModelName, int | None]:
    """Make `version` the name's current one; returns the name and the version it replaced. Promoting the canary
    ends the canary (it is the current version now)."""
    name = get_name(session, ref, viewer)
    _require_owner(viewer, name)
    number, _ = _resolve_version(session, viewer, name, version)
    before = name.current_version
    if number == before:
        raise InvalidRequest(f"Version {number} is already the current version of '{name.id}'", param="version")
    name.current_version = number
    if name.canary_version == number:
        name.canary_version, name.canary_share = None, 0.0
    _log(session, viewer, name, "promote", from_version=before, to_version=number)
    return name, before


def rollback(session: Session, viewer: Principal, ref: str) -> tuple[m.ModelName, int | None]:
    """Undo the latest promotion still in effect (module docstring); returns the name and the version it left."""
    name = get_name(session, ref, viewer)
    _require_owner(viewer, name)
    stack: list[int | None] = []
    for row in state(session, name).history:
        if row.action in ("create", "promote"):
            stack.append(row.to_version)
        elif row.action == "rollback" and stack:
            stack.pop()
    if len(stack) < 2 or stack[-2] is None:
        raise InvalidRequest(f"'{name.id}' has no earlier promotion to roll back to", param="name")
    target = stack[-2]
    adapter = models.version_adapter(session, name, target)
    if adapter is None:
        raise InvalidRequest(
            f"The version to roll back to, {target}, was deleted: promote another version instead",
            param="name",
            code="model_version_deleted",
        )
    before = name.current_version
    name.current_version = target
    if name.canary_version == target:
        name.canary_version, name.canary_share = None, 0.0
    _log(session, viewer, name, "rollback", from_version=before, to_version=target)
    return name, before


def check_share(share: Any) -> float:
    if (
        isinstance(share, bool)
        or not isinstance(share, int | float)
        or not math.isfinite(share)
        or not 0 <= share <= 100
    ):
        raise InvalidRequest(f"share must be a percentage between 0 and 100, got {share!r}", param="share")
    return float(share)


def set_canary(session: Session, viewer: Principal, ref: str, version: int | str, share: Any) -> m.ModelName:
    """Send `share` % of the name's requests to `version`, the rest to its current version."""
    share = check_share(share)
    name = get_name(session, ref, viewer)
    _require_owner(viewer, name)
    number, _ = _resolve_version(session, viewer, name, version)
    if number == name.current_version:
        raise InvalidRequest(
            f"Version {number} is the current version already; a canary is another version", param="version"
        )
    name.canary_version, name.canary_share = number, share
    _log(session, viewer, name, "canary", from_version=name.current_version, to_version=number, share=share)
    return name


def end_canary(session: Session, viewer: Principal, ref: str) -> tuple[m.ModelName, int]:
    name = get_name(session, ref, viewer)
    _require_owner(viewer, name)
    if name.canary_version is None:
        raise InvalidRequest(f"'{name.id}' has no canary", param="name")
    ended = name.canary_version
    name.canary_version, name.canary_share = None, 0.0
    _log(session, viewer, name, "canary_end", from_version=ended, to_version=name.current_version)
    return name, ended


def delete_name(session: Session, viewer: Principal, ref: str) -> m.ModelName:
    """The name goes (its versions' adapters stay); clients calling it get 404 from then on."""
    name = get_name(session, ref, viewer)
    _require_owner(viewer, name)
    session.delete(name)
    session.flush()
    return name


def in_canary(name_id: str, request_id: str, share: float) -> bool:
    """Whether request `request_id` of name `name_id` goes to the canary at `share` % (module docstring)."""
    digest = hashlib.sha256(f"{name_id}\n{request_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS < round(share * BUCKETS / 100)


def route(session: Session, ref: models.ModelRef, request_id: str, viewer: Principal, *, record: bool = True) -> Routed:
    """The version that answers request `request_id` for the name `ref` (from `models.get_model`), recorded
    unless `record` is False (an arena side: its battle keeps which version answered, counted at the vote)."""
    name = ref.name
    routed = Routed(ref.adapter, name.current_version, False)
    if name.canary_version is not None and in_canary(name.id, request_id, name.canary_share):
        candidate = models.version_adapter(session, name, name.canary_version)
        if candidate is not None and models.sees_version(viewer, candidate, models.shared_with(session, viewer)):
            routed = Routed(candidate, name.canary_version, True)
    if not record:
        return routed
    session.add(
        m.ModelNameRequest(
            id=request_id,
            tenant_id=name.tenant_id,
            name_id=name.id,
            version=routed.version,
            adapter_id=routed.adapter.id,
            canary=routed.canary,
            user_id=viewer.user_id,
        )
    )
    return routed


@dataclass
class Tally:
    """What one version of a name got: its requests (of them, as the canary), ratings and corrections of its
    answers, and its arena results when it answered a side for the name."""

    requests: int = 0
    canary_requests: int = 0
    thumbs_up: int = 0
    thumbs_down: int = 0
    corrections: int = 0
    arena_wins: int = 0
    arena_losses: int = 0
    arena_ties: int = 0

    def as_dict(self) -> dict[str, Any]:
        rated = self.thumbs_up + self.thumbs_down
        return {**self.__dict__, "approval": round(self.thumbs_up / rated, 3) if rated else None}


def tallies(session: Session, name: m.ModelName) -> dict[int, Tally]:
    """Each version's counts, kept apart (a canary's from its current version's) so its owner can compare them
    before promoting. Feedback and arena sides count for the adapter that answered them (`route` records it);
    a version counts only what came after it joined the name: an adapter's earlier life is not the name's."""
    rows = session.scalars(select(m.ModelNameVersion).where(m.ModelNameVersion.name_id == name.id)).all()
    out = {row.number: Tally() for row in rows}
    joined = {row.adapter_id: (row.number, row.created_at) for row in rows}
    requests = session.execute(
        select(m.ModelNameRequest.version, m.ModelNameRequest.canary, func.count())
        .where(m.ModelNameRequest.name_id == name.id)
        .group_by(m.ModelNameRequest.version, m.ModelNameRequest.canary)
    )
    for version, canary, count in requests:
        if version in out:
            out[version].requests += count
            out[version].canary_requests += count if canary else 0
    ratings = session.execute(
        select(m.Feedback.model, m.Feedback.rating, m.Feedback.correction.is_not(None), m.Feedback.created_at).where(
            m.Feedback.model.in_(list(joined))
        )
    )
    for model, rating, corrected, created in ratings:
        number, since = joined[model]
        if created >= since:
            tally = out[number]
            tally.thumbs_up += rating == 1
            tally.thumbs_down += rating == -1
            tally.corrections += bool(corrected)
    battles = session.scalars(
        select(m.ArenaBattle).where(
            m.ArenaBattle.winner.is_not(None), or_(m.ArenaBattle.model_a == name.id, m.ArenaBattle.model_b == name.id)
        )
    )
    for battle in battles:
        for side, other in (("a", "b"), ("b", "a")):
            number = joined.get(getattr(battle, f"answered_{side}") or "", (None, 0))[0]
            if getattr(battle, f"model_{side}") != name.id or number is None:
                continue
            tally = out[number]
            tally.requests += 1  # an arena side is counted once voted: before, the count would unblind it
            if battle.winner == "tie":
                tally.arena_ties += 1
            elif battle.winner == side:
                tally.arena_wins += 1
            elif battle.winner == other:
                tally.arena_losses += 1
    return out


def answered_by(session: Session, request_id: str) -> m.ModelNameRequest | None:
    """Which version of which name answered a completion (None: it was not a request for a name)."""
    return session.get(m.ModelNameRequest, request_id)


def fine_tune(
    session: Session,
    viewer: Principal,
    ref: str,
    *,
    training_file: str | None = None,
    dataset: str | None = None,
    dataset_version: int | None = None,
    validation_file: str | None = None,
    method: dict[str, Any] | None = None,
    suffix: str | None = None,
    seed: int | None = None,
    settings: Settings | None = None,
) -> m.FineTuningJob:
    """A fine-tune (SFT or DPO, as `method` says) on a file or a dataset version, starting from the weights of the
    name's current version. Its lineage names that adapter (its predecessor) and the name; when it succeeds, its
    adapter becomes the name's next version (not promoted: its owner decides, its evaluation in hand)."""
    name = get_name(session, ref, viewer)
    current = models.version_adapter(session, name, name.current_version)
    if current is None:
        raise InvalidRequest(
            f"'{name.id}' has no current version to continue from (version {name.current_version} was deleted)",
            param="name",
            code="model_version_deleted",
        )
    if (training_file is None) == (dataset is None):
        raise InvalidRequest("give either training_file or dataset (with its version)", param="training_file")
    if dataset is not None:
        try:
            found = datasets.get_dataset(session, dataset)
        except NotFound:
            raise InvalidRequest(f"invalid dataset: no dataset '{dataset}'", param="dataset") from None
        training_file = datasets.export_version(session, found, dataset_version, allow_invalid=False).id
    lineage = {
        "kind": "refine",
        "parent_job": current.job_id,
        "checkpoint": None,
        "adapter": current.id,
        "model_name": name.id,
        "version": name.current_version,
    }
    return finetuning.create_job(
        session,
        viewer,
        model=name.base_model,
        training_file=training_file,
        validation_file=validation_file,
        suffix=suffix or name.name,
        method=method,
        seed=seed,
        settings=settings,
        start_from=current,
        lineage=lineage,
    )


def version_from_job(session: Session, job: m.FineTuningJob, adapter: m.Adapter) -> tuple[str, int] | None:
    """A finished job that trained on from a name: its adapter becomes the name's next version. Returns (name,
    version), or None for any other job (or a name deleted meanwhile)."""
    name_ref = (job.lineage or {}).get("model_name")
    name = session.get(m.ModelName, name_ref) if name_ref else None
    if name is None or name.tenant_id != job.tenant_id or name.base_model != adapter.base_model:
        return None
    return name.id, add_version(session, name, adapter, added_by=job.user_id, job_id=job.id)
