"""Bad input stopped at the door, before any route runs: JSON bodies bounded in size and nesting depth,
JSON routes only take JSON, and a client that stops sending its body is cut off.

A refused request never reaches a handler, so it leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from fastapi import params
from fastapi.routing import APIRoute, iter_route_contexts
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from adaptery.data.untrusted import json_depth, lone_surrogate, too_long_number
from adaptery.settings import Settings

_BODY_METHODS = ("POST", "PUT", "PATCH", "DELETE")


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


def _takes_json(route: APIRoute) -> bool:
    """A route whose body is a pydantic model (not a form, not a raw stream)."""
    return any(not isinstance(f.field_info, params.Form) for f in route.dependant.body_params)


class RequestGuard:
    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self._json_routes: dict[int, bool] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        receive = self._timed(receive)
        if scope["method"] not in _BODY_METHODS:
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        content_type = headers.get("content-type", "")
        if _is_json(content_type):
            await self._json(scope, receive, send, headers)
            return
        declared = headers.get("content-length")
        has_body = "transfer-encoding" in headers or (declared is not None and declared not in ("", "0"))
        if has_body and self._route_takes_json(scope):
            await _refuse(send, 415, f"Content-Type must be application/json, not {content_type or 'none'}.")
            return
        await self.app(scope, receive, send)

    def _timed(self, receive: Receive) -> Receive:
        """A body that stalls longer than the timeout reads as a disconnect: the handler aborts cleanly."""
        timeout = self.settings.request_body_timeout_seconds
        body_done = False

        async def timed() -> Message:
            nonlocal body_done
            if body_done:  # afterwards, receive() only waits for a disconnect while a response streams
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), timeout)
            except TimeoutError:
                return {"type": "http.disconnect"}
            body_done = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        return timed

    def _route_takes_json(self, scope: Scope) -> bool:
        for context in iter_route_contexts(scope["app"].router.routes):
            route = context.original_route
            if isinstance(route, APIRoute) and route.matches(scope)[0] == Match.FULL:
                if id(route) not in self._json_routes:
                    self._json_routes[id(route)] = _takes_json(route)
                return self._json_routes[id(route)]
        return False

    async def _json(self, scope: Scope, receive: Receive, send: Send, headers: dict[str, str]) -> None:
        limit = self.settings.max_json_bytes
        too_large = f"The JSON body is larger than the limit of {limit} bytes."
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            await _refuse(send, 413, too_large, code="request_too_large")
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await _refuse(send, 413, too_large, code="request_too_large")
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        max_depth = self.settings.max_json_depth
        if body.count(b"[") + body.count(b"{") > max_depth and json_depth(body) > max_depth:
            await _refuse(send, 400, f"The JSON body is nested deeper than {max_depth} levels.", code="json_too_deep")
            return
        where = too_long_number(body)
        if where is not None:  # every JSON parser here would raise ValueError on it: a 400 naming the field
            message = f"Invalid value for '{where}': the number has too many digits."
            await _refuse(send, 400, message, code="invalid_value", param=where)
            return
        where = lone_surrogate(body)
        if where is not None:  # databases, encoders and tokenizers all raise on it: a 400 naming the field
            message = f"Invalid value for '{where}': the text holds a lone UTF-16 surrogate (\\ud800-\\udfff)."
            await _refuse(send, 400, message, code="invalid_value", param=where)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _refuse(send: Send, status: int, message: str, code: str | None = None, param: str | None = None) -> None:
    error: dict[str, Any] = {"message": message, "type": "invalid_request_error", "param": param, "code": code}
    payload = json.dumps({"error": error}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": payload})
