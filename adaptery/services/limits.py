"""Rate limits and budgets, per API key and per tenant, on one ledger in the database.

Every limit is a conditional UPDATE of a `usage_counters` row ("add this if the total stays within the
limit"): the database serialises concurrent writers, so the limits hold across any number of server
processes and no request can slip past a budget between a check and a write.

- requests/minute: counted when a request is authorized (`count_request`);
- tokens/minute, the monthly token budget and concurrent requests: an inference call `reserve`s its worst
  case (prompt + max_tokens, one concurrency slot) before it runs and `settle`s what it really used afterwards,
  as soon as it ends, whether it finished, failed or its client went away. A reservation whose process died
  is released by the next `reserve` after it expires (the engine's request deadline and a minute: a live
  request is never swept), counted as spent in full (so a crash can never be used to overshoot);
- fine-tuning: the tokens a finished job trained on are charged to the tenant's monthly budget, and a new
  job is refused once the budget is spent;
- evaluations: an lm-eval run's calls through /v1 are reserved and settled as any call is (the ledger marks them
  `evaluations`: the key is one minted for an evaluation); a held-out run generates on its agent, and what it
  reports having used is charged when it finishes (`charge_evaluation`): the tenant's month (and its cost, at the
  platform's prices) and the ledger, by the evaluation's creator, each model and the agent. A new evaluation is
  refused once the budget is spent;
- a tenant's monthly cost budget (`monthly_cost`, at the platform's prices): an inference call holds the cost
  of its worst case and settles what its tokens really cost, as the token budget does (in millionths of the
  currency, on the `cost:<month>` row). That row starts from the month's whole cost in the accounting ledger
  (fine-tuning and compute included) when the budget is first checked in a month; later fine-tuning and
  compute are not added to it (their prices are not known where a job ends), only a new job is refused once the
  budget is spent.

The month rows count every settled token, limited or not (a subject without a monthly budget holds nothing, and
its tokens are added when the call settles; a call that holds nothing at all is counted as a request then too, so
that `reserve` writes nothing for it), and each settlement also writes the accounting ledger
(`services.usage`) in the same transaction: the limits' month and the ledger agree.
"""

from __future__ import annotations

import datetime as dt
import functools
import math
import time
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import bindparam, delete, select, update
from sqlalchemy.orm import Session, aliased

from adaptery.auth.principal import Principal
from adaptery.db import models as m
from adaptery.db.ids import new_id
from adaptery.db.session import Database
from adaptery.services import usage as ledger
from adaptery.services.errors import InvalidRequest, RateLimited, Unauthenticated

LIMIT_FIELDS = (
    "requests_per_minute",
    "tokens_per_minute",
    "concurrent_streams",
    "monthly_tokens",
    "max_tokens",
    "max_upload_bytes",
    "monthly_cost",
)
EVALUATION_COUNTS = ("requests", "prompt_tokens", "completion_tokens")  # what a held-out run reports per model
TENANT_ONLY = ("max_tokens", "max_upload_bytes", "monthly_cost")  # limits a tenant has and its keys do not
KEY_LIMIT_FIELDS = tuple(f for f in LIMIT_FIELDS if f not in TENANT_ONLY)
MICROS = 1_000_000  # cost is counted in millionths of the currency


def clock() -> float:
    """The ledger's clock (one seam, so tests can move to the next minute without waiting for it)."""
    return time.time()


@dataclass(frozen=True)
class Limits:
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    concurrent_streams: int | None = None
    monthly_tokens: int | None = None
    max_tokens: int | None = None
    max_upload_bytes: int | None = None
    monthly_cost: float | None = None


@dataclass
class Reservation:
    id: str
    tokens: int
    holds: list[list[Any]] = field(default_factory=list)
    use: ledger.Use | None = None  # the ledger row the call is accounted to when it settles
    subjects: list[str] = field(default_factory=list)  # every limits subject it counts against
    token_prices: tuple[float, float] = (0.0, 0.0)  # (prompt, completion) per token, for a cost hold


def minute_period(now: float) -> str:
    return f"min:{int(now // 60)}"


def month_period(now: float) -> str:
    return "month:" + dt.datetime.fromtimestamp(now, dt.UTC).strftime("%Y-%m")


def _seconds_to_next_minute(now: float) -> float:
    return 60 - now % 60


