"""How CLI commands reach a running platform: the official OpenAI client plus httpx for /api."""

from __future__ import annotations

from typing import TYPE_CHECKING

import httpx
import typer

from adaptery.settings import ClientSettings

if TYPE_CHECKING:
    from openai import OpenAI


def base_url() -> str:
    return ClientSettings().base_url.rstrip("/").removesuffix("/v1")


def api_key() -> str:
    configured = ClientSettings().api_key
    key = configured.get_secret_value() if configured else ""
    if not key:
        typer.secho(
            "Set ADAPTERY_API_KEY to your key (printed by the first `adaptery serve`, or `adaptery keys create`).",
            fg="red",
            err=True,
        )
        raise typer.Exit(2)
    return key


def openai_client() -> OpenAI:
    from openai import OpenAI  # here, not at the top: 0.7 s of every CLI command's start, most never use it

    return OpenAI(base_url=f"{base_url()}/v1", api_key=api_key(), max_retries=0, timeout=600)


def api(method: str, path: str, *, headers: dict[str, str] | None = None, **kwargs: object) -> dict:
    """Call Adaptery's own `/api` routes; an error response ends the command with its message."""
    response = httpx.request(
        method,
        f"{base_url()}{path}",
        headers={"Authorization": f"Bearer {api_key()}", **(headers or {})},
        timeout=600,
        **kwargs,
    )  # transport errors are reported by cli.main.main
    if response.status_code >= 400:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text
        typer.secho(f"Error {response.status_code}: {message}", fg="red", err=True)
        raise typer.Exit(1)
    return response.json() if response.content else {}  # 204: nothing to say
