"""A client the island tests run inside an island's network namespace (`ip netns exec … python fabric_probe.py`).

Modes, each printing one JSON object (the last line of stdout):
- `requests`: an enrolled agent asks the control plane (`lease`) through its leaf, back to back, for --seconds;
  reports every gap between answers and every request that failed, so a stall or a loss shows.
- `trespass`: an enrolled agent tries another agent's subjects (request and subscription) through its leaf.
- `handshake`: connect to the hub's fabric port with a given certificate (or none); reports how it ended.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import time
from pathlib import Path

import nats
from nats.errors import NoRespondersError

from adaptery.messaging import protocol
from adaptery.messaging.identity import IdentityDir


async def connect(identity_dir: str, url: str) -> tuple[nats.NATS, str]:
    store = IdentityDir(Path(identity_dir))
    me = store.identity()
    agent_id = me.agent_id
    nc = await nats.connect(
        url,
        tls=store.ssl_context(),
        tls_handshake_first=True,  # as agents do
        tls_hostname=me.tls_hostname(url),  # its island leaf's name, as `adaptery agent` checks it
        inbox_prefix=protocol.inbox_prefix(agent_id),
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.2,
    )
    return nc, agent_id


async def requests(args: argparse.Namespace) -> dict:
    nc, agent_id = await connect(args.identity, args.url)
    print("connected", flush=True)  # the test starts its fault from here
    answers, failures = [], []
    deadline = time.monotonic() + args.seconds
    while time.monotonic() < deadline:
        try:
            await nc.request(protocol.agent_subject(agent_id, "lease"), b"{}", timeout=args.timeout)
            answers.append(time.time())
            if len(answers) == 1:
                print("answered", flush=True)  # asking through the link: a fault from here cuts a live exchange
        except Exception as exc:  # noqa: BLE001 - every failure is what this probe reports
            failures.append([time.time(), type(exc).__name__])
            await asyncio.sleep(0.05)
        await asyncio.sleep(args.every)
    await nc.close()
    gaps = [b - a for a, b in zip(answers, answers[1:], strict=False)]
    return {"answers": answers, "failures": failures, "max_gap": max(gaps, default=None)}


async def trespass(args: argparse.Namespace) -> dict:
    nc, agent_id = await connect(args.identity, args.url)
    own = await nc.request(protocol.agent_subject(agent_id, "lease"), b"{}", timeout=10)
    result = {"own": json.loads(own.data)}
    try:
        await nc.request(protocol.agent_subject(args.other, "lease"), b"{}", timeout=3)
        result["other"] = "answered"
    except NoRespondersError:
        result["other"] = "no responders"
    except TimeoutError:
        result["other"] = "timeout"
    await nc.close()
    return result


async def handshake(args: argparse.Namespace) -> dict:
    context = ssl.create_default_context(cafile=args.ca)
    if args.cert:
        context.load_cert_chain(args.cert, args.key)
    try:
        nc = await nats.connect(
            args.url,
            tls=context,
            tls_handshake_first=True,
            allow_reconnect=False,
            max_reconnect_attempts=0,
            connect_timeout=5,
        )
    except Exception as exc:  # noqa: BLE001 - how it was refused is the answer
        return {"connected": False, "error": f"{type(exc).__name__}: {exc}"}
    await nc.close()
    return {"connected": True}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["requests", "trespass", "handshake"])
    parser.add_argument("--identity")
    parser.add_argument("--url", required=True)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--every", type=float, default=0.02)
    parser.add_argument("--timeout", type=float, default=30)
    parser.add_argument("--other")
    parser.add_argument("--ca")
    parser.add_argument("--cert")
    parser.add_argument("--key")
    args = parser.parse_args()
    modes = {"requests": requests, "trespass": trespass, "handshake": handshake}
    print(json.dumps(asyncio.run(modes[args.mode](args))))


if __name__ == "__main__":
    main()
