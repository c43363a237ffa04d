"""`adaptery storage check`: the blob store against the rows that name its blobs."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time

import pytest

from adaptery.db import models as m
from adaptery.db.ids import new_id
from adaptery.services.storage_check import check_storage
from tests.integration.test_tenancy_and_queue import make_blobs, make_tenant
from tests.unit.test_crypto import SALT, seal_v1

DAY = 24 * 3600


def make_old(path) -> None:
    past = time.time() - DAY
    os.utime(path, (past, past))


@pytest.fixture
def store(db, tmp_path):
    """Tenant a: a file, a checkpoint that lost its optimizer state, a crash's leftover, an upload in flight.
    Tenant b: a file whose sealed bytes were altered on disk. And a cut-off upload in `tmp/`."""
    blobs = make_blobs(db, tmp_path)  # the layout of a data dir: blobs/ and keys/master.key
    a, b = make_tenant(db, "a"), make_tenant(db, "b")
    named = blobs.put_stream(a, [b"training data"]).sha256
    weights, lost = blobs.put_stream(a, [b"weights"]).sha256, blobs.put_stream(a, [b"optimizer"]).sha256
    blobs.delete(a, lost)
    leftover, in_flight = blobs.put_stream(a, [b"old optimizer"]).sha256, blobs.put_stream(a, [b"new upload"]).sha256
    make_old(blobs.path(a, leftover))
    altered = blobs.put_stream(b, [b"b's data " * 1000]).sha256
    sealed = bytearray(blobs.path(b, altered).read_bytes())
    sealed[100] ^= 1
    blobs.path(b, altered).write_bytes(bytes(sealed))
    cut_off = blobs.root / "tmp" / "tmpcutoff"
    cut_off.write_bytes(b"half an upload")
    make_old(cut_off)
    with db.system() as s:
        s.add(m.BaseModel(id="base", ref="/nowhere", display_name="b", finetune_defaults={}))
    with db.tenant(a) as s:
        s.add(m.File(id="file-a", filename="t.jsonl", purpose="fine-tune", bytes=13, sha256=named))
        job = m.FineTuningJob(
            id=new_id("ftjob-"),
            model="base",
            training_file="file-a",
            seed=1,
            hyperparameters={},
            method={"type": "supervised"},
            status="running",
        )
        s.add(job)
        s.flush()
        manifest = {"adapter_model.safetensors": weights, "optimizer.pt": lost}
        checkpoint = m.JobCheckpoint(id="ftckpt-x-4", job_id=job.id, step=4, metrics={}, model_name="m:ckpt-step-4")
        s.add(checkpoint)
        checkpoint.manifest, checkpoint.resumable = manifest, True
    with db.tenant(b) as s:
        s.add(m.File(id="file-b", filename="b.jsonl", purpose="fine-tune", bytes=9000, sha256=altered))
    return blobs, a, b, {"lost": lost, "leftover": leftover, "in_flight": in_flight, "altered": altered}


def test_missing_altered_and_unreferenced_blobs_are_told_apart(db, store):
    blobs, a, b, sha = store
    report = check_storage(db, blobs)
    assert report.tenants == 2 and report.referenced == 4 and report.verified == 0
    assert [(p.tenant_id, p.sha256, p.problem, p.used_by) for p in report.problems] == [
        (a, sha["lost"], "missing from storage", ("checkpoint ftckpt-x-4 (optimizer.pt)",))
    ]
    assert set(report.unreferenced) == {blobs.path(a, sha["leftover"]), blobs.root / "tmp" / "tmpcutoff"}
    assert report.young == 1 and report.removed == 0  # the upload in flight is not counted as a leftover

    verified = check_storage(db, blobs, verify=True)
    assert verified.verified == 3
    altered = [p for p in verified.problems if p.tenant_id == b]
    assert altered[0].sha256 == sha["altered"] and altered[0].problem.startswith("does not authenticate")
    assert altered[0].used_by == ("file file-b",)


def test_the_check_command_removes_only_old_unreferenced_files(db, store, tmp_path):
    blobs, a, _, sha = store
    command = [sys.executable, "-m", "adaptery.cli", "storage", "check", "--data-dir", str(tmp_path)]
    command += ["--database-url", db.url, "--verify", "--remove-unreferenced"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    out = " ".join(result.stdout.split())  # rich wraps long lines
    assert result.returncode == 1, out + result.stderr
    assert "missing from storage; named by checkpoint ftckpt-x-4 (optimizer.pt)" in out
    assert "does not authenticate" in out and "named by file file-b" in out
    assert "2 tenants, 4 blobs named by the database: 2 intact, 2 with problems." in out
    assert "2 files no row names (" in out and "removed." in out
    assert "1 unreferenced files younger than 1 h left alone." in out
    assert not blobs.path(a, sha["leftover"]).exists() and not (blobs.root / "tmp" / "tmpcutoff").exists()
    assert blobs.path(a, sha["in_flight"]).exists()
    assert check_storage(db, blobs).unreferenced == []


def test_a_whole_store_checks_clean(db, tmp_path):
    blobs = make_blobs(db, tmp_path)
    a = make_tenant(db, "a")
    sha = blobs.put_stream(a, [b"x" * 3_000_000]).sha256  # several sealed segments
    with db.tenant(a) as s:
        s.add(m.File(id="file-a", filename="t", purpose="fine-tune", bytes=3_000_000, sha256=sha))
    command = [sys.executable, "-m", "adaptery.cli", "storage", "check", "--data-dir", str(tmp_path)]
    result = subprocess.run([*command, "--database-url", db.url, "--verify"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 tenants, 1 blobs named by the database: 1 intact, 0 with problems." in result.stdout


def test_verify_reads_both_blob_formats_and_catches_an_altered_salt(db, tmp_path):
    """A store from before format version 2 holds version 1 blobs beside the version 2 ones written since."""
    blobs = make_blobs(db, tmp_path)
    a = make_tenant(db, "a")
    old = b"sealed before version 2 " * 5000  # several segments
    old_sha = hashlib.sha256(old).hexdigest()
    blobs.path(a, old_sha).parent.mkdir(parents=True, exist_ok=True)
    blobs.path(a, old_sha).write_bytes(seal_v1(blobs.keyring.data_key(a), old))
    new_sha = blobs.put_stream(a, [b"sealed as version 2 " * 5000]).sha256
    with db.tenant(a) as s:
        s.add(m.File(id="file-old", filename="old", purpose="fine-tune", bytes=len(old), sha256=old_sha))
        s.add(m.File(id="file-new", filename="new", purpose="fine-tune", bytes=len(old) - 5000, sha256=new_sha))
    assert [blobs.path(a, sha).read_bytes()[4] for sha in (old_sha, new_sha)] == [1, 2]
    assert blobs.size(a, old_sha) == len(old) and b"".join(blobs.iter_bytes(a, old_sha)) == old

    report = check_storage(db, blobs, verify=True)
    assert report.ok and report.verified == 2

    sealed = bytearray(blobs.path(a, new_sha).read_bytes())
    sealed[SALT.start + 3] ^= 1  # another salt derives another key: no segment opens
    blobs.path(a, new_sha).write_bytes(bytes(sealed))
    report = check_storage(db, blobs, verify=True)
    assert [(p.sha256, p.used_by) for p in report.problems] == [(new_sha, ("file file-new",))]
    assert report.problems[0].problem.startswith("does not authenticate")
