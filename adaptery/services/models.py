"""Base models every tenant shares, and the adapters each tenant owns."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePath

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from adaptery.auth import policy
from adaptery.auth.principal import Principal, Role
from adaptery.db import models as m
from adaptery.db.ids import new_id
from adaptery.engine.loading import read_platform_defaults, resolve_model_path
from adaptery.services.errors import Conflict, InvalidRequest, NotFound, PermissionDenied
from adaptery.storage.blobs import BlobStore

# Only data files travel with an adapter: never pickles, never code.
ADAPTER_FILE_SUFFIXES = (".safetensors", ".json", ".jinja", ".txt", ".model")


@dataclass(frozen=True)
class ModelRef:
    id: str
    base: m.BaseModel
    adapter: m.Adapter | None  # for a stable name: its current version
    owned_by: str
    created_at: float
    name: m.ModelName | None = None  # a stable name (`services.model_names`), answering from `adapter`


def register_base_model(system: Session, model_id: str, ref: str, *, offline: bool) -> m.BaseModel:
    """Record a base model (local path or hub id) and its recommended fine-tuning defaults."""
    path = resolve_model_path(ref, offline=offline)
    platform = read_platform_defaults(path)
    record = system.get(m.BaseModel, model_id) or m.BaseModel(id=model_id)
    record.ref = ref
    record.display_name = platform.get("display_name", model_id)
    record.finetune_defaults = platform.get("finetune_defaults", {})
    system.add(record)
    system.flush()
    return record


def base_model_id(ref: str) -> str:
    """`meta-llama/Llama-3.2-1B` → `meta-llama/Llama-3.2-1B`; `/models/my-llama/` → `my-llama`."""
    return PurePath(ref).name if os.path.isdir(ref) else ref


def list_models(session: Session, viewer: Principal | None = None) -> list[ModelRef]:
    """Base models and the tenant's adapters; with `viewer`, only those it may see and its key may use."""
    bases = {b.id: b for b in session.scalars(select(m.BaseModel).order_by(m.BaseModel.created_at))}
    refs = [ModelRef(b.id, b, None, "adaptery", b.created_at) for b in bases.values()]
    for adapter, tenant in session.execute(
        select(m.Adapter, m.Tenant).join(m.Tenant, m.Tenant.id == m.Adapter.tenant_id).order_by(m.Adapter.created_at)
    ):
        refs.append(ModelRef(adapter.id, bases[adapter.base_model], adapter, tenant.name, adapter.created_at))
    for name, tenant in session.execute(
        select(m.ModelName, m.Tenant).join(m.Tenant, m.Tenant.id == m.ModelName.tenant_id).order_by(m.ModelName.name)
    ):
        adapter = version_adapter(session, name, name.current_version)
        if adapter is not None:  # a name whose version was deleted answers nothing: not listed, errs when called
            refs.append(ModelRef(name.id, bases[name.base_model], adapter, tenant.name, name.created_at, name))
    if viewer is None:
        return refs
    shared = shared_with(session, viewer)
    return [ref for ref in refs if _visible(viewer, ref, shared)]


def shared_with(session: Session, viewer: Principal) -> set[str]:
    """The ids of the adapters shared with `viewer` by name (what `sees_adapter` needs)."""
    return set(session.scalars(select(m.AdapterShare.adapter_id).where(m.AdapterShare.user_id == viewer.user_id)))


def sees_adapter(viewer: Principal, adapter: m.Adapter, shared_adapter_ids: set[str]) -> bool:
    """Whether `viewer` may see and use the adapter: its key allows it and its visibility shows it to them."""
    if not policy.may_use_model(viewer, adapter.id):
        return False
    members = {viewer.user_id} if adapter.id in shared_adapter_ids else set()
    return policy.can_see_adapter(
        viewer, visibility=adapter.visibility, created_by=adapter.created_by, shared_with=members
    )


