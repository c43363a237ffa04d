"""What the sites train and what travels: FFA-LoRA, sparse head fine-tuning (SPF), the update vector.

Exactness. The served update of a LoRA module is B·A. Averaging the sites' A and B separately
gives mean(B)·mean(A), which is not mean(B·A): plain LoRA FedAvg aggregates something no site
trained (the cross terms B_i·A_j). FFA-LoRA (Sun et al., ICLR 2024) freezes A at a random init
that every site draws from the same seed and trains only B, so B·A is linear in B and the
weighted mean of the sites' B is exactly the weighted mean of their adapters; it also halves
what is sent. `method="lora"` (A and B both trained and averaged) is kept as an option, with
that inexactness.

Sparsification Parameter Fine-tuning (arXiv 2401.09796, Method 2): attention heads are ranked by
the L1 norm of their rows in the base model's q/k/v projections, globally over all layers, and
only the top `head_fraction` of them are trained; with FFA-LoRA a head's rows of B are exactly its
share of the q/k/v update, so only those rows are trained and sent (bytes fall with the fraction).

FedAvg weights. A site with n examples uploads w·Δ and w, w = min(n, example_cap) / example_cap,
inside the secure sum; the coordinator divides the two sums: sum(n_i Δ_i) / sum(n_i) without
learning any n_i.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from adaptery.federated.config import FederatedLoraConfig

HEAD_PROJECTIONS = ("q_proj", "k_proj", "v_proj")


def build_model(base_dir: Path, config: FederatedLoraConfig):  # noqa: ANN201 - a PeftModel
    """The base with LoRA on `target_modules`; A is drawn from `config.seed`, identically on every site."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        base_dir, dtype=torch.float32, trust_remote_code=False, local_files_only=True, use_safetensors=True
    )
    torch.manual_seed(config.seed)
    peft_config = LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=0.0,
        target_modules=list(config.target_modules),
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, peft_config)
    for name, parameter in model.named_parameters():
        parameter.requires_grad = "lora_B" in name or (config.method == "lora" and "lora_A" in name)
    return model


def _head_of_rows(module_name: str) -> bool:
    return module_name.rsplit(".", 1)[-1] in HEAD_PROJECTIONS


def rank_heads(model, fraction: float) -> set[tuple[int, int]]:  # noqa: ANN001
    """(layer, head) of the top `fraction` of attention heads by the L1 norm of their q/k/v rows."""
    config = model.config
    heads, head_dim = config.num_attention_heads, config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", heads)
    norms: dict[tuple[int, int], float] = {}
    for layer_index, layer in enumerate(model.base_model.model.model.layers):
        attention = layer.self_attn
        for head in range(heads):
            kv = head * kv_heads // heads
            total = 0.0
            for name, row_head in (("q_proj", head), ("k_proj", kv), ("v_proj", kv)):
                weight = getattr(attention, name).base_layer.weight
                total += float(weight[row_head * head_dim : (row_head + 1) * head_dim].abs().sum())
            norms[(layer_index, head)] = total
    keep = max(1, math.ceil(fraction * len(norms)))
    return set(sorted(norms, key=lambda key: -norms[key])[:keep])


@dataclass
class Slot:
    """One parameter's share of the update vector: which rows of it travel."""

    name: str
    rows: np.ndarray | None  # None: the whole tensor
    size: int


