"""Datasets: uploads in any supported format, normalised, validated, curated into immutable versions.

Every operation (upload, dedup, scrub, split) makes a new version whose records are a blob of
canonical chat JSONL with its content hash, its parent (lineage), its parameters and its report.
The work itself runs in the background (`run_version`); a version is `processing`, then `ready`
or `failed` with a message, never left half-made: its blob appears only when complete.
"""

from __future__ import annotations

import json
import time
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from adaptery.auth.principal import Principal
from adaptery.data import dedup, pii, stats
from adaptery.data.formats import (
    FORMATS,
    ColumnMapping,
    FormatError,
    ValidationReport,
    detect_format,
    validate_and_normalise,
)
from adaptery.data.split import split_indices
from adaptery.data.untrusted import RecordLimits, UntrustedJSONError, loads
from adaptery.db import models as m
from adaptery.db.ids import new_id
from adaptery.db.session import Database
from adaptery.services.errors import Conflict, InvalidRequest, NotFound
from adaptery.storage.blobs import BlobStore, StoredBlob
from adaptery.storage.crypto import DataKey
from adaptery.training.spec import MAX_SEED

OPERATIONS = ("upload", "feedback", "dedup", "scrub", "split-train", "split-validation")
CARD_FIELDS = ("name", "description", "source", "license", "contains_protected_data")
TokenCounter = Callable[[dict[str, Any]], int]  # a canonical record -> its tokens


@dataclass(frozen=True)
class TokenBudget:
    """How to count a record's tokens for one base model, that model's context, and how large and deep
    one record may be before it is parsed."""

    model: str
    count: TokenCounter
    context: int
    limits: RecordLimits


# --- reading -------------------------------------------------------------------------------------


def get_dataset(session: Session, ref: str) -> m.Dataset:
    """By id or by name (names are unique within a tenant)."""
    dataset = session.scalar(select(m.Dataset).where((m.Dataset.id == ref) | (m.Dataset.name == ref)))
    if dataset is None:
        raise NotFound(f"No dataset '{ref}'", param="dataset_id")
    return dataset


def list_datasets(session: Session) -> list[m.Dataset]:
    return list(session.scalars(select(m.Dataset).order_by(m.Dataset.created_at.desc())))


def versions_of(session: Session, dataset: m.Dataset) -> list[m.DatasetVersion]:
    return list(
        session.scalars(
            select(m.DatasetVersion).where(m.DatasetVersion.dataset_id == dataset.id).order_by(m.DatasetVersion.number)
        )
    )


def get_version(session: Session, dataset: m.Dataset, number: int | None = None) -> m.DatasetVersion:
    """Version `number`, or the newest one."""
    query = select(m.DatasetVersion).where(m.DatasetVersion.dataset_id == dataset.id)
    if number is None:
        version = session.scalar(query.order_by(m.DatasetVersion.number.desc()).limit(1))
    else:
        version = session.scalar(query.where(m.DatasetVersion.number == number))
    if version is None:
        raise NotFound(f"Dataset '{dataset.name}' has no version {number}", param="version")
    return version


def ready_version(session: Session, dataset: m.Dataset, number: int | None) -> m.DatasetVersion:
    version = get_version(session, dataset, number)
    if version.status != "ready":
        raise InvalidRequest(
            f"Version {version.number} of '{dataset.name}' is {version.status}"
            + (f": {version.error}" if version.error else "; wait until it is ready"),
            param="version",
        )
    return version


# Report fields that quote record text (PII snippets, validation messages): stored sealed with the tenant's key.
SEALED_REPORT_FIELDS = (("pii", "examples"), ("validation", "errors"), ("validation", "summary"))


def seal_report(key: DataKey, report: dict[str, Any], version_id: str) -> dict[str, Any]:
    sealed = {part: dict(value) if isinstance(value, dict) else value for part, value in report.items()}
    for part, name in SEALED_REPORT_FIELDS:
        if isinstance(sealed.get(part), dict) and name in sealed[part]:
            text = json.dumps(sealed[part][name])
            sealed[part][name] = {"sealed": key.seal_text(text, f"dataset_versions.report.{part}.{name}|{version_id}")}
    return sealed


