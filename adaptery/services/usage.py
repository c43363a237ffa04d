"""The accounting ledger: what every tenant, user, API key, model and agent used, by day, and what it cost.

Every path that uses something writes here, in the same transaction as the limits' own accounting
(`services.limits`): a completion or chat call when it settles (whether it finished, failed after its first
token or lost its client: the tokens it really produced, its n choices together, one request), an embeddings
call, a fine-tuning job's trained tokens when it ends (`limits.settle_training`), an evaluation's generated tokens
(kind `evaluations`, apart from chat: an lm-eval run's calls through /v1 as they settle, a held-out run's when it
finishes, `limits.charge_evaluation`), and the CPU, accelerator and wall seconds an agent measured for each attempt
of a job. Rows are sums per (day, tenant, user, key, model,
agent, kind), only ever added to by a conditional upsert, so several server processes write one exact ledger.

Prices are the platform's (`Settings.usage_prices`, per million tokens and per compute hour) and are applied
when the ledger is read: changing a price re-prices the past, which is what an institution's own chargeback
wants. The admin API gives the ledger in the shape of OpenAI's organization usage and costs endpoints (daily
buckets, `group_by`), as CSV, and /metrics exposes the same sums as Prometheus counters read from these rows.
"""

from __future__ import annotations

import csv
import datetime as dt
import functools
import io
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from adaptery.db import models as m
from adaptery.db.session import Database
from adaptery.services.audit import csv_cell
from adaptery.services.errors import InvalidRequest

LEDGER_KEY = ("day", "tenant_id", "user_id", "api_key_id", "model", "agent_id", "kind")  # a row per these
KINDS = ("completions", "embeddings", "fine_tuning", "compute", "evaluations")
GENERATED = ("completions", "evaluations")  # kinds whose rows hold prompt and completion tokens
COUNTS = (
    "requests",
    "failed_requests",
    "prompt_tokens",
    "completion_tokens",
    "trained_tokens",
    "cpu_seconds",
    "accelerator_seconds",
    "wall_seconds",
)
DIMENSIONS = ("user_id", "api_key_id", "model", "agent_id")
DAY = 86400
MAX_BUCKETS = 31
COMPUTE_PRICES = "compute"  # the key of `usage_prices` that prices agent seconds


@dataclass(frozen=True)
class Use:
    """Who used what, where: the dimensions of a ledger row ("" where one does not apply)."""

    tenant_id: str
    kind: str
    user_id: str = ""
    api_key_id: str = ""
    model: str = ""
    agent_id: str = ""


def day_of(now: float) -> str:
    return dt.datetime.fromtimestamp(now, dt.UTC).strftime("%Y-%m-%d")


def day_start(day: str) -> int:
    return int(dt.datetime.strptime(day, "%Y-%m-%d").replace(tzinfo=dt.UTC).timestamp())


def add(session: Session, use: Use, now: float, **amounts: float) -> None:
    """Add `amounts` (names from COUNTS) to the row of `use` on the day of `now`."""
    if use.kind not in KINDS:
        raise ValueError(f"unknown usage kind {use.kind!r}")
    amounts = {name: value for name, value in amounts.items() if value}
    if not amounts:
        return
    unknown = set(amounts) - set(COUNTS)
    if unknown:
        raise ValueError(f"unknown usage counts {sorted(unknown)}")
    key = {
        "day": day_of(now),
        "tenant_id": use.tenant_id,
        "user_id": use.user_id or "",
        "api_key_id": use.api_key_id or "",
        "model": (use.model or "")[:255],
        "agent_id": use.agent_id or "",
        "kind": use.kind,
    }
    # one statement (every inference request writes one): the day's row made or added to
    session.execute(_upsert(session.get_bind().dialect.name), key | {name: amounts.get(name, 0) for name in COUNTS})


@functools.cache
def _upsert(dialect: str) -> Any:
    """INSERT a day's row, or add its counts to the row there (ON CONFLICT, in SQLite and PostgreSQL alike): built
    once, values as parameters, so that a call pays for the SQL rather than for building and keying a statement."""
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    table = m.UsageRecord.__table__
    statement = insert(table)
    return statement.on_conflict_do_update(
        index_elements=[table.c[name] for name in LEDGER_KEY],
        set_={name: table.c[name] + statement.excluded[name] for name in COUNTS},
    )


# --- reading -----------------------------------------------------------------------------------------------


def _window(start_time: int, end_time: int | None, now: float) -> tuple[int, int]:
    start = start_time - start_time % DAY
    end = end_time if end_time is not None else int(now) - int(now) % DAY + DAY
    if end <= start_time:
        raise InvalidRequest("end_time must be after start_time", param="end_time")
    return start, end


