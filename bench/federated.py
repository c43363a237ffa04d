"""Benchmark: our secure aggregation against Flower's SecAgg+, federated accuracy, and SPF ratios.

    PYTHONPATH=. .venv/bin/python bench/federated.py --json-out federated.json

1. Protocol cost per round, ours against Flower's own SecAgg+ (flwr's `SecAggPlusWorkflow` on the server,
   `secaggplus_mod` on each client, unchanged) on the same update size, in the same run. Both run through
   one in-process Flower Grid (`LoopbackGrid`): every message is serialised to Flower's protobuf wire form,
   handed to the node's ClientApp, and the reply serialised back, so both pay the same framing and the
   bytes are what Flower would put on the wire. Ours is the platform's own `Coordinator.round` and
   ClientApp stages (adaptery/federated/apps.py), with the model left out: each site contributes a fixed
   vector instead of training. Flower's deployment engine would add the same polling latency to both
   (~3 s per stage, see FEDERATED-NOTES.md), which would hide the protocols' own cost; the simulation
   engine needs Ray. Wall time is the whole round on one core (all sites and the coordinator, in turn),
   the fastest of `--repeats` (the two protocols alternate, so a busy machine slows both alike);
   bytes are what one surviving site uploads in the round (all stages). Both are run with every site
   answering and with the last site dropping after sharing its keys (before its masked input), the case
   both protocols recover from with Shamir shares. Flower is configured with every site a neighbour of every
   other (num_shares = sites, the full graph ours uses), reconstruction threshold as ours, clipping range =
   our bound, its default 2^22 quantization; its FedAvg strategy's own aggregate_fit is part of its round.
   Ours does more per round (five stages with the consistency round, keys signed and checked against each
   site's roster, ChaCha20 masks) and uploads uint32 where Flower uploads int64.
2. Accuracy: a synthetic task with one domain per site (each site's answers use its own vocabulary and
   phrasing); eval loss on held-out examples of all domains for FFA-LoRA trained federatedly (secure
   aggregation in process), for each site training alone on its slice, and for centralised training on
   the union, each with the same number of optimizer steps per site (centralised: the sites' batches
   together, one optimizer for the whole run).
3. SPF: the same federated training with 12.5/25/50/100% of attention heads tuned (100% is the run of 2.):
   trainable values, bytes each site uploads per round (the secure aggregation payloads of all five stages,
   without Flower's framing), and the eval loss.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from uuid import uuid4

import numpy as np
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict  # noqa: E402
from flwr.app.error import Error  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.common import ndarrays_to_parameters  # noqa: E402
from flwr.common.constant import SUPERLINK_NODE_ID as SUPERLINK_NODE  # noqa: E402
from flwr.common.serde import message_from_proto, message_to_proto  # noqa: E402
from flwr.proto.message_pb2 import Message as ProtoMessage  # noqa: E402
from flwr.serverapp import Grid  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from adaptery.federated import apps, secagg  # noqa: E402
from adaptery.federated.config import FederatedLoraConfig  # noqa: E402

# ---------------------------------------------------------------------------------------------
# One in-process Grid for both protocols


class LoopbackGrid(Grid):
    """Flower's Grid in one process: messages go through Flower's protobuf serialisation both ways.

    `drop_after[node] = k`: the node answers its first k messages, then replies with an error (what a
    coordinator sees of a site that left); counted bytes are those of the serialised messages."""

    def __init__(self, apps_by_node: dict[int, ClientApp], node_config: dict[int, dict], drop_after: dict[int, int]):
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, SUPERLINK_NODE, 1  # as a ServerApp is told
        self.apps = apps_by_node
        self.contexts = {
            node: Context(run_id=1, node_id=node, node_config=node_config[node], state=RecordDict(), run_config={})
            for node in apps_by_node
        }
        self.drop_after = drop_after
        self.answered = dict.fromkeys(apps_by_node, 0)
        self.uploaded = dict.fromkeys(apps_by_node, 0)
        self.downloaded = dict.fromkeys(apps_by_node, 0)
        self.replies: dict[str, Message] = {}

    def set_run(self, run) -> None:  # noqa: ANN001 - one fixed run
        raise NotImplementedError

    @property
    def run(self):  # noqa: ANN201
        return SimpleNamespace(run_id=1)

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:  # noqa: ANN001
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> list[int]:
        return list(self.apps)

    def push_messages(self, messages) -> list[str]:  # noqa: ANN001
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = str(uuid4())
            message.metadata.__dict__["_src_node_id"] = SUPERLINK_NODE
            node = message.metadata.dst_node_id
            wire = message_to_proto(message).SerializeToString()
            self.downloaded[node] += len(wire)
            received = message_from_proto(ProtoMessage.FromString(wire))
            if self.answered[node] >= self.drop_after.get(node, 1 << 30):
                reply = Message(Error(code=0, reason="site dropped out"), reply_to=received)
            else:
                reply = self.apps[node](received, self.contexts[node])
            self.answered[node] += 1
            wire = message_to_proto(reply).SerializeToString()
            self.uploaded[node] += len(wire)
            self.replies[message.metadata.message_id] = message_from_proto(ProtoMessage.FromString(wire))
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids) -> list[Message]:  # noqa: ANN001
        return [self.replies.pop(mid) for mid in message_ids if mid in self.replies]

    def send_and_receive(self, messages, *, timeout=None) -> list[Message]:  # noqa: ANN001
        return self.pull_messages(self.push_messages(list(messages)))


# ---------------------------------------------------------------------------------------------
# Ours: the platform's coordinator and site stages on a fixed vector

FIXED_VALUES: dict[int, np.ndarray] = {}  # site -> its contribution (weighted update, weighted loss, weight)
ours_app = ClientApp()


@ours_app.query("advertise")
def _advertise_fixed(message: Message, context: Context) -> Message:
    site = apps._site(context)
    roster = apps.load_roster(Path(site.roster_path))
    advert, _ = apps.open_round(message, context, site, roster, FIXED_VALUES[site.site], FederatedLoraConfig().bound)
    return apps._reply(message, "advert", ConfigRecord(advert.to_dict()))


for _stage in apps.STAGES[1:]:
    ours_app.query(_stage)(getattr(apps, _stage))


class ProtocolCoordinator(apps.Coordinator):
    """The platform's coordinator with the model left out: `round` on a vector of `size` values."""

    def __init__(self, grid: Grid, job: apps.CoordinatorJob, size: int) -> None:
        self.grid, self.job, self.run_id = grid, job, 1
        self.out_dir = Path(job.out_dir)
        (self.out_dir / "transcript").mkdir(parents=True, exist_ok=True)
        self.roster = apps.load_roster(Path(job.roster_path))
        self.lora = FederatedLoraConfig()
        self.layout = SimpleNamespace(size=size)
        self.frac_bits = secagg.frac_bits_for(len(self.roster), self.lora.bound)


