"""The Flower ServerApp (coordinator) and ClientApp (site) that carry `secagg` over Flower's message API.

One round is five message exchanges, `query.<stage>` for each secagg stage. The first carries the
global update vector and the recipe; the site trains locally on its own data, encodes its weighted
update and keeps it in its node state (on the site), and answers with signed public keys only.
What the coordinator ever receives from a site: signed public keys, ciphertexts of shares for
other sites, one masked vector, a signature on the survivor list, and the shares the protocol
allows. Every received payload is kept in the coordinator's transcript (`transcript/round-N.npz`)
so that this can be checked.

A site drops out by failing to answer a stage within `stage_timeout` (or answering with an error,
as a site that refuses a request does); the round continues while at least `threshold` remain.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives import serialization

try:
    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
except ImportError as error:  # an optional extra: say how to get it
    raise ImportError("federated fine-tuning needs Flower: pip install 'adaptery[federated]'") from error

from adaptery.federated import dp, secagg
from adaptery.federated.config import FederatedLoraConfig

log = logging.getLogger("adaptery.federated")

LOSS_SCALE = 64.0  # the mean loss travels as weight * loss / LOSS_SCALE, inside the secure sum's bound
STAGES = ("advertise", "share", "masked", "consistency", "unmask")


def load_roster(path: Path) -> dict[int, secagg.IdentityPublicKey]:
    """{site number: identity public key} from a JSON file of OpenSSH public keys (what `flwr supernode register`
    takes, so a site's Flower node key is its identity key)."""
    raw = json.loads(Path(path).read_text())
    return {int(site): serialization.load_ssh_public_key(key.encode()) for site, key in raw.items()}


@dataclass
class CoordinatorJob:
    """What the ServerApp runs; written by `adaptery federated coordinator`, read in the ServerApp process."""

    federation: str
    base_dir: str
    roster_path: str
    out_dir: str
    rounds: int
    threshold: int
    lora: dict = field(default_factory=dict)
    min_sites: int = 0  # wait for this many connected SuperNodes before round 1 (0: the threshold)
    train_timeout: float = 600.0  # the first stage: load the base, train locally
    stage_timeout: float = 60.0  # each secagg stage after it
    connect_timeout: float = 120.0

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: Path) -> CoordinatorJob:
        return cls(**json.loads(Path(path).read_text()))


@dataclass
class SiteConfig:
    """A site's own settings (`adaptery federated site` writes it; the SuperNode passes its path)."""

    site: int
    key_path: str  # EC private key (OpenSSH): the SuperNode's auth key and the signer of secagg keys
    roster_path: str
    data_path: str
    base_dir: str
    work_dir: str  # the site's own records: each contribution it made, as it encoded it

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: Path) -> SiteConfig:
        return cls(**json.loads(Path(path).read_text()))

    def identity(self) -> secagg.IdentityPrivateKey:
        return serialization.load_ssh_private_key(Path(self.key_path).read_bytes(), password=None)


def _progress(out_dir: Path, **event: object) -> None:
    """One JSON line per event in out_dir/progress.jsonl: what the CLI (and the platform) shows of a run."""
    with (out_dir / "progress.jsonl").open("a") as stream:
        stream.write(json.dumps({"time": time.time(), **event}) + "\n")


# ---------------------------------------------------------------------------------------------
# Coordinator