def open_report(key: DataKey, report: dict[str, Any] | None, version_id: str) -> dict[str, Any] | None:
    """A version's report as it was made (the sealed fields opened)."""
    if not report:
        return report
    opened = {part: dict(value) if isinstance(value, dict) else value for part, value in report.items()}
    for part, name in SEALED_REPORT_FIELDS:
        value = opened.get(part, {}).get(name) if isinstance(opened.get(part), dict) else None
        if isinstance(value, dict) and set(value) == {"sealed"}:
            context = f"dataset_versions.report.{part}.{name}|{version_id}"
            opened[part][name] = json.loads(key.open_text(value["sealed"], context))
    return opened


def iter_records(blobs: BlobStore, tenant_id: str, sha256: str) -> Iterator[tuple[int, dict]]:
    with blobs.open(tenant_id, sha256) as handle:
        for index, line in enumerate(handle):
            yield index, json.loads(line)


def preview(blobs: BlobStore, version: m.DatasetVersion, *, offset: int, limit: int) -> list[dict]:
    out = []
    for index, record in iter_records(blobs, version.tenant_id, version.sha256):
        if index >= offset + limit:
            break
        if index >= offset:
            out.append(record)
    return out


# --- creating ------------------------------------------------------------------------------------


def check_name(name: str) -> str:
    """A dataset's name is a label shown everywhere (pages, exports, the CLI), never a path: 1-128 printable
    characters, without control characters or path separators. The name without surrounding spaces."""
    name = name.strip()
    if not 1 <= len(name) <= 128 or not name.isprintable() or "/" in name or "\\" in name:
        raise InvalidRequest(
            "name must be 1-128 printable characters, without control characters, '/' or '\\'", param="name"
        )
    return name


def create_dataset(session: Session, principal: Principal, *, name: str, card: dict[str, Any]) -> m.Dataset:
    name = check_name(name)
    if session.scalar(select(m.Dataset).where(m.Dataset.name == name)):
        raise Conflict(f"A dataset named '{name}' already exists; upload a new version to it instead", param="name")
    dataset = m.Dataset(id=new_id("ds_"), name=name, created_by=principal.user_id)
    update_card(session, dataset, card)
    session.add(dataset)
    session.flush()
    return dataset


def update_card(session: Session, dataset: m.Dataset, card: dict[str, Any]) -> m.Dataset:
    unknown = set(card) - set(CARD_FIELDS)
    if unknown:
        raise InvalidRequest(f"unknown card field(s): {', '.join(sorted(unknown))}", param=sorted(unknown)[0])
    if isinstance(card.get("name"), str):
        card = {**card, "name": check_name(card["name"])}
    if "name" in card and card["name"] != dataset.name:
        clash = session.scalar(select(m.Dataset).where(m.Dataset.name == card["name"], m.Dataset.id != dataset.id))
        if clash is not None:
            raise Conflict(f"A dataset named '{card['name']}' already exists", param="name")
    for field, value in card.items():
        if value is not None:
            setattr(dataset, field, value)
    dataset.updated_at = time.time()
    return dataset


def parse_mapping(raw: str | dict | None) -> dict[str, str] | None:
    """`prompt=question,response=answer` or a JSON object → the column mapping of a CSV/TSV upload."""
    if raw is None or raw == "":
        return None
    if isinstance(raw, str):
        raw = raw.strip()
        if raw.startswith("{"):
            try:
                raw = loads(raw, max_depth=1)  # one flat object of column names
            except UntrustedJSONError as exc:
                raise InvalidRequest(
                    f"mapping must be a flat JSON object of column names: {exc}", param="mapping"
                ) from exc
            if not all(isinstance(v, str) for v in raw.values()):
                raise InvalidRequest("mapping must name a column (a string) for each field", param="mapping")
        else:
            pairs = [part.split("=", 1) for part in raw.split(",") if part.strip()]
            if any(len(p) != 2 for p in pairs):
                raise InvalidRequest("mapping must look like prompt=question,response=answer", param="mapping")
            raw = {k.strip(): v.strip() for k, v in pairs}
    fields = set(ColumnMapping.__dataclass_fields__)
    unknown = set(raw) - fields
    if unknown:
        raise InvalidRequest(
            f"unknown mapping field(s) {', '.join(sorted(unknown))}; use {', '.join(sorted(fields))}", param="mapping"
        )
    return dict(raw)