def _seconds_to_next_month(now: float) -> float:
    day = dt.datetime.fromtimestamp(now, dt.UTC)
    first = dt.datetime(day.year + (day.month == 12), day.month % 12 + 1, 1, tzinfo=dt.UTC)
    return first.timestamp() - now


def tenant_limits(session: Session, tenant_id: str) -> Limits:
    row = session.get(m.TenantLimits, tenant_id)
    return Limits(**{f: getattr(row, f) for f in LIMIT_FIELDS}) if row else Limits()


@dataclass(frozen=True)
class CallerLimits:
    key: Limits  # the caller's API key's (none for a browser session)
    tenant: Limits
    evaluation_key: bool = False  # the key is one minted for an lm-eval run (`services.evaluation_queue`)
    requester_key: tuple[str, Limits] | None = None  # that run's: the key its evaluation was asked for with
    requester_gone: str | None = None  # why that key may no longer ask (revoked, expired, deleted): the run ends

    def subjects(self, who: Principal) -> list[tuple[str, str, Limits]]:
        """The caller's key, the key that asked for its evaluation (an lm-eval run's call), then the tenant: always
        in this order (keys before tenants; a minted key never asks for an evaluation), so no lock cycles."""
        subjects = _subjects(who, self.key, self.tenant)
        if self.requester_key is not None:
            key_id, lim = self.requester_key
            subjects.insert(-1, (f"key:{key_id}", "the API key that asked for this evaluation", lim))
        return subjects


def caller_limits(session: Session, who: Principal) -> CallerLimits:
    """The caller's key's and tenant's limits, and whether the key is an evaluation's, in one read (every inference
    call asks twice: when it is authorized and when it reserves)."""
    if who.api_key_id:
        row = session.execute(_caller_limits_query(), {"key_id": who.api_key_id, "tenant_id": who.tenant_id}).first()
        if row is not None:
            n, t = len(KEY_LIMIT_FIELDS), len(LIMIT_FIELDS)
            evaluation, asked_with, requester, revoked, expires = row[n + t : n + t + 5]
            requester_limits = Limits(**dict(zip(KEY_LIMIT_FIELDS, row[n + t + 5 :], strict=True)))
            gone = None
            if asked_with and requester is None:
                gone = "was deleted"
            elif revoked is not None:
                gone = "was revoked"
            elif expires is not None and expires <= clock():
                gone = "has expired"
            return CallerLimits(
                Limits(**dict(zip(KEY_LIMIT_FIELDS, row[:n], strict=True))),
                Limits(**dict(zip(LIMIT_FIELDS, row[n : n + t], strict=True))),
                evaluation is not None,
                (requester, requester_limits) if requester else None,
                gone,
            )
    return CallerLimits(Limits(), tenant_limits(session, who.tenant_id))


@functools.cache
def _caller_limits_query() -> Any:
    """Built once, values as parameters: building and keying it for every call cost more than running it."""
    requester = aliased(m.ApiKey)
    return (
        select(
            *[getattr(m.ApiKey, f) for f in KEY_LIMIT_FIELDS],
            *[getattr(m.TenantLimits, f) for f in LIMIT_FIELDS],
            m.Evaluation.id,  # the evaluation whose run the key was minted for, if it was
            m.Evaluation.requester_key_id,
            requester.id,
            requester.revoked_at,
            requester.expires_at,
            *[getattr(requester, f) for f in KEY_LIMIT_FIELDS],
        )
        .select_from(m.ApiKey)
        .outerjoin(m.TenantLimits, m.TenantLimits.tenant_id == bindparam("tenant_id"))
        .outerjoin(
            m.Evaluation, (m.Evaluation.api_key_id == m.ApiKey.id) & (m.Evaluation.tenant_id == m.ApiKey.tenant_id)
        )
        .outerjoin(
            requester, (requester.id == m.Evaluation.requester_key_id) & (requester.tenant_id == m.ApiKey.tenant_id)
        )
        .where(m.ApiKey.id == bindparam("key_id"))
        .limit(1)
    )


def upload_limit(session: Session, tenant_id: str, platform_limit: int) -> int:
    """The largest upload `tenant_id` may send: the platform's limit, or the tenant's if lower."""
    own = tenant_limits(session, tenant_id).max_upload_bytes
    return min(platform_limit, own) if own is not None else platform_limit