class Coordinator:
    def __init__(self, grid: Grid, job: CoordinatorJob, run_id: int) -> None:
        from adaptery.federated.lora import UpdateLayout, build_model

        self.grid, self.job, self.run_id = grid, job, run_id
        self.out_dir = Path(job.out_dir)
        (self.out_dir / "transcript").mkdir(parents=True, exist_ok=True)
        self.roster = load_roster(Path(job.roster_path))
        self.lora = FederatedLoraConfig.from_dict(job.lora)
        self.model = build_model(Path(job.base_dir), self.lora)
        self.layout = UpdateLayout(self.model, self.lora)
        self.frac_bits = secagg.frac_bits_for(len(self.roster), self.lora.bound)

    def _exchange(self, round_number: int, stage: str, contents: dict[int, RecordDict]) -> dict[int, RecordDict]:
        messages = [
            Message(content, dst_node_id=node, message_type=f"query.{stage}", group_id=str(round_number))
            for node, content in contents.items()
        ]
        timeout = self.job.train_timeout if stage == "advertise" else self.job.stage_timeout
        replies = {}
        for reply in self._send_and_receive(messages, timeout):
            node = reply.metadata.src_node_id
            if reply.has_error():
                _progress(self.out_dir, round=round_number, stage=stage, node=node, error=reply.error.reason)
                continue
            replies[node] = reply.content
        _progress(
            self.out_dir,
            round=round_number,
            stage=stage,
            answered=len(replies),
            asked=len(contents),
            received_bytes=sum(_size(c) for c in replies.values()),
            sent_bytes=sum(_size(c) for c in contents.values()),
        )
        return replies

    def _send_and_receive(self, messages: list[Message], timeout: float) -> list[Message]:
        """Flower's send_and_receive, except that it stops waiting for a site whose SuperNode has disconnected
        (a dropped site costs a heartbeat, not the whole timeout; a hung one still costs the timeout)."""
        pending = {}
        for message_id, message in zip(self.grid.push_messages(messages), messages, strict=True):
            if message_id:
                pending[message_id] = message.metadata.dst_node_id
        replies: list[Message] = []
        deadline = time.monotonic() + timeout
        next_liveness = time.monotonic() + 2.0
        while pending and time.monotonic() < deadline:
            for reply in self.grid.pull_messages(list(pending)):
                pending.pop(reply.metadata.reply_to_message_id, None)
                replies.append(reply)
            if pending and time.monotonic() >= next_liveness:
                online = set(self.grid.get_node_ids())
                pending = {mid: node for mid, node in pending.items() if node in online}
                next_liveness = time.monotonic() + 2.0
            if pending:
                time.sleep(0.25)
        return replies

    def _wait_for_nodes(self) -> list[int]:
        wanted = self.job.min_sites or self.job.threshold
        deadline = time.monotonic() + self.job.connect_timeout
        while True:
            nodes = sorted(self.grid.get_node_ids())
            if len(nodes) >= wanted:
                return nodes
            if time.monotonic() > deadline:
                raise secagg.SecAggError(
                    f"{len(nodes)} sites connected within {self.job.connect_timeout}s, {wanted} needed"
                )
            time.sleep(1.0)

    def run(self) -> Path:
        nodes = self._wait_for_nodes()
        _progress(self.out_dir, event="start", sites=len(nodes), rounds=self.job.rounds, parameters=self.layout.size)
        global_vector = self.layout.read()
        for round_number in range(1, self.job.rounds + 1):
            started = time.monotonic()
            mean_update, loss, survivors = self.round(round_number, nodes, global_vector)
            global_vector = global_vector + mean_update
            privacy = {}
            if self.lora.private:
                spent = dp.epsilon(self.lora.dp_noise, round_number, self.lora.dp_delta)
                privacy = {"epsilon": spent, "delta": self.lora.dp_delta}
            _progress(
                self.out_dir,
                event="round",
                round=round_number,
                loss=None if self.lora.private else loss,
                survivors=survivors,
                seconds=time.monotonic() - started,
                **privacy,
            )
            nodes = sorted(self.grid.get_node_ids())
        self.layout.write(global_vector)
        from adaptery.federated.lora import save_adapter

        adapter_dir = save_adapter(self.model, self.out_dir / "adapter")
        _progress(self.out_dir, event="done", adapter=str(adapter_dir))
        return adapter_dir

    def round(self, round_number: int, nodes: list[int], global_vector: np.ndarray) -> tuple[np.ndarray, float, list]:
        context = f"{self.job.federation}|run {self.run_id}|round {round_number}"
        length = self.layout.size + 2  # weighted update, weighted loss, weight
        server = secagg.Aggregator(self.roster, self.job.threshold, context.encode(), length)
        setup = ConfigRecord(
            {
                "context": context,
                "round": round_number,
                "threshold": self.job.threshold,
                "lora": self.lora.to_json(),
                "global": global_vector.astype("<f8").tobytes(),
            }
        )
        replies = self._exchange(round_number, "advertise", {n: RecordDict({"setup": setup}) for n in nodes})
        site_of: dict[int, int] = {}
        adverts = []
        for node, content in replies.items():
            advert = secagg.Advertisement.from_dict(content["advert"])
            if advert.site in site_of.values():
                continue  # a second node claiming the same site: only the first counts
            site_of[node] = advert.site
            adverts.append(advert)
        accepted = server.collect_adverts(adverts)
        node_of = {site: node for node, site in site_of.items() if site in accepted}
        relay = ConfigRecord({f"advert-{s}": json.dumps(_b64(a.to_dict())) for s, a in accepted.items()})
        replies = self._exchange(round_number, "share", {node_of[s]: RecordDict({"adverts": relay}) for s in accepted})
        outboxes = {
            site_of[node]: {int(k.split("-")[1]): bytes(v) for k, v in content["shares"].items()}
            for node, content in replies.items()
        }
        inboxes = server.route_shares(outboxes)
        inbox_records = {
            node_of[site]: RecordDict({"inbox": ConfigRecord({f"from-{s}": blob for s, blob in inbox.items()})})
            for site, inbox in inboxes.items()
        }
        replies = self._exchange(round_number, "masked", inbox_records)
        survivors = server.collect_masked(
            {site_of[node]: np.frombuffer(bytes(c["masked"]["vector"]), dtype="<u4") for node, c in replies.items()}
        )
        listing = ConfigRecord({"survivors": json.dumps(survivors)})
        replies = self._exchange(
            round_number, "consistency", {node_of[s]: RecordDict({"list": listing}) for s in survivors}
        )
        signatures = server.collect_signatures(
            {site_of[n]: bytes(c["signed"]["signature"]) for n, c in replies.items()}
        )
        request = ConfigRecord(
            {
                "survivors": json.dumps(survivors),
                "dropped": json.dumps(server.dropped),
                "signatures": json.dumps({str(s): sig.hex() for s, sig in signatures.items()}),
            }
        )
        replies = self._exchange(
            round_number, "unmask", {node_of[s]: RecordDict({"request": request}) for s in signatures}
        )
        reveals = [
            secagg.UnmaskReply(
                site_of[node],
                b_shares={int(k): int(v) for k, v in json.loads(c["reveal"]["b"]).items()},
                s_shares={int(k): int(v) for k, v in json.loads(c["reveal"]["s"]).items()},
            )
            for node, c in replies.items()
        ]
        total = secagg.decode(server.unmask(reveals), self.frac_bits)
        np.savez(
            self.out_dir / "transcript" / f"round-{round_number}.npz",
            **{f"masked-{site}": vector for site, vector in server.received.items()},
            aggregate=total,
            survivors=np.array(survivors),
            dropped=np.array(server.dropped),
            revealed=np.array(
                json.dumps({r.site: {"b": sorted(r.b_shares), "s": sorted(r.s_shares)} for r in reveals})
            ),
        )
        weight = total[-1]
        if weight <= 0:
            raise secagg.SecAggError("the survivors' weights sum to zero: no examples were trained on")
        return total[:-2] / weight, float(total[-2] / weight * LOSS_SCALE), survivors


