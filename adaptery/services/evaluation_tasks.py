"""lm-evaluation-harness tasks a tenant uploads: a YAML of a checked subset and its JSONL documents.

The harness would run code from a task file (`!function`, Jinja templates rendered unsandboxed, `process_results`)
and fetch data from the hub (`dataset_path`), so only a subset is accepted: `generate_until` (answers come from
chat completions), templates of `{{ field }}` placeholders only, the `exact_match` metric, no data source but the
uploaded documents. Each is checked here at upload; the agent writes the harness's YAML from the checked form.
"""

from __future__ import annotations

import io
import re
from typing import Any

import yaml
from sqlalchemy import select
from sqlalchemy.orm import Session

from adaptery.auth.principal import Principal
from adaptery.data.untrusted import LineTooLong, RecordLimits, UntrustedJSONError, bounded_lines, loads
from adaptery.db import models as m
from adaptery.db.ids import new_id
from adaptery.services.errors import InvalidRequest, NotFound
from adaptery.storage.blobs import BlobStore

TASK_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_\-]{0,63}$")
# The templates a tenant's task may use: text with {{ field }} placeholders, nothing else (the harness renders
# them with an unsandboxed Jinja environment, so no expression, filter or statement may reach it).
PLACEHOLDER = re.compile(r"{{\s*([A-Za-z_][A-Za-z0-9_]*)\s*}}")
TASK_KEYS = {
    "task", "output_type", "doc_to_text", "doc_to_target", "description", "target_delimiter",
    "generation_kwargs", "metric_list",
}  # fmt: skip
METRICS = {"exact_match"}
METRIC_OPTIONS = {"metric", "aggregation", "higher_is_better", "ignore_case", "ignore_punctuation"}
GENERATION_OPTIONS = {"until", "max_gen_toks"}
MAX_TASK_YAML_BYTES = 64 * 1024
MAX_TASK_RECORDS = 10_000
MAX_TASK_YAML_DEPTH = 16  # the accepted subset nests three deep; the YAML composer recurses per level


def _placeholders(template: Any, key: str) -> set[str]:
    if not isinstance(template, str) or not template.strip():
        raise InvalidRequest(f"task file: '{key}' must be a text template", param="config")
    if "{%" in template or "{#" in template or PLACEHOLDER.sub("", template).count("{{"):
        raise InvalidRequest(
            f"task file: '{key}' may only use {{{{ field }}}} placeholders (no expressions, filters or statements)",
            param="config",
        )
    return set(PLACEHOLDER.findall(template))


def _check_depth(text: str) -> None:
    """Refuse YAML nested deeper than MAX_TASK_YAML_DEPTH before composing it: the parser's events come without
    recursion, the composer's nodes do not (thousands of `[` would end in a RecursionError)."""
    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_TASK_YAML_DEPTH:
                mark = event.start_mark
                raise InvalidRequest(
                    f"task file: nested deeper than {MAX_TASK_YAML_DEPTH} levels at line {mark.line + 1}, "
                    f"column {mark.column + 1}",
                    param="config",
                )
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