def _identities(sites: int, folder: Path) -> tuple[Path, dict[int, Path]]:
    keys = {}
    roster = {}
    for site in range(1, sites + 1):
        key = ec.generate_private_key(ec.SECP384R1())
        keys[site] = folder / f"site-{site}.key"
        keys[site].write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
            )
        )
        roster[site] = (
            key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
        )
    (folder / "roster.json").write_text(json.dumps(roster))
    return folder / "roster.json", keys


def ours_round(updates: dict[int, np.ndarray], weights: dict[int, float], threshold: int, drop: set[int]) -> dict:
    folder = Path(tempfile.mkdtemp(prefix="bench-ours-"))
    roster_path, keys = _identities(len(updates), folder)
    FIXED_VALUES.clear()
    FIXED_VALUES.update({s: np.concatenate([weights[s] * u, [0.0, weights[s]]]) for s, u in updates.items()})
    configs = {}
    for site in updates:
        config = apps.SiteConfig(site, str(keys[site]), str(roster_path), "", "", str(folder / f"work-{site}"))
        config.save(folder / f"site-{site}.json")
        configs[site] = {"adaptery-site": str(folder / f"site-{site}.json")}
    grid = LoopbackGrid(dict.fromkeys(updates, ours_app), configs, drop_after=dict.fromkeys(drop, 2))
    job = apps.CoordinatorJob("bench", "", str(roster_path), str(folder / "out"), 1, threshold)
    size = len(next(iter(updates.values())))
    coordinator = ProtocolCoordinator(grid, job, size)
    started = time.perf_counter()
    mean, _, survivors = coordinator.round(1, sorted(updates), np.zeros(size))
    seconds = time.perf_counter() - started
    return {"mean": mean, "seconds": seconds, "uploaded": grid.uploaded, "survivors": survivors}