def _size(content: RecordDict) -> int:
    """Payload bytes of a message's records (bytes and strings as sent; numbers as 8 bytes)."""
    total = 0
    for record in content.config_records.values():
        for value in record.values():
            total += len(value) if isinstance(value, bytes | str) else 8
    return total


def _b64(data: dict) -> dict:
    import base64

    return {k: base64.b64encode(v).decode() if isinstance(v, bytes) else v for k, v in data.items()}


def _unb64(data: dict) -> dict:
    import base64

    return {k: base64.b64decode(v) if isinstance(v, str) else v for k, v in data.items()}


server_app = ServerApp()


@server_app.main()
def coordinate(grid: Grid, context: Context) -> None:
    job = CoordinatorJob.load(Path(str(context.run_config["adaptery-job"])))
    Path(job.out_dir).mkdir(parents=True, exist_ok=True)
    try:
        Coordinator(grid, job, context.run_id).run()
    except Exception as error:
        _progress(Path(job.out_dir), event="failed", error=f"{type(error).__name__}: {error}")
        raise


# ---------------------------------------------------------------------------------------------
# Site

client_app = ClientApp()
STATE = "adaptery-secagg"


def _site(context: Context) -> SiteConfig:
    return SiteConfig.load(Path(str(context.node_config["adaptery-site"])))


def _session(context: Context, site: SiteConfig) -> secagg.SiteSession:
    state = context.state.config_records[STATE]
    return secagg.SiteSession.load(
        bytes(state["session"]),
        site.identity(),
        load_roster(Path(site.roster_path)),
        int(state["threshold"]),
        str(state["context"]).encode(),
    )


def _keep(context: Context, session: secagg.SiteSession) -> None:
    context.state.config_records[STATE]["session"] = session.dump()


def _reply(message: Message, name: str, record: ConfigRecord) -> Message:
    return Message(RecordDict({name: record}), reply_to=message)