def sees_version(viewer: Principal, adapter: m.Adapter, shared_adapter_ids: set[str]) -> bool:
    """Whether `viewer` may see an adapter that answers through a stable name: by its visibility alone, since a key
    kept to the name (its `allowed_models`) uses whichever version the name answers from."""
    members = {viewer.user_id} if adapter.id in shared_adapter_ids else set()
    return policy.can_see_adapter(
        viewer, visibility=adapter.visibility, created_by=adapter.created_by, shared_with=members
    )


def _visible(viewer: Principal, ref: ModelRef, shared_adapter_ids: set[str]) -> bool:
    if ref.name is not None:  # a key may be kept to the name alone; who sees it is who sees its current version
        return policy.may_use_model(viewer, ref.id) and sees_version(viewer, ref.adapter, shared_adapter_ids)
    if ref.adapter is not None:
        return sees_adapter(viewer, ref.adapter, shared_adapter_ids)
    return policy.may_use_model(viewer, ref.id)


def get_model(
    session: Session,
    model_id: str,
    *,
    param: str = "model",
    viewer: Principal | None = None,
    checkpoints: bool = False,
) -> ModelRef:
    """A model by id; with `viewer`, one it may not see or use is not found, exactly like one that does not exist.
    With `checkpoints`, a job's checkpoint (`ft:...:ckpt-step-N`, OpenAI's `fine_tuned_model_checkpoint`) is a model
    too: for answering only, so only inference asks for them."""
    try:
        ref = _get_model(session, model_id, param=param)
    except NotFound:
        found = _checkpoint_model(session, model_id) if checkpoints and ":ckpt-step-" in model_id else None
        if found is None:
            raise
        ref = found
    if viewer is not None:
        shared = shared_with(session, viewer) if ref.adapter is not None else set()  # a base needs no shares
        if not _visible(viewer, ref, shared):
            raise _not_found(model_id, param)
    return ref


def _checkpoint_model(session: Session, model_id: str) -> ModelRef | None:
    """A checkpoint as a model to answer with: its adapter files, seen by whoever sees the job's adapter (no more
    people than its source adapter while the job has none yet; a shared one's checkpoints only by its creator)."""
    row = session.execute(
        select(m.JobCheckpoint, m.FineTuningJob, m.Tenant)
        .join(m.FineTuningJob, m.FineTuningJob.id == m.JobCheckpoint.job_id)
        .join(m.Tenant, m.Tenant.id == m.JobCheckpoint.tenant_id)
        .where(m.JobCheckpoint.model_name == model_id)
    ).first()
    if row is None:
        return None
    checkpoint, job, tenant = row
    wanted = ("adapter_model.safetensors", "adapter_config.json")
    files = {name: sha for name, sha in (checkpoint.manifest or {}).items() if name in wanted}
    if len(files) != 2:
        return None
    grown = session.scalar(select(m.Adapter).where(m.Adapter.job_id == job.id)) or source_adapter(session, job.id)
    visibility = grown.visibility if grown is not None else "tenant"
    adapter = m.Adapter(  # transient: never added to the session
        id=model_id,
        tenant_id=job.tenant_id,
        base_model=job.model,
        job_id=job.id,
        method=grown.method if grown is not None else "lora",
        rank=grown.rank if grown is not None else int((job.hyperparameters or {}).get("lora_r") or 0),
        manifest=files,
        sha256=files["adapter_model.safetensors"],
        visibility="private" if visibility == "shared" else visibility,
        created_by=job.user_id,
        created_at=checkpoint.created_at,
    )
    return ModelRef(model_id, session.get(m.BaseModel, job.model), adapter, tenant.name, checkpoint.created_at)


def _not_found(model_id: str, param: str) -> NotFound:
    return NotFound(
        f"The model '{model_id}' does not exist or you do not have access to it.", param=param, code="model_not_found"
    )


