"""Adapters in and out as ordinary PEFT directories, zipped: take them to PEFT, vLLM or LoRAX, or
bring one trained elsewhere. Only data files travel: safetensors weights and JSON/text configs;
pickled weights (`.bin`, `.pt`, `.pkl`) and anything that could run code are refused.

An upload is bounded before and while it unpacks: a 1 MB zip once wrote 988 MB to scratch before its
400. The entry count is read from the archive's end record before the directory is parsed; the sizes
the directory declares must add up to at most `max_adapter_bytes`, a large member may not compress
better than MAX_COMPRESSION_RATIO, and the bytes really written are counted against the declared
ones. Its JSON files are parsed within the JSON limits, and a chat template it brings must render a
sample conversation within its budget (`data.chat_template`), or the import is a 400 naming the file.
"""

from __future__ import annotations

import json
import shutil
import struct
import tempfile
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from safetensors import safe_open
from sqlalchemy.orm import Session
from transformers import AutoTokenizer

from adaptery.data.chat_template import ChatTemplateError, TemplateBudget, check_template, stored_chat_template
from adaptery.data.untrusted import UntrustedJSONError, loads
from adaptery.db import models as m
from adaptery.db.ids import random_token
from adaptery.services import models
from adaptery.services.errors import InvalidRequest
from adaptery.storage.blobs import CHUNK, BlobStore

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
SUPPORTED_PEFT_TYPES = ("LORA",)
MAX_MEMBERS = 64  # entries, directories included: an adapter is a handful of files
# Weights hardly compress (~1.1:1), JSON and text ~10:1; bombs ~1000:1. Small files may compress
# past any ratio harmlessly, so only members above RATIO_CHECKED_FROM bytes are held to it.
MAX_COMPRESSION_RATIO = 100
RATIO_CHECKED_FROM = 1024 * 1024
_END_RECORD = struct.Struct("<4s4H2LH")  # the zip's end of central directory record
_END_SIGNATURE = b"PK\x05\x06"


