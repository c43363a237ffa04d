"""`adaptery feedback ...`: the tenant's feedback policy, feedback on a completion by its id, collected feedback,
feedback as a dataset, and the arena's leaderboard (clients of `/api/feedback` and `/api/arena`)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from adaptery.cli.client import api

feedback_app = typer.Typer(help="Feedback on answers: policy, give, list, build a dataset, arena leaderboard.",
                           no_args_is_help=True)  # fmt: skip
console = Console(emoji=False)


@feedback_app.command("policy")
def policy(
    collect: Annotated[str | None, typer.Option(help="off, feedback or all (tenant admins)")] = None,
    readers: Annotated[str | None, typer.Option(help="admins, owners or members (tenant admins)")] = None,
) -> None:
    """Show the workspace's feedback policy, or set it (--collect, --readers)."""
    if collect is None and readers is None:
        current = api("GET", "/api/feedback/policy")
    else:
        body = {k: v for k, v in {"collect": collect, "readers": readers}.items() if v is not None}
        current = api("PUT", "/api/feedback/policy", json=body)
    console.print(f"collect: [bold]{current['collect']}[/bold]   readers: [bold]{current['readers']}[/bold]")
    console.print(escape(current["description"]))


@feedback_app.command("give")
def give(
    completion_id: str,
    rating: Annotated[int | None, typer.Option(help="1 (good) or -1 (bad)")] = None,
    reason: Annotated[str, typer.Option(help="why")] = "",
    correction: Annotated[str | None, typer.Option(help="the answer as it should be")] = None,
    choice: Annotated[int, typer.Option(help="which choice of the completion")] = 0,
) -> None:
    """Feedback on a chat completion by its `chatcmpl-` id (kept when the policy collects `all`)."""
    body = {"rating": rating, "reason": reason, "correction": correction, "choice_index": choice}
    given = api("POST", f"/api/completions/{completion_id}/feedback", json=body)
    console.print(f"Feedback [bold]{given['id']}[/bold] on {escape(given['model'])}")


@feedback_app.command("list")
def list_feedback(model: str | None = None, mine: bool = False) -> None:
    """The feedback you may read under the policy, newest first."""
    params = {"mine": mine, **({"model": model} if model else {})}
    table = Table("id", "model", "rating", "reason", "corrected", "from")
    for item in api("GET", "/api/feedback", params=params)["data"]:
        source = item["completion_id"] or item["conversation_id"] or ""
        table.add_row(item["id"], escape(item["model"]), str(item["rating"] or ""), escape(item["reason"]),
                      "yes" if item["correction"] else "", source)  # fmt: skip
    console.print(table)


@feedback_app.command("dataset")
def build_dataset(
    name: str,
    kind: Annotated[str, typer.Option(help="sft (accepted and corrected answers) or dpo (preference pairs)")] = "sft",
    model: Annotated[str | None, typer.Option(help="only feedback on this model's answers")] = None,
    no_dedup: bool = False,
    no_scrub: bool = False,
) -> None:
    """Make a dataset version of the feedback you may read (validated, deduplicated, PII-scrubbed)."""
    body = {"name": name, "kind": kind, "model": model, "dedup": not no_dedup, "scrub": not no_scrub}
    dataset = api("POST", "/api/feedback/datasets", json=body)
    for version in dataset["versions"]:
        console.print(f"v{version['version']} {version['operation']}: {version['status']}, "
                      f"{version['records'] or 0} record(s)")  # fmt: skip
    console.print(f"Dataset [bold]{escape(dataset['name'])}[/bold] ({dataset['id']})")


@feedback_app.command("leaderboard")
def leaderboard(base: str) -> None:
    """The arena's Bradley–Terry leaderboard of a base model's models, with 95% intervals."""
    board = api("GET", "/api/arena/leaderboard", params={"base": base})
    table = Table("model", "rating", "95% interval", "won", "lost", "tied")
    for row in board["data"]:
        table.add_row(escape(row["model"]), str(row["rating"]), f"{row['ci_low']} – {row['ci_high']}",
                      str(row["wins"]), str(row["losses"]), str(row["ties"]))  # fmt: skip
    console.print(table)
    console.print(f"{board['votes']} vote(s); {escape(board['method'])}")
