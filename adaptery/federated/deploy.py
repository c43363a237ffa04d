"""Flower's deployment engine, started and driven for a federation: SuperLink, SuperNodes, `flwr run`.

The coordinator runs a SuperLink with TLS (a certificate from the platform CA) and node
authentication on: only SuperNodes whose public key was registered (`flwr supernode register`,
done here from the federation's roster) may connect. Each site runs a SuperNode with its identity
key, next to its data; the ClientApp reads the data there and nothing but secagg messages leaves.

Every Flower process gets the offline settings: its own FLWR_HOME (not ~/.flwr), telemetry off,
no update check, no runtime dependency installation (the apps are this installed package).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

APP_PYPROJECT = """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "adaptery-federated"
version = "1.0.0"
description = "Adaptery federated fine-tuning with secure aggregation"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "adaptery"

[tool.flwr.app.components]
serverapp = "adaptery.federated.apps:server_app"
clientapp = "adaptery.federated.apps:client_app"

[tool.flwr.app.config]
adaptery-job = ""
"""


def flower_env(home: Path) -> dict[str, str]:
    """The environment every Flower process of ours runs with (offline, quiet, self-contained)."""
    home.mkdir(parents=True, exist_ok=True)
    return {
        **os.environ,
        "FLWR_HOME": str(home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "PYTHONUNBUFFERED": "1",
        "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2",  # the default 1 s adds up over five stages a round
        # The SuperLink and SuperNode start `flower-superexec` (and it the apps) by name: this environment's first.
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    }


def _bin(name: str) -> str:
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def new_identity_key(path: Path) -> Path:
    """A site identity: an EC P-384 key (OpenSSH format, 0600: what a SuperNode authenticates with) and its
    OpenSSH public key beside it (`.pub`: what `flwr supernode register` and the roster take)."""
    key = ec.generate_private_key(ec.SECP384R1())
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as stream:
        stream.write(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
            )
        )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    path.with_suffix(".pub").write_bytes(public + b"\n")
    return path


def public_key_of(key_path: Path) -> str:
    key = serialization.load_ssh_private_key(Path(key_path).read_bytes(), password=None)
    return key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()


def write_app(app_dir: Path) -> Path:
    """The Flower App the SuperLink runs: a pyproject naming this package's ServerApp and ClientApp."""
    app_dir.mkdir(parents=True, exist_ok=True)
    (app_dir / "pyproject.toml").write_text(APP_PYPROJECT)
    return app_dir


def write_connection(home: Path, address: str, ca_path: Path) -> None:
    """The `flwr` CLI's connection to our SuperLink (FLWR_HOME/config.toml)."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "adaptery"\n\n[superlink.adaptery]\naddress = "{address}"\n'
        f'root-certificates = "{ca_path}"\n'
    )


def start_superlink(home: Path, host: str, port: int, tls_dir: Path, log_path: Path) -> subprocess.Popen:
    from adaptery.auth.tls import ensure_server_certificate

    cert, key = ensure_server_certificate(tls_dir, host)
    args = [
        _bin("flower-superlink"),
        "--ssl-certfile", str(cert),
        "--ssl-keyfile", str(key),
        "--ssl-ca-certfile", str(tls_dir / "ca.pem"),
        "--enable-supernode-auth",
        "--disable-runtime-dependency-installation",
        "--host", host,
        "--port", str(port),
        "--database", str(home / "superlink.db"),
    ]  # fmt: skip
    write_connection(home, f"{host}:{port}", tls_dir / "ca.pem")
    log = open(log_path, "ab")  # noqa: SIM115 - the child owns it
    return subprocess.Popen(args, env=flower_env(home), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def wait_listening(host: str, port: int, process: subprocess.Popen, timeout: float = 60.0) -> None:
    """Until something accepts connections on host:port; raises if `process` exits first or time runs out."""
    import socket
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the Flower process exited with code {process.returncode} before listening")
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"nothing listens on {host}:{port} after {timeout:.0f}s")


def flwr(home: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """The `flwr` CLI against our SuperLink; raises with its output when it fails."""
    result = subprocess.run(
        [_bin("flwr"), *args], env=flower_env(home), capture_output=True, text=True, timeout=timeout, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"flwr {' '.join(args)} failed ({result.returncode}): {result.stdout}{result.stderr}")
    return result


def register_sites(home: Path, public_key_paths: list[Path], timeout: float = 120) -> None:
    """`flwr supernode register` for each site key (at once: each call is a few seconds of imports)."""
    calls = [
        subprocess.Popen(
            [_bin("flwr"), "supernode", "register", str(path), "adaptery"],
            env=flower_env(home),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for path in public_key_paths
    ]
    failures = []
    for path, call in zip(public_key_paths, calls, strict=True):
        output, _ = call.communicate(timeout=timeout)
        if call.returncode != 0:
            failures.append(f"{path}: {output.strip()}")
    if failures:
        raise RuntimeError("registering site keys failed:\n" + "\n".join(failures))


def start_run(home: Path, app_dir: Path, job_path: Path) -> int:
    result = flwr(home, "run", str(app_dir), "adaptery", "--run-config", f'adaptery-job="{job_path}"')
    found = re.search(r"run (\d+)", result.stdout)
    if not found:
        raise RuntimeError(f"flwr run printed no run id: {result.stdout}")
    return int(found.group(1))


def start_supernode(
    home: Path,
    superlink: str,
    ca_path: Path,
    key_path: Path,
    site_config_path: Path,
    runtime_port: int,
    log_path: Path,
) -> subprocess.Popen:
    args = [
        _bin("flower-supernode"),
        "--superlink", superlink,
        "--root-certificates", str(ca_path),
        "--auth-supernode-private-key", str(key_path),
        "--node-config", f'adaptery-site="{site_config_path}"',
        "--port", str(runtime_port),
        "--max-retries", "20",
    ]  # fmt: skip
    log = open(log_path, "ab")  # noqa: SIM115 - the child owns it
    return subprocess.Popen(args, env=flower_env(home), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def read_progress(out_dir: Path) -> list[dict]:
    path = Path(out_dir) / "progress.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def stop_flower(home: Path, timeout: float = 10.0) -> None:
    """End every Flower process started with this FLWR_HOME (SuperExec and app processes detach from their
    parent, so a process group is not enough): they are found by the environment we gave them."""
    import psutil

    mine = []
    for process in psutil.process_iter():
        try:
            if process.environ().get("FLWR_HOME") == str(home):
                mine.append(process)
        except (psutil.Error, OSError):
            continue
    for process in mine:
        with contextlib.suppress(psutil.Error):
            process.terminate()
    _, alive = psutil.wait_procs(mine, timeout=timeout)
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.kill()
