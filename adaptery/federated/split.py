"""Split fine-tuning: the first layers of the model run on the site, the middle on the coordinator.

An option beside federated averaging for a site too small to run the whole model: the site keeps the
token embedding, the first `split_layer` decoder layers with their LoRA, and the final norm and LM head;
the coordinator runs the remaining decoder layers with their LoRA. Per batch, four messages:

    site -> coordinator   "forward"   hidden states after layer k (B, T, d) and the attention mask (B, T)
    coordinator -> site   "states"    hidden states after the last layer (B, T, d)
    site -> coordinator   "backward"  the loss gradient with respect to those states (B, T, d)
    coordinator -> site   "gradient"  the gradient with respect to the site's hidden states (B, T, d)

The head stays on the site (a "U-shaped" split) so that neither labels nor the loss cross; each side
updates its own LoRA with its own AdamW, which is the same arithmetic as training the whole model in one
place (AdamW is per parameter): tests/unit/test_federated_split.py checks the losses agree step by step.
Before the first batch the site says "hello" (its base model's shape) and the coordinator answers "config"
(the cut and the LoRA recipe, so that both halves are one model); after the last, the site sends "finish"
with its LoRA weights (layers [0, k)) and gets back "adapter", the coordinator's (layers [k, L)): each side
then holds the whole adapter and writes it as an ordinary PEFT directory (`save_adapter`). A refused
message is answered "error" with the reason.
Messages are safetensors bytes (tensors and a small string header, nothing executable); `SplitCoordinator.
handle` takes one and returns the reply, so any byte transport carries them: in process, or the
authenticated loopback socket of `serve` / `connect` (multiprocessing.connection, bytes only, never
pickle). That socket is not encrypted: across machines it must run inside TLS (or an SSH tunnel).

WHAT THE COORDINATOR LEARNS (read before choosing this over federated averaging)

- The site's text. The coordinator holds the base model, so it can run the site's first layers itself
  on candidate tokens and keep, position by position, the one whose states match what it received:
  tests/unit/test_federated_split.py does exactly that and reads the site's tokens back exactly, after
  the site's own LoRA has trained (its small change does not hide the match). Learned inversion
  (e.g. Vec2Text recovers 92% of 32-token inputs from embeddings) works without the base weights.
  Splitting after more layers makes this costlier, not impossible. Treat the activations as the data
  itself: split fine-tuning gives no confidentiality against the coordinator.
- Labels and the loss, indirectly. The gradient the site returns for the final states is
  softmax(logits) - one_hot(label) pushed through the head: with the head's weights (the base model's,
  known to the coordinator) the label tokens can be read from it (gradient-based label inference).
- Sequence lengths and padding, exactly (the attention mask is sent), and per-batch timing.
- At the end, the site's LoRA weights for its layers (to assemble the adapter): a function of its data,
  but less than the activations above already gave away. The site in turn gets the coordinator's LoRA,
  which was trained on the site's own data only.

Secure aggregation does not apply here (there is nothing to sum), nor does the differential privacy of
adaptery.federated.dp. Use split fine-tuning only where the coordinator may see the data (a site that
lacks the hardware, not one whose data must stay private), or run the coordinator in a trusted enclave
as arXiv 2401.09796 does; federated averaging with secure aggregation is the private option.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from dataclasses import asdict, dataclass
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Listener
from pathlib import Path

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from transformers.masking_utils import create_causal_mask

from adaptery.federated.config import FederatedLoraConfig
from adaptery.federated.lora import build_model

Tensors = dict[str, torch.Tensor]
Exchange = Callable[[bytes], bytes]  # one request to the coordinator, its reply


@dataclass(frozen=True)
class SplitConfig:
    """Where the model is cut and how both halves train (the same on the site and the coordinator)."""

    split_layer: int = 1  # decoder layers 0..split_layer-1 run on the site
    rank: int = 8
    alpha: int = 16
    seed: int = 0  # LoRA init: both sides draw the same, as one model would
    learning_rate: float = 2e-3

    def lora(self) -> FederatedLoraConfig:
        return FederatedLoraConfig(method="lora", rank=self.rank, alpha=self.alpha, seed=self.seed)

    def check(self, layers: int) -> None:
        if not 1 <= self.split_layer < layers:
            raise ValueError(f"split_layer must be between 1 and {layers - 1} for a model of {layers} layers")

    @classmethod
    def from_dict(cls, data: dict) -> SplitConfig:
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown split settings: {sorted(unknown)}")
        return cls(**data)


class SplitError(ValueError):
    """A message refused by the other side (its reason), or one out of place."""


def encode(kind: str, tensors: Tensors, info: dict | None = None) -> bytes:
    """One message: safetensors bytes with the kind (and a small JSON `info`) in its header."""
    metadata = {"kind": kind, **({"info": json.dumps(info)} if info is not None else {})}
    return save_tensors({k: v.detach().contiguous() for k, v in tensors.items()}, metadata=metadata)


def _metadata(message: bytes) -> dict:
    (length,) = struct.unpack("<Q", message[:8])
    return json.loads(message[8 : 8 + length]).get("__metadata__", {})


def decode(message: bytes) -> tuple[str, Tensors]:
    return _metadata(message).get("kind", ""), load_tensors(message)


def info_of(message: bytes) -> dict:
    return json.loads(_metadata(message).get("info", "{}"))


def _reply(message: bytes, wanted: str) -> Tensors:
    """The tensors of a reply of kind `wanted`; the other side's refusal raised as a SplitError."""
    kind, tensors = decode(message)
    if kind == "error":
        raise SplitError(info_of(message).get("reason", "refused"))
    _expect(kind, wanted)
    return tensors


