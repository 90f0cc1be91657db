"""Per-step recurrence sampling: r ~ 1 + Poisson(exp(tau)), tau ~ Normal(mu, sigma), clamped to [1, r_max].

The common recipe draws Poisson(e^tau) + 1 with E[e^tau] = mean, so it trains at mean + 1 recurrences and spends
~20% more FLOPs than advertised. Here mu is calibrated numerically so that the *clamped* distribution has exactly the
configured mean.

The Poisson rate exp(tau) is clamped to [e^-60, 4 r_max + 50]. A wide sigma otherwise sends it past 2^63 (or to
inf), where torch.poisson overflows the int64 draw; inside the clamp P(1 + N < r_max) at the top and P(N >= 1) at
the bottom are both below 1e-25, so the clamp changes no clamped draw measurably. Calibration uses the same clamp.
"""

from __future__ import annotations

import functools
import hashlib
import math

import torch

LOG_RATE_MIN = -60.0  # below this rate P(N >= 1) < 1e-25: r is 1 either way


def _log_rate_max(r_max: int) -> float:
    """At rate 4 r_max + 50, P(N <= r_max - 2) < 1e-25 for every r_max: r is r_max either way."""
    return math.log(4 * r_max + 50)


def _clamped_log_rate(tau: torch.Tensor, r_max: int) -> torch.Tensor:
    return tau.clamp(LOG_RATE_MIN, _log_rate_max(r_max))  # +-inf from an overflowing sigma * z clamp too


@functools.lru_cache(maxsize=64)
def _calibrated_mu(mean: float, sigma: float, r_max: int) -> float:
    """The mu for which E[min(1 + Poisson(exp(tau)), r_max)] == mean, tau ~ N(mu, sigma)."""
    z = torch.linspace(-8.0, 8.0, 1601, dtype=torch.float64)
    w = torch.exp(-0.5 * z * z)
    w = w / w.sum()  # discretised standard normal
    j = torch.arange(r_max, dtype=torch.float64)  # Poisson support points 0..r_max-1

    def clamped_mean(mu: float) -> float:
        log_lam = _clamped_log_rate(mu + sigma * z, r_max)[:, None]  # (Z, 1), finite: no 0 * inf below
        log_pmf = -log_lam.exp() + j[None, :] * log_lam - torch.lgamma(j + 1)[None, :]
        cdf = torch.exp(log_pmf).cumsum(dim=1)  # P(N <= j)
        # E[min(1+N, r_max)] = 1 + sum_{j=1}^{r_max-1} P(N >= j) = 1 + sum_{j=0}^{r_max-2} (1 - P(N <= j))
        tail = (1.0 - cdf[:, : r_max - 1]).clamp_min(0).sum(dim=1)
        return float(1.0 + (w * tail).sum())

    # At lo every tau of the grid (|z| <= 8) clamps to the bottom rate (mean 1), at hi to the top (mean r_max).
    # Bounded to finite floats so that mu + sigma * z is never inf - inf for an astronomically wide sigma.
    lo = max(LOG_RATE_MIN - 9 * sigma, -1e300)
    hi = min(_log_rate_max(r_max) + 9 * sigma, 1e300)
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if clamped_mean(mid) < mean:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def sample_num_recur(
    mean: float, sigma: float, r_max: int, generator: torch.Generator | None = None, size: int | None = None
) -> int | torch.Tensor:
    """Draw r (an int, or a LongTensor of `size` draws) with E[r] == mean and r in [1, r_max]."""
    if not 1 <= mean <= r_max:
        raise ValueError(f"sample_num_recur: mean={mean} must lie in [1, r_max={r_max}]")
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sample_num_recur: sigma={sigma} must be a finite number > 0")
    n = 1 if size is None else size
    if mean == 1 or r_max == 1:
        out = torch.ones(n, dtype=torch.long)
    elif mean >= r_max - 1e-9:
        out = torch.full((n,), r_max, dtype=torch.long)
    else:
        mu = _calibrated_mu(float(mean), float(sigma), int(r_max))
        tau = torch.randn(n, generator=generator, dtype=torch.float64) * sigma + mu
        rate = _clamped_log_rate(tau, r_max).exp()
        out = (1 + torch.poisson(rate, generator=generator)).clamp_(max=r_max).long()
    return int(out[0]) if size is None else out


def recur_generator(seed: int, step: int) -> torch.Generator:
    """A CPU generator that depends only on (seed, step): every DDP rank and every resumed run draws the same r.

    The generator seed is a 64-bit hash of the pair, not an affine mix like seed * K + step, under which
    (0, K + t) and (1, t) share a stream; distinct pairs collide with probability 2^-64. blake2b rather than
    hash(): the same on every process and Python version.
    """
    digest = hashlib.blake2b(f"{int(seed)}:{int(step)}".encode(), digest_size=8).digest()
    g = torch.Generator(device="cpu")
    g.manual_seed(int.from_bytes(digest, "little"))  # manual_seed accepts [0, 2^64)
    return g
