"""Adapters in and out as ordinary PEFT directories, zipped: take them to PEFT, vLLM or LoRAX, or
bring one trained elsewhere. Only data files travel: safetensors weights and JSON/text configs;
pickled weights (`.bin`, `.pt`, `.pkl`) and anything that could run code are refused."""

from __future__ import annotations

import json
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from safetensors import safe_open
from sqlalchemy.orm import Session

from adaptery.db import models as m
from adaptery.db.ids import random_token
from adaptery.services import models
from adaptery.services.errors import InvalidRequest
from adaptery.storage.blobs import CHUNK, BlobStore

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
SUPPORTED_PEFT_TYPES = ("LORA",)
MAX_MEMBERS = 64


def zip_adapter(blobs: BlobStore, adapter: m.Adapter) -> Iterator[bytes]:
    """The adapter's files as a zip stream (written to a temporary file first: zips need seeking)."""
    with tempfile.TemporaryFile(dir=blobs.scratch) as spool:  # plaintext: not in the data dir
        with zipfile.ZipFile(spool, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for name, sha256 in sorted(adapter.manifest.items()):
                with blobs.open(adapter.tenant_id, sha256) as source, archive.open(name, "w") as target:
                    shutil.copyfileobj(source, target, CHUNK)
        spool.seek(0)
        yield from iter(lambda: spool.read(CHUNK), b"")


def _refuse(message: str) -> InvalidRequest:
    return InvalidRequest(message, param="file", code="invalid_adapter")


def unpack_adapter(archive_path: Path, into: Path) -> Path:
    """Check and extract an uploaded adapter zip; returns the directory holding its files."""
    try:
        archive = zipfile.ZipFile(archive_path)
    except zipfile.BadZipFile as exc:
        raise _refuse("the upload is not a zip archive of a PEFT adapter directory") from exc
    with archive:
        members = [i for i in archive.infolist() if not i.is_dir()]
        if len(members) > MAX_MEMBERS:
            raise _refuse(f"the archive has {len(members)} files; an adapter has a handful")
        names = {PurePosixPath(i.filename).name for i in members}
        pickles = sorted(n for n in names if n.endswith(PICKLE_SUFFIXES))
        if pickles:
            raise _refuse(
                f"refusing pickled weights ({', '.join(pickles)}): loading them can run code. Save the adapter "
                "with safetensors (PEFT's save_pretrained does by default) and upload adapter_model.safetensors"
            )
        roots = {PurePosixPath(i.filename).parent for i in members}
        if len(roots) != 1:
            raise _refuse("all files must sit in one directory of the archive (the PEFT adapter directory)")
        for info in members:
            name = PurePosixPath(info.filename)
            if name.is_absolute() or ".." in name.parts:
                raise _refuse(f"unsafe path in archive: {info.filename}")
            if not name.name.endswith(models.ADAPTER_FILE_SUFFIXES):
                raise _refuse(
                    f"unexpected file {name.name}: an adapter holds only .safetensors, .json, .jinja, .txt "
                    "or .model files"
                )
        for required in ("adapter_config.json", "adapter_model.safetensors"):
            if required not in names:
                raise _refuse(f"the archive has no {required}")
        into.mkdir(parents=True, exist_ok=True)
        for info in members:
            with archive.open(info) as source, (into / PurePosixPath(info.filename).name).open("wb") as target:
                shutil.copyfileobj(source, target, CHUNK)
    return into


def _base_shapes(base_dir: Path) -> dict[str, tuple[int, ...]]:
    """Weight name → shape of a base model, read from safetensors headers only."""
    shapes = {}
    for path in sorted(base_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as weights:
            for name in weights.keys():  # noqa: SIM118 - safe_open is not a mapping
                shapes[name] = tuple(weights.get_slice(name).get_shape())
    return shapes


def check_adapter(adapter_dir: Path, base_dir: Path, *, max_rank: int) -> dict:
    """The adapter's config, once it is known to fit the base and be servable; a clear 400 otherwise."""
    try:
        config = json.loads((adapter_dir / "adapter_config.json").read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _refuse(f"adapter_config.json is not valid JSON: {exc}") from exc
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type not in SUPPORTED_PEFT_TYPES:
        raise _refuse(f"peft_type {config.get('peft_type')!r} is not served yet; supported: LORA")
    rank = config.get("r")
    if not isinstance(rank, int) or not 1 <= rank <= max_rank:
        raise _refuse(f"LoRA rank {rank!r} is outside what this server serves (1 to {max_rank})")
    try:
        with safe_open(str(adapter_dir / "adapter_model.safetensors"), framework="pt") as weights:
            tensors = {name: tuple(weights.get_slice(name).get_shape()) for name in weights.keys()}  # noqa: SIM118
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise _refuse(f"adapter_model.safetensors is not a valid safetensors file: {exc}") from exc
    pairs = [n for n in tensors if n.endswith(".lora_A.weight")]
    if not pairs:
        raise _refuse("adapter_model.safetensors holds no LoRA A/B weights")
    base = _base_shapes(base_dir)
    for a_name in pairs:
        module = a_name.removesuffix(".lora_A.weight").removeprefix("base_model.model.")
        target = base.get(f"{module}.weight")
        b_shape = tensors.get(a_name.replace(".lora_A.", ".lora_B."))
        if target is None:
            raise _refuse(
                f"the adapter targets {module}, which this base model does not have: "
                "it was trained for a different base"
            )
        if b_shape is None or tensors[a_name] != (rank, target[1]) or b_shape != (target[0], rank):
            raise _refuse(
                f"the adapter's weights for {module} do not fit this base model's shapes "
                f"(A {tensors[a_name]}, B {b_shape}, base {target}): it was trained for a different base"
            )
    return config


def import_adapter(
    session: Session,
    blobs: BlobStore,
    *,
    tenant_id: str,
    tenant_name: str,
    base: m.BaseModel,
    base_dir: Path,
    suffix: str | None,
    adapter_dir: Path,
    max_rank: int,
) -> m.Adapter:
    check_adapter(adapter_dir, base_dir, max_rank=max_rank)
    model_id = models.fine_tuned_model_name(base.id, tenant_name, suffix, "ftjob-" + random_token(8))
    return models.register_adapter(
        session, blobs, tenant_id=tenant_id, model_id=model_id, base_model=base.id, job_id=None, adapter_dir=adapter_dir
    )
