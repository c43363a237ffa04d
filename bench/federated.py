"""Benchmark: secure aggregation against plain FedAvg, and sparse head fine-tuning (SPF) ratios.

    .venv/bin/python bench/federated.py --json-out federated.json

1. Protocol cost per round, in process (no transport): for update sizes from the demo model's FFA-LoRA
   vector up to 4M values and `--sites` sites with one dropping after sharing its keys, the wall time
   of the whole round (every site's work plus the coordinator's, one core) and the bytes each site
   uploads, against plain FedAvg (each site uploads its float32 update; the coordinator averages).
   Bytes are the serialised payloads the Flower apps send (keys, ciphertexts, masked vector, signature,
   shares); Flower's own framing is the same for both and left out.
2. SPF: the demo model trained federatedly (`--rounds` rounds, 3 sites each holding a different slice of
   the sample chat data, secure aggregation in process) with 12.5/25/50/100% of attention heads tuned:
   trainable values, bytes uploaded per site per round, and the eval loss on all the data.

Transport latency on Flower's deployment engine is separate and dominated by its polling (the
SuperNode polls every 3 s; each stage starts a ClientApp process): tests/e2e/test_federated.py prints
it in the coordinator's progress.jsonl (~8-18 s a secagg stage on this 2-core machine).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric import ec

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from adaptery.federated import secagg  # noqa: E402


def _roster(sites: int):
    keys = {s: ec.generate_private_key(ec.SECP384R1()) for s in range(1, sites + 1)}
    return keys, {s: k.public_key() for s, k in keys.items()}


def secure_round(vectors: dict[int, np.ndarray], keys, roster, threshold: int, drop: set[int]) -> dict:
    """One full secagg round in process; returns the sum, the seconds and the bytes each site uploaded."""
    context = b"bench|round 1"
    length = len(next(iter(vectors.values())))
    started = time.perf_counter()
    sessions = {s: secagg.SiteSession(s, keys[s], roster, threshold, context) for s in vectors}
    server = secagg.Aggregator(roster, threshold, context, length)
    sent = {s: 0 for s in vectors}
    adverts = []
    for s, session in sessions.items():
        advert = session.advertise()
        sent[s] += len(advert.c_public) + len(advert.s_public) + len(advert.signature) + 8
        adverts.append(advert)
    accepted = server.collect_adverts(adverts)
    outboxes = {}
    for s, session in sessions.items():
        outboxes[s] = session.share_keys(accepted)
        sent[s] += sum(len(blob) for blob in outboxes[s].values())
    inboxes = server.route_shares(outboxes)
    masked = {}
    for s in inboxes:
        if s in drop:
            continue
        masked[s] = sessions[s].masked_input(inboxes[s], vectors[s])
        sent[s] += masked[s].nbytes
    survivors = server.collect_masked(masked)
    signatures = {}
    for s in survivors:
        signatures[s] = sessions[s].sign_survivors(survivors)
        sent[s] += len(signatures[s])
    server.collect_signatures(signatures)
    replies = []
    for s in survivors:
        reply = sessions[s].unmask(survivors, server.dropped, signatures)
        sent[s] += len(json.dumps({str(k): str(v) for k, v in {**reply.b_shares, **reply.s_shares}.items()}))
        replies.append(reply)
    total = server.unmask(replies)
    return {"sum": total, "seconds": time.perf_counter() - started, "sent": sent, "survivors": survivors}


def plain_round(updates: dict[int, np.ndarray]) -> dict:
    started = time.perf_counter()
    payloads = {s: u.astype(np.float32).tobytes() for s, u in updates.items()}
    total = sum(np.frombuffer(p, dtype=np.float32).astype(np.float64) for p in payloads.values())
    sent = {s: len(p) + 8 for s, p in payloads.items()}  # + the weight
    return {"sum": total, "seconds": time.perf_counter() - started, "sent": sent}


def protocol_table(sizes: list[int], sites: int, threshold: int) -> list[dict]:
    keys, roster = _roster(sites)
    rows = []
    rng = np.random.default_rng(0)
    frac = secagg.frac_bits_for(sites, 1.0)
    for size in sizes:
        floats = {s: rng.uniform(-0.5, 0.5, size) for s in range(1, sites + 1)}
        encoded = {s: secagg.encode(v, frac, 1.0)[0] for s, v in floats.items()}
        secure = secure_round(encoded, keys, roster, threshold, drop={sites})
        plain = plain_round({s: floats[s] for s in secure["survivors"]})
        error = float(np.max(np.abs(secagg.decode(secure["sum"], frac) - plain["sum"])))
        survivor = secure["survivors"][0]
        rows.append(
            {
                "values": size,
                "sites": sites,
                "dropped": 1,
                "secagg_round_s": round(secure["seconds"], 4),
                "fedavg_round_s": round(plain["seconds"], 4),
                "secagg_bytes_per_site": secure["sent"][survivor],
                "fedavg_bytes_per_site": plain["sent"][survivor],
                "bytes_ratio": round(secure["sent"][survivor] / plain["sent"][survivor], 3),
                "max_abs_error_vs_float_sum": error,
            }
        )
        print(f"  {size} values: secagg {secure['seconds']:.3f}s", file=sys.stderr, flush=True)
    return rows


def spf_table(fractions: list[float], rounds: int) -> list[dict]:
    from transformers import AutoTokenizer

    from adaptery.engine.demo_model import DEMO_MODEL_ID, build_demo_model
    from adaptery.federated.config import FederatedLoraConfig
    from adaptery.federated.lora import UpdateLayout, build_model, evaluate, local_train, weight_of
    from adaptery.training.data import load_chat_dataset

    base = build_demo_model(Path(tempfile.mkdtemp()) / DEMO_MODEL_ID)
    tokenizer = AutoTokenizer.from_pretrained(base)
    sample = Path(__file__).resolve().parent.parent / "adaptery" / "samples" / "demo-chat.jsonl"
    examples = load_chat_dataset(sample, tokenizer, max_seq_length=256).examples
    slices = {1: examples[0:2], 2: examples[2:4], 3: examples[4:6]}
    keys, roster = _roster(3)
    rows = []
    for fraction in fractions:
        config = FederatedLoraConfig(head_fraction=fraction, local_steps=4, learning_rate=5e-3, batch_size=2)
        frac = secagg.frac_bits_for(3, config.bound)
        model = build_model(base, config)
        layout = UpdateLayout(model, config)
        global_vector = layout.read()
        started = time.perf_counter()
        sent = 0
        for round_number in range(1, rounds + 1):
            encoded = {}
            for site, data in slices.items():
                layout.write(global_vector)
                loss = local_train(model, layout, data, config, seed=round_number * 10 + site)
                w = weight_of(len(data), config)
                values = np.concatenate([w * (layout.read() - global_vector), [w * loss / 64.0, w]])
                encoded[site] = secagg.encode(values, frac, config.bound)[0]
            result = secure_round(encoded, keys, roster, threshold=2, drop=set())
            total = secagg.decode(result["sum"], frac)
            global_vector = global_vector + total[:-2] / total[-1]
            sent += result["sent"][1]
        layout.write(global_vector)
        rows.append(
            {
                "head_fraction": fraction,
                "trained_values": layout.size,
                "bytes_per_site_per_round": sent // rounds,
                "eval_loss": round(evaluate(model, examples), 4),
                "seconds": round(time.perf_counter() - started, 1),
            }
        )
        print(f"  SPF {fraction}: loss {rows[-1]['eval_loss']}", file=sys.stderr, flush=True)
    model = build_model(base, FederatedLoraConfig())
    rows.append({"head_fraction": "untrained", "trained_values": 0, "bytes_per_site_per_round": 0,
                 "eval_loss": round(evaluate(model, examples), 4), "seconds": 0})  # fmt: skip
    return rows


def table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sites", type=int, default=5)
    parser.add_argument("--sizes", default="32768,262144,1048576,4194304")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--fractions", default="0.125,0.25,0.5,1.0")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    threshold = args.sites // 2 + 1
    protocol = protocol_table([int(s) for s in args.sizes.split(",")], args.sites, threshold)
    spf = spf_table([float(f) for f in args.fractions.split(",")], args.rounds)
    result = {"protocol": protocol, "spf": spf, "threshold": threshold}
    print(json.dumps(result, indent=2))
    print(f"\n### Secure aggregation vs plain FedAvg ({args.sites} sites, threshold {threshold}, one dropped)\n")
    print(table(protocol, list(protocol[0])))
    print(f"\n### SPF on the demo model (3 sites, {args.rounds} rounds, FFA-LoRA rank 8, secure aggregation)\n")
    print(table(spf, list(spf[0])))
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
