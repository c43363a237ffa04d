"""Transport security: no plain HTTP beyond loopback unless told; HTTPS from the platform's own CA."""

from __future__ import annotations

import os
import re
import ssl
import stat
import subprocess
import sys
import time

import httpx
import pytest
from openai import OpenAI

from tests.conftest import free_port, prepare_data_dir


def serve(data_dir, *args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "adaptery.cli", "serve", "--data-dir", str(data_dir), *args],
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_serve_refuses_a_non_loopback_address_without_tls(tmp_path):
    result = serve(tmp_path / "data", "--host", "0.0.0.0", "--port", str(free_port()))
    output, _ = result.communicate(timeout=60)
    assert result.returncode == 2
    assert "Refusing to listen on 0.0.0.0 without TLS" in output


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_tls_with_the_platforms_own_ca(tmp_path, database_url, demo_model_dir):
    data_dir = prepare_data_dir(tmp_path / "data", demo_model_dir)
    port = free_port()
    process = serve(data_dir, "--tls", "--port", str(port), "--no-agent", env={"ADAPTERY_DATABASE_URL": database_url})
    ca = data_dir / "tls" / "ca.pem"
    trust = lambda: ssl.create_default_context(cafile=str(ca))  # noqa: E731

    def wait_until_it_answers() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"https://127.0.0.1:{port}/api/health", verify=trust(), timeout=1).status_code == 200:
                    return
            except (httpx.HTTPError, OSError):
                time.sleep(0.3)
        raise AssertionError("the TLS server did not answer")

    try:
        wait_until_it_answers()
        assert stat.S_IMODE((data_dir / "tls" / "ca.key").stat().st_mode) == 0o600
        assert stat.S_IMODE((data_dir / "tls" / "server.key").stat().st_mode) == 0o600

        with pytest.raises(httpx.ConnectError):  # an unknown CA is not trusted
            httpx.get(f"https://127.0.0.1:{port}/api/health", timeout=2)
        with pytest.raises(httpx.HTTPError):  # no plain HTTP on the TLS port
            httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2)

        process.terminate()
        output, _ = process.communicate(timeout=30)
        key = re.search(r"^ADAPTERY_API_KEY=(\S+)$", output, re.M).group(1)
        assert re.search(r"^ADAPTERY_LOGIN_URL=https://127\.0\.0\.1:", output, re.M)
        process = serve(
            data_dir, "--tls", "--port", str(port), "--no-agent", env={"ADAPTERY_DATABASE_URL": database_url}
        )
        wait_until_it_answers()  # a restart on a loaded machine takes longer than the client's retries
        client = OpenAI(
            base_url=f"https://localhost:{port}/v1",
            api_key=key,
            http_client=httpx.Client(verify=trust()),
            max_retries=5,
        )
        assert "adaptery-demo" in [m.id for m in client.models.list()]
        response = httpx.get(f"https://localhost:{port}/", verify=trust())
        assert response.headers["strict-transport-security"].startswith("max-age=")
    finally:
        process.terminate()
        process.wait(timeout=30)
