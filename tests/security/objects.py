"""Objects that carry weights, made straight in the database as training would leave them: a finished job with
its adapter (at a visibility) and a checkpoint, a job still training from another job's adapter, and copies
of rows for the cells that delete or change them. Real adapter files (the fixture's LoRA), no training run."""

from __future__ import annotations

import io
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select

from adaptery.db import models as m
from adaptery.db.ids import new_id, random_token
from adaptery.messaging.protocol import ADAPTER_FILES
from adaptery.services import finetuning, models
from tests.security.conftest import World

BASE = "adaptery-demo"


def unpack(lora_bytes: bytes, target: Path) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(io.BytesIO(lora_bytes)) as archive:
        archive.extractall(target)
    return target


@dataclass(frozen=True)
class Trained:
    job_id: str
    model_id: str | None  # the job's adapter; None while it trains
    checkpoint_id: str  # a checkpoint that holds adapter weights


def _job(world: World, user_id: str, **fields: object) -> m.FineTuningJob:
    hyperparameters = {"n_epochs": 1, "batch_size": 1, "learning_rate_multiplier": 1.0}
    return m.FineTuningJob(
        id=new_id("ftjob-"),
        tenant_id=world.tenant_id,
        user_id=user_id,
        model=BASE,
        training_file=world.ids["file_id"],
        seed=1,
        hyperparameters=hyperparameters,
        method={"type": "supervised", "supervised": {"hyperparameters": hyperparameters}},
        **fields,
    )


def _checkpoint(job: m.FineTuningJob, manifest: dict[str, str], name: str) -> m.JobCheckpoint:
    return m.JobCheckpoint(
        id=f"ftckpt-{job.id.removeprefix('ftjob-')}-1",
        tenant_id=job.tenant_id,
        job_id=job.id,
        step=1,
        metrics={"step": 1, "train_loss": 1.0},
        model_name=f"{name}:ckpt-step-1",
        manifest={k: v for k, v in manifest.items() if k in ADAPTER_FILES},
    )


def trained(
    world: World, username: str, adapter_dir: Path, *, visibility: str = "tenant", shared_with: tuple[str, ...] = ()
) -> Trained:
    """A succeeded job of `username` with its adapter at `visibility` (shared with `shared_with` usernames)."""
    p = world.platform
    with p.db.tenant(world.tenant_id) as s:
        job = _job(world, world.users[username], status="succeeded", finished_at=time.time(), trained_tokens=10)
        s.add(job)
        s.flush()
        model_id = models.fine_tuned_model_name(BASE, "lab", visibility, job.id)
        adapter = models.register_adapter(
            s,
            p.blobs,
            tenant_id=world.tenant_id,
            model_id=model_id,
            base_model=BASE,
            job_id=job.id,
            adapter_dir=adapter_dir,
            created_by=world.users[username],
        )
        adapter.visibility = visibility
        for member in shared_with:
            s.add(m.AdapterShare(id=new_id("share_"), adapter_id=model_id, user_id=world.users[member]))
        job.fine_tuned_model = model_id
        checkpoint = _checkpoint(job, adapter.manifest, model_id)
        s.add(checkpoint)
        finetuning.add_event(s, job, f"New fine-tuned model created: {model_id}")
        return Trained(job.id, model_id, checkpoint.id)


def training_from(world: World, username: str, parent: Trained) -> Trained:
    """A job of `username` still training from `parent`'s adapter (an extend), with a first checkpoint."""
    with world.platform.db.tenant(world.tenant_id) as s:
        start = s.get(m.Adapter, parent.model_id).manifest
        job = _job(
            world,
            world.users[username],
            status="running",
            lineage={"kind": "extend", "parent_job": parent.job_id, "checkpoint": None},
            init_adapter={k: v for k, v in start.items() if k in ADAPTER_FILES},
        )
        s.add(job)
        s.flush()
        checkpoint = _checkpoint(job, start, models.fine_tuned_model_name(BASE, "lab", None, job.id))
        s.add(checkpoint)
        return Trained(job.id, None, checkpoint.id)


def training(world: World, username: str, weights: Trained) -> Trained:
    """A job of `username` from the base model, still training (no adapter yet), whose first checkpoint holds
    `weights`' adapter files (any real LoRA files serve)."""
    with world.platform.db.tenant(world.tenant_id) as s:
        files = s.get(m.Adapter, weights.model_id).manifest
        job = _job(world, world.users[username], status="running")
        s.add(job)
        s.flush()
        checkpoint = _checkpoint(job, files, models.fine_tuned_model_name(BASE, "lab", None, job.id))
        s.add(checkpoint)
        return Trained(job.id, None, checkpoint.id)


def copy_adapter(world: World, model_id: str) -> str:
    """Another adapter of the same creator, weights, visibility and shares (for a cell that deletes one)."""
    with world.platform.db.tenant(world.tenant_id) as s:
        adapter = s.get(m.Adapter, model_id)
        copy_id = f"{model_id}-{random_token(6)}"
        s.add(
            m.Adapter(
                id=copy_id,
                tenant_id=adapter.tenant_id,
                base_model=adapter.base_model,
                job_id=None,
                method=adapter.method,
                rank=adapter.rank,
                manifest=dict(adapter.manifest),
                sha256=adapter.sha256,
                visibility=adapter.visibility,
                created_by=adapter.created_by,
            )
        )
        s.flush()
        members = s.scalars(select(m.AdapterShare.user_id).where(m.AdapterShare.adapter_id == model_id)).all()
        for user_id in members:
            s.add(m.AdapterShare(id=new_id("share_"), adapter_id=copy_id, user_id=user_id))
        return copy_id


def copy_job(world: World, job_id: str, status: str) -> str:
    """Another job like `job_id` (same owner, result and lineage) in `status` (for a cell that changes it)."""
    with world.platform.db.tenant(world.tenant_id) as s:
        job = s.get(m.FineTuningJob, job_id)
        copy = _job(
            world,
            job.user_id,
            status=status,
            fine_tuned_model=job.fine_tuned_model,
            lineage=job.lineage,
            init_adapter=job.init_adapter,
        )
        s.add(copy)
        return copy.id


def copy_file(world: World, file_id: str) -> str:
    with world.platform.db.tenant(world.tenant_id) as s:
        record = s.get(m.File, file_id)
        copy = m.File(
            id=new_id("file-"),
            tenant_id=record.tenant_id,
            filename=record.filename,
            purpose=record.purpose,
            bytes=record.bytes,
            sha256=record.sha256,
            records=record.records,
        )
        s.add(copy)
        return copy.id


def copy_dataset(world: World, dataset_id: str) -> str:
    """An empty dataset of the same creator (for a cell that deletes one)."""
    with world.platform.db.tenant(world.tenant_id) as s:
        dataset = s.get(m.Dataset, dataset_id)
        copy = m.Dataset(
            id=new_id("ds_"),
            tenant_id=dataset.tenant_id,
            name=f"{dataset.name}-{random_token(6)}",
            created_by=dataset.created_by,
        )
        s.add(copy)
        return copy.id
