"""What an infer agent keeps at rest is sealed under its own key; the engine loads a plaintext copy that lives only
in the agent's private scratch and goes with its cache entry."""

from __future__ import annotations

import hashlib
import stat
from pathlib import Path

from adaptery.agent.inference import AdapterCache
from adaptery.agent.vault import AgentVault
from adaptery.messaging.protocol import InferRequest

WEIGHTS = b"lora weights that only this tenant may read " * 4000
CONFIG = b'{"r": 8, "lora_alpha": 16}'


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def make_vault(tmp_path: Path) -> AgentVault:
    return AgentVault(tmp_path / "keys" / "agent.key", tmp_path / "scratch")


def test_a_sealed_file_opens_only_with_its_key_and_its_hash(tmp_path):
    vault = make_vault(tmp_path)
    assert mode(tmp_path / "keys" / "agent.key") == 0o600
    plain = tmp_path / "plain.safetensors"
    plain.write_bytes(WEIGHTS)
    sealed = tmp_path / "cache" / "a" / "adapter_model.safetensors"
    vault.seal(plain, sealed)
    assert mode(sealed) == 0o600 and mode(sealed.parent) == 0o700
    assert b"only this tenant" not in sealed.read_bytes()

    sha = hashlib.sha256(WEIGHTS).hexdigest()
    target = tmp_path / "scratch" / "out"
    assert vault.unseal(sealed, target, sha) and target.read_bytes() == WEIGHTS
    assert not vault.unseal(sealed, tmp_path / "scratch" / "wrong", "0" * 64)  # not the hash asked for
    assert not (tmp_path / "scratch" / "wrong").exists()

    tampered = bytearray(sealed.read_bytes())
    tampered[len(tampered) // 2] ^= 1
    sealed.write_bytes(bytes(tampered))
    assert not vault.unseal(sealed, tmp_path / "scratch" / "edited", sha)
    assert not (tmp_path / "scratch" / "edited").exists()

    other = AgentVault(tmp_path / "other.key", tmp_path / "scratch2")  # another agent's key opens nothing
    vault.seal(plain, sealed)
    assert not other.unseal(sealed, tmp_path / "scratch2" / "x", sha)


class FakeLink:
    def __init__(self) -> None:
        self.fetched: list[str] = []

    def download_adapter(self, request_id: str, sha256: str, target: Path) -> Path:
        self.fetched.append(sha256)
        target.write_bytes({hashlib.sha256(WEIGHTS).hexdigest(): WEIGHTS}.get(sha256, CONFIG))
        return target


def request(key: str) -> InferRequest:
    files = {
        "adapter_model.safetensors": hashlib.sha256(WEIGHTS).hexdigest(),
        "adapter_config.json": hashlib.sha256(CONFIG).hexdigest(),
    }
    return InferRequest(f"req-{key[:4]}", "base", [1], {}, adapter_key=key, adapter_files=files)


def test_a_cached_adapter_is_sealed_on_disk_and_plain_only_in_the_private_scratch(tmp_path):
    vault = make_vault(tmp_path)
    cache = AdapterCache(tmp_path / "adapters", 1, vault)
    link = FakeLink()
    first, second = "a" * 64, "b" * 64
    spec, hit = cache.acquire(link, request(first))  # type: ignore[arg-type]
    assert not hit and spec.path.is_relative_to(vault.scratch) and mode(vault.scratch) == 0o700
    assert (spec.path / "adapter_model.safetensors").read_bytes() == WEIGHTS  # what the engine loads
    at_rest = [p for p in (tmp_path / "adapters").rglob("*") if p.is_file()]
    assert {p.name for p in at_rest} == {"adapter_model.safetensors", "adapter_config.json"}
    assert all(b"only this tenant" not in p.read_bytes() and mode(p) == 0o600 for p in at_rest)
    cache.release(first)

    cache.acquire(link, request(second))  # type: ignore[arg-type]  # capacity 1: the first is evicted, both copies
    assert not spec.path.exists() and not (tmp_path / "adapters" / first).exists()