def _next_number(session: Session, dataset: m.Dataset) -> int:
    latest = session.scalar(select(func.max(m.DatasetVersion.number)).where(m.DatasetVersion.dataset_id == dataset.id))
    return (latest or 0) + 1


def add_upload(
    session: Session,
    dataset: m.Dataset,
    blob: StoredBlob,
    *,
    filename: str | None,
    fmt: str | None,
    mapping: dict[str, str] | None,
    model: str | None,
) -> m.DatasetVersion:
    if fmt is not None and fmt not in FORMATS:
        raise InvalidRequest(f"format must be one of {', '.join(FORMATS)}", param="format")
    version = m.DatasetVersion(
        id=new_id("dsv_"),
        dataset_id=dataset.id,
        number=_next_number(session, dataset),
        operation="upload",
        params={k: v for k, v in {"format": fmt, "mapping": mapping, "model": model}.items() if v},
        source_filename=filename,
        source_sha256=blob.sha256,
        source_bytes=blob.size,
    )
    session.add(version)
    session.flush()
    return version


def add_feedback_version(
    session: Session,
    principal: Principal,
    blob: StoredBlob,
    *,
    name: str,
    kind: str,
    model: str | None,
    lineage: list[dict[str, Any]],
    skipped: dict[str, int],
    only_model: str | None = None,
) -> tuple[m.Dataset, m.DatasetVersion]:
    """A version made of feedback records (`services.feedback.curate`): validated like an upload, its params
    keep where each record came from (`lineage[i]` is line i + 1 of the source)."""
    existing = session.scalar(select(m.Dataset).where(m.Dataset.name == check_name(name)))
    card = {"source": "feedback on answers (Adaptery feedback loop)"}
    dataset = existing or create_dataset(session, principal, name=name, card=card)
    fmt = "openai-preference" if kind == "dpo" else "openai-chat"
    if model is None and only_model is not None:
        answering = session.scalar(select(m.Adapter.base_model).where(m.Adapter.id == only_model))
        model = answering or only_model
    params = {"format": fmt, "kind": kind, "model": model, "only_model": only_model}
    version = m.DatasetVersion(
        id=new_id("dsv_"),
        dataset_id=dataset.id,
        number=_next_number(session, dataset),
        operation="feedback",
        params={**{k: v for k, v in params.items() if v}, "lineage": lineage, "skipped": skipped},
        source_filename=f"feedback-{kind}.jsonl",
        source_sha256=blob.sha256,
        source_bytes=blob.size,
    )
    session.add(version)
    session.flush()
    return dataset, version