def _get_model(session: Session, model_id: str, *, param: str = "model") -> ModelRef:
    if model_id.startswith("ft:"):
        row = session.execute(
            select(m.Adapter, m.Tenant)
            .join(m.Tenant, m.Tenant.id == m.Adapter.tenant_id)
            .where(m.Adapter.id == model_id)
        ).one_or_none()
        if row is not None:
            adapter, tenant = row
            base = session.get(m.BaseModel, adapter.base_model)
            return ModelRef(adapter.id, base, adapter, tenant.name, adapter.created_at)
        row = session.execute(
            select(m.ModelName, m.Tenant)
            .join(m.Tenant, m.Tenant.id == m.ModelName.tenant_id)
            .where(m.ModelName.id == model_id)
        ).one_or_none()
        if row is not None:
            name, tenant = row
            adapter = version_adapter(session, name, name.current_version)
            if adapter is None:
                raise InvalidRequest(
                    f"The model '{model_id}' has no version to answer from: its version {name.current_version} "
                    "was deleted. Promote another version to it, or roll it back.",
                    param=param,
                    code="model_version_deleted",
                )
            return ModelRef(
                name.id, session.get(m.BaseModel, name.base_model), adapter, tenant.name, name.created_at, name
            )
    else:
        base = session.get(m.BaseModel, model_id)
        if base is not None:
            return ModelRef(base.id, base, None, "adaptery", base.created_at)
    raise _not_found(model_id, param)


def version_adapter(session: Session, name: m.ModelName, number: int | None) -> m.Adapter | None:
    """The adapter that is version `number` of `name`; None if there is no such version or its adapter is gone."""
    if number is None:
        return None
    adapter_id = session.scalar(
        select(m.ModelNameVersion.adapter_id).where(
            m.ModelNameVersion.name_id == name.id, m.ModelNameVersion.number == number
        )
    )
    adapter = session.get(m.Adapter, adapter_id) if adapter_id else None
    return adapter if adapter is not None and adapter.tenant_id == name.tenant_id else None


def fine_tuned_model_name(base: str, tenant: str, suffix: str | None, job_id: str) -> str:
    return f"ft:{base}:{tenant}:{suffix or ''}:{job_id.removeprefix('ftjob-')[:8]}"


def register_adapter(
    session: Session,
    blobs: BlobStore,
    *,
    tenant_id: str,
    model_id: str,
    base_model: str,
    job_id: str | None,
    adapter_dir: Path,
    created_by: str | None = None,
) -> m.Adapter:
    """Store a PEFT adapter directory (safetensors only) as content-addressed blobs."""
    config_path = adapter_dir / "adapter_config.json"
    if not config_path.is_file() or not (adapter_dir / "adapter_model.safetensors").is_file():
        raise InvalidRequest(
            "an adapter needs adapter_config.json and adapter_model.safetensors (pickled weights are refused)",
            param="adapter",
        )
    config = json.loads(config_path.read_text())
    manifest = {}
    for path in sorted(adapter_dir.iterdir()):
        if path.is_file() and path.suffix in ADAPTER_FILE_SUFFIXES:
            manifest[path.name] = blobs.put_path(tenant_id, path).sha256
    digest = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()
    adapter = m.Adapter(
        id=model_id,
        tenant_id=tenant_id,
        base_model=base_model,
        job_id=job_id,
        method=str(config.get("peft_type", "LORA")).lower(),
        rank=int(config.get("r") or 0),
        manifest=manifest,
        sha256=digest,
        created_by=created_by or _job_owner(session, job_id),
    )
    session.add(adapter)
    session.flush()
    _inherit_visibility(session, adapter)
    return adapter


