"""A job's requirements (accelerator, memory, "only my tenant's island") against what the leasing agent has: the
queue hands a job only to an agent that meets them, and a job nobody can run waits, saying why once."""

from __future__ import annotations

import pytest
from nats.aio.msg import Msg
from sqlalchemy import select

from adaptery.db import models as m
from adaptery.messaging import protocol
from adaptery.services import job_requirements
from adaptery.services.control_plane import ControlPlane
from adaptery.services.errors import InvalidRequest
from adaptery.services.queue import JobQueue
from tests.integration.test_tenancy_and_queue import add_file, make_blobs, make_tenant, queued_job

GPU_BOX = {"accelerator": "cuda", "memory_gb": 80.0}
LAPTOP = {"accelerator": "cpu", "memory_gb": 16.0}


@pytest.fixture
def setup(db, tmp_path):
    with db.system() as s:
        s.add(m.BaseModel(id="base", ref="/nowhere", display_name="b", finetune_defaults={}))
    a, b = make_tenant(db, "a"), make_tenant(db, "b")
    queue = JobQueue(db, make_blobs(db, tmp_path), lease_seconds=60, max_attempts=2)
    return queue, a, add_file(db, a), b, add_file(db, b)


def job_requiring(db, tenant_id: str, file_id: str, **requirements) -> str:
    job_id = queued_job(db, tenant_id, file_id)
    with db.system() as s:
        job = s.get(m.FineTuningJob, job_id)
        job.method = {**job.method, "requirements": job_requirements.parse(requirements)}
    return job_id


def events(db, job_id: str) -> list[str]:
    with db.system() as s:
        query = select(m.JobEvent.message).where(m.JobEvent.job_id == job_id).order_by(m.JobEvent.seq)
        return list(s.scalars(query))


def status(db, job_id: str) -> str:
    with db.system() as s:
        return s.get(m.FineTuningJob, job_id).status


def test_a_cuda_job_goes_to_the_gpu_agent_and_the_cpu_agent_takes_the_next_it_can_run(db, setup):
    queue, a, file_a, *_ = setup
    cuda_job = job_requiring(db, a, file_a, accelerator="cuda")
    plain_job = queued_job(db, a, file_a)  # behind it in the queue
    assert queue.lease("laptop", capabilities=LAPTOP).job_id == plain_job  # skips what it cannot run
    assert status(db, cuda_job) == "queued"
    assert events(db, cuda_job) == ["Waiting for an agent with cuda"]
    assert queue.lease("gpu-box", capabilities=GPU_BOX).job_id == cuda_job


def test_a_job_nobody_can_run_stays_queued_and_says_why_once(db, setup):
    queue, a, file_a, *_ = setup
    big = job_requiring(db, a, file_a, memory_gb=64)
    for _ in range(3):
        assert queue.lease("laptop", capabilities=LAPTOP) is None
        assert queue.lease("other-laptop", capabilities=LAPTOP) is None
    assert JobQueue(queue.db, queue.blobs, lease_seconds=60, max_attempts=2).lease("x", capabilities=LAPTOP) is None
    assert status(db, big) == "queued"
    assert events(db, big) == ["Waiting for an agent with at least 64 GiB of memory"]  # a restarted server too
    assert queue.lease("gpu-box", capabilities=GPU_BOX).job_id == big  # 80 GiB: enough


def test_an_agent_that_says_nothing_gets_only_jobs_without_requirements(db, setup):
    queue, a, file_a, *_ = setup
    on_cpu = job_requiring(db, a, file_a, accelerator="cpu")
    some_memory = job_requiring(db, a, file_a, memory_gb=1)
    assert queue.lease("old-agent") is None  # taken for a CPU machine of unknown memory: neither is safe to give
    assert queue.lease("old-agent", capabilities={"accelerator": "tpu", "memory_gb": -3}) is None  # not a shape we know
    assert events(db, on_cpu) == ["Waiting for an agent with cpu"]
    assert events(db, some_memory) == ["Waiting for an agent with at least 1 GiB of memory"]
    plain = queued_job(db, a, file_a)
    assert queue.lease("old-agent").job_id == plain
    assert queue.lease("laptop", capabilities=LAPTOP).job_id == on_cpu