def start_operation(
    session: Session, dataset: m.Dataset, parent_number: int | None, operation: str, params: dict[str, Any]
) -> list[m.DatasetVersion]:
    """Check the parameters now (400 before any work) and create the version(s) it will fill."""
    parent = ready_version(session, dataset, parent_number)
    if operation == "dedup":
        params = {"threshold": 0.8, "num_perm": 128, "near": True, **params}
        if not isinstance(params["threshold"], int | float) or not 0 < params["threshold"] <= 1:
            raise InvalidRequest("threshold must be a number in (0, 1]", param="threshold")
        if not isinstance(params["num_perm"], int) or not 16 <= params["num_perm"] <= 1024:
            raise InvalidRequest("num_perm must be an integer from 16 to 1024", param="num_perm")
        operations = ["dedup"]
    elif operation == "scrub":
        kinds = params.get("kinds") or list(pii.KINDS)
        bad = [k for k in kinds if k not in pii.KINDS]
        if bad:
            raise InvalidRequest(f"unknown PII kind(s) {', '.join(bad)}; known: {', '.join(pii.KINDS)}", param="kinds")
        params = {"kinds": list(kinds)}
        operations = ["scrub"]
    elif operation == "split":
        params = {"validation_fraction": 0.1, "seed": 42, **params}
        fraction, seed = params["validation_fraction"], params["seed"]
        if not isinstance(fraction, int | float) or not 0 < fraction <= 0.5:
            raise InvalidRequest("validation_fraction must be in (0, 0.5]", param="validation_fraction")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
            raise InvalidRequest(f"seed must be an integer between 0 and {MAX_SEED}", param="seed")
        if (parent.records or 0) < 2:
            raise InvalidRequest("a split needs at least 2 records", param="version")
        operations = ["split-train", "split-validation"]
    else:
        raise InvalidRequest(f"unknown operation '{operation}'", param="operation")
    unknown = set(params) - {"threshold", "num_perm", "near", "kinds", "validation_fraction", "seed"}
    if unknown:
        raise InvalidRequest(f"unknown parameter(s): {', '.join(sorted(unknown))}", param=sorted(unknown)[0])
    created = []
    number = _next_number(session, dataset)
    for offset, op in enumerate(operations):
        version = m.DatasetVersion(
            id=new_id("dsv_"),
            dataset_id=dataset.id,
            number=number + offset,
            parent_number=parent.number,
            operation=op,
            params=params,
            format=parent.format,
        )
        session.add(version)
        created.append(version)
    session.flush()
    return created


def undo_failed_creation(session: Session, key: DataKey, dataset_id: str) -> tuple[str, list[str]] | None:
    """The dataset an upload just created, removed if that upload gave no records (a file that failed as a
    whole, or one whose every record is invalid): returns why, and the blobs to release. None when it stays.

    A dataset is made by its first upload or not at all: nobody is left with an empty one to clean up."""
    dataset = session.scalar(select(m.Dataset).where(m.Dataset.id == dataset_id))
    versions = versions_of(session, dataset) if dataset is not None else []
    if len(versions) != 1 or versions[0].status == "processing" or versions[0].records:
        return None
    version = versions[0]
    name = version.source_filename or dataset.name
    if version.status == "failed":
        reason = f"Nothing was kept of '{name}': {version.error or 'it could not be read'}"
    else:
        report = open_report(key, version.report, version.id) or {}
        validation = report.get("validation") or {}
        problems = "; ".join(
            f"{error.get('unit') or 'line'} {error.get('line')}: "
            + (f"{error['field']}: " if error.get("field") else "")
            + str(error.get("message"))
            for error in (validation.get("errors") or [])[:5]
        )  # as `LineError` says it: line, field, message
        total = validation.get("records_total", 0)
        reason = f"Nothing was kept of '{name}': none of its {total} record(s) is valid" + (
            f" ({problems})" if problems else ""
        )
    return reason, delete_dataset(session, dataset)


def delete_dataset(session: Session, dataset: m.Dataset) -> list[str]:
    """Remove the dataset; returns the blobs its versions used, for the caller to release."""
    shas = [s for v in versions_of(session, dataset) for s in (v.sha256, v.source_sha256) if s]
    session.delete(dataset)
    return shas


def _export_name(dataset: m.Dataset, version: m.DatasetVersion) -> str:
    return f"{dataset.name}-v{version.number}.jsonl"


def exported_files(session: Session, dataset: m.Dataset, versions: list[m.DatasetVersion]) -> dict[int, m.File]:
    """The fine-tuning file each version was exported as (by version number), where it was."""
    wanted = {(v.sha256, _export_name(dataset, v)): v.number for v in versions if v.sha256}
    if not wanted:
        return {}
    found: dict[int, m.File] = {}
    candidates = session.scalars(
        select(m.File)
        .where(m.File.purpose == "fine-tune", m.File.sha256.in_({sha for sha, _ in wanted}))
        .order_by(m.File.created_at)
    )
    for record in candidates:
        number = wanted.get((record.sha256, record.filename))
        if number is not None:
            found.setdefault(number, record)
    return found


