"""Adapters out as PEFT zips that PEFT loads unchanged, and back in; pickles and misfits refused."""

from __future__ import annotations

import io
import json
import zipfile

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import SAMPLE_CHAT
from tests.integration.helpers import upload_sample, wait_for_job

RECORD = next(
    r
    for r in map(json.loads, SAMPLE_CHAT.read_text().splitlines())
    if all(m["role"] != "system" for m in r["messages"])
)
QUESTION = [m for m in RECORD["messages"] if m["role"] == "user"]
ANSWER = RECORD["messages"][-1]["content"]


@pytest.fixture
def trained(running) -> str:
    file = upload_sample(running.client, running.auth())
    job = running.client.post(
        "/v1/fine_tuning/jobs",
        headers=running.auth(),
        json={"model": "adaptery-demo", "training_file": file["id"], "suffix": "out"},
    ).json()
    done = wait_for_job(running.client, running.auth(), job["id"], ("succeeded", "failed"))
    assert done["status"] == "succeeded", done["error"]
    return done["fine_tuned_model"]


def ask(running, model: str) -> str:
    response = running.client.post(
        "/v1/chat/completions",
        headers=running.auth(),
        json={"model": model, "messages": QUESTION, "temperature": 0, "max_tokens": 40},
    )
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def zip_of(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def import_zip(running, data: bytes, **params):
    return running.client.post(
        "/api/models/import", params={"base_model": "adaptery-demo", **params}, content=data, headers=running.auth()
    )


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # one backend is enough here
def test_downloaded_adapter_loads_in_peft_unchanged_and_imports_back(running, trained, demo_model_dir, tmp_path):
    response = running.client.get(f"/api/models/{trained}/download", headers=running.auth())
    assert response.status_code == 200 and response.headers["content-type"] == "application/zip"
    archive = zipfile.ZipFile(io.BytesIO(response.content))
    names = set(archive.namelist())
    assert {"adapter_config.json", "adapter_model.safetensors"} <= names
    assert not any(n.endswith((".bin", ".pt")) for n in names)
    config = json.loads(archive.read("adapter_config.json"))
    assert config["base_model_name_or_path"] == "adaptery-demo"  # the model id, never a path on the server
    archive.extractall(tmp_path / "adapter")

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "adapter")  # the chat template travels with it
    base = AutoModelForCausalLM.from_pretrained(demo_model_dir)
    model = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    prompt = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=40, do_sample=False, eos_token_id=tokenizer.eos_token_id)
    assert tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True) == ANSWER == ask(running, trained)

    imported = import_zip(running, response.content, suffix="again")
    assert imported.status_code == 200, imported.text
    model_id = imported.json()["id"]
    assert model_id.startswith("ft:adaptery-demo:default:again:")
    assert model_id in [m["id"] for m in running.client.get("/v1/models", headers=running.auth()).json()["data"]]
    assert ask(running, model_id) == ANSWER


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"adapter_config.json": b"{}", "adapter_model.bin": b"\x80\x04pickle"}, "refusing pickled weights"),
        ({"adapter/adapter_config.json": b"{}", "adapter/model.pt": b"x"}, "refusing pickled weights"),
        ({"../adapter_config.json": b"{}", "../adapter_model.safetensors": b"x"}, "unsafe path"),
        (
            {"adapter_config.json": b"{}", "adapter_model.safetensors": b"x", "setup.py": b"import os"},
            "unexpected file",
        ),
        ({"adapter_config.json": b"{}"}, "no adapter_model.safetensors"),
        (
            {"adapter_config.json": b'{"peft_type": "PROMPT_TUNING"}', "adapter_model.safetensors": b"x"},
            "is not served yet",
        ),
        (
            {"adapter_config.json": b'{"peft_type": "LORA", "r": 16}', "adapter_model.safetensors": b"garbage"},
            "not a valid safetensors file",
        ),
    ],
)
def test_unsafe_or_broken_adapters_are_refused_and_nothing_is_registered(running, files, message):
    response = import_zip(running, zip_of(files))
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]["message"]
    assert response.json()["error"]["code"] == "invalid_adapter"
    assert [m["id"] for m in running.client.get("/v1/models", headers=running.auth()).json()["data"]] == [
        "adaptery-demo",
        "all-MiniLM-L6-v2",
    ]


def test_not_a_zip_is_refused(running):
    response = import_zip(running, b"just bytes")
    assert response.status_code == 400 and "not a zip" in response.json()["error"]["message"]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # service logic: one backend is enough
def test_an_adapter_for_another_base_or_too_high_a_rank_is_refused(running, trained, tmp_path):
    original = zipfile.ZipFile(
        io.BytesIO(running.client.get(f"/api/models/{trained}/download", headers=running.auth()).content)
    )
    files = {name: original.read(name) for name in original.namelist()}
    config = json.loads(files["adapter_config.json"])
    lying = {**files, "adapter_config.json": json.dumps({**config, "r": 8}).encode()}
    response = import_zip(running, zip_of(lying))
    assert response.status_code == 400 and "do not fit this base model" in response.json()["error"]["message"]
    too_big = {**files, "adapter_config.json": json.dumps({**config, "r": 1024}).encode()}
    assert "outside what this server serves" in import_zip(running, zip_of(too_big)).json()["error"]["message"]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # service logic: one backend is enough
def test_other_tenant_cannot_download_my_adapter(running, trained):
    other = running.auth(running.new_tenant("other", "mallory").api_key)
    assert running.client.get(f"/api/models/{trained}/download", headers=other).status_code == 404
    unknown_base = running.client.post(
        "/api/models/import", params={"base_model": trained}, content=b"x", headers=other
    )
    assert unknown_base.status_code == 404


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # service logic: one backend is enough
def test_an_adapter_is_prompted_with_the_chat_template_stored_beside_it(running, trained):
    """Serving formats prompts exactly as training did: the template travels with the adapter."""
    archive = zipfile.ZipFile(
        io.BytesIO(running.client.get(f"/api/models/{trained}/download", headers=running.auth()).content)
    )
    files = {name: archive.read(name) for name in archive.namelist()}
    files["chat_template.jinja"] = (
        b"{% for m in messages %}### {{ m['role'] }} said, at some length: {{ m['content'] }}\n{% endfor %}"
        b"{% if add_generation_prompt %}### assistant:{% endif %}"
    )
    imported = import_zip(running, zip_of(files), suffix="tpl")
    assert imported.status_code == 200, imported.text

    def prompt_tokens(model: str) -> int:
        body = {"model": model, "messages": QUESTION, "max_tokens": 1, "temperature": 0}
        response = running.client.post("/v1/chat/completions", headers=running.auth(), json=body)
        assert response.status_code == 200, response.text
        return response.json()["usage"]["prompt_tokens"]

    trained_tokens, base_tokens = prompt_tokens(trained), prompt_tokens("adaptery-demo")
    assert trained_tokens == base_tokens  # trained here: the base's own template was saved with it
    assert prompt_tokens(imported.json()["id"]) > base_tokens + 5