def test_an_island_job_runs_only_on_its_own_tenants_agents(db, setup):
    queue, a, file_a, b, file_b = setup
    island_job = job_requiring(db, a, file_a, island="tenant", accelerator="cuda")
    assert queue.lease("platform-gpu", capabilities=GPU_BOX) is None  # platform-wide: never, whatever it has
    assert queue.lease("b-island-gpu", tenant_scope=b, capabilities=GPU_BOX) is None  # another tenant's island
    assert queue.lease("a-island-laptop", tenant_scope=a, capabilities=LAPTOP) is None  # its island, without cuda
    assert events(db, island_job) == [
        "Waiting for an agent of your own island (a platform-wide agent may not run it)",
        "Waiting for an agent with cuda",
    ]
    b_job = queued_job(db, b, file_b)  # the other tenant's island still works for its own tenant
    assert queue.lease("b-island-gpu", tenant_scope=b, capabilities=GPU_BOX).job_id == b_job
    assert queue.lease("a-island-gpu", tenant_scope=a, capabilities=GPU_BOX).job_id == island_job


def test_the_control_plane_hands_capabilities_from_the_lease_request_to_the_queue(db, setup, tmp_path):
    """Through the NATS responder, as agents ask: another tenant's agent never gets an island job."""
    queue, a, file_a, b, _ = setup
    island_job = job_requiring(db, a, file_a, island="tenant", accelerator="cuda", memory_gb=40)
    control = ControlPlane(
        queue,
        queue.blobs,
        tmp_path / "uploads",
        url="nats://127.0.0.1:1",  # never connected: the test calls the responder directly
        user=None,
        password=None,
        max_upload_bytes=1 << 20,
        agent_scope={"agent-a": a, "agent-b": b, "platform": None},
    )
    try:

        def lease(agent_id: str, body: dict) -> dict:
            msg = Msg(None, subject=protocol.agent_subject(agent_id, "lease"), data=protocol.encode(body))
            reply, _ = control._handle(msg)
            return protocol.decode(reply)

        assert lease("agent-b", {"capabilities": GPU_BOX})["assignment"] is None
        assert lease("platform", {"capabilities": GPU_BOX})["assignment"] is None
        assert lease("agent-a", {})["assignment"] is None  # an agent from before capabilities
        assert lease("agent-a", {"capabilities": {"accelerator": "cuda", "memory_gb": 24}})["assignment"] is None
        assert lease("agent-a", {"capabilities": GPU_BOX})["assignment"]["job_id"] == island_job
    finally:
        control._workers.shutdown()
        control._loop.close()


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        ({"accelerator": "tpu"}, "requirements.accelerator"),
        ({"memory_gb": -1}, "requirements.memory_gb"),
        ({"memory_gb": 0}, "requirements.memory_gb"),
        ({"memory_gb": "lots"}, "requirements.memory_gb"),
        ({"memory_gb": True}, "requirements.memory_gb"),
        ({"island": "platform"}, "requirements.island"),
        ({"gpus": 2}, "requirements.gpus"),
        (["cuda"], "requirements"),
    ],
)
def test_bad_requirements_are_refused_naming_the_field(raw, param):
    with pytest.raises(InvalidRequest) as refused:
        job_requirements.parse(raw)
    assert refused.value.param == param


def test_good_requirements_are_kept_as_given():
    assert job_requirements.parse(None) == job_requirements.parse({}) == {}
    given = {"memory_gb": 7.5, "accelerator": "cuda", "island": "tenant"}
    assert job_requirements.parse(given) == given
