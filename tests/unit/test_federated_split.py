"""Split fine-tuning: the two halves train exactly as one model would, and only activations and gradients
cross the boundary (never token ids or labels), in process and between two processes."""

from __future__ import annotations

import multiprocessing
import secrets
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from adaptery.federated.lora import save_adapter
from adaptery.federated.split import (
    SplitConfig,
    SplitCoordinator,
    SplitError,
    SplitSite,
    _run_layers,
    connect,
    decode,
    encode,
    hello,
    serve,
)
from adaptery.training.data import load_chat_dataset
from tests.conftest import SAMPLE_CHAT


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread() -> Iterator[None]:
    # As in test_training.py: torch threads competing with other processes for 2 cores slow steps 20x.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


CONFIG = SplitConfig(split_layer=2, rank=4, alpha=8, learning_rate=0.01)
STEPS = 3


@pytest.fixture(scope="module")
def batches(demo_model_dir):
    """STEPS padded batches of two chat examples (right padding, as training pads)."""
    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir)
    examples = load_chat_dataset(SAMPLE_CHAT, tokenizer, max_seq_length=64).examples
    pad = tokenizer.pad_token_id
    out = []
    for step in range(STEPS):
        batch = [examples[(2 * step) % len(examples)], examples[(2 * step + 1) % len(examples)]]
        longest = max(len(e["input_ids"]) for e in batch)
        out.append(
            (
                torch.tensor([e["input_ids"] + [pad] * (longest - len(e["input_ids"])) for e in batch]),
                torch.tensor([e["attention_mask"] + [0] * (longest - len(e["input_ids"])) for e in batch]),
                torch.tensor([e["labels"] + [-100] * (longest - len(e["labels"])) for e in batch]),
            )
        )
    return out


@pytest.fixture(scope="module")
def local_losses(demo_model_dir, batches) -> list[float]:
    """The reference: the whole model with LoRA on every layer, one AdamW, in one place."""
    from adaptery.federated.lora import build_model

    model = build_model(demo_model_dir, CONFIG.lora())
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=CONFIG.learning_rate, weight_decay=0.0
    )
    model.train()
    losses = []
    for ids, mask, labels in batches:
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


@pytest.fixture(scope="module")
def split_run(demo_model_dir, batches):
    """The site and coordinator trained in process over `batches`: (coordinator, site, losses, messages sent)."""
    coordinator = SplitCoordinator(demo_model_dir, CONFIG)
    sent: list[bytes] = []

    def exchange(message: bytes) -> bytes:
        sent.append(message)
        return coordinator.handle(message)

    site = SplitSite(demo_model_dir, CONFIG, exchange)
    return coordinator, site, [site.step(*batch) for batch in batches], sent


def test_split_training_matches_local_training_and_sends_no_tokens(split_run, batches, local_losses):
    _, site, split, sent = split_run
    assert split == pytest.approx(local_losses, rel=1e-4, abs=1e-4)
    assert split[-1] < split[0] - 0.3  # it did learn

    # What crossed the boundary: per batch, the activations with the mask, then a gradient; nothing else.
    assert [decode(m)[0] for m in sent] == ["forward", "backward"] * STEPS
    hidden = site.model.config.hidden_size
    for message, (ids, mask, labels) in zip(sent[::2], batches, strict=True):
        _, tensors = decode(message)
        assert set(tensors) == {"hidden", "attention_mask"}
        assert tensors["hidden"].dtype == torch.float32 and tensors["hidden"].shape == (*ids.shape, hidden)
        assert torch.equal(tensors["attention_mask"], mask)  # lengths do leak (said in the docstring)
        for tokens in (ids, labels[labels >= 0]):
            for dtype in (np.int64, np.int32, np.int16):
                assert tokens.numpy().astype(dtype).tobytes() not in message
    for message in sent[1::2]:
        _, tensors = decode(message)
        assert set(tensors) == {"grad"} and tensors["grad"].dtype == torch.float32


def test_the_coordinator_reads_the_text_back_from_the_activations(split_run, batches):
    """The leakage the module docstring states, shown: with the base model alone (the site's LoRA after
    training is unknown to it), the coordinator recovers the tokens of the last batch it was sent by a
    greedy search over the vocabulary, position by position."""
    coordinator, _, _, sent = split_run
    received = decode(sent[-2])[1]["hidden"][0]
    ids = batches[-1][0][0]
    inner = coordinator.inner
    vocabulary = torch.arange(inner.embed_tokens.weight.shape[0])[:, None]
    recovered: list[int] = []
    with torch.no_grad():
        for position in range(4):
            candidates = torch.cat([torch.tensor([recovered] * len(vocabulary), dtype=torch.long), vocabulary], 1)
            front = inner.layers[: CONFIG.split_layer]
            states = _run_layers(coordinator.model, front, inner.embed_tokens(candidates), torch.ones_like(candidates))
            recovered.append(int((states[:, position] - received[position]).norm(dim=-1).argmin()))
    assert recovered == ids[:4].tolist()  # "<|bos|><|user|>Where does" of the sample chat