def zip_adapter(blobs: BlobStore, adapter: m.Adapter) -> Iterator[bytes]:
    """The adapter's files as a zip stream (written to a temporary file first: zips need seeking).

    `adapter_config.json` names its base by the platform's model id, not by where the base lies on the server
    (PEFT writes the path it loaded the base from; a download must not tell a client the server's paths)."""
    with tempfile.TemporaryFile(dir=blobs.scratch) as spool:  # plaintext: not in the data dir
        with zipfile.ZipFile(spool, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for name, sha256 in sorted(adapter.manifest.items()):
                if name == "adapter_config.json":
                    config = json.loads(b"".join(blobs.iter_bytes(adapter.tenant_id, sha256)))
                    config["base_model_name_or_path"] = adapter.base_model
                    archive.writestr(name, json.dumps(config, indent=2, sort_keys=True))
                    continue
                with blobs.open(adapter.tenant_id, sha256) as source, archive.open(name, "w") as target:
                    shutil.copyfileobj(source, target, CHUNK)
        spool.seek(0)
        yield from iter(lambda: spool.read(CHUNK), b"")


def _refuse(message: str) -> InvalidRequest:
    return InvalidRequest(message, param="file", code="invalid_adapter")


def _declared_entries(archive_path: Path) -> int:
    """How many entries the archive's end record declares, read before zipfile parses the whole directory
    (which it holds in memory: a 512 MB upload of empty entries would be millions of them)."""
    with archive_path.open("rb") as handle:
        size = handle.seek(0, 2)
        handle.seek(max(0, size - _END_RECORD.size - 0xFFFF))
        tail = handle.read()
    at = tail.rfind(_END_SIGNATURE)
    if at < 0 or len(tail) - at < _END_RECORD.size:
        raise _refuse("the upload is not a zip archive of a PEFT adapter directory")
    _, _, _, _, entries, directory_size, _, _ = _END_RECORD.unpack_from(tail, at)
    return max(entries, directory_size // 46)  # 46 bytes: the smallest directory entry


def _check_sizes(members: list[zipfile.ZipInfo], max_bytes: int) -> None:
    total = sum(info.file_size for info in members)
    if total > max_bytes:
        raise _refuse(
            f"the archive unpacks to {total} bytes, more than the limit of {max_bytes} bytes for an adapter "
            "(setting ADAPTERY_MAX_ADAPTER_BYTES)"
        )
    for info in members:
        if info.flag_bits & 0x1:
            raise _refuse(f"{info.filename} is encrypted: zip the adapter without a password")
        ratio = info.file_size / max(info.compress_size, 1)
        if info.file_size >= RATIO_CHECKED_FROM and ratio > MAX_COMPRESSION_RATIO:
            raise _refuse(
                f"{info.filename} has a compression ratio of {ratio:.0f}:1, more than {MAX_COMPRESSION_RATIO}:1 "
                "(adapter weights hardly compress): refusing what looks like a zip bomb"
            )


def _extract(archive: zipfile.ZipFile, members: list[zipfile.ZipInfo], into: Path, max_bytes: int) -> None:
    """Write the members, counting the bytes really written: a member's declared size can lie."""
    written = 0
    for info in members:
        name = PurePosixPath(info.filename).name
        member_bytes = 0
        try:
            with archive.open(info) as source, (into / name).open("wb") as target:
                while chunk := source.read(CHUNK):
                    member_bytes += len(chunk)
                    written += len(chunk)
                    if member_bytes > info.file_size or written > max_bytes:
                        raise _refuse(
                            f"{info.filename} unpacks to more bytes than the archive declares for it: "
                            "refusing what looks like a zip bomb"
                        )
                    target.write(chunk)
        except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError) as exc:
            raise _refuse(f"{info.filename} cannot be unpacked ({exc}): the archive is damaged") from exc


def unpack_adapter(archive_path: Path, into: Path, *, max_bytes: int) -> Path:
    """Check and extract an uploaded adapter zip within `max_bytes` unpacked; returns the directory
    holding its files. On refusal nothing is left in `into`."""
    entries = _declared_entries(archive_path)
    if entries > MAX_MEMBERS:
        raise _refuse(f"the archive has {entries} entries; an adapter directory has a handful of files")
    try:
        archive = zipfile.ZipFile(archive_path)
    except zipfile.BadZipFile as exc:
        raise _refuse("the upload is not a zip archive of a PEFT adapter directory") from exc
    with archive:
        if len(archive.infolist()) > MAX_MEMBERS:
            raise _refuse(f"the archive has {len(archive.infolist())} entries; an adapter has a handful of files")
        members = [i for i in archive.infolist() if not i.is_dir()]
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
        _check_sizes(members, max_bytes)
        into.mkdir(parents=True, exist_ok=True)
        try:
            _extract(archive, members, into, max_bytes)
        except BaseException:
            shutil.rmtree(into, ignore_errors=True)
            raise
    return into


def _base_shapes(base_dir: Path) -> dict[str, tuple[int, ...]]:
    """Weight name → shape of a base model, read from safetensors headers only."""
    shapes = {}
    for path in sorted(base_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as weights:
            for name in weights.keys():  # noqa: SIM118 - safe_open is not a mapping
                shapes[name] = tuple(weights.get_slice(name).get_shape())
    return shapes


def _read_json_files(adapter_dir: Path, *, max_depth: int, max_bytes: int) -> dict[str, object]:
    """Every JSON file of the adapter, parsed within the limits (a config nested 100,000 deep was a 500)."""
    parsed = {}
    for path in sorted(adapter_dir.glob("*.json")):
        try:
            parsed[path.name] = loads(path.read_bytes(), max_depth=max_depth, max_bytes=max_bytes)
        except UntrustedJSONError as exc:
            raise _refuse(f"{path.name}: {exc}") from exc
    return parsed


def _check_chat_template(adapter_dir: Path, base_dir: Path, budget: TemplateBudget) -> None:
    """An adapter's own chat template must render a sample conversation within its budget."""
    try:
        stored = stored_chat_template(adapter_dir, max_json_depth=budget.max_json_depth)
    except ChatTemplateError as exc:
        raise _refuse(str(exc)) from exc
    if stored is None:
        return
    template, source = stored
    # The base's special tokens, as serving passes them (`bos_token + ...` fails without them).
    tokenizer = AutoTokenizer.from_pretrained(base_dir, trust_remote_code=False, local_files_only=True)
    try:
        check_template(template, budget=budget, variables=tokenizer.special_tokens_map)
    except ChatTemplateError as exc:
        raise _refuse(f"{source}: {exc}") from exc


def check_adapter(
    adapter_dir: Path,
    base_dir: Path,
    *,
    max_rank: int,
    max_json_bytes: int,
    template_budget: TemplateBudget,
) -> dict:
    """The adapter's config, once it is known to fit the base and be servable; a clear 400 otherwise."""
    parsed = _read_json_files(adapter_dir, max_depth=template_budget.max_json_depth, max_bytes=max_json_bytes)
    config = parsed["adapter_config.json"]
    if not isinstance(config, dict):
        raise _refuse("adapter_config.json must hold a JSON object (PEFT's LoraConfig)")
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type not in SUPPORTED_PEFT_TYPES:
        raise _refuse(f"peft_type {config.get('peft_type')!r} is not served yet; supported: LORA")
    rank = config.get("r")
    if not isinstance(rank, int) or not 1 <= rank <= max_rank:
        raise _refuse(f"LoRA rank {rank!r} is outside what this server serves (1 to {max_rank})")
    if config.get("modules_to_save"):
        raise _refuse(
            f"adapter_config.json: modules_to_save {config['modules_to_save']!r} is not supported: such an adapter "
            "replaces whole modules of the base model, which this server does not serve. Train it without "
            "modules_to_save (LoRA on the linear layers only)"
        )
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
    _check_chat_template(adapter_dir, base_dir, template_budget)
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
    max_json_bytes: int,
    template_budget: TemplateBudget,
) -> m.Adapter:
    check_adapter(
        adapter_dir, base_dir, max_rank=max_rank, max_json_bytes=max_json_bytes, template_budget=template_budget
    )
    model_id = models.fine_tuned_model_name(base.id, tenant_name, suffix, "ftjob-" + random_token(8))
    return models.register_adapter(
        session, blobs, tenant_id=tenant_id, model_id=model_id, base_model=base.id, job_id=None, adapter_dir=adapter_dir
    )
