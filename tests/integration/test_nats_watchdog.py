"""The platform's NATS server, killed from outside (an attacker's report: both servers died at once and stayed
dead until `serve` was restarted, every agent cut off): the watchdog restarts it on the same port, and the
control plane and agents are back without anyone restarting anything."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from adaptery.messaging import protocol
from tests.integration.test_queue import connect, enroll, settings_overrides  # noqa: F401 - no embedded agent


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_nats_server_killed_from_outside_is_restarted_and_agents_are_served_again(running):
    nats, control = running.platform.nats, running.platform.control
    agent = enroll(running, "survivor")
    port, killed = nats.port, nats.process.pid
    os.kill(killed, signal.SIGKILL)

    deadline = time.monotonic() + 15
    while (nats.restarts < 1 or nats.process.poll() is not None) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert nats.restarts == 1 and nats.process.pid != killed and nats.process.poll() is None
    assert nats.port == port  # the same address: clients redial it by themselves

    async def lease() -> dict:
        until = time.monotonic() + 15
        while True:  # the control plane redials within its reconnect wait
            nc = await connect(running, agent)
            try:
                reply = await nc.request(protocol.agent_subject(agent.agent_id, "lease"), b"{}", timeout=2)
                return protocol.decode(reply.data)
            except Exception:
                if time.monotonic() > until:
                    raise
                await asyncio.sleep(0.2)
            finally:
                await nc.close()

    assert asyncio.run(lease()) == {"assignment": None}
    assert control._nc.is_connected
