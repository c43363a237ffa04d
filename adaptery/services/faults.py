"""Which faults may pass by themselves, so that the work behind them is tried again rather than given up.

A refusal (invalid, not found, not permitted) is final: asking again gets the same answer. A locked or
restarting database, a dropped connection, a timeout or a server error may pass: the job stays queued, the
agent asks again after a pause. The control plane's replies carry this (`protocol.RemoteError.retryable`).
"""

from __future__ import annotations

from sqlalchemy import exc as sa

from adaptery.services.errors import ServiceError


def is_transient(exc: BaseException) -> bool:
    """The database locked, restarting or unreachable, a timeout, a server-side error or a rate limit."""
    if isinstance(exc, sa.OperationalError | sa.DisconnectionError | sa.TimeoutError):
        return True  # SQLite's "database is locked", PostgreSQL shutting down, a pool with no free connection
    if isinstance(exc, sa.DBAPIError):
        return exc.connection_invalidated
    if isinstance(exc, ServiceError):
        return exc.status >= 500 or exc.status == 429
    return isinstance(exc, TimeoutError | ConnectionError)


def is_refusal(exc: BaseException) -> bool:
    """A service's answer about the request itself (invalid, not found, permission, conflict, too large)."""
    return isinstance(exc, ServiceError) and not is_transient(exc)
