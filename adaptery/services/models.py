"""Base models every tenant shares, and the adapters each tenant owns."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePath

from sqlalchemy import select
from sqlalchemy.orm import Session

from adaptery.db import models as m
from adaptery.engine.loading import read_platform_defaults, resolve_model_path
from adaptery.services.errors import InvalidRequest, NotFound
from adaptery.storage.blobs import BlobStore

# Only data files travel with an adapter: never pickles, never code.
ADAPTER_FILE_SUFFIXES = (".safetensors", ".json", ".jinja", ".txt", ".model")


@dataclass(frozen=True)
class ModelRef:
    id: str
    base: m.BaseModel
    adapter: m.Adapter | None
    owned_by: str
    created_at: float


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


def list_models(session: Session) -> list[ModelRef]:
    bases = {b.id: b for b in session.scalars(select(m.BaseModel).order_by(m.BaseModel.created_at))}
    refs = [ModelRef(b.id, b, None, "adaptery", b.created_at) for b in bases.values()]
    for adapter, tenant in session.execute(
        select(m.Adapter, m.Tenant).join(m.Tenant, m.Tenant.id == m.Adapter.tenant_id).order_by(m.Adapter.created_at)
    ):
        refs.append(ModelRef(adapter.id, bases[adapter.base_model], adapter, tenant.name, adapter.created_at))
    return refs


def get_model(session: Session, model_id: str, *, param: str = "model") -> ModelRef:
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
    else:
        base = session.get(m.BaseModel, model_id)
        if base is not None:
            return ModelRef(base.id, base, None, "adaptery", base.created_at)
    raise NotFound(
        f"The model '{model_id}' does not exist or you do not have access to it.", param=param, code="model_not_found"
    )


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
            manifest[path.name] = blobs.put_path(path).sha256
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
    )
    session.add(adapter)
    session.flush()
    return adapter


def delete_adapter(session: Session, model_id: str) -> m.Adapter:
    ref = get_model(session, model_id)
    if ref.adapter is None:
        raise InvalidRequest("Base models cannot be deleted through the API.", param="model")
    session.delete(ref.adapter)
    return ref.adapter


def materialize_adapter(blobs: BlobStore, adapter: m.Adapter, cache_dir: Path) -> Path:
    """An adapter as a PEFT directory on local disk, unpacked once per content hash."""
    target = cache_dir / adapter.sha256
    if target.is_dir():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=cache_dir, prefix=".unpack-"))
    try:
        for name, sha256 in adapter.manifest.items():
            if PurePath(name).name != name or not name.endswith(ADAPTER_FILE_SUFFIXES):
                raise InvalidRequest(f"refusing adapter file name {name!r}")
            with blobs.open(sha256) as source, (staging / name).open("wb") as out:
                shutil.copyfileobj(source, out)
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