@client_app.query("advertise")
def advertise(message: Message, context: Context) -> Message:
    """Train on the local data from the global vector, encode the weighted update, keep it here; send keys."""
    from transformers import AutoTokenizer

    from adaptery.federated.lora import UpdateLayout, build_model, local_train, weight_of
    from adaptery.training.data import load_chat_dataset

    site = _site(context)
    setup = message.content["setup"]
    round_number = int(setup["round"])
    previous = context.state.config_records.get(STATE)
    if previous is not None and int(previous["round"]) >= round_number:
        raise secagg.SecAggError(f"round {round_number} was already played (replay refused)")
    roster = load_roster(Path(site.roster_path))
    lora = FederatedLoraConfig.from_json(str(setup["lora"]))
    model = build_model(Path(site.base_dir), lora)
    layout = UpdateLayout(model, lora)
    global_vector = np.frombuffer(bytes(setup["global"]), dtype="<f8")
    layout.write(global_vector)
    tokenizer = AutoTokenizer.from_pretrained(site.base_dir, local_files_only=True)
    examples = load_chat_dataset(Path(site.data_path), tokenizer, max_seq_length=lora.max_seq_length).examples
    loss = local_train(model, layout, examples, lora, seed=round_number * 1000 + site.site)
    update = layout.read() - global_vector
    threshold = int(setup["threshold"])
    if lora.private:  # site-level DP: weight 1, clipped, this site's share of the noise; the loss stays here
        update, _ = dp.clip_l2(update, lora.dp_clip)
        update = update + dp.site_noise(update.size, lora.dp_clip, lora.dp_noise, threshold)
        values = np.concatenate([update, [0.0, 1.0]])
    else:
        weight = weight_of(len(examples), lora)
        values = np.concatenate([weight * update, [weight * loss / LOSS_SCALE, weight]])
    advert, clipped = open_round(message, context, site, roster, values, lora.bound)
    log.info("site %s: round %s trained, loss %.4f, %s values clipped", site.site, round_number, loss, clipped)
    return _reply(message, "advert", ConfigRecord(advert.to_dict()))


def open_round(
    message: Message,
    context: Context,
    site: SiteConfig,
    roster: dict[int, secagg.IdentityPublicKey],
    values: np.ndarray,
    bound: float,
) -> tuple[secagg.Advertisement, int]:
    """Encode this round's contribution, keep it (on the site, and in the site's own records) and start the
    secagg session: its signed advertisement, and how many values were clipped.
    Split from `advertise` so that the protocol can be run on any vector (bench/federated.py)."""
    setup = message.content["setup"]
    round_number = int(setup["round"])
    frac_bits = secagg.frac_bits_for(len(roster), bound)
    encoded, clipped = secagg.encode(values, frac_bits, bound)
    work = Path(site.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    np.save(work / f"contribution-run{context.run_id}-round{round_number}.npy", encoded)
    session = secagg.SiteSession(
        site.site, site.identity(), roster, int(setup["threshold"]), str(setup["context"]).encode()
    )
    advert = session.advertise()
    context.state.config_records[STATE] = ConfigRecord(
        {
            "round": round_number,
            "context": str(setup["context"]),
            "threshold": int(setup["threshold"]),
            "update": encoded.astype("<u4").tobytes(),
            "session": session.dump(),
        }
    )
    return advert, clipped


@client_app.query("share")
def share(message: Message, context: Context) -> Message:
    site = _site(context)
    session = _session(context, site)
    relayed = message.content["adverts"]
    adverts = {int(k.split("-")[1]): secagg.Advertisement.from_dict(_unb64(json.loads(v))) for k, v in relayed.items()}
    outbox = session.share_keys(adverts)
    _keep(context, session)
    return _reply(message, "shares", ConfigRecord({f"to-{peer}": blob for peer, blob in outbox.items()}))


@client_app.query("masked")
def masked(message: Message, context: Context) -> Message:
    site = _site(context)
    session = _session(context, site)
    inbox = {int(k.split("-")[1]): bytes(v) for k, v in message.content["inbox"].items()}
    update = np.frombuffer(bytes(context.state.config_records[STATE]["update"]), dtype="<u4")
    vector = session.masked_input(inbox, update)
    _keep(context, session)
    return _reply(message, "masked", ConfigRecord({"vector": vector.astype("<u4").tobytes()}))


@client_app.query("consistency")
def consistency(message: Message, context: Context) -> Message:
    site = _site(context)
    session = _session(context, site)
    signature = session.sign_survivors(json.loads(str(message.content["list"]["survivors"])))
    _keep(context, session)
    return _reply(message, "signed", ConfigRecord({"signature": signature}))


@client_app.query("unmask")
def unmask(message: Message, context: Context) -> Message:
    site = _site(context)
    session = _session(context, site)
    request = message.content["request"]
    signatures = {int(s): bytes.fromhex(sig) for s, sig in json.loads(str(request["signatures"])).items()}
    try:
        reveal = session.unmask(json.loads(str(request["survivors"])), json.loads(str(request["dropped"])), signatures)
    finally:
        _keep(context, session)  # the stage advances even on a refusal: no second request is answered
    return _reply(
        message,
        "reveal",
        ConfigRecord(
            {
                "b": json.dumps({str(k): str(v) for k, v in reveal.b_shares.items()}),
                "s": json.dumps({str(k): str(v) for k, v in reveal.s_shares.items()}),
            }
        ),
    )