# ---------------------------------------------------------------------------------------------
# Flower's SecAgg+, unchanged


def flower_round(updates: dict[int, np.ndarray], weights: dict[int, int], threshold: int, drop: set[int]) -> dict:
    from flwr.client import NumPyClient
    from flwr.client.mod import secaggplus_mod
    from flwr.compat.common import recorddict_compat as compat
    from flwr.server import ServerConfig
    from flwr.server.client_manager import SimpleClientManager
    from flwr.server.compat.grid_client_proxy import GridClientProxy
    from flwr.server.compat.legacy_context import LegacyContext
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow import SecAggPlusWorkflow
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key

    class FixedClient(NumPyClient):
        def __init__(self, node: int) -> None:
            self.node = node

        def fit(self, parameters, config):  # noqa: ANN001, ANN202
            return [updates[self.node].astype(np.float32)], weights[self.node], {}

    def client_fn(context: Context):  # noqa: ANN202
        return FixedClient(context.node_id).to_client()

    sites = sorted(updates)
    app = ClientApp(client_fn=client_fn, mods=[secaggplus_mod])
    grid = LoopbackGrid(dict.fromkeys(sites, app), dict.fromkeys(sites, {}), drop_after=dict.fromkeys(drop, 2))
    strategy = FedAvg(
        fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=len(sites), min_available_clients=len(sites)
    )
    server = Context(run_id=1, node_id=SUPERLINK_NODE, node_config={}, state=RecordDict(), run_config={})
    context = LegacyContext(server, ServerConfig(num_rounds=1), strategy, SimpleClientManager())
    for node in sites:
        context.client_manager.register(GridClientProxy(node, grid, 1))
    size = len(updates[sites[0]])
    zeros = ndarrays_to_parameters([np.zeros(size, dtype=np.float32)])
    context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(zeros, True)
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: 1})
    workflow = SecAggPlusWorkflow(
        num_shares=len(sites), reconstruction_threshold=threshold, clipping_range=FederatedLoraConfig().bound
    )
    started = time.perf_counter()
    workflow(grid, context)
    seconds = time.perf_counter() - started
    record: ArrayRecord = context.state.array_records[MAIN_PARAMS_RECORD]
    mean = np.concatenate([array.numpy().reshape(-1) for array in record.values()]).astype(np.float64)
    return {"mean": mean, "seconds": seconds, "uploaded": grid.uploaded}


def protocol_table(sizes: list[int], sites: int, threshold: int, repeats: int) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for size in sizes:
        for drop in (set(), {sites}):
            updates = {s: rng.uniform(-0.5, 0.5, size) for s in range(1, sites + 1)}
            counts = {s: 100 * s for s in updates}
            survivors = [s for s in updates if s not in drop]
            expected = sum(counts[s] * updates[s] for s in survivors) / sum(counts[s] for s in survivors)
            weights = {s: counts[s] / FederatedLoraConfig().example_cap for s in updates}
            runs = [(ours_round(updates, weights, threshold, drop), flower_round(updates, counts, threshold, drop))
                    for _ in range(repeats)]  # fmt: skip
            ours = min((pair[0] for pair in runs), key=lambda run: run["seconds"])
            flower = min((pair[1] for pair in runs), key=lambda run: run["seconds"])
            site = survivors[0]
            rows.append(
                {
                    "values": size,
                    "sites": sites,
                    "dropped": len(drop),
                    "ours_round_s": round(ours["seconds"], 3),
                    "flower_secagg+_round_s": round(flower["seconds"], 3),
                    "time_ratio": round(ours["seconds"] / flower["seconds"], 2),
                    "ours_bytes_per_site": ours["uploaded"][site],
                    "flower_bytes_per_site": flower["uploaded"][site],
                    "bytes_ratio": round(ours["uploaded"][site] / flower["uploaded"][site], 2),
                    "ours_max_error": float(f"{np.max(np.abs(ours['mean'] - expected)):.2g}"),
                    "flower_max_error": float(f"{np.max(np.abs(flower['mean'] - expected)):.2g}"),
                }
            )
            print(f"  {size} values, {len(drop)} dropped: {rows[-1]}", file=sys.stderr, flush=True)
    return rows


# ---------------------------------------------------------------------------------------------
# The synthetic task: one domain per site