def set_tenant_limits(session: Session, tenant_id: str, values: dict[str, int | None]) -> m.TenantLimits:
    for name, value in values.items():
        if name not in LIMIT_FIELDS:
            raise InvalidRequest(f"unknown limit {name!r}", param=name)
        if value is not None and name == "monthly_cost" and not value > 0:
            raise InvalidRequest(f"{name} must be more than 0 (or null for no limit)", param=name)
        if value is not None and name != "monthly_cost" and value < 1:
            raise InvalidRequest(f"{name} must be at least 1 (or null for no limit)", param=name)
    row = session.get(m.TenantLimits, tenant_id) or m.TenantLimits(tenant_id=tenant_id)
    for name, value in values.items():
        setattr(row, name, value)
    row.updated_at = clock()
    session.add(row)
    session.flush()
    return row


def cost_period(now: float) -> str:
    return "cost:" + dt.datetime.fromtimestamp(now, dt.UTC).strftime("%Y-%m")


def _micros(amount: float) -> int:
    return round(amount * MICROS)


def _start_cost_month(session: Session, tenant_id: str, prices: dict[str, dict[str, float]], now: float) -> None:
    """The month's cost row, made once from what the accounting ledger says the month cost so far (so a budget
    set mid-month, and fine-tuning and compute, count)."""
    subject, period = f"tenant:{tenant_id}", cost_period(now)
    if session.get(m.UsageCounter, (subject, period)) is not None:
        return
    month_start = dt.datetime.fromtimestamp(now, dt.UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    spent = ledger.cost_between(session, tenant_id, prices, int(month_start.timestamp()), int(now) + 1)
    if session.get_bind().dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    session.execute(
        insert(m.UsageCounter)
        .values(subject=subject, period=period, requests=0, tokens=_micros(spent), reserved=0)
        .on_conflict_do_nothing()
    )


def _ensure_row(session: Session, subject: str, period: str) -> None:
    if session.get_bind().dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    created = session.execute(
        insert(m.UsageCounter)
        .values(subject=subject, period=period, requests=0, tokens=0, reserved=0)
        .on_conflict_do_nothing()
    ).rowcount
    if created and period.startswith("min:"):  # a new minute: the subject's older minutes are history
        session.execute(
            delete(m.UsageCounter).where(
                m.UsageCounter.subject == subject, m.UsageCounter.period.like("min:%"), m.UsageCounter.period < period
            )
        )


def claim_once(session: Session, subject: str, period: str) -> bool:
    """True the first time (subject, period) is claimed, whoever asks, in any process; False after."""
    if session.get(m.UsageCounter, (subject, period)) is not None:
        return False
    _ensure_row(session, subject, period)
    counter = m.UsageCounter
    claimed = session.execute(
        update(counter)
        .where(counter.subject == subject, counter.period == period, counter.requests == 0)
        .values(requests=1)
    ).rowcount
    return claimed == 1


def _take(session: Session, subject: str, period: str, column: str, amount: int, limit: int, *, total: Any) -> bool:
    """Add `amount` to `column` if `total + amount` stays within `limit`; False (nothing written) if not."""
    _ensure_row(session, subject, period)
    counter = m.UsageCounter
    result = session.execute(
        update(counter)
        .where(counter.subject == subject, counter.period == period, total + amount <= limit)
        .values({column: getattr(counter, column) + amount})
    )
    return result.rowcount == 1


def _add(session: Session, subject: str, period: str, **amounts: int) -> None:
    counter = m.UsageCounter
    if period.startswith("min:"):  # a new minute clears the older ones (`_ensure_row`)
        _ensure_row(session, subject, period)
        session.execute(
            update(counter)
            .where(counter.subject == subject, counter.period == period)
            .values({name: getattr(counter, name) + amount for name, amount in amounts.items()})
        )
        return
    # one statement, not an insert and an update: two of these run for every inference request
    counts = {"requests": 0, "tokens": 0, "reserved": 0} | amounts
    session.execute(_upsert(session.get_bind().dialect.name), {"subject": subject, "period": period, **counts})


@functools.cache
def _upsert(dialect: str) -> Any:
    """INSERT a counter's row, or add to the row there: built once, values as parameters (building and keying a
    statement for every call cost more than running it)."""
    from sqlalchemy.dialects import postgresql, sqlite

    table = m.UsageCounter.__table__
    statement = (postgresql if dialect == "postgresql" else sqlite).insert(table)
    return statement.on_conflict_do_update(
        index_elements=[table.c.subject, table.c.period],
        set_={name: table.c[name] + statement.excluded[name] for name in ("requests", "tokens", "reserved")},
    )


def _subjects(who: Principal, key: Limits, tenant: Limits) -> list[tuple[str, str, Limits]]:
    """(subject, label, limits): the key first, then the tenant, always in this order (no lock cycles)."""
    out = []
    if who.api_key_id:
        out.append((f"key:{who.api_key_id}", "this API key", key))
    out.append((f"tenant:{who.tenant_id}", "your organization", tenant))
    return out


def count_request(s: Session, who: Principal) -> CallerLimits:
    """Requests per minute, per key and per tenant, in the system session `s` (the caller's authentication's); a
    429 with Retry-After past either. Returns the caller's limits it read, which the request may hand to `reserve`
    rather than read them again."""
    caller = caller_limits(s, who)
    if caller.requester_gone is not None:  # the run's key dies with the key that asked for the evaluation
        raise Unauthenticated(
            f"This key was minted for an evaluation, and the API key that asked for it {caller.requester_gone}",
            code="invalid_api_key",
        )
    subjects = caller.subjects(who)
    if all(lim.requests_per_minute is None for _, _, lim in subjects):
        return caller
    now = clock()
    for subject, label, lim in subjects:
        if lim.requests_per_minute is None:
            continue
        total = m.UsageCounter.requests
        if not _take(s, subject, minute_period(now), "requests", 1, lim.requests_per_minute, total=total):
            s.rollback()
            raise RateLimited(
                f"Rate limit reached for {label}: {lim.requests_per_minute} requests per minute. "
                "Please try again later.",
                retry_after=_seconds_to_next_minute(now),
            )
    return caller


def _release(session: Session, holds: list[list[Any]], used: int | None, cost_micros: int | None = None) -> None:
    """Undo a reservation's holds; `used` tokens and `cost_micros` (None: all that were reserved) become spent."""
    counter = m.UsageCounter
    for subject, period, kind, amount in holds:
        spent = amount if used is None else min(used, amount)
        if kind == "cost":
            _add(session, subject, period, reserved=-amount, tokens=amount if cost_micros is None else cost_micros)
        elif kind == "month":
            _add(session, subject, period, reserved=-amount, tokens=spent)
        elif kind == "minute":
            session.execute(
                update(counter)
                .where(counter.subject == subject, counter.period == period)
                .values(tokens=counter.tokens - (amount - spent))
            )
        elif kind == "stream":
            _add(session, subject, period, reserved=-amount)


def sweep_expired(session: Session, now: float) -> int:
    """Release the reservations of requests whose process died; each exactly once, whoever sweeps."""
    released = 0
    for row in session.scalars(select(m.UsageReservation).where(m.UsageReservation.expires_at < now).limit(50)):
        if session.execute(delete(m.UsageReservation).where(m.UsageReservation.id == row.id)).rowcount == 1:
            _release(session, row.holds, None)
            released += 1
    return released


def charge_training(session: Session, tenant_id: str, now: float, agents: dict[str, str] | None = None) -> None:
    """Charge each finished fine-tuning job's trained tokens to the tenant's month and to the accounting ledger,
    once (`agents`: the agent that trained a job, where the caller knows it)."""
    month = month_period(now)
    start = dt.datetime.fromtimestamp(now, dt.UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0).timestamp()
    job = m.FineTuningJob
    jobs = session.execute(
        select(job.id, job.trained_tokens, job.user_id, job.fine_tuned_model, job.model, job.finished_at).where(
            job.tenant_id == tenant_id, job.finished_at >= start, job.trained_tokens > 0
        )
    ).all()
    for job_id, tokens, user_id, fine_tuned, base, finished_at in jobs:
        marker = f"job:{job_id}"
        if session.get(m.UsageCounter, (marker, "training")) is not None:
            continue
        _ensure_row(session, marker, "training")
        claimed = session.execute(
            update(m.UsageCounter)
            .where(m.UsageCounter.subject == marker, m.UsageCounter.period == "training", m.UsageCounter.tokens == 0)
            .values(tokens=tokens)
        ).rowcount
        if claimed:
            _add(session, f"tenant:{tenant_id}", month, tokens=tokens)
            trained = ledger.Use(
                tenant_id, "fine_tuning", user_id=user_id or "", model=fine_tuned or base,
                agent_id=(agents or {}).get(job_id, ""),
            )  # fmt: skip
            ledger.add(session, trained, finished_at, requests=1, trained_tokens=tokens)


def hold_training(session: Session, tenant_id: str, job_id: str, tokens: int, now: float) -> str | None:
    """Before a job is queued, hold its estimated training tokens against the tenant's monthly budget, so
    jobs running at once cannot together spend past it. Returns why not when the budget lacks room."""
    lim = tenant_limits(session, tenant_id)
    if lim.monthly_tokens is None or tokens <= 0:
        return None
    charge_training(session, tenant_id, now)
    month = month_period(now)
    counter = m.UsageCounter
    subject = f"tenant:{tenant_id}"
    if not _take(
        session, subject, month, "reserved", tokens, lim.monthly_tokens, total=counter.tokens + counter.reserved
    ):
        return (
            f"The monthly token budget of your organization ({lim.monthly_tokens} tokens) does not cover this job's "
            f"estimated {tokens} training tokens (the training file's tokens × n_epochs)."
        )
    _ensure_row(session, f"job:{job_id}", f"hold:{month}")
    session.execute(
        update(counter)
        .where(counter.subject == f"job:{job_id}", counter.period == f"hold:{month}")
        .values(reserved=tokens)
    )
    return None


def settle_training(session: Session, job: m.FineTuningJob, agent_id: str | None = None) -> None:
    """A job ended: give back its hold and charge what it really trained (exactly once, whoever calls)."""
    counter = m.UsageCounter
    for hold in session.scalars(
        select(counter).where(counter.subject == f"job:{job.id}", counter.period.like("hold:%"))
    ).all():
        month, amount = hold.period.removeprefix("hold:"), hold.reserved
        gone = session.execute(
            delete(counter).where(counter.subject == hold.subject, counter.period == hold.period)
        ).rowcount
        if gone == 1:
            _add(session, f"tenant:{job.tenant_id}", month, reserved=-amount)
    if job.trained_tokens:
        charge_training(session, job.tenant_id, job.finished_at or clock(), {job.id: agent_id} if agent_id else None)


def reserve(
    db: Database,
    who: Principal,
    *,
    prompt_tokens: int,
    max_tokens: int,
    hold_seconds: float,
    model: str,
    kind: str = "completions",
    prices: dict[str, dict[str, float]] | None = None,
    caller: CallerLimits | None = None,
) -> Reservation:
    """Hold an inference call's worst case against every limit, or 429: prompt + max_tokens tokens, and one slot of
    `concurrent_streams`, which counts every call running at once, streamed or not (20 concurrent non-streamed
    calls once passed a limit of 3). A call takes one slot whatever its `n`: its choices share one connection
    and come back together, and their cost is held in tokens (the caller passes max_tokens × n). A process that
    dies holding a reservation gives it back after `hold_seconds`. The call is accounted to `model` (and `kind`:
    completions or embeddings) in the ledger when it settles; `prices` (the platform's) price it against a cost
    budget. `caller`: the caller's limits as this request's `count_request` read them (else they are read here)."""
    worst = prompt_tokens + max_tokens
    now = clock()
    with db.system() as s:
        caller = caller if caller is not None else caller_limits(s, who)
        tenant = caller.tenant
        if tenant.max_tokens is not None and max_tokens > tenant.max_tokens:
            raise InvalidRequest(
                f"max_tokens is too large: {max_tokens}. Your organization allows at most {tenant.max_tokens}.",
                param="max_tokens",
            )
        subjects = caller.subjects(who)
        if any(_holds(lim) for _, _, lim in subjects):  # else nothing here reads what a dead process held
            sweep_expired(s, now)
        if any(lim.monthly_tokens is not None for _, _, lim in subjects):
            charge_training(s, who.tenant_id, now)
        counter = m.UsageCounter
        holds: list[list[Any]] = []
        refused: RateLimited | None = None
        token_prices = (0.0, 0.0)
        if tenant.monthly_cost is not None:
            token_prices = ledger.token_prices(s, prices or {}, model, kind)
            _start_cost_month(s, who.tenant_id, prices or {}, now)
        worst_cost = math.ceil((prompt_tokens * token_prices[0] + max_tokens * token_prices[1]) * MICROS)
        for subject, label, lim in subjects:
            checks = []
            if lim.monthly_cost is not None:
                total = counter.tokens + counter.reserved
                checks.append(("cost", cost_period(now), "reserved", worst_cost, _micros(lim.monthly_cost), total))
            if lim.tokens_per_minute is not None:
                checks.append(("minute", minute_period(now), "tokens", worst, lim.tokens_per_minute, counter.tokens))
            if lim.monthly_tokens is not None:
                total = counter.tokens + counter.reserved
                checks.append(("month", month_period(now), "reserved", worst, lim.monthly_tokens, total))
            if lim.concurrent_streams is not None:
                checks.append(("stream", "streams", "reserved", 1, lim.concurrent_streams, counter.reserved))
            for hold, period, column, amount, limit, total in checks:
                if _take(s, subject, period, column, amount, limit, total=total):
                    holds.append([subject, period, hold, amount])
                    continue
                refused = _refusal(hold, label, limit, amount, now)
                break
            if refused:
                break
        if refused is not None:
            s.rollback()  # nothing of this request was held
            raise refused
        if kind == "completions" and caller.evaluation_key:
            kind = "evaluations"  # an lm-eval run's call: charged as any call, told apart from chat in the ledger
        use = ledger.Use(who.tenant_id, kind, user_id=who.user_id, api_key_id=who.api_key_id or "", model=model)
        reservation = Reservation(
            new_id("resv_"), worst, holds, use, [subject for subject, _, _ in subjects], token_prices
        )
        if holds:  # a limit applies: its hold is written now, the request counted with it
            s.add(m.UsageReservation(id=reservation.id, holds=holds, expires_at=now + hold_seconds))
            for subject, _, _ in subjects:
                _add(s, subject, month_period(now), requests=1)
        # else nothing is held, and nothing written before the call: the month counts the request when it settles,
        # with its tokens, in one statement a subject (a call without limits writes once, not twice; one that
        # never settles, its process dead, is in neither the month nor the ledger)
        return reservation


def evaluation_hold_id(evaluation_id: str) -> str:
    return f"resv_{evaluation_id}"


def hold_evaluation(
    session: Session,
    who: Principal,
    evaluation_id: str,
    per_model: tuple[int, int],
    models: list[str],
    now: float,
    prices: dict[str, dict[str, float]] | None = None,
) -> None:
    """Before a held-out evaluation is queued, hold its worst case (`per_model`: prompt and completion tokens each
    of its `models` may use) against the months of the key that asks for it and of its tenant, and the tenant's
    cost budget, or 429: evaluations queued at once cannot together spend past a budget that covers each alone.
    Held in the caller's transaction (no evaluation without its hold), until the evaluation ends
    (`release_evaluation`); what it really used is then charged (`charge_evaluation`)."""
    prompt, completion = per_model
    worst = (prompt + completion) * len(models)
    caller = caller_limits(session, who)
    subjects = caller.subjects(who)
    counter = m.UsageCounter
    holds: list[list[Any]] = []
    if any(lim.monthly_tokens is not None for _, _, lim in subjects):
        charge_training(session, who.tenant_id, now)
    for subject, label, lim in subjects:
        if lim.monthly_tokens is None:
            continue
        total = counter.tokens + counter.reserved
        if not _take(session, subject, month_period(now), "reserved", worst, lim.monthly_tokens, total=total):
            raise _evaluation_refusal(f"monthly token budget of {label} ({lim.monthly_tokens} tokens)", worst, now)
        holds.append([subject, month_period(now), "month", worst])
    cost_limit = caller.tenant.monthly_cost
    if cost_limit is not None:
        _start_cost_month(session, who.tenant_id, prices or {}, now)
        worst_cost = 0
        for model in models:
            prompt_price, completion_price = ledger.token_prices(session, prices or {}, model, "completions")
            worst_cost += math.ceil((prompt * prompt_price + completion * completion_price) * MICROS)
        subject, total = f"tenant:{who.tenant_id}", counter.tokens + counter.reserved
        if worst_cost and not _take(session, subject, cost_period(now), "reserved", worst_cost,
                                    _micros(cost_limit), total=total):  # fmt: skip
            raise _evaluation_refusal(f"monthly cost budget of your organization ({cost_limit:g})", worst, now)
        if worst_cost:
            holds.append([subject, cost_period(now), "cost", worst_cost])
    if holds:
        far = now + 10 * 366 * 86400  # not a dead process's: held until the evaluation ends, however long it waits
        session.add(m.UsageReservation(id=evaluation_hold_id(evaluation_id), holds=holds, expires_at=far))


def _evaluation_refusal(budget: str, worst: int, now: float) -> RateLimited:
    refused = RateLimited(
        f"The {budget} does not cover this evaluation's worst case ({worst} tokens: its models' answers to every "
        "example, each its prompt and up to the evaluation's new tokens). Evaluate on a smaller file or ask an "
        "administrator to raise it.",
        retry_after=_seconds_to_next_month(now),
    )
    refused.code = "insufficient_quota"
    return refused


def release_evaluation(session: Session, evaluation_id: str) -> None:
    """An evaluation ended: give its hold back (what it used is charged by `charge_evaluation`), exactly once."""
    hold = session.get(m.UsageReservation, evaluation_hold_id(evaluation_id))
    if hold is None:
        return
    gone = session.execute(delete(m.UsageReservation).where(m.UsageReservation.id == hold.id)).rowcount
    if gone == 1:
        _release(session, hold.holds, 0, 0)


def _holds(lim: Limits) -> bool:
    """Whether a call under `lim` holds anything while it runs."""
    held = (lim.monthly_cost, lim.tokens_per_minute, lim.monthly_tokens, lim.concurrent_streams)
    return any(value is not None for value in held)


def charge_evaluation(
    session: Session,
    evaluation: m.Evaluation,
    used: dict[str, dict[str, int]],
    agent_id: str,
    now: float,
    prices: dict[str, dict[str, float]],
) -> None:
    """Charge what a held-out evaluation generated (`used`: per label, EVALUATION_COUNTS) as inference is charged:
    the ledger per model (kind `evaluations`, the evaluation's creator, the agent), the tenant's month (and the month
    of the key it was asked for with), and its
    cost row where this month's has started (else it starts from the ledger, these rows included). The caller
    ends the evaluation in the same transaction, so it is charged once."""
    tenant_subject = f"tenant:{evaluation.tenant_id}"
    total_tokens = total_requests = cost = 0
    for entry in evaluation.models:
        counts = used[entry["label"]]
        prompt, completion = counts["prompt_tokens"], counts["completion_tokens"]
        use = ledger.Use(
            evaluation.tenant_id, "evaluations", user_id=evaluation.user_id or "",
            api_key_id=evaluation.requester_key_id or "", model=entry["model"], agent_id=agent_id,
        )  # fmt: skip
        ledger.add(session, use, now, requests=counts["requests"], prompt_tokens=prompt, completion_tokens=completion)
        total_tokens += prompt + completion
        total_requests += counts["requests"]
        prompt_price, completion_price = ledger.token_prices(session, prices, entry["model"], "completions")
        cost += math.ceil((prompt * prompt_price + completion * completion_price) * MICROS)
    if total_tokens or total_requests:
        _add(session, tenant_subject, month_period(now), requests=total_requests, tokens=total_tokens)
        if evaluation.requester_key_id:  # the key it was asked for with spends its own month too
            key_subject = f"key:{evaluation.requester_key_id}"
            _add(session, key_subject, month_period(now), requests=total_requests, tokens=total_tokens)
    if cost and session.get(m.UsageCounter, (tenant_subject, cost_period(now))) is not None:
        _add(session, tenant_subject, cost_period(now), tokens=cost)


def _refusal(kind: str, label: str, limit: int, amount: int, now: float) -> RateLimited:
    if kind == "minute":
        too_big = " This request alone is larger than that." if amount > limit else ""
        return RateLimited(
            f"Rate limit reached for {label}: {limit} tokens per minute (this request may use {amount}).{too_big}",
            retry_after=_seconds_to_next_minute(now),
        )
    if kind == "cost":
        spent = RateLimited(
            f"The monthly cost budget of {label} ({limit / MICROS:g}) does not cover this request's worst case "
            f"({amount / MICROS:.6f}: prompt + max_tokens at the platform's prices). Lower max_tokens or ask an "
            "administrator to raise it.",
            retry_after=_seconds_to_next_month(now),
        )
        spent.code = "insufficient_quota"
        return spent
    if kind == "month":
        exhausted = RateLimited(
            f"The monthly token budget of {label} ({limit} tokens) does not cover this request's worst case "
            f"({amount} tokens: prompt + max_tokens). Lower max_tokens or ask an administrator to raise it.",
            retry_after=_seconds_to_next_month(now),
        )
        exhausted.code = "insufficient_quota"  # OpenAI's code for a spent budget
        return exhausted
    return RateLimited(
        f"Too many concurrent requests for {label} (at most {limit} at once, streamed or not); wait for one to finish.",
        retry_after=1,
    )


def settle(
    db: Database,
    reservation: Reservation | None,
    *,
    prompt_tokens: int,
    completion_tokens: int,
    failed: bool = False,
) -> None:
    """Replace a reservation's worst case by what the request really used, and account it in the ledger (one
    request, `failed` if it ended in an error, with every token it produced before)."""
    if reservation is None:
        return
    used_tokens = prompt_tokens + completion_tokens
    now = clock()
    with db.system() as s:
        if reservation.holds:
            gone = s.execute(delete(m.UsageReservation).where(m.UsageReservation.id == reservation.id)).rowcount
            if gone != 1:
                return  # expired and swept already: counted in full, as promised (and in the ledger as used)
            prompt_price, completion_price = reservation.token_prices
            cost = math.ceil((prompt_tokens * prompt_price + completion_tokens * completion_price) * MICROS)
            _release(s, reservation.holds, used_tokens, cost)
        held_month = {subject for subject, _, kind, _ in reservation.holds if kind == "month"}
        unheld = 0 if reservation.holds else 1  # the request, where `reserve` wrote nothing
        for subject in reservation.subjects:
            if subject not in held_month:  # no budget held: its month counts what was used all the same
                _add(s, subject, month_period(now), tokens=used_tokens, requests=unheld)
        if reservation.use is not None:
            ledger.add(
                s, reservation.use, now, requests=1, failed_requests=int(failed),
                prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
            )  # fmt: skip


def check_training(db: Database, who: Principal) -> None:
    """A new fine-tuning job needs budget left this month; its estimated tokens are held once its files are
    validated (`hold_training`) and settled to what it trained when it ends (`settle_training`)."""
    now = clock()
    with db.system() as s:
        caller = caller_limits(s, who)
        for subject, label, lim in caller.subjects(who):
            if lim.monthly_tokens is None:
                continue
            charge_training(s, who.tenant_id, now)
            row = s.get(m.UsageCounter, (subject, month_period(now)))
            if row is not None and row.tokens + row.reserved >= lim.monthly_tokens:
                raise _refusal("month", label, lim.monthly_tokens, 1, now)
        cost_limit = caller.tenant.monthly_cost
        row = s.get(m.UsageCounter, (f"tenant:{who.tenant_id}", cost_period(now)))
        if cost_limit is not None and row is not None and row.tokens + row.reserved >= _micros(cost_limit):
            raise _refusal("cost", "your organization", _micros(cost_limit), 0, now)


def usage(session: Session, subjects: list[str], now: float | None = None) -> dict[str, dict[str, int]]:
    """This month's requests, spent and reserved tokens, and open streams per subject."""
    now = now or clock()
    month, minute = month_period(now), minute_period(now)
    rows = session.scalars(
        select(m.UsageCounter).where(
            m.UsageCounter.subject.in_(subjects), m.UsageCounter.period.in_([month, minute, "streams"])
        )
    )
    out = {s: {"requests": 0, "tokens": 0, "reserved": 0, "tokens_this_minute": 0, "streams": 0} for s in subjects}
    for row in rows:
        entry = out[row.subject]
        if row.period == month:
            entry.update(requests=row.requests, tokens=row.tokens, reserved=row.reserved)
        elif row.period == minute:
            entry["tokens_this_minute"] = row.tokens
        else:
            entry["streams"] = row.reserved
    return out
