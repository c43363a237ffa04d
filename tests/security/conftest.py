"""A tenant with one person of each role, an outsider, keys in every state, and objects to aim at."""

from __future__ import annotations

import io
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from adaptery.api.app import create_app
from adaptery.auth.principal import Role
from adaptery.db import models as m
from adaptery.db.ids import new_id
from adaptery.platform import Platform
from adaptery.services import keys
from tests.conftest import BACKENDS, SAMPLE_CHAT, PostgresDatabases
from tests.integration.conftest import Running, make_settings


def add_user(platform: Platform, tenant_id: str, username: str, role: Role) -> str:
    with platform.db.system() as s:
        user = m.User(id=new_id("user_"), username=username)
        s.add(user)
        s.flush()
        s.add(m.Membership(id=new_id("mem_"), tenant_id=tenant_id, user_id=user.id, role=role.value))
        return user.id


def add_key(platform: Platform, tenant_id: str, user_id: str, **options: object) -> str:
    with platform.db.system() as s:
        return keys.create_key(s, tenant_id=tenant_id, user_id=user_id, **options).secret


def lora_zip(base_dir: Path, work: Path, *, seed: int = 0) -> bytes:
    """A real PEFT LoRA adapter for the demo base (random weights), zipped as `models import` takes it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    peft = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    peft.save_pretrained(work)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in work.iterdir():
            if path.suffix in (".safetensors", ".json"):  # PEFT also writes a README model card
                archive.write(path, path.name)
    return buffer.getvalue()


@dataclass
class World:
    running: Running
    tenant_id: str
    other_tenant_id: str
    tokens: dict[str, str]  # principal -> bearer token
    users: dict[str, str]  # username -> user id
    ids: dict[str, str] = field(default_factory=dict)  # path parameter -> an object of the tenant

    @property
    def client(self) -> TestClient:
        return self.running.client

    @property
    def platform(self) -> Platform:
        return self.running.platform

    def auth(self, principal: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[principal]}"}


@pytest.fixture
def platform_running(tmp_path: Path, database_url: str, demo_model_dir: Path) -> Iterator[Running]:
    """An in-process platform without the embedded agent: nothing trains behind the tests' backs."""
    platform = Platform(make_settings(tmp_path, database_url, demo_model_dir, embedded_agent=False))
    first = platform.prepare()
    with TestClient(create_app(platform)) as client:
        yield Running(platform, client, first)


@pytest.fixture(scope="module", params=BACKENDS)
def platform_once(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    postgres: PostgresDatabases | None,
    demo_model_dir: Path,
) -> Iterator[Running]:
    """`platform_running`, once for a module whose tests leave the objects they aim at as they found them."""
    tmp_path = tmp_path_factory.mktemp("platform")
    url = f"sqlite:///{tmp_path / 'adaptery.db'}" if request.param == "sqlite" else postgres.create()
    platform = Platform(make_settings(tmp_path, url, demo_model_dir, embedded_agent=False))
    first = platform.prepare()
    try:
        with TestClient(create_app(platform)) as client:
            yield Running(platform, client, first)
    finally:
        if request.param != "sqlite":
            postgres.drop(url)


@pytest.fixture(scope="session")
def lora_bytes(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return lora_zip(demo_model_dir, tmp_path_factory.mktemp("lora"))


@pytest.fixture
def world(platform_running: Running, lora_bytes: bytes) -> World:
    return build_world(platform_running, lora_bytes)


@pytest.fixture(scope="module")
def world_once(platform_once: Running, lora_bytes: bytes) -> World:
    return build_world(platform_once, lora_bytes)


def build_world(running: Running, lora_bytes: bytes) -> World:
    p = running.platform
    lab = running.new_tenant("lab", "lab-owner")
    other = running.new_tenant("elsewhere", "else-owner")
    users = {"lab-owner": lab.owner.id}
    tokens = {"owner": lab.api_key, "platform_admin": running.first.api_key}
    for role in (Role.ADMIN, Role.MEMBER, Role.VIEWER):
        users[f"lab-{role}"] = add_user(p, lab.tenant.id, f"lab-{role}", role)
        tokens[role.value] = add_key(p, lab.tenant.id, users[f"lab-{role}"])
    users["lab-target"] = add_user(p, lab.tenant.id, "lab-target", Role.MEMBER)
    outsider = add_user(p, other.tenant.id, "else-member", Role.MEMBER)
    tokens["other_tenant_member"] = add_key(p, other.tenant.id, outsider)
    tokens["revoked"] = add_key(p, lab.tenant.id, lab.owner.id)
    tokens["expired"] = add_key(p, lab.tenant.id, lab.owner.id, expires_in_days=1)
    with p.db.system() as s:
        for name, column in (("revoked", "revoked_at"), ("expired", "expires_at")):
            record = s.get(m.ApiKey, tokens[name].split("-")[2])
            setattr(record, column, time.time() - 1)
    world = World(running, lab.tenant.id, other.tenant.id, tokens, users)

    client = running.client
    owner, member = world.auth("owner"), world.auth("member")
    upload = client.post(
        "/v1/files", headers=owner, files={"file": ("t.jsonl", SAMPLE_CHAT.read_bytes())}, data={"purpose": "fine-tune"}
    )
    world.ids["file_id"] = upload.json()["id"]
    dataset = client.post(
        "/api/datasets", params={"filename": "t.jsonl"}, content=SAMPLE_CHAT.read_bytes(), headers=owner
    )
    world.ids["dataset_id"] = dataset.json()["id"]
    job = client.post(
        "/v1/fine_tuning/jobs", headers=owner, json={"model": "adaptery-demo", "training_file": world.ids["file_id"]}
    )
    world.ids["job_id"] = job.json()["id"]
    adapter = client.post(
        "/api/models/import",
        params={"base_model": "adaptery-demo", "suffix": "sec"},
        content=lora_bytes,
        headers=member,  # the member creates it, so the member may delete and share it
    )
    assert adapter.status_code == 200, adapter.text
    world.ids["model_id"] = adapter.json()["id"]
    victim = client.post("/api/keys", headers=owner, json={"name": "victim"}).json()
    world.ids["key_id"] = victim["id"]
    world.ids["username"] = "lab-target"
    world.ids["tenant_id"] = lab.tenant.id
    world.ids["number"] = "1"
    return world