DOMAINS = {  # site: (topic, its words, its phrasing)
    1: ("weather", "rain wind cloud storm sunny cold warm fog", "The forecast says {} and {}."),
    2: ("kitchen", "bread butter salt onion garlic pepper rice soup", "Cook it with {} then {}."),
    3: ("garden", "rose tulip oak seed soil leaf root moss", "Plant the {} near the {}."),
}


def domain_records(site: int, count: int, rng: random.Random) -> list[dict]:
    topic, words, template = DOMAINS[site]
    records = []
    for _ in range(count):
        first, second = rng.sample(words.split(), 2)
        question = f"Tell me about {topic} and {first}."
        records.append({"messages": [{"role": "user", "content": question},
                                     {"role": "assistant", "content": template.format(first, second)}]})  # fmt: skip
    return records


def tokenised(records: list[dict], tokenizer, folder: Path, name: str) -> list[dict]:  # noqa: ANN001
    from adaptery.training.data import load_chat_dataset

    path = folder / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return load_chat_dataset(path, tokenizer, max_seq_length=96).examples


def federated_train(base: Path, config: FederatedLoraConfig, slices: dict[int, list], rounds: int):  # noqa: ANN201
    """FFA-LoRA over `rounds`, every site's weighted update summed by secure aggregation (in process)."""
    from adaptery.federated.lora import UpdateLayout, build_model, local_train, weight_of

    keys = {s: ec.generate_private_key(ec.SECP384R1()) for s in slices}
    roster = {s: k.public_key() for s, k in keys.items()}
    frac = secagg.frac_bits_for(len(slices), config.bound)
    model = build_model(base, config)
    layout = UpdateLayout(model, config)
    global_vector = layout.read()
    uploaded = 0
    for round_number in range(1, rounds + 1):
        context = f"bench|round {round_number}".encode()
        encoded = {}
        for site, data in slices.items():
            layout.write(global_vector)
            local_train(model, layout, data, config, seed=round_number * 10 + site)
            weight = weight_of(len(data), config)
            values = np.append(weight * (layout.read() - global_vector), weight)
            encoded[site] = secagg.encode(values, frac, config.bound)[0]
        total, sent = _secure_sum(encoded, keys, roster, context)
        total = secagg.decode(total, frac)
        global_vector = global_vector + total[:-1] / total[-1]
        uploaded += sent
    layout.write(global_vector)
    return model, layout, uploaded // rounds


def _secure_sum(encoded: dict[int, np.ndarray], keys, roster, context: bytes) -> tuple[np.ndarray, int]:  # noqa: ANN001
    """The sum by the pure protocol objects; also the payload bytes the first site uploaded."""
    threshold = len(encoded) // 2 + 1
    sessions = {s: secagg.SiteSession(s, keys[s], roster, threshold, context) for s in encoded}
    server = secagg.Aggregator(roster, threshold, context, len(next(iter(encoded.values()))))
    accepted = server.collect_adverts([session.advertise() for session in sessions.values()])
    outboxes = {s: session.share_keys(accepted) for s, session in sessions.items()}
    inboxes = server.route_shares(outboxes)
    masked = {s: sessions[s].masked_input(inboxes[s], encoded[s]) for s in inboxes}
    survivors = server.collect_masked(masked)
    signatures = server.collect_signatures({s: sessions[s].sign_survivors(survivors) for s in survivors})
    replies = [sessions[s].unmask(survivors, server.dropped, signatures) for s in survivors]
    first = survivors[0]
    advert = accepted[first]
    shares = json.dumps({str(k): str(v) for k, v in {**replies[0].b_shares, **replies[0].s_shares}.items()})
    sent = (
        len(advert.c_public) + len(advert.s_public) + len(advert.signature)
        + sum(len(blob) for blob in outboxes[first].values())
        + masked[first].nbytes + len(signatures[first]) + len(shares)
    )  # fmt: skip
    return server.unmask(replies), sent