def run_coordinator(base: str, authkey: bytes, ports) -> None:  # noqa: ANN001 - a multiprocessing queue
    """The coordinator's process: its own model and optimizer, reached only through the socket."""
    torch.set_num_threads(1)
    serve(SplitCoordinator(base, CONFIG), ("127.0.0.1", 0), authkey, ports.put)


def test_split_training_between_two_processes_matches_local_training(demo_model_dir, batches, local_losses):
    # Forked, not spawned: a fresh interpreter spends 15-40 s importing torch on this busy 2-core machine.
    context = multiprocessing.get_context("fork")
    authkey, ports = secrets.token_bytes(32), context.Queue()
    process = context.Process(target=run_coordinator, args=(str(demo_model_dir), authkey, ports))
    process.start()
    try:
        port = ports.get(timeout=60)
        with pytest.raises(multiprocessing.AuthenticationError):  # a peer without the key is refused
            connect(("127.0.0.1", port), secrets.token_bytes(32))
        exchange, close = connect(("127.0.0.1", port), authkey)
        site = SplitSite(demo_model_dir, CONFIG, exchange)
        losses = [site.step(*batch) for batch in batches[:2]]
        close()
        process.join(timeout=30)
        assert process.exitcode == 0
    finally:
        process.kill()
    assert losses == pytest.approx(local_losses[:2], rel=1e-4, abs=1e-4)


def test_split_refuses_bad_cuts_and_out_of_order_messages(demo_model_dir):
    for bad in (0, 4):
        with pytest.raises(ValueError, match="split_layer must be between 1 and 3"):
            SplitCoordinator(demo_model_dir, SplitConfig(split_layer=bad))
    coordinator = SplitCoordinator(demo_model_dir, CONFIG)
    with pytest.raises(ValueError, match="without the forward"):
        coordinator.handle(encode("backward", {"grad": torch.zeros(1, 3, 256)}))
    with pytest.raises(ValueError, match="unknown split message kind 'tokens'"):
        coordinator.handle(encode("tokens", {"input_ids": torch.zeros(1, 3, dtype=torch.long)}))
    with pytest.raises(ValueError, match=r"\(batch, tokens, 256\)"):
        coordinator.handle(encode("forward", {"hidden": torch.zeros(1, 3, 8), "attention_mask": torch.ones(1, 3)}))
    with pytest.raises(ValueError, match="attention mask must be"):
        coordinator.handle(encode("forward", {"hidden": torch.zeros(1, 3, 256), "attention_mask": torch.ones(1, 4)}))


@torch.no_grad()
def split_logits(site: SplitSite, coordinator: SplitCoordinator, ids: torch.Tensor) -> torch.Tensor:
    """The split model's logits: the site's layers with its LoRA, the coordinator's with its, the site's head."""
    mask = torch.ones_like(ids)
    front, back = site.inner.layers[: CONFIG.split_layer], coordinator.inner.layers[CONFIG.split_layer :]
    hidden = _run_layers(site.model, front, site.inner.embed_tokens(ids), mask)
    states = _run_layers(coordinator.model, back, hidden, mask)
    return site.model.base_model.model.lm_head(site.inner.norm(states))


def test_the_assembled_adapter_is_the_split_model_as_one_peft_adapter(demo_model_dir, batches, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    coordinator = SplitCoordinator(demo_model_dir, CONFIG)
    assert hello(coordinator.handle, demo_model_dir) == CONFIG  # the site learns the cut and the recipe
    site = SplitSite(demo_model_dir, CONFIG, coordinator.handle)
    for batch in batches[:2]:
        site.step(*batch)
    ids = batches[0][0][:1]
    expected = split_logits(site, coordinator, ids)
    site.finish()
    assert coordinator.finished
    for model in (site.model, coordinator.model):  # both sides now hold the same, whole adapter
        base = AutoModelForCausalLM.from_pretrained(demo_model_dir, dtype=torch.float32)
        plain = base(input_ids=ids).logits
        out = save_adapter(model, tmp_path / str(id(model)))
        adapter = PeftModel.from_pretrained(base, out).eval()
        with torch.no_grad():
            logits = adapter(input_ids=ids).logits
        assert torch.allclose(logits, expected, atol=1e-4, rtol=0)
        assert not torch.allclose(logits, plain, atol=1e-2)  # the trained LoRA is in it


def test_split_refuses_a_different_base_and_a_foreign_finish(demo_model_dir):
    coordinator = SplitCoordinator(demo_model_dir, CONFIG)
    other = {"model_type": "llama", "num_hidden_layers": 4, "hidden_size": 512, "vocab_size": 10}
    with pytest.raises(SplitError, match="not the coordinator's"):
        coordinator.handle(encode("hello", {}, {"model": other}))
    with pytest.raises(SplitError, match="not those of the other half's layers"):  # e.g. the coordinator's own layers
        coordinator.handle(encode("finish", {"base_model.model.model.layers.3.mlp.lora_A.weight": torch.zeros(4, 8)}))
    assert not coordinator.finished
