"""Base models an enrolled agent fetches from the platform: once, verified by hash, sealed at rest.

`adaptery agent --base ID=PATH` serves a base from a local directory. `--base ID` alone (no such directory), and a
training job whose base is not on this machine, fetch it from the platform instead: the control plane lists the
base's files (configs, tokenizer, safetensors weights only) with their SHA-256 and a presigned URL each (the `base`
request), each file streams over HTTPS (`agent/transfers.py`) into the agent's private scratch, is checked against
its hash there, and is kept sealed under the agent's key (`agent/vault.py`). A later start unseals that copy,
checked against the platform's current hashes, and fetches only what changed or does not verify.
"""

from __future__ import annotations

import hashlib
import re
import threading
from pathlib import Path
from typing import Any

from adaptery.agent.link import AgentLink
from adaptery.agent.transfers import TransferFailed
from adaptery.agent.vault import AgentVault
from adaptery.messaging import protocol

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_FILE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_WEIGHTS = (".bin", ".pt", ".pth", ".pkl", ".ckpt", ".h5", ".msgpack")  # never loaded: safetensors only


class BaseStore:
    def __init__(self, directory: Path, vault: AgentVault) -> None:
        self.directory = directory
        self.vault = vault
        self._lock = threading.Lock()

    def ensure(self, link: AgentLink, base_id: str) -> Path:
        """The base's directory in the private scratch, every file verified against the platform's hash."""
        if link.transfers is None:
            raise ValueError(
                f"base model {base_id!r}: fetching a base from the platform needs an enrolled agent (--identity); "
                "give a local directory as --base ID=PATH otherwise"
            )
        files = self._listing(link, base_id)
        name = hashlib.sha256(base_id.encode()).hexdigest()[:32]
        with self._lock:
            plain, sealed = self.vault.plain_dir("bases", name), self.directory / name
            for file_name in sorted(files):
                target, kept = plain / file_name, sealed / file_name
                if kept.is_file() and self.vault.unseal(kept, target, files[file_name]["sha256"]):
                    continue  # fetched before and still the platform's
                try:
                    self._download(link, files[file_name], target)
                except TransferFailed as exc:
                    if not exc.retryable:
                        raise
                    # the URLs live minutes and a large base takes longer: ask for fresh ones, once
                    files = self._listing(link, base_id)
                    self._download(link, files[file_name], target)
                self.vault.seal(target, kept)
            for stale in [*plain.iterdir(), *(sealed.iterdir() if sealed.is_dir() else [])]:
                if stale.name not in files:
                    stale.unlink(missing_ok=True)
        return plain

    @staticmethod
    def _listing(link: AgentLink, base_id: str) -> dict[str, dict[str, Any]]:
        listing = link.call(protocol.agent_subject(link.agent_id, protocol.BASE_VERB), {"base_id": base_id})
        return _checked(base_id, listing.get("files"))

    @staticmethod
    def _download(link: AgentLink, described: dict[str, Any], target: Path) -> None:
        link.transfers.download(described["url"], described["sha256"], described["bytes"], target)


def _checked(base_id: str, files: Any) -> dict[str, dict[str, Any]]:  # noqa: ANN401 - the control plane's JSON
    """The listing, refused unless every name is a plain file name, every hash a sha256, and the weights are
    safetensors only."""
    if not isinstance(files, dict) or not files:
        raise ValueError(f"base model {base_id!r}: the platform listed no files")
    for name, described in files.items():
        if not isinstance(name, str) or not _FILE_NAME.match(name) or name.endswith(_WEIGHTS):
            raise ValueError(f"base model {base_id!r}: refusing the file {name!r} (safetensors weights only)")
        if not isinstance(described, dict) or not _SHA256.match(str(described.get("sha256"))):
            raise ValueError(f"base model {base_id!r}: {name} has no sha256")
        if not isinstance(described.get("bytes"), int) or not isinstance(described.get("url"), str):
            raise ValueError(f"base model {base_id!r}: {name} has no size or URL")
    if not any(name.endswith(".safetensors") for name in files):
        raise ValueError(f"base model {base_id!r} has no safetensors weights")
    return files
