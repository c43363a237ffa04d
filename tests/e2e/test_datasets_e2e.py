"""Datasets against a real server: an upload killed midway leaves nothing; the CLI's curation loop."""

from __future__ import annotations

import re
import socket
import time
from urllib.parse import urlparse

import httpx
import pytest

from tests.conftest import SAMPLE_CHAT


def wait_until(condition, timeout: float = 20) -> bool:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def stored_blobs(server) -> set[str]:
    root = server.data_dir / "blobs"
    return {p.name for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_an_upload_killed_midway_leaves_nothing_visible(server):
    before = stored_blobs(server)
    scratch = server.data_dir / "blobs" / "tmp"  # where a blob is written before it is complete
    url = urlparse(server.url)
    with socket.create_connection((url.hostname, url.port)) as conn:
        conn.sendall(
            (
                "POST /api/datasets?filename=half.jsonl HTTP/1.1\r\n"
                f"Host: {url.netloc}\r\nAuthorization: Bearer {server.api_key}\r\n"
                "Content-Type: application/octet-stream\r\nContent-Length: 10000000\r\n\r\n"
            ).encode()
        )
        conn.sendall(b'{"messages": [{"role": "user", "content": "half"}]}\n' * 20000)  # ~1 MB of 10
        assert wait_until(lambda: any(scratch.iterdir())), "the server never started storing the upload"
    assert wait_until(lambda: not any(scratch.iterdir())), "the half upload's temporary file was left behind"
    headers = {"Authorization": f"Bearer {server.api_key}"}
    assert httpx.get(f"{server.url}/api/datasets", headers=headers).json()["data"] == []
    assert stored_blobs(server) == before
    assert list((server.data_dir / "blobs" / "tmp").iterdir()) == []


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_cli_datasets_upload_show_dedup_scrub_split_export_and_train(server, tmp_path):
    data = tmp_path / "qa.csv"
    data.write_text(
        "question,answer\n"
        "Who leads the lab?,Dr. Ines Okafor leads it.\n"
        "Who leads the lab?,Dr. Ines Okafor leads it.\n"
        "How do I reach the admin?,Write to admin@marlow.example or call +1 415 555 0132.\n"
        "Where is the lab?,In building B on the second floor.\n"
    )
    uploaded = server.cli("datasets", "upload", str(data), "--name", "qa")
    assert uploaded.returncode == 0, uploaded.stdout + uploaded.stderr
    assert "v1 ready upload: 4 records, format csv" in uploaded.stdout

    deduped = server.cli("datasets", "dedup", "qa")
    assert deduped.returncode == 0, deduped.stdout + deduped.stderr
    assert "v2 ready dedup from v1: 3 records" in deduped.stdout

    scrubbed = server.cli("datasets", "scrub", "qa@2")
    assert "v3 ready scrub from v2: 3 records" in scrubbed.stdout and "'email': 1" in scrubbed.stdout

    split = server.cli("datasets", "split", "qa", "--validation-fraction", "0.34")
    assert "v4 ready split-train from v3" in split.stdout and "v5 ready split-validation from v3" in split.stdout

    shown = server.cli("datasets", "versions", "qa")
    assert [f"v{n}" for n in range(1, 6)] == re.findall(r"^(v\d) ", shown.stdout, re.M)
    validated = server.cli("datasets", "validate", "qa@3", "--model", "adaptery-demo")
    assert validated.returncode == 0 and "3 valid, 0 invalid" in validated.stdout

    exported = server.cli("datasets", "export", "qa@3")
    file_id = re.search(r"(file-\w+)", exported.stdout).group(1)
    trained = server.cli("jobs", "create", "-t", file_id, "--epochs", "1")
    assert trained.returncode == 0 and "Fine-tuned model: ft:adaptery-demo" in trained.stdout

    bad = tmp_path / "bad.jsonl"
    bad.write_text(SAMPLE_CHAT.read_text() + '{"messages": [{"role": "robot", "content": "beep"}]}\n')
    reported = server.cli("datasets", "upload", str(bad))
    assert "6 valid, 1 invalid of 7" in reported.stdout
    assert "line 7: messages[0].role: unknown role 'robot'" in reported.stdout