def model_shape(config) -> dict:  # noqa: ANN001 - a transformers PretrainedConfig
    """What both halves must agree on to be one model (compared at "hello")."""
    return {k: getattr(config, k) for k in ("model_type", "num_hidden_layers", "hidden_size", "vocab_size")}


def lora_weights(model, layers: range) -> Tensors:  # noqa: ANN001
    """The LoRA weights of decoder layers `layers`, by parameter name."""
    own = tuple(f".layers.{i}." for i in layers)
    return {n: p.detach() for n, p in model.named_parameters() if "lora_" in n and any(s in n for s in own)}


def load_lora(model, layers: range, tensors: Tensors) -> None:  # noqa: ANN001
    """Put the other half's LoRA weights (layers `layers`) into `model`: exactly those names and shapes."""
    expected = lora_weights(model, layers)
    if set(tensors) != set(expected):
        raise SplitError("the LoRA weights sent are not those of the other half's layers")
    for name, tensor in tensors.items():
        if tensor.shape != expected[name].shape:
            raise SplitError(f"{name}: shape {tuple(tensor.shape)}, expected {tuple(expected[name].shape)}")
    with torch.no_grad():
        parameters = dict(model.named_parameters())
        for name, tensor in tensors.items():
            parameters[name].copy_(tensor)


