"""What a fine-tuning job asks of the machine that trains it, and whether an agent has it.

A job may carry `requirements` (all optional): `memory_gb`, the least memory the agent's training device has (a
GPU's own memory on a CUDA agent, the machine's on a CPU one); `accelerator`, "cpu" or "cuda" (absent: either);
`island`, "tenant" to run only on agents enrolled for the job's tenant (a tenant's own island), never on a
platform-wide one. They are stored in the job's `method` JSON under "requirements" (so a retrain, which copies
its parent's method, keeps them) and shown as the job object's own `requirements`.

An agent says what it has in its lease request (`protocol.Capabilities`); the queue hands a job only to an agent
that has all of it. An agent that says nothing (one from before this) is taken for a CPU machine of unknown memory:
it gets only jobs that ask for no accelerator and no memory. Its tenant scope is the control plane's own record,
never the agent's word.
"""

from __future__ import annotations

import math
from typing import Any

from adaptery.db import models as m
from adaptery.services.errors import InvalidRequest

ACCELERATORS = ("cpu", "cuda")
ISLANDS = ("tenant",)
MAX_MEMORY_GB = 1 << 20  # a petabyte: anything above is a typo, not a machine


def parse(raw: Any) -> dict[str, Any]:
    """The requirements of a job creation request, checked; {} for none. InvalidRequest names the field."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise InvalidRequest("requirements must be an object", param="requirements")
    unknown = sorted(set(raw) - {"memory_gb", "accelerator", "island"})
    if unknown:
        param = f"requirements.{unknown[0]}"
        raise InvalidRequest(f"unknown requirement '{unknown[0]}': use memory_gb, accelerator or island", param=param)
    parsed: dict[str, Any] = {}
    memory = raw.get("memory_gb")
    if memory is not None:
        if isinstance(memory, bool) or not isinstance(memory, int | float) or not math.isfinite(memory):
            raise InvalidRequest("requirements.memory_gb must be a number of GiB", param="requirements.memory_gb")
        if not 0 < memory <= MAX_MEMORY_GB:
            raise InvalidRequest(
                f"requirements.memory_gb must be more than 0 and at most {MAX_MEMORY_GB}, not {memory}",
                param="requirements.memory_gb",
            )
        parsed["memory_gb"] = memory
    accelerator = raw.get("accelerator")
    if accelerator is not None:
        if accelerator not in ACCELERATORS:
            raise InvalidRequest(
                f"requirements.accelerator must be one of {', '.join(ACCELERATORS)} (or absent for any), "
                f"not {accelerator!r}",
                param="requirements.accelerator",
            )
        parsed["accelerator"] = accelerator
    island = raw.get("island")
    if island is not None:
        if island not in ISLANDS:
            raise InvalidRequest(
                f"requirements.island must be 'tenant' (only agents of your own island) or absent, not {island!r}",
                param="requirements.island",
            )
        parsed["island"] = island
    return parsed


def of_method(method: dict[str, Any] | None) -> dict[str, Any]:
    requirements = (method or {}).get("requirements")
    return dict(requirements) if isinstance(requirements, dict) else {}


def of(job: m.FineTuningJob) -> dict[str, Any]:
    return of_method(job.method)


def capabilities(raw: Any) -> dict[str, Any]:
    """An agent's lease request's `capabilities`, normalised: accelerator None and memory None where it did not
    say (or said something that is not a capability: the agent's word is taken only in the shape we know)."""
    raw = raw if isinstance(raw, dict) else {}
    accelerator = raw.get("accelerator") if raw.get("accelerator") in ACCELERATORS else None
    memory = raw.get("memory_gb")
    usable = isinstance(memory, int | float) and not isinstance(memory, bool) and math.isfinite(memory) and memory >= 0
    return {"accelerator": accelerator, "memory_gb": float(memory) if usable else None}


def shortfall(
    requirements: dict[str, Any], have: dict[str, Any], *, agent_scope: str | None, tenant_id: str
) -> str | None:
    """What the agent lacks for a job of `tenant_id` with these requirements, as "an agent with ..."; None if
    nothing. `have` is `capabilities(...)`; `agent_scope` is the tenant the agent was enrolled for (None: the
    platform's)."""
    if requirements.get("island") == "tenant" and agent_scope != tenant_id:
        return "an agent of your own island (a platform-wide agent may not run it)"
    accelerator = requirements.get("accelerator")
    if accelerator is not None and have["accelerator"] != accelerator:
        return f"an agent with {accelerator}"
    memory = requirements.get("memory_gb")
    if memory is not None and (have["memory_gb"] is None or have["memory_gb"] < memory):
        return f"an agent with at least {memory:.12g} GiB of memory"
    return None