def check_task(text: str) -> tuple[dict[str, Any], set[str]]:
    """The checked task configuration of a YAML task file, and the fields its templates read."""
    if len(text.encode()) > MAX_TASK_YAML_BYTES:
        raise InvalidRequest(f"task file: larger than {MAX_TASK_YAML_BYTES} bytes", param="config")
    try:
        _check_depth(text)
        config = yaml.safe_load(text)
    except yaml.YAMLError as exc:  # !function and other tags are refused here too: safe_load knows none
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        raise InvalidRequest(f"task file is not valid YAML{at}: {getattr(exc, 'problem', None) or exc}",
                             param="config") from None  # fmt: skip
    if not isinstance(config, dict):
        raise InvalidRequest("task file: expected a YAML mapping (task:, doc_to_text:, ...)", param="config")
    unknown = sorted(set(config) - TASK_KEYS)
    if unknown:
        raise InvalidRequest(
            f"task file: unsupported key(s) {', '.join(map(str, unknown))}; allowed: {', '.join(sorted(TASK_KEYS))} "
            "(the data comes from the uploaded JSONL, never from a hub)",
            param="config",
        )
    name = config.get("task")
    if not isinstance(name, str) or not TASK_NAME.match(name):
        raise InvalidRequest(
            "task file: 'task' must be a name of letters, digits, _ and - (at most 64)", param="config"
        )
    if config.get("output_type", "generate_until") != "generate_until":
        raise InvalidRequest(
            "task file: only output_type generate_until is supported (answers come from chat completions)",
            param="config",
        )
    fields = _placeholders(config.get("doc_to_text"), "doc_to_text") | _placeholders(
        config.get("doc_to_target"), "doc_to_target"
    )
    for key in ("description", "target_delimiter"):
        if key in config and not isinstance(config[key], str):
            raise InvalidRequest(f"task file: '{key}' must be text", param="config")
    if "target_delimiter" in config and any(mark in config["target_delimiter"] for mark in ("{{", "{%", "{#")):
        raise InvalidRequest("task file: 'target_delimiter' must be plain text (no template syntax)", param="config")
    if "description" in config:
        fields |= _placeholders(config["description"] or " ", "description") if "{" in config["description"] else set()
    generation = config.get("generation_kwargs", {})
    if not isinstance(generation, dict) or set(generation) - GENERATION_OPTIONS:
        raise InvalidRequest(f"task file: generation_kwargs may set {', '.join(sorted(GENERATION_OPTIONS))}",
                             param="config")  # fmt: skip
    until = generation.get("until", [])
    if not isinstance(until, list) or not all(isinstance(u, str) for u in until):
        raise InvalidRequest("task file: generation_kwargs.until must be a list of strings", param="config")
    if any(mark in u for u in until for mark in ("{{", "{%", "{#")):
        raise InvalidRequest("task file: generation_kwargs.until must be plain text (no template syntax)",
                             param="config")  # fmt: skip
    max_gen = generation.get("max_gen_toks", 64)
    if isinstance(max_gen, bool) or not isinstance(max_gen, int) or not 1 <= max_gen <= 1024:
        raise InvalidRequest("task file: generation_kwargs.max_gen_toks must be 1..1024", param="config")
    metric_list = config.get("metric_list", [{"metric": "exact_match"}])
    if not isinstance(metric_list, list) or not metric_list:
        raise InvalidRequest("task file: metric_list must be a non-empty list", param="config")
    for metric in metric_list:
        if not isinstance(metric, dict) or metric.get("metric") not in METRICS or set(metric) - METRIC_OPTIONS:
            raise InvalidRequest(
                f"task file: each metric is {{metric: {'|'.join(sorted(METRICS))}}} with "
                f"{', '.join(sorted(METRIC_OPTIONS - {'metric'}))}",
                param="config",
            )
        if metric.get("aggregation", "mean") != "mean":
            raise InvalidRequest("task file: a metric's aggregation must be mean", param="config")
    checked = {
        "task": name,
        "output_type": "generate_until",
        "doc_to_text": config["doc_to_text"],
        "doc_to_target": config["doc_to_target"],
        "generation_kwargs": {"until": until, "max_gen_toks": max_gen, "do_sample": False, "temperature": 0.0},
        "metric_list": [{"aggregation": "mean", "higher_is_better": True, **metric} for metric in metric_list],
    }
    for key in ("description", "target_delimiter"):
        if key in config:
            checked[key] = config[key]
    return checked, fields


def check_task_data(data: bytes, fields: set[str], limits: RecordLimits) -> int:
    """How many documents a task's JSONL holds; an error names the line and the field."""
    count = 0
    for number, raw in enumerate(bounded_lines(io.BytesIO(data), limits.max_bytes), start=1):
        if isinstance(raw, LineTooLong):
            raise InvalidRequest(f"data line {number}: {limits.too_large(raw.size)}", param="data")
        if not raw.strip():
            continue
        try:
            record = loads(raw.rstrip(b"\r\n"), max_depth=limits.max_depth)
        except UntrustedJSONError as exc:
            raise InvalidRequest(f"data line {number}: {exc}", param="data") from None
        if not isinstance(record, dict):
            raise InvalidRequest(f"data line {number}: each line must be a JSON object", param="data")
        for name in sorted(fields):
            if not isinstance(record.get(name), str | int | float) or isinstance(record.get(name), bool):
                raise InvalidRequest(f"data line {number}: field '{name}' (used by the task) is missing or not "
                                     "text", param="data")  # fmt: skip
        count += 1
        if count > MAX_TASK_RECORDS:
            raise InvalidRequest(f"data: more than {MAX_TASK_RECORDS} documents", param="data")
    if count == 0:
        raise InvalidRequest("data: no documents (one JSON object per line)", param="data")
    return count


def create_task(
    session: Session, blobs: BlobStore, who: Principal, config_text: str, data: bytes, limits: RecordLimits
) -> m.EvaluationTask:
    config, fields = check_task(config_text)
    records = check_task_data(data, fields, limits)
    if session.scalar(select(m.EvaluationTask).where(m.EvaluationTask.name == config["task"])) is not None:
        raise InvalidRequest(f"a task named '{config['task']}' exists already; name this one differently",
                             param="config", code="conflict")  # fmt: skip
    stored = blobs.put_stream(who.tenant_id, [data])
    task = m.EvaluationTask(
        id=new_id("evtask-"),
        name=config["task"],
        config=config,
        data_sha256=stored.sha256,
        records=records,
        created_by=who.user_id,
    )
    session.add(task)
    session.flush()
    return task


def get_task(session: Session, name_or_id: str) -> m.EvaluationTask:
    task = session.scalar(
        select(m.EvaluationTask).where((m.EvaluationTask.name == name_or_id) | (m.EvaluationTask.id == name_or_id))
    )
    if task is None:
        raise NotFound(f"No evaluation task '{name_or_id}'", param="task")
    return task


def list_tasks(session: Session) -> list[m.EvaluationTask]:
    return list(session.scalars(select(m.EvaluationTask).order_by(m.EvaluationTask.created_at.desc())))
