"""Optional differential privacy at the site level, added before secure aggregation.

Each site clips its update to L2 norm `clip` and adds Gaussian noise of standard deviation
noise_multiplier * clip / sqrt(threshold). At least `threshold` sites survive a round (else it
aborts), so the aggregate carries noise of standard deviation >= noise_multiplier * clip, which is
the Gaussian mechanism for the sum with sensitivity `clip` (adding or removing one site's whole
contribution). No single site's noise protects that site alone: the guarantee is for the released
aggregate, and holds when the surviving sites add their noise honestly.

Under DP every site weighs 1 (example counts would change the sensitivity) and the training loss
is not aggregated. The budget is tracked with Rényi DP (Mironov 2017): a Gaussian mechanism with
noise multiplier z costs alpha / (2 z^2) at order alpha per round, rounds add up (every site takes
part in every round: no sampling amplification is claimed), and (epsilon, delta) follows from
epsilon = min over alpha of rounds * alpha / (2 z^2) + log(1 / delta) / (alpha - 1).

Noise is drawn in floating point from a generator seeded by the OS's entropy and then rounded to
the fixed-point grid: the usual floating-point caveats of the Gaussian mechanism apply.
"""

from __future__ import annotations

import math
import secrets

import numpy as np

ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 257))


def clip_l2(update: np.ndarray, clip: float) -> tuple[np.ndarray, float]:
    """The update scaled down to L2 norm `clip` if it is longer; also its norm before clipping."""
    norm = float(np.linalg.norm(update))
    return (update * (clip / norm) if norm > clip else update), norm


def site_noise(size: int, clip: float, noise_multiplier: float, threshold: int) -> np.ndarray:
    """This site's share of the aggregate's noise (fresh entropy each call)."""
    rng = np.random.default_rng(secrets.randbits(128))
    return rng.normal(0.0, noise_multiplier * clip / math.sqrt(threshold), size)


def epsilon(noise_multiplier: float, rounds: int, delta: float) -> float:
    """The (epsilon, delta) budget spent after `rounds` rounds (site-level, RDP accounting)."""
    if noise_multiplier <= 0:
        return math.inf
    return min(rounds * alpha / (2 * noise_multiplier**2) + math.log(1 / delta) / (alpha - 1) for alpha in ORDERS)