def records(
    session: Session, tenant_id: str | None, start: int, end: int, kinds: Iterable[str] = KINDS
) -> list[m.UsageRecord]:
    """The ledger's rows of `tenant_id` (None: every tenant) for the days that start within [start, end)."""
    query = select(m.UsageRecord).where(
        m.UsageRecord.day >= day_of(start), m.UsageRecord.day <= day_of(end - 1), m.UsageRecord.kind.in_(list(kinds))
    )
    if tenant_id is not None:
        query = query.where(m.UsageRecord.tenant_id == tenant_id)
    return list(session.scalars(query.order_by(m.UsageRecord.day)))


@dataclass(frozen=True)
class Prices:
    """The platform's price list: per million tokens by model (an adapter falls back to its base), per hour of
    compute."""

    table: dict[str, dict[str, float]]
    currency: str
    bases: dict[str, str]  # adapter model id -> its base model id

    def per_token(self, model: str, kind: str) -> float:
        entry = self.table.get(model) or self.table.get(self.bases.get(model, ""), {})
        return entry.get(kind, 0.0) / 1_000_000

    def per_second(self, kind: str) -> float:
        return self.table.get(COMPUTE_PRICES, {}).get(kind, 0.0) / 3600

    def line_items(self, row: m.UsageRecord) -> dict[str, float]:
        """What `row` cost, by line item ("<model>, <what>")."""
        items: dict[str, float] = {}

        def put(name: str, amount: float) -> None:
            if amount:
                items[name] = items.get(name, 0.0) + amount

        if row.kind == "completions":
            put(f"{row.model}, input", row.prompt_tokens * self.per_token(row.model, "prompt"))
            put(f"{row.model}, output", row.completion_tokens * self.per_token(row.model, "completion"))
        elif row.kind == "evaluations":  # priced as chat is, its own line items
            put(f"{row.model}, evaluation input", row.prompt_tokens * self.per_token(row.model, "prompt"))
            put(f"{row.model}, evaluation output", row.completion_tokens * self.per_token(row.model, "completion"))
        elif row.kind == "embeddings":
            put(f"{row.model}, input", row.prompt_tokens * self.per_token(row.model, "embedding"))
        elif row.kind == "fine_tuning":
            put(f"{row.model}, training", row.trained_tokens * self.per_token(row.model, "trained"))
        elif row.kind == "compute":
            put("compute, cpu", row.cpu_seconds * self.per_second("cpu"))
            put("compute, accelerator", row.accelerator_seconds * self.per_second("accelerator"))
        return items

    def cost(self, row: m.UsageRecord) -> float:
        return sum(self.line_items(row).values())


def prices(session: Session, table: dict[str, dict[str, float]], currency: str) -> Prices:
    bases = dict(session.execute(select(m.Adapter.id, m.Adapter.base_model)).all()) if table else {}
    return Prices(table, currency, bases)


def token_prices(session: Session, table: dict[str, dict[str, float]], model: str, kind: str) -> tuple[float, float]:
    """(prompt, completion) price per token of one call to `model` (an adapter: its base's unless listed)."""
    adapter = session.get(m.Adapter, model) if model not in table else None
    price_list = Prices(table, "", {model: adapter.base_model} if adapter is not None else {})
    if kind == "embeddings":
        return price_list.per_token(model, "embedding"), 0.0
    return price_list.per_token(model, "prompt"), price_list.per_token(model, "completion")


def cost_between(session: Session, tenant_id: str, table: dict[str, dict[str, float]], start: int, end: int) -> float:
    price_list = prices(session, table, "")
    return sum(price_list.cost(row) for row in records(session, tenant_id, start, end))


def _generated(r: dict[str, Any]) -> dict[str, Any]:
    return {
        "input_tokens": r["prompt_tokens"],
        "output_tokens": r["completion_tokens"],
        "input_cached_tokens": 0,
        "input_audio_tokens": 0,
        "output_audio_tokens": 0,
        "num_model_requests": r["requests"],
        "num_failed_requests": r["failed_requests"],
    }


_RESULT_FIELDS = {
    "completions": _generated,
    "evaluations": _generated,
    "embeddings": lambda r: {"input_tokens": r["prompt_tokens"], "num_model_requests": r["requests"]},
    "fine_tuning": lambda r: {"trained_tokens": r["trained_tokens"], "num_jobs": r["requests"]},
    "compute": lambda r: {
        "cpu_seconds": round(r["cpu_seconds"], 6),
        "accelerator_seconds": round(r["accelerator_seconds"], 6),
        "wall_seconds": round(r["wall_seconds"], 6),
        "num_attempts": r["requests"],
    },
}
GROUPS = {
    "completions": ("model", "user_id", "api_key_id", "project_id"),
    "embeddings": ("model", "user_id", "api_key_id", "project_id"),
    "fine_tuning": ("model", "user_id", "project_id"),
    "compute": ("model", "user_id", "agent_id", "project_id"),
    "evaluations": ("model", "user_id", "api_key_id", "agent_id", "project_id"),
    "costs": ("line_item", "project_id"),
}