def export_version(session: Session, dataset: m.Dataset, number: int | None, *, allow_invalid: bool) -> m.File:
    """A fine-tuning file (`/v1/files`, purpose fine-tune) holding the version's records."""
    version = ready_version(session, dataset, number)
    invalid = (version.report or {}).get("validation", {}).get("records_invalid", 0)
    if invalid and not allow_invalid:
        raise InvalidRequest(
            f"Version {version.number} left out {invalid} invalid record(s) of the uploaded file; fix the file and "
            "upload it again, or export with allow_invalid=true to train on the valid records only",
            param="allow_invalid",
        )
    if not version.records:
        raise InvalidRequest(f"Version {version.number} has no records", param="version")
    existing = exported_files(session, dataset, [version]).get(version.number)
    if existing is not None:  # exported before: the same file again, not a second copy of the same data
        return existing
    record = m.File(
        id=new_id("file-"),
        filename=_export_name(dataset, version),
        purpose="fine-tune",
        bytes=version.bytes,
        sha256=version.sha256,
        records=version.records,
    )
    session.add(record)
    session.flush()
    return record


# --- the work ------------------------------------------------------------------------------------


class _Progress:
    """Writes a version's progress (records done) at most about once a second."""

    def __init__(self, db: Database, tenant_id: str, version_id: str) -> None:
        self.db, self.tenant_id, self.version_id = db, tenant_id, version_id
        self._last = 0.0

    def __call__(self, done: int) -> None:
        now = time.monotonic()
        if now - self._last < 1.0:
            return
        self._last = now
        with self.db.tenant(self.tenant_id) as s:
            version = s.get(m.DatasetVersion, self.version_id)
            if version is not None:
                version.progress = done


def _write_records(sink: Any, records: Iterator[dict]) -> int:
    count = 0
    for record in records:
        sink.write(json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode() + b"\n")
        count += 1
    return count


