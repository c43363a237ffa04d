"""What sites train and send: FFA-LoRA's exact aggregation (and plain LoRA's inexactness), SPF head
selection, the recipe's checks, and the differential-privacy helpers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from adaptery.federated import dp
from adaptery.federated.config import FederatedLoraConfig
from adaptery.federated.lora import UpdateLayout, build_model, local_train, rank_heads
from adaptery.training.data import load_chat_dataset
from tests.conftest import SAMPLE_CHAT

SMALL = {"rank": 4, "alpha": 8, "local_steps": 2, "batch_size": 2, "max_seq_length": 96, "learning_rate": 0.01}


@pytest.fixture(scope="module")
def examples(demo_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir)
    return load_chat_dataset(SAMPLE_CHAT, tokenizer, max_seq_length=96).examples


def lora_deltas(model) -> dict[str, torch.Tensor]:
    """Each adapted module's served update, scale * B @ A."""
    deltas = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
            deltas[name] = (module.scaling["default"] * b @ a).detach().double()
    return deltas


def trained_sites(demo_model_dir, examples, config):
    sites = []
    for site, data in ((1, examples[:4]), (2, examples[4:])):
        model = build_model(demo_model_dir, config)
        layout = UpdateLayout(model, config)
        local_train(model, layout, data, config, seed=site)
        sites.append((model, layout, len(data)))
    return sites


def test_ffa_lora_aggregate_is_exactly_the_weighted_mean_of_the_adapters(demo_model_dir, examples):
    config = FederatedLoraConfig(**SMALL)
    (m1, l1, n1), (m2, l2, n2) = trained_sites(demo_model_dir, examples, config)
    mean_vector = (n1 * l1.read() + n2 * l2.read()) / (n1 + n2)
    merged = build_model(demo_model_dir, config)
    UpdateLayout(merged, config).write(mean_vector)
    d1, d2, dm = lora_deltas(m1), lora_deltas(m2), lora_deltas(merged)
    for name in dm:
        expected = (n1 * d1[name] + n2 * d2[name]) / (n1 + n2)
        assert torch.allclose(dm[name], expected, atol=1e-7), name
    assert not any(p.requires_grad for n, p in merged.named_parameters() if "lora_A" in n)  # A frozen


def test_plain_lora_averaging_is_not_the_mean_adapter(demo_model_dir, examples):
    config = FederatedLoraConfig(method="lora", **SMALL)
    (m1, l1, _), (m2, l2, _) = trained_sites(demo_model_dir, examples, config)
    merged = build_model(demo_model_dir, config)
    UpdateLayout(merged, config).write((l1.read() + l2.read()) / 2)
    d1, d2, dm = lora_deltas(m1), lora_deltas(m2), lora_deltas(merged)
    gap = max(float((dm[n] - (d1[n] + d2[n]) / 2).abs().max()) for n in dm)
    assert gap > 1e-6  # mean(B)·mean(A) != mean(B·A): the documented inexactness


def test_spf_trains_and_sends_only_the_top_heads(demo_model_dir, examples):
    config = FederatedLoraConfig(head_fraction=0.25, **SMALL)
    model = build_model(demo_model_dir, config)
    layout = UpdateLayout(model, config)
    heads = model.config.num_attention_heads
    head_dim = model.config.hidden_size // heads
    selected = rank_heads(model, 0.25)
    total_heads = heads * model.config.num_hidden_layers
    assert len(selected) == math.ceil(0.25 * total_heads)
    assert layout.size == len(selected) * head_dim * config.rank * 3  # q, k, v rows of B; nothing else
    norms = {}
    for layer, block in enumerate(model.base_model.model.model.layers):
        for head in range(heads):
            rows = slice(head * head_dim, (head + 1) * head_dim)
            norms[(layer, head)] = sum(
                float(getattr(block.self_attn, p).base_layer.weight[rows].abs().sum())
                for p in ("q_proj", "k_proj", "v_proj")
            )
    assert min(norms[h] for h in selected) >= max(norms[h] for h in set(norms) - selected)
    local_train(model, layout, examples, config, seed=0)
    for layer, block in enumerate(model.base_model.model.model.layers):
        b = block.self_attn.q_proj.lora_B["default"].weight
        for head in range(heads):
            moved = bool(b[head * head_dim : (head + 1) * head_dim].abs().sum() > 0)
            assert moved == ((layer, head) in selected)
        assert float(block.self_attn.o_proj.lora_B["default"].weight.abs().sum()) == 0  # not trained under SPF


def test_recipe_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="needs method='ffa'"):
        FederatedLoraConfig(method="lora", head_fraction=0.5)
    with pytest.raises(ValueError, match="dp_noise > 0"):
        FederatedLoraConfig(dp_clip=1.0)
    with pytest.raises(ValueError, match="bound must be at least"):
        FederatedLoraConfig(dp_clip=1.0, dp_noise=1.0, bound=2.0)
    with pytest.raises(ValueError, match="unknown federated LoRA settings"):
        FederatedLoraConfig.from_dict({"rnak": 4})
    config = FederatedLoraConfig(dp_clip=0.5, dp_noise=1.0, bound=5.0, head_fraction=0.5)
    assert FederatedLoraConfig.from_json(config.to_json()) == config


def test_dp_clip_and_aggregate_noise():
    clipped, norm = dp.clip_l2(np.full(100, 1.0), 2.0)
    assert norm == pytest.approx(10.0) and float(np.linalg.norm(clipped)) == pytest.approx(2.0)
    same, _ = dp.clip_l2(np.full(4, 0.1), 2.0)
    assert np.array_equal(same, np.full(4, 0.1))
    threshold = 3
    total = sum(dp.site_noise(40_000, 0.5, 2.0, threshold) for _ in range(threshold))
    assert float(np.std(total)) == pytest.approx(2.0 * 0.5, rel=0.03)  # z * clip once threshold sites add theirs


def test_dp_budget_grows_with_rounds_and_shrinks_with_noise():
    assert dp.epsilon(1.0, 10, 1e-5) > dp.epsilon(1.0, 1, 1e-5)
    assert dp.epsilon(2.0, 10, 1e-5) < dp.epsilon(1.0, 10, 1e-5)
    # The optimum over alpha in closed form: rounds / (2 z^2) + sqrt(2 rounds ln(1/delta)) / z.
    for z, rounds in ((1.0, 1), (2.0, 10)):
        closed = rounds / (2 * z**2) + math.sqrt(2 * rounds * math.log(1e5)) / z
        assert dp.epsilon(z, rounds, 1e-5) == pytest.approx(closed, rel=2e-3)
    assert dp.epsilon(0.0, 1, 1e-5) == math.inf