class UpdateLayout:
    """The fixed order in which trained parameters (or the selected rows of them) form the vector."""

    def __init__(self, model, config: FederatedLoraConfig) -> None:  # noqa: ANN001
        selected = rank_heads(model, config.head_fraction) if config.head_fraction < 1 else None
        heads = model.config.num_attention_heads
        head_dim = model.config.hidden_size // heads
        kv_heads = getattr(model.config, "num_key_value_heads", heads)
        self.parameters = dict(model.named_parameters())
        self.slots: list[Slot] = []
        for name, parameter in self.parameters.items():
            if not parameter.requires_grad:
                continue
            rows = None
            module = name.split(".lora_")[0]
            if selected is not None and "lora_B" in name:
                if _head_of_rows(module):
                    layer = int(module.split(".layers.")[1].split(".")[0])
                    projection = module.rsplit(".", 1)[-1]
                    count = heads if projection == "q_proj" else kv_heads
                    chosen = sorted(
                        {h if projection == "q_proj" else h * kv_heads // heads for (ly, h) in selected if ly == layer}
                    )
                    rows = np.array(
                        [r for h in chosen for r in range(h * head_dim, (h + 1) * head_dim)], dtype=np.int64
                    )
                    assert count * head_dim == parameter.shape[0]
                else:
                    rows = np.zeros(0, dtype=np.int64)  # o_proj and MLP: not trained under SPF
            size = parameter.numel() if rows is None else len(rows) * parameter.shape[1]
            self.slots.append(Slot(name, rows, size))
        self.size = sum(slot.size for slot in self.slots)

    def trainable_mask(self) -> dict[str, torch.Tensor | None]:
        """Per parameter, the rows whose gradient counts (None: all of them)."""
        masks = {}
        for slot in self.slots:
            if slot.rows is None:
                masks[slot.name] = None
            else:
                mask = torch.zeros(self.parameters[slot.name].shape[0], 1)
                mask[torch.as_tensor(slot.rows)] = 1.0
                masks[slot.name] = mask
        return masks

    def read(self) -> np.ndarray:
        parts = []
        for slot in self.slots:
            tensor = self.parameters[slot.name].detach().cpu().numpy()
            parts.append((tensor if slot.rows is None else tensor[slot.rows]).reshape(-1))
        return np.concatenate(parts).astype(np.float64) if parts else np.zeros(0)

    def write(self, vector: np.ndarray) -> None:
        if len(vector) != self.size:
            raise ValueError(f"update has {len(vector)} values, the layout {self.size}")
        offset = 0
        with torch.no_grad():
            for slot in self.slots:
                parameter = self.parameters[slot.name]
                chunk = torch.as_tensor(vector[offset : offset + slot.size], dtype=parameter.dtype)
                if slot.rows is None:
                    parameter.copy_(chunk.view_as(parameter))
                else:
                    parameter[torch.as_tensor(slot.rows)] = chunk.view(len(slot.rows), parameter.shape[1])
                offset += slot.size


def local_train(model, layout: UpdateLayout, examples: list[dict], config: FederatedLoraConfig, seed: int) -> float:  # noqa: ANN001
    """`local_steps` AdamW steps on the site's examples (loss on assistant tokens); the mean loss."""
    generator = torch.Generator().manual_seed(seed)
    masks = layout.trainable_mask()
    trained = [layout.parameters[slot.name] for slot in layout.slots]
    optimizer = torch.optim.AdamW(trained, lr=config.learning_rate, weight_decay=0.0)
    pad = model.config.pad_token_id or 0
    model.train()
    losses = []
    for _ in range(config.local_steps):
        batch = [examples[int(i)] for i in torch.randint(len(examples), (config.batch_size,), generator=generator)]
        longest = max(len(e["input_ids"]) for e in batch)
        ids = torch.tensor([e["input_ids"] + [pad] * (longest - len(e["input_ids"])) for e in batch])
        attention = torch.tensor([e["attention_mask"] + [0] * (longest - len(e["input_ids"])) for e in batch])
        labels = torch.tensor([e["labels"] + [-100] * (longest - len(e["labels"])) for e in batch])
        loss = model(input_ids=ids, attention_mask=attention, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        for slot in layout.slots:
            if masks[slot.name] is not None:
                layout.parameters[slot.name].grad.mul_(masks[slot.name])
        optimizer.step()
        losses.append(loss.item())
    return float(np.mean(losses))


@torch.no_grad()
def evaluate(model, examples: list[dict]) -> float:  # noqa: ANN001
    """Mean loss over `examples`, one at a time (no padding effects)."""
    model.eval()
    losses = [
        float(
            model(
                input_ids=torch.tensor([e["input_ids"]]),
                attention_mask=torch.tensor([e["attention_mask"]]),
                labels=torch.tensor([e["labels"]]),
            ).loss
        )
        for e in examples
    ]
    return float(np.mean(losses))


def weight_of(examples: int, config: FederatedLoraConfig) -> float:
    return min(examples, config.example_cap) / config.example_cap


def save_adapter(model, out_dir: Path) -> Path:  # noqa: ANN001
    """An ordinary PEFT adapter directory (safetensors), as the platform imports and serves it."""
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    (out_dir / "README.md").unlink(missing_ok=True)  # PEFT's model card template: not part of an adapter
    return out_dir