def run_version(
    db: Database,
    blobs: BlobStore,
    tenant_id: str,
    version_id: str,
    budget_for: Callable[[str | None], TokenBudget],
) -> None:
    """Do a version's work: fill its blob, stats and report; `failed` with a message on any error."""
    with db.tenant(tenant_id) as s:
        version = s.get(m.DatasetVersion, version_id)
        if version is None or version.status != "processing":
            return
        parent = None
        if version.parent_number is not None:
            parent = s.scalar(
                select(m.DatasetVersion).where(
                    m.DatasetVersion.dataset_id == version.dataset_id, m.DatasetVersion.number == version.parent_number
                )
            )
        operation, params = version.operation, dict(version.params)
        source_sha, source_name = version.source_sha256, version.source_filename
        parent_sha, parent_records = (parent.sha256, parent.records) if parent else (None, 0)
    progress = _Progress(db, tenant_id, version_id)
    try:
        budget = budget_for(params.get("model"))
        report: dict[str, Any] = {}
        fmt = None
        counted = array("I")  # token lengths found while validating, reused by the statistics

        def count_and_keep(record: dict[str, Any]) -> int:
            tokens = budget.count(record)
            counted.append(tokens)
            return tokens

        with blobs.writer(tenant_id) as sink:
            if operation in ("upload", "feedback"):
                with blobs.plaintext(tenant_id, source_sha) as path:  # parsers need a path (Parquet, CSV)
                    fmt = params.get("format") or detect_format(path, source_name)
                    mapping = ColumnMapping(**params["mapping"]) if params.get("mapping") else None
                    validation = validate_and_normalise(
                        path,
                        fmt,
                        sink,
                        limits=budget.limits,
                        mapping=mapping,
                        count_tokens=count_and_keep,
                        max_tokens=budget.context,
                        progress=progress,
                    )
                report["validation"] = {**validation.to_dict(), "model": budget.model}
            elif operation == "dedup":
                result = dedup.deduplicate(
                    iter_records(blobs, tenant_id, parent_sha),
                    threshold=params["threshold"],
                    num_perm=params["num_perm"],
                    near=params["near"],
                    progress=progress,
                )
                kept = set(result.keep)
                _write_records(sink, (r for i, r in iter_records(blobs, tenant_id, parent_sha) if i in kept))
                report["dedup"] = result.report.to_dict()
            elif operation == "scrub":
                scrubbed, pii_report = pii.scrub(
                    (r for _, r in iter_records(blobs, tenant_id, parent_sha)), params["kinds"], progress=progress
                )
                _write_records(sink, scrubbed)
                report["pii"] = pii_report.to_dict()
            else:  # split-train / split-validation
                train, validation_part = split_indices(
                    parent_records, validation_fraction=params["validation_fraction"], seed=params["seed"]
                )
                chosen = set(train if operation == "split-train" else validation_part)
                _write_records(sink, (r for i, r in iter_records(blobs, tenant_id, parent_sha) if i in chosen))
                report["split"] = {
                    "part": operation.removeprefix("split-"),
                    "records": len(chosen),
                    "of": parent_records,
                    **params,
                }
        blob = sink.blob
        records_again = (r for _, r in iter_records(blobs, tenant_id, blob.sha256))
        if operation in ("upload", "feedback"):  # only records within the context were kept, in order
            kept_counts = (tokens for tokens in counted if tokens <= budget.context)
            summary = stats.compute_stats(records_again, token_counts=kept_counts)
        else:
            summary = stats.compute_stats(records_again, count_tokens=budget.count)
        with db.tenant(tenant_id) as s:
            version = s.get(m.DatasetVersion, version_id)
            version.sha256, version.bytes = blob.sha256, blob.size
            version.records = summary["records"]
            version.stats = {**summary, "tokens_model": budget.model}
            version.report = seal_report(blobs.keyring.data_key(tenant_id), report, version_id)
            if fmt:
                version.format = fmt
            version.status = "ready"
            version.finished_at = time.time()
    except (FormatError, ValueError, KeyError, OSError) as exc:
        _fail(db, tenant_id, version_id, str(exc))
    except Exception as exc:  # reported on the version, never a version stuck in processing
        _fail(db, tenant_id, version_id, f"{type(exc).__name__}: {exc}")


def _fail(db: Database, tenant_id: str, version_id: str, message: str) -> None:
    with db.tenant(tenant_id) as s:
        version = s.get(m.DatasetVersion, version_id)
        version.status = "failed"
        version.error = message
        version.finished_at = time.time()


def pending_versions(system: Session) -> list[tuple[str, str, str]]:
    """(tenant, version, dataset) of every version still processing: at start, their work is run again."""
    return [
        (v.tenant_id, v.id, v.dataset_id)
        for v in system.scalars(select(m.DatasetVersion).where(m.DatasetVersion.status == "processing"))
    ]


class _Discard:
    """A sink for validation runs that only report."""

    def write(self, data: bytes) -> int:
        return len(data)


def check_chat_file(blobs: BlobStore, tenant_id: str, sha256: str, budget: TokenBudget) -> ValidationReport:
    """Validate stored chat JSONL as training would see it, against `budget`'s base model."""
    with blobs.plaintext(tenant_id, sha256) as path:
        return validate_and_normalise(
            path, "openai-chat", _Discard(), limits=budget.limits, count_tokens=budget.count, max_tokens=budget.context
        )


def validate_for_model(blobs: BlobStore, version: m.DatasetVersion, budget: TokenBudget) -> dict[str, Any]:
    """A version's records checked against a base model's context; the content is unchanged."""
    report = check_chat_file(blobs, version.tenant_id, version.sha256, budget)
    return {**report.to_dict(), "model": budget.model, "context": budget.context, "version": version.number}
