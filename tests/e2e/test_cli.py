"""The `adaptery` CLI against a running server: the same loop from a terminal."""

from __future__ import annotations

import json
import re

import pytest

from tests.conftest import SAMPLE_CHAT


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_cli_upload_train_follow_list_chat_and_keys(server, tmp_path):
    uploaded = server.cli("files", "upload", str(SAMPLE_CHAT))
    assert uploaded.returncode == 0, uploaded.stderr
    file_id = re.search(r"(file-\w+)", uploaded.stdout).group(1)

    trained = server.cli("jobs", "create", "--training-file", file_id, "--suffix", "cli")
    assert trained.returncode == 0, trained.stdout + trained.stderr
    assert "Files validated" in trained.stdout and "steps" in trained.stdout
    model = re.search(r"Fine-tuned model: (ft:\S+)", trained.stdout).group(1)

    listed = server.cli("models", "list")
    assert model in listed.stdout and "adaptery-demo" in listed.stdout
    assert "succeeded" in server.cli("jobs", "list").stdout

    record = json.loads(SAMPLE_CHAT.read_text().splitlines()[2])
    question, answer = record["messages"][0]["content"], record["messages"][-1]["content"]
    chatted = server.cli("chat", model, "--message", question)
    assert chatted.returncode == 0, chatted.stderr
    assert answer in chatted.stdout

    zipped = server.cli("models", "download", model, "-o", str(tmp_path / "adapter.zip"))
    assert zipped.returncode == 0 and (tmp_path / "adapter.zip").stat().st_size > 0, zipped.stdout
    imported = server.cli(
        "models", "import", str(tmp_path / "adapter.zip"), "--base", "adaptery-demo", "--suffix", "back"
    )
    assert imported.returncode == 0, imported.stdout
    back = re.search(r"Imported as (ft:\S+)", imported.stdout).group(1)
    assert answer in server.cli("chat", back, "--message", question).stdout

    created = server.cli("keys", "create", "--name", "laptop", "--env", "staging")
    new_key = created.stdout.strip().splitlines()[-1]
    assert new_key.startswith("sk-staging-")
    key_id = new_key.split("-")[2]
    assert key_id in server.cli("keys", "list").stdout
    assert server.cli("models", "list", key=new_key).returncode == 0
    assert server.cli("keys", "revoke", key_id).returncode == 0
    refused = server.cli("models", "list", key=new_key)
    assert refused.returncode != 0 and "Incorrect API key" in refused.stdout + refused.stderr


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_cli_reports_bad_input_clearly(server, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "robot", "content": "hi"}]}\n')
    result = server.cli("files", "upload", str(bad))
    assert result.returncode == 1
    assert "line 1: messages[0].role: unknown role 'robot'" in result.stdout
    missing = server.cli("jobs", "create", "--training-file", "file-nope", "--no-follow")
    assert missing.returncode == 1 and "no such file 'file-nope'" in missing.stdout


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_cli_federation_create_add_sites_and_roster(server, tmp_path):
    for site in (1, 2):
        made = server.cli("federated", "keygen", str(tmp_path / f"site{site}.key"))
        assert made.returncode == 0, made.stderr
        assert (tmp_path / f"site{site}.pub").read_text().startswith("ecdsa-sha2-nistp384 ")
    assert server.cli("federated", "keygen", str(tmp_path / "site1.key")).returncode != 0  # never overwritten
    created = server.cli("federated", "create", "clinics", "--base-model", "adaptery-demo")
    assert created.returncode == 0, created.stderr
    federation = re.search(r"Federation (fed_\w+)", created.stdout).group(1)
    for site in (1, 2):
        added = server.cli(
            "federated", "add-site", federation, "--name", f"clinic-{site}", "--key", str(tmp_path / f"site{site}.pub")
        )
        assert added.returncode == 0 and f"Site {site} (clinic-{site})" in added.stdout, added.stderr
    roster_path = tmp_path / "roster.json"
    shown = server.cli("federated", "roster", federation, "--out", str(roster_path))
    assert shown.returncode == 0, shown.stderr
    roster = json.loads(roster_path.read_text())
    assert roster == {str(s): " ".join((tmp_path / f"site{s}.pub").read_text().split()[:2]) for s in (1, 2)}
    refused = server.cli("federated", "add-site", federation, "--name", "again", "--key", str(tmp_path / "site1.pub"))
    assert refused.returncode != 0 and "409" in refused.stderr
    invited = server.cli("fed", "invite", federation, "--name", "clinic-3", "--ttl", "600")  # `fed`: the short name
    assert invited.returncode == 0, invited.stderr
    assert re.search(rf"adaptery fed join --server {server.url} --token \S+\.[0-9a-f]{{64}} ", invited.stdout)
