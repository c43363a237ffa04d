"""`adaptery fed ...` refuses bad input before it starts anything: a malformed invitation token, a site directory
with no membership and no token, a coordinator given neither or both of a roster and a federation. A progress
report the platform refuses does not stop the coordinator's rounds."""

from __future__ import annotations

import httpx
import typer
from typer.testing import CliRunner

from adaptery.cli import federated
from adaptery.cli.main import app

ENV = {"COLUMNS": "200"}


def test_fed_join_refuses_a_malformed_token_and_a_directory_with_no_site(tmp_path):
    data = tmp_path / "local.jsonl"
    data.write_text("{}\n")
    base = tmp_path / "base"
    base.mkdir()
    common = ["--server", "http://127.0.0.1:9", "--data", str(data), "--base-model", str(base)]
    runner = CliRunner()
    bad = runner.invoke(app, ["fed", "join", *common, "--token", "garbage", "--work-dir", str(tmp_path / "s")], env=ENV)
    assert bad.exit_code == 1 and "adaptery fed invite" in bad.output
    assert not (tmp_path / "s" / "identity.key").exists()
    none = runner.invoke(app, ["fed", "join", *common, "--work-dir", str(tmp_path / "empty")], env=ENV)
    assert none.exit_code == 2 and "give --token" in none.output


def test_the_coordinator_needs_exactly_one_of_a_roster_and_a_federation(tmp_path):
    roster = tmp_path / "roster.json"
    roster.write_text("{}")
    common = ["federated", "coordinator", "--base-model", str(tmp_path), "--work-dir", str(tmp_path / "c")]
    runner = CliRunner()
    neither = runner.invoke(app, common, env=ENV)
    both = runner.invoke(app, [*common, "--roster", str(roster), "--federation", "fed_x"], env=ENV)
    for result in (neither, both):
        assert result.exit_code == 2 and "exactly one of --roster and --federation" in result.output
    assert not (tmp_path / "c").exists()  # refused before a SuperLink was started


def test_a_refused_or_lost_progress_report_does_not_stop_the_rounds(capsys):
    def refused(event: dict) -> None:
        raise typer.Exit(1)

    def lost(event: dict) -> None:
        raise httpx.ConnectError("platform down")

    taken: list[dict] = []
    for report in (refused, lost, taken.append):
        federated._reported(report, {"event": "round", "round": 1})
    assert taken == [{"event": "round", "round": 1}]
    assert capsys.readouterr().out.count("the rounds go on") == 2