def source_adapter(session: Session, job_id: str | None) -> m.Adapter | None:
    """The adapter a job's weights grew from: the one it fine-tunes (`model`), else its parent job's (extend,
    continue, fork), up the lineage; None for a job that started from a base model."""
    job = session.get(m.FineTuningJob, job_id) if job_id else None
    seen: set[str] = set()
    while job is not None and job.id not in seen:
        seen.add(job.id)
        predecessor = session.get(m.Adapter, (job.lineage or {}).get("adapter") or "")  # trained on from a name
        if predecessor is not None and predecessor.tenant_id == job.tenant_id:
            return predecessor
        if (adapter := session.get(m.Adapter, job.model)) is not None and adapter.tenant_id == job.tenant_id:
            return adapter
        parent = session.get(m.FineTuningJob, (job.lineage or {}).get("parent_job") or "")
        if parent is None or parent.tenant_id != job.tenant_id:
            return None
        if parent.fine_tuned_model and (adapter := session.get(m.Adapter, parent.fine_tuned_model)) is not None:
            return adapter
        job = parent
    return None


def _inherit_visibility(session: Session, adapter: m.Adapter) -> None:
    """An adapter grown from another is seen by no more people than its source: a private source gives a
    private adapter, a shared one the same members plus the source's creator (an extended or forked copy of
    a colleague's shared adapter became visible to the whole tenant)."""
    source = source_adapter(session, adapter.job_id)
    if source is None or source.visibility == "tenant":
        return
    adapter.visibility = source.visibility
    if source.visibility == "shared":
        members = set(session.scalars(select(m.AdapterShare.user_id).where(m.AdapterShare.adapter_id == source.id)))
        members.add(source.created_by)
        for user_id in sorted(u for u in members if u and u != adapter.created_by):
            session.add(
                m.AdapterShare(id=new_id("share_"), tenant_id=adapter.tenant_id, adapter_id=adapter.id, user_id=user_id)
            )
    session.flush()


def _job_owner(session: Session, job_id: str | None) -> str | None:
    job = session.get(m.FineTuningJob, job_id) if job_id else None
    return job.user_id if job else None


def _not_a_name(ref: ModelRef) -> None:
    """A stable name is not an adapter: what it answers from changes, so it is managed as a name."""
    if ref.name is not None:
        raise InvalidRequest(
            f"'{ref.id}' is a stable name, not an adapter: manage it with /api/model_names/{ref.name.name} "
            f"(its current version is {ref.adapter.id})",
            param="model",
        )


VISIBILITIES = ("private", "shared", "tenant")


@dataclass(frozen=True)
class Sharing:
    adapter: m.Adapter
    members: list[str]  # usernames an adapter of visibility `shared` is shared with


def get_sharing(session: Session, viewer: Principal, model_id: str) -> Sharing:
    ref = get_model(session, model_id, viewer=viewer)
    _not_a_name(ref)
    if ref.adapter is None:
        raise InvalidRequest("Base models are shared with everyone; only adapters have a visibility.", param="model")
    members = session.scalars(
        select(m.User.username)
        .join(m.AdapterShare, m.AdapterShare.user_id == m.User.id)
        .where(m.AdapterShare.adapter_id == ref.adapter.id)
        .order_by(m.User.username)
    )
    return Sharing(ref.adapter, list(members))