def accuracy_tables(rounds: int, per_site: int, fractions: list[float]) -> tuple[list[dict], list[dict]]:
    import torch
    from transformers import AutoTokenizer

    from adaptery.engine.demo_model import DEMO_MODEL_ID, build_demo_model
    from adaptery.federated.lora import UpdateLayout, build_model, evaluate, local_train

    torch.set_num_threads(1)
    folder = Path(tempfile.mkdtemp(prefix="bench-fed-"))
    base = build_demo_model(folder / DEMO_MODEL_ID)
    tokenizer = AutoTokenizer.from_pretrained(base)
    rng = random.Random(0)
    slices = {s: tokenised(domain_records(s, per_site, rng), tokenizer, folder, f"site-{s}") for s in DOMAINS}
    held_out = [e for s in DOMAINS for e in tokenised(domain_records(s, 8, rng), tokenizer, folder, f"eval-{s}")]
    config = FederatedLoraConfig(local_steps=4, learning_rate=2e-2, batch_size=2)
    steps = rounds * config.local_steps

    def row(training: str, model, started: float) -> dict:  # noqa: ANN001
        loss = evaluate(model, held_out)
        print(f"  {training}: {loss:.4f}", file=sys.stderr, flush=True)
        return {"training": training, "eval_loss": round(loss, 4), "seconds": round(time.perf_counter() - started, 1)}

    def recipe(**changes: object) -> FederatedLoraConfig:
        return FederatedLoraConfig.from_dict({**json.loads(config.to_json()), **changes})

    accuracy = [row("untrained", build_model(base, config), time.perf_counter())]
    started = time.perf_counter()
    model, layout, uploaded = federated_train(base, config, slices, rounds)
    accuracy.append(row(f"federated ({len(slices)} sites, secure aggregation)", model, started))
    trained = {1.0: (layout, uploaded, accuracy[-1])}  # SPF at 100% is this very run
    for site, data in slices.items():
        started = time.perf_counter()
        model = build_model(base, config)
        local_train(model, UpdateLayout(model, config), data, recipe(local_steps=steps), seed=site)
        accuracy.append(row(f"site {site} alone ({DOMAINS[site][0]})", model, started))
    started = time.perf_counter()
    model = build_model(base, config)
    union = [e for data in slices.values() for e in data]
    central = recipe(local_steps=steps, batch_size=config.batch_size * len(slices))
    local_train(model, UpdateLayout(model, config), union, central, seed=0)
    accuracy.append(row("centralised (all data in one place)", model, started))
    for entry in accuracy:
        entry["vs_centralised"] = f"{(entry['eval_loss'] / accuracy[-1]['eval_loss'] - 1) * 100:+.1f}%"

    spf = []
    for fraction in fractions:
        if fraction not in trained:
            started = time.perf_counter()
            model, layout, uploaded = federated_train(base, recipe(head_fraction=fraction), slices, rounds)
            trained[fraction] = (layout, uploaded, row(f"SPF {fraction * 100:g}%", model, started))
        layout, uploaded, entry = trained[fraction]
        spf.append({"head_fraction": f"{fraction * 100:g}%", "trainable_values": layout.size,
                    "bytes_per_site_per_round": uploaded, "eval_loss": entry["eval_loss"]})  # fmt: skip
    return accuracy, spf


def table(rows: list[dict]) -> str:
    columns = list(dict.fromkeys(c for row in rows for c in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sites", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3, help="protocol rounds per cell; the fastest counts")
    parser.add_argument("--sizes", default="32768,262144,1048576")
    parser.add_argument("--rounds", type=int, default=24)
    parser.add_argument("--per-site", type=int, default=24, help="training examples per site (synthetic task)")
    parser.add_argument("--fractions", default="0.125,0.25,0.5,1.0")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    logging.getLogger("flwr").setLevel(logging.WARNING)  # its per-stage INFO lines would bury the tables
    threshold = args.sites // 2 + 1
    protocol = protocol_table([int(s) for s in args.sizes.split(",")], args.sites, threshold, args.repeats)
    accuracy, spf = accuracy_tables(args.rounds, args.per_site, [float(f) for f in args.fractions.split(",")])
    result = {"protocol": protocol, "accuracy": accuracy, "spf": spf, "threshold": threshold, "rounds": args.rounds}
    print(json.dumps(result, indent=2))
    print(f"\n### Secure aggregation per round: ours vs Flower's SecAgg+ ({args.sites} sites, threshold {threshold})\n")
    print(table(protocol))
    print(f"\n### Eval loss on all domains (3 sites, one domain each, {args.rounds} rounds, FFA-LoRA rank 8)\n")
    print(table(accuracy))
    print(f"\n### SPF (3 sites, {args.rounds} rounds, secure aggregation)\n")
    print(table(spf))
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
