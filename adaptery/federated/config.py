"""The recipe every site and the coordinator share (it travels in each round's first message).

Kept free of torch: the ClientApp's secagg stages import it, and each stage is a fresh process.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class FederatedLoraConfig:
    """The training recipe every site and the coordinator share (it travels in the run config)."""

    method: str = "ffa"  # "ffa": A frozen and shared, B trained (exact); "lora": both trained (inexact)
    rank: int = 8
    alpha: int = 16
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    seed: int = 0  # A's init: the same on every site
    head_fraction: float = 1.0  # SPF: the fraction of attention heads trained (1.0: all)
    learning_rate: float = 2e-3
    local_steps: int = 4
    batch_size: int = 4
    max_seq_length: int = 256
    example_cap: int = 10_000  # FedAvg weights saturate here (keeps weighted values inside the bound)
    bound: float = 1.0  # per coordinate, after weighting: larger values are clipped (and counted)
    dp_clip: float = 0.0  # differential privacy (adaptery.federated.dp): L2 clip of each site's update; 0: off
    dp_noise: float = 0.0  # noise multiplier z: the aggregate's noise std is z * dp_clip
    dp_delta: float = 1e-5

    def __post_init__(self) -> None:
        if self.method not in ("ffa", "lora"):
            raise ValueError(f"method must be 'ffa' or 'lora', not {self.method!r}")
        if not 0 < self.head_fraction <= 1:
            raise ValueError("head_fraction must be in (0, 1]")
        if self.method == "lora" and self.head_fraction < 1:
            raise ValueError(
                "sparse head fine-tuning needs method='ffa' (a head's share of the update is its rows of B)"
            )

        if self.dp_clip < 0 or self.dp_noise < 0 or not 0 < self.dp_delta < 1:
            raise ValueError("dp_clip and dp_noise must be >= 0 and dp_delta in (0, 1)")
        if self.dp_clip > 0 and self.dp_noise == 0:
            raise ValueError("differential privacy needs dp_noise > 0 (clipping alone gives no guarantee)")
        if self.dp_clip > 0 and self.bound < self.dp_clip * (1 + 8 * self.dp_noise):
            # A noisy value clipped at the bound would no longer be Gaussian: keep 8 standard deviations of room.
            raise ValueError(f"with dp_clip={self.dp_clip} and dp_noise={self.dp_noise}, bound must be at least "
                             f"{self.dp_clip * (1 + 8 * self.dp_noise):g}")  # fmt: skip

    @property
    def private(self) -> bool:
        return self.dp_clip > 0

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> FederatedLoraConfig:
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown federated LoRA settings: {sorted(unknown)}")
        if "target_modules" in data:
            data = {**data, "target_modules": tuple(data["target_modules"])}
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> FederatedLoraConfig:
        return cls.from_dict(json.loads(text))
