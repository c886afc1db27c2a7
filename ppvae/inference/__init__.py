"""Training, objectives, evaluation and diagnostics for any model/guide pair (DESIGN §2)."""

from ppvae.inference.importance import (
    effective_sample_size,
    elbo,
    iwae_bound,
    log_marginal,
    log_marginal_stderr,
    log_weights,
)
from ppvae.inference.train import FitResult, fit, resolve_device

__all__ = [
    "FitResult",
    "fit",
    "resolve_device",
    "effective_sample_size",
    "elbo",
    "iwae_bound",
    "log_marginal",
    "log_marginal_stderr",
    "log_weights",
]