def hello(exchange: Exchange, base_dir: Path) -> SplitConfig:
    """The coordinator's split settings, once it has checked that this base model is its own."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(base_dir, local_files_only=True, trust_remote_code=False)
    answer = exchange(encode("hello", {}, {"model": model_shape(config)}))
    _reply(answer, "config")
    return SplitConfig.from_dict(info_of(answer)["config"])


def _run_layers(model, layers, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
    """Decoder layers on hidden states (B, T, d), with the causal mask and rotary positions the whole model
    would build for them (transformers' own `create_causal_mask`, so the result matches one model)."""
    inner = model.base_model.model.model
    positions = torch.arange(hidden.shape[1]).unsqueeze(0)
    mask = create_causal_mask(
        config=inner.config, inputs_embeds=hidden, attention_mask=attention_mask, past_key_values=None,
        position_ids=positions,
    )  # fmt: skip
    rotary = inner.rotary_emb(hidden, position_ids=positions)
    for layer in layers:
        hidden = layer(hidden, attention_mask=mask, position_embeddings=rotary, position_ids=positions)
    return hidden


def _optimizer(model, layers: range, config: SplitConfig) -> torch.optim.Optimizer:  # noqa: ANN001
    own = tuple(f".layers.{i}." for i in layers)
    trained = [p for name, p in model.named_parameters() if p.requires_grad and any(s in name for s in own)]
    return torch.optim.AdamW(trained, lr=config.learning_rate, weight_decay=0.0)


class SplitSite:
    """The site's half: embedding, layers [0, k) with LoRA, final norm and LM head. Tokens and labels stay here."""

    def __init__(self, base_dir: Path, config: SplitConfig, exchange: Exchange) -> None:
        self.model = build_model(Path(base_dir), config.lora())
        layers = self.model.config.num_hidden_layers
        config.check(layers)
        self.config, self.exchange = config, exchange
        self.inner = self.model.base_model.model.model
        self.optimizer = _optimizer(self.model, range(config.split_layer), config)

    def step(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> float:
        """One training step on a batch; the loss (computed here, never sent)."""
        self.model.train()
        front = self.inner.layers[: self.config.split_layer]
        hidden = _run_layers(self.model, front, self.inner.embed_tokens(input_ids), attention_mask)
        reply = _reply(self.exchange(encode("forward", {"hidden": hidden, "attention_mask": attention_mask})), "states")
        states = reply["hidden"].requires_grad_(True)
        logits = self.model.base_model.model.lm_head(self.inner.norm(states))
        loss = self.model.base_model.model.loss_function(logits=logits, labels=labels, vocab_size=logits.shape[-1])
        self.optimizer.zero_grad()
        loss.backward()
        reply = _reply(self.exchange(encode("backward", {"grad": states.grad})), "gradient")
        hidden.backward(reply["grad"])
        self.optimizer.step()
        return float(loss.detach())

    def finish(self) -> None:
        """Send this half's LoRA weights, take the coordinator's: `self.model` is then the whole adapter."""
        layers = self.model.config.num_hidden_layers
        mine = lora_weights(self.model, range(self.config.split_layer))
        theirs = _reply(self.exchange(encode("finish", mine)), "adapter")
        load_lora(self.model, range(self.config.split_layer, layers), theirs)


class SplitCoordinator:
    """The coordinator's half: layers [k, L) with LoRA. It answers one forward, then its backward, per batch."""

    def __init__(self, base_dir: Path, config: SplitConfig) -> None:
        self.model = build_model(Path(base_dir), config.lora())
        layers = self.model.config.num_hidden_layers
        config.check(layers)
        self.config = config
        self.inner = self.model.base_model.model.model
        self.optimizer = _optimizer(self.model, range(config.split_layer, layers), config)
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None  # (input states, output states)
        self.steps = 0
        self.finished = False  # the site's LoRA is in: `self.model` is the whole adapter

    def handle(self, message: bytes) -> bytes:
        kind, tensors = decode(message)
        if kind == "hello":
            if info_of(message).get("model") != model_shape(self.model.config):
                raise SplitError(f"the site's base model is not the coordinator's ({model_shape(self.model.config)})")
            return encode("config", {}, {"config": asdict(self.config)})
        if kind == "finish":
            if self.pending is not None:
                raise SplitError("finish in the middle of a step")
            load_lora(self.model, range(self.config.split_layer), tensors)
            self.finished = True
            layers = self.model.config.num_hidden_layers
            return encode("adapter", lora_weights(self.model, range(self.config.split_layer, layers)))
        if kind == "forward":
            hidden = tensors["hidden"].requires_grad_(True)
            if hidden.dim() != 3 or hidden.shape[-1] != self.model.config.hidden_size:
                raise ValueError(f"hidden states must be (batch, tokens, {self.model.config.hidden_size})")
            if tensors["attention_mask"].shape != hidden.shape[:2]:
                raise ValueError("the attention mask must be (batch, tokens), as the hidden states")
            self.model.train()
            back = self.inner.layers[self.config.split_layer :]
            states = _run_layers(self.model, back, hidden, tensors["attention_mask"])
            self.pending = (hidden, states)
            return encode("states", {"hidden": states})
        if kind == "backward":
            if self.pending is None:
                raise ValueError("a backward message without the forward it answers")
            hidden, states = self.pending
            self.pending = None
            self.optimizer.zero_grad()
            states.backward(tensors["grad"])
            self.optimizer.step()
            self.steps += 1
            return encode("gradient", {"grad": hidden.grad})
        raise ValueError(f"unknown split message kind {kind!r}")


def _expect(kind: str, wanted: str) -> None:
    if kind != wanted:
        raise SplitError(f"the coordinator answered {kind!r}, expected {wanted!r}")


# ---------------------------------------------------------------------------------------------
# A byte transport between processes (authenticated, not encrypted: see the module docstring)


MAX_MESSAGE_BYTES = 1 << 30  # a batch's activations; a larger message is refused before it is read


def serve(
    coordinator: SplitCoordinator,
    address: tuple[str, int],
    authkey: bytes,
    ready: Callable,
    until: Callable[[], bool] | None = None,
) -> None:
    """Answer a site's messages until it disconnects (and, with `until`, until `until()` holds: a site that
    left early may come back); `ready(port)` is called once listening. A refused message is answered
    "error" with the reason, and the connection goes on."""
    with Listener(address, authkey=authkey) as listener:
        ready(listener.address[1])
        while True:
            try:
                connection = listener.accept()
            except AuthenticationError:
                continue  # a peer without the key: refused by the handshake, the next one may have it
            with connection:
                while True:
                    try:
                        message = connection.recv_bytes(MAX_MESSAGE_BYTES)
                    except (EOFError, ConnectionResetError):
                        break
                    try:
                        answer = coordinator.handle(message)
                    except ValueError as error:
                        answer = encode("error", {}, {"reason": str(error)})
                    connection.send_bytes(answer)
            if until is None or until():
                return


def connect(address: tuple[str, int], authkey: bytes):  # noqa: ANN201 - (exchange, close)
    """A site's `exchange` over the socket, and the function that closes it."""
    connection = Client(address, authkey=authkey)

    def exchange(message: bytes) -> bytes:
        connection.send_bytes(message)
        return connection.recv_bytes()

    return exchange, connection.close
