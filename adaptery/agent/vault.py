"""What an agent keeps at rest is sealed under a key of its own; plaintext lives only in a private scratch.

Cached adapters and fetched base weights are kept in the platform's blob format (`storage/crypto.py`: AES-256-GCM
in authenticated 64 KiB segments, a key per file derived from the agent's key and a random salt), under a 32-byte
key made on first use in a 0600 file beside the agent's data. Code that needs a path (the engine loading an
adapter or a base, the trainer) gets a plaintext copy in the agent's scratch: a 0700 directory of this process,
in memory (`/dev/shm`) where the machine has it, removed with its entry, when the process exits, and, should it
have been killed, by the next agent that starts (`storage.modes.make_scratch`).

A sealed file is opened only through its authentication, and every plaintext copy is checked against the hash
the platform named before it is used: a sealed copy that was altered, or one from another key, is fetched again.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
from pathlib import Path

from adaptery.storage.crypto import DataKey, TamperedError, new_master_key_text, write_key_file
from adaptery.storage.modes import make_scratch, private_dir

CHUNK = 1024 * 1024
MEMORY_TMP = Path("/dev/shm")


class AgentVault:
    def __init__(self, key_file: Path, scratch: Path | None = None) -> None:
        if not key_file.exists():
            write_key_file(key_file, new_master_key_text())
        self.key = DataKey(base64.b64decode(key_file.read_text().strip(), validate=True))
        in_memory = MEMORY_TMP if MEMORY_TMP.is_dir() and os.access(MEMORY_TMP, os.W_OK) else None
        self.scratch = private_dir(scratch) if scratch is not None else make_scratch(in_memory)

    def seal(self, plaintext: Path, sealed: Path) -> None:
        """Write `plaintext` sealed to `sealed` (0600, atomically: never a partial file under its name)."""
        private_dir(sealed.parent)
        partial = sealed.with_name(sealed.name + ".part")
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "wb") as sink, plaintext.open("rb") as source:
                writer = self.key.encryptor(sink)
                for chunk in iter(lambda: source.read(CHUNK), b""):
                    writer.write(chunk)
                writer.close()
            os.replace(partial, sealed)
        finally:
            partial.unlink(missing_ok=True)

    def unseal(self, sealed: Path, target: Path, sha256: str) -> bool:
        """Decrypt `sealed` into `target` (in the scratch) if it authenticates and its plaintext hashes to
        `sha256`; otherwise leave nothing and say so."""
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        digest = hashlib.sha256()
        try:
            with sealed.open("rb") as source, _private_file(target) as out:
                for chunk in self.key.decrypt_stream(source):
                    out.write(chunk)
                    digest.update(chunk)
        except (OSError, TamperedError):
            target.unlink(missing_ok=True)
            return False
        if digest.hexdigest() != sha256:
            target.unlink(missing_ok=True)
            return False
        return True

    def plain_dir(self, *parts: str) -> Path:
        """A directory in the scratch for plaintext copies (0700)."""
        path = self.scratch.joinpath(*parts)
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        return path

    def wipe(self, path: Path) -> None:
        shutil.rmtree(path, ignore_errors=True)


def _private_file(path: Path):  # noqa: ANN202 - a file object
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb")