def check_group_by(kind: str, group_by: list[str]) -> list[str]:
    allowed = GROUPS[kind]
    for name in group_by:
        if name not in allowed:
            raise InvalidRequest(
                f"Invalid group_by {name!r} for {kind}; choose among: {', '.join(allowed)}.", param="group_by"
            )
    return [name for name in group_by if name != "project_id"]  # one tenant is one project: nothing to split


def _sum(rows: Iterable[m.UsageRecord], group_by: list[str]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, ...], dict[str, Any]] = {}
    for row in rows:
        key = tuple(getattr(row, name) for name in group_by)
        entry = groups.setdefault(key, {**dict(zip(group_by, key, strict=True)), **{c: 0 for c in COUNTS}})
        for name in COUNTS:
            entry[name] += getattr(row, name)
    return [groups[key] for key in sorted(groups)]


@dataclass(frozen=True)
class Page:
    buckets: list[dict[str, Any]]
    next_page: str | None


def _bucket_starts(start: int, end: int, page: str | None, limit: int) -> tuple[list[int], str | None]:
    first = start
    if page is not None:
        if not page.isdigit() or not start <= int(page) < end:
            raise InvalidRequest("page is not a cursor of this query (use next_page as given)", param="page")
        first = int(page)
    starts = list(range(first, end, DAY))
    more = len(starts) > limit
    return starts[:limit], (str(starts[limit]) if more else None)


def usage_page(
    session: Session,
    tenant_id: str,
    kind: str,
    *,
    start_time: int,
    end_time: int | None,
    group_by: list[str],
    limit: int,
    page: str | None,
    now: float,
    filters: dict[str, list[str]] | None = None,
) -> dict[str, Any]:
    """OpenAI's organization usage page: one bucket a day, each with its results summed by `group_by`."""
    grouping = check_group_by(kind, group_by)
    start, end = _window(start_time, end_time, now)
    starts, next_page = _bucket_starts(start, end, page, min(limit, MAX_BUCKETS))
    rows = records(session, tenant_id, starts[0], starts[-1] + DAY, [kind]) if starts else []
    for name, wanted in (filters or {}).items():
        if wanted:
            rows = [row for row in rows if getattr(row, name) in wanted]
    by_day: dict[str, list[m.UsageRecord]] = {}
    for row in rows:
        by_day.setdefault(row.day, []).append(row)
    data = []
    for bucket in starts:
        results = []
        for summed in _sum(by_day.get(day_of(bucket), []), grouping):
            result = {"object": f"organization.usage.{kind}.result", **_RESULT_FIELDS[kind](summed)}
            for name in GROUPS[kind]:
                result[name] = summed.get(name) or None if name in grouping else None
            results.append(result)
        data.append({"object": "bucket", "start_time": bucket, "end_time": bucket + DAY, "results": results})
    return {"object": "page", "data": data, "has_more": next_page is not None, "next_page": next_page}


def costs_page(
    session: Session,
    tenant_id: str,
    price_list: Prices,
    *,
    start_time: int,
    end_time: int | None,
    group_by: list[str],
    limit: int,
    page: str | None,
    now: float,
) -> dict[str, Any]:
    """OpenAI's organization costs page: what each day cost, by line item if asked."""
    by_item = "line_item" in check_group_by("costs", group_by)
    start, end = _window(start_time, end_time, now)
    starts, next_page = _bucket_starts(start, end, page, min(limit, MAX_BUCKETS))
    rows = records(session, tenant_id, starts[0], starts[-1] + DAY) if starts else []
    data = []
    for bucket in starts:
        items: dict[str | None, float] = {}
        for row in rows:
            if row.day != day_of(bucket):
                continue
            for item, amount in price_list.line_items(row).items():
                name = item if by_item else None
                items[name] = items.get(name, 0.0) + amount
        results = [
            {
                "object": "organization.costs.result",
                "amount": {"value": round(amount, 9), "currency": price_list.currency},
                "line_item": item,
                "project_id": None,
            }
            for item, amount in sorted(items.items(), key=lambda pair: pair[0] or "")
        ]
        data.append({"object": "bucket", "start_time": bucket, "end_time": bucket + DAY, "results": results})
    return {"object": "page", "data": data, "has_more": next_page is not None, "next_page": next_page}


