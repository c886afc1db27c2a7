"""Observation models p_θ(x|z) shared by the zoo: the network output -> a Pyro distribution."""

from __future__ import annotations

import pyro.distributions as dist
import torch
from torch.nn import functional as F

from ppvae.errors import PPVAEError

LIKELIHOODS = ("bernoulli", "continuous-bernoulli", "gaussian")
MIN_OBS_SCALE = 1e-3


def check_likelihood(name: str) -> str:
    if name not in LIKELIHOODS:
        raise PPVAEError(f"unknown likelihood {name!r}; use one of {', '.join(LIKELIHOODS)}")
    return name


def observation_dist(
    name: str, out: torch.Tensor, raw_scale: torch.Tensor | None = None
) -> dist.TorchDistribution:
    """``[..., D]`` decoder output -> a distribution with event shape ``[D]``."""
    if name == "bernoulli":
        return dist.Bernoulli(logits=out).to_event(1)
    if name == "continuous-bernoulli":
        return dist.ContinuousBernoulli(logits=out).to_event(1)
    return dist.Normal(out, F.softplus(raw_scale) + MIN_OBS_SCALE).to_event(1)


def observation_mean(name: str, out: torch.Tensor) -> torch.Tensor:
    """E[x|z] (for plots and reconstructions)."""
    if name == "bernoulli":
        return torch.sigmoid(out)
    if name == "continuous-bernoulli":
        return dist.ContinuousBernoulli(logits=out).mean
    return out


def check_observations(name: str, x: torch.Tensor) -> None:
    """A one-line error when ``x`` lies outside the likelihood's support."""
    if not torch.isfinite(x).all():
        raise PPVAEError("the data contain NaN/inf values; remove or impute them first")
    if name == "gaussian":
        return
    low, high = float(x.min()), float(x.max())
    if low < 0.0 or high > 1.0:
        raise PPVAEError(
            f"the {name} likelihood needs values in [0, 1] but the data span "
            f"[{low:.4g}, {high:.4g}]; rescale the data or use --likelihood gaussian"
        )
    if name == "bernoulli" and not ((x == 0) | (x == 1)).all():
        raise PPVAEError(
            "the bernoulli likelihood needs binary data but got grey values; use "
            "--binarize dynamic or static, or --likelihood continuous-bernoulli"
        )
