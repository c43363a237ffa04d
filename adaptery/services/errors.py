"""Errors a use case raises; the API turns each into OpenAI's error object and status code."""

from __future__ import annotations


class ServiceError(Exception):
    status = 400
    type = "invalid_request_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class InvalidRequest(ServiceError):
    pass


class NotFound(ServiceError):
    status = 404

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message, param=param, code=code)


class Unauthenticated(ServiceError):
    status = 401
    type = "authentication_error"


class PermissionDenied(ServiceError):
    status = 403
    type = "permission_error"


class TooLarge(ServiceError):
    status = 413


class RateLimited(ServiceError):
    status = 429
    type = "rate_limit_error"

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message, code="rate_limit_exceeded")
        self.retry_after = retry_after


class Conflict(ServiceError):
    status = 409


class ServerError(ServiceError):
    """The server could not finish a valid request (the engine's own error)."""

    status = 500
    type = "server_error"


class BadGateway(ServerError):
    """What served the request upstream (an infer agent) answered wrongly."""

    status = 502


class TimedOut(ServerError):
    """The request ran past the server's deadline for it."""

    status = 504