def summary(session: Session, tenant_id: str, price_list: Prices, start: int, end: int) -> dict[str, Any]:
    """The period's totals, and the same by day, model, user and key: what the admin page draws."""
    rows = records(session, tenant_id, start, end)
    usernames = _usernames(session, rows)

    def figures(group: list[m.UsageRecord]) -> dict[str, Any]:
        summed = _sum(group, [])
        entry = summed[0] if summed else {c: 0 for c in COUNTS}
        return {
            "requests": entry["requests"] - sum(r.requests for r in group if r.kind in ("fine_tuning", "compute")),
            "failed_requests": entry["failed_requests"],
            "prompt_tokens": sum(r.prompt_tokens for r in group if r.kind == "completions"),
            "completion_tokens": sum(r.completion_tokens for r in group if r.kind == "completions"),
            "embedding_tokens": sum(r.prompt_tokens for r in group if r.kind == "embeddings"),
            "evaluation_tokens": sum(r.prompt_tokens + r.completion_tokens for r in group if r.kind == "evaluations"),
            "trained_tokens": entry["trained_tokens"],
            "total_tokens": entry["prompt_tokens"] + entry["completion_tokens"] + entry["trained_tokens"],
            "cpu_seconds": round(entry["cpu_seconds"], 6),
            "accelerator_seconds": round(entry["accelerator_seconds"], 6),
            "cost": round(sum(price_list.cost(r) for r in group), 9),
        }

    def by(name: str) -> dict[str, dict[str, Any]]:
        groups: dict[str, list[m.UsageRecord]] = {}
        for row in rows:
            groups.setdefault(getattr(row, name), []).append(row)
        return {value: figures(group) for value, group in sorted(groups.items()) if value}

    users = by("user_id")
    return {
        "currency": price_list.currency,
        "totals": figures(rows),
        "by_day": by("day"),
        "by_model": by("model"),
        "by_user": {usernames.get(user_id, user_id): entry for user_id, entry in users.items()},
        "by_key": by("api_key_id"),
        "by_agent": by("agent_id"),
    }


def _usernames(session: Session, rows: list[m.UsageRecord]) -> dict[str, str]:
    ids = {row.user_id for row in rows if row.user_id}
    return dict(session.execute(select(m.User.id, m.User.username).where(m.User.id.in_(ids))).all()) if ids else {}


CSV_COLUMNS = ("day", "tenant_id", "user_id", "username", "api_key_id", "model", "agent_id", "kind", *COUNTS, "cost")


def csv_rows(session: Session, tenant_id: str, price_list: Prices, start: int, end: int) -> Iterator[str]:
    """The ledger's rows as CSV lines (a header first), with each row's cost."""
    rows = records(session, tenant_id, start, end)
    usernames = _usernames(session, rows)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in rows:
        values = {name: getattr(row, name) for name in CSV_COLUMNS if hasattr(m.UsageRecord, name)}
        values["username"] = usernames.get(row.user_id, "")
        values["cost"] = round(price_list.cost(row), 9)
        writer.writerow(csv_cell(values[name]) for name in CSV_COLUMNS)
    yield out.getvalue()


# --- Prometheus --------------------------------------------------------------------------------------------


class LedgerCollector(Collector):
    """The ledger's all-time sums as Prometheus counters, read from the database at each scrape: they agree with
    the ledger by construction, whichever process served the traffic."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def collect(self) -> Iterator[CounterMetricFamily]:
        record = m.UsageRecord
        with self.db.system() as s:
            rows = s.execute(
                select(record.kind, record.model, *(func.sum(getattr(record, c)) for c in COUNTS)).group_by(
                    record.kind, record.model
                )
            ).all()
        requests = CounterMetricFamily(
            "adaptery_usage_requests", "Requests served, from the usage ledger", labels=["kind", "model"]
        )
        failed = CounterMetricFamily(
            "adaptery_usage_failed_requests", "Requests that failed after they started", labels=["kind", "model"]
        )
        tokens = CounterMetricFamily(
            "adaptery_usage_tokens", "Tokens used, from the usage ledger", labels=["kind", "model", "type"]
        )
        seconds = CounterMetricFamily(
            "adaptery_usage_compute_seconds", "Agent compute seconds, from the usage ledger", labels=["model", "type"]
        )
        for kind, model, *sums in rows:
            counts = dict(zip(COUNTS, (value or 0 for value in sums), strict=True))
            if kind in ("completions", "embeddings", "evaluations"):
                requests.add_metric([kind, model], counts["requests"])
                failed.add_metric([kind, model], counts["failed_requests"])
                tokens.add_metric([kind, model, "prompt"], counts["prompt_tokens"])
            if kind in GENERATED:
                tokens.add_metric([kind, model, "completion"], counts["completion_tokens"])
            if kind == "fine_tuning":
                tokens.add_metric([kind, model, "trained"], counts["trained_tokens"])
            if kind == "compute":
                for name in ("cpu", "accelerator", "wall"):
                    seconds.add_metric([model, name], counts[f"{name}_seconds"])
        yield from (requests, failed, tokens, seconds)


def registry(db: Database) -> CollectorRegistry:
    collectors = CollectorRegistry(auto_describe=False)
    collectors.register(LedgerCollector(db))
    return collectors