def set_sharing(
    session: Session, viewer: Principal, model_id: str, *, visibility: str, members: list[str]
) -> tuple[Sharing, list[str], list[str]]:
    """Set an adapter's visibility and named members; returns it with the usernames added and removed.

    Only the adapter's creator or a tenant admin may change who sees it; members must belong to the tenant.
    """
    current = get_sharing(session, viewer, model_id)
    adapter = current.adapter
    if not policy.may_share_adapter(viewer, created_by=adapter.created_by):
        raise PermissionDenied("Only the adapter's creator or a tenant admin may change who sees it.")
    if visibility not in VISIBILITIES:
        raise InvalidRequest(f"visibility must be one of {', '.join(VISIBILITIES)}", param="visibility")
    if members and visibility != "shared":
        raise InvalidRequest("members are named only with visibility 'shared'", param="members")
    wanted = sorted(set(members))
    users = dict(
        session.execute(
            select(m.User.username, m.User.id)
            .join(m.Membership, m.Membership.user_id == m.User.id)
            .where(m.User.username.in_(wanted))
        ).all()
    )
    for i, name in enumerate(wanted):
        if name not in users:
            raise InvalidRequest(f"'{name}' is not a member of this tenant", param=f"members[{i}]")
    _keep_names_visible(session, adapter, visibility, {users[u] for u in wanted})
    added = [u for u in wanted if u not in current.members]
    removed = [u for u in current.members if u not in wanted]
    session.execute(
        delete(m.AdapterShare).where(
            m.AdapterShare.adapter_id == adapter.id, m.AdapterShare.user_id.not_in([users[u] for u in wanted])
        )
    )
    for name in added:
        session.add(m.AdapterShare(id=new_id("share_"), adapter_id=adapter.id, user_id=users[name]))
    adapter.visibility = visibility
    session.flush()
    return Sharing(adapter, wanted), added, removed


def _keep_names_visible(session: Session, adapter: m.Adapter, visibility: str, members: set[str]) -> None:
    """Refuse narrowing an adapter's visibility while it is a version of a stable name whose creator would no
    longer see it: a name is seen as its versions are, so its creator would be locked out of their own name."""
    rows = session.execute(
        select(m.ModelName.name, m.ModelName.created_by, m.ModelNameVersion.number)
        .join(m.ModelNameVersion, m.ModelNameVersion.name_id == m.ModelName.id)
        .where(m.ModelNameVersion.adapter_id == adapter.id, m.ModelName.tenant_id == adapter.tenant_id)
        .order_by(m.ModelName.name, m.ModelNameVersion.number)
    ).all()
    for name, creator, number in rows:
        if visibility == "tenant" or creator in (None, adapter.created_by) or creator in members:
            continue
        role = session.scalar(
            select(m.Membership.role).where(
                m.Membership.tenant_id == adapter.tenant_id, m.Membership.user_id == creator
            )
        )
        if role in (Role.OWNER.value, Role.ADMIN.value):  # admins see every adapter of their tenant
            continue
        raise Conflict(
            f"{adapter.id} is version {number} of the model name '{name}', made by someone who would no longer "
            f"see it as '{visibility}': promote another version there (or delete the name) first",
            param="visibility",
            code="adapter_is_a_name_version",
        )


def delete_adapter(session: Session, model_id: str, viewer: Principal | None = None) -> m.Adapter:
    ref = get_model(session, model_id, viewer=viewer)
    _not_a_name(ref)
    if ref.adapter is None:
        raise InvalidRequest("Base models cannot be deleted through the API.", param="model")
    if viewer is not None and not policy.may_share_adapter(viewer, created_by=ref.adapter.created_by):
        raise PermissionDenied("Only the adapter's creator or a tenant admin may delete it.")
    session.delete(ref.adapter)
    return ref.adapter


def materialize_adapter(blobs: BlobStore, adapter: m.Adapter, cache_dir: Path) -> Path:
    """An adapter as a PEFT directory, unpacked (decrypted) once per tenant and content hash into `cache_dir`,
    which must be transient (the platform's per-process scratch directory, outside the data dir)."""
    target = cache_dir / f"{adapter.tenant_id}-{adapter.sha256}"
    if target.is_dir():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=cache_dir, prefix=".unpack-"))
    try:
        for name, sha256 in adapter.manifest.items():
            if PurePath(name).name != name or not name.endswith(ADAPTER_FILE_SUFFIXES):
                raise InvalidRequest(f"refusing adapter file name {name!r}")
            blobs.copy_to(adapter.tenant_id, sha256, staging / name)
        os.replace(staging, target)
    except OSError:
        if target.is_dir():  # another thread unpacked the same adapter first
            shutil.rmtree(staging, ignore_errors=True)
            return target
        raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target
