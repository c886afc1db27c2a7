"""Training, objectives, evaluation and diagnostics for any model/guide pair (DESIGN §2)."""

from ppvae.inference.ais import AISResult, BDMCResult, ais_log_marginal, bdmc
from ppvae.inference.collapse import active_units, collapse_metrics, kl_per_dimension
from ppvae.inference.evaluate import EvaluationReport, evaluate
from ppvae.inference.gaps import GapResult, gap_decomposition
from ppvae.inference.importance import (
    effective_sample_size,
    elbo,
    iwae_bound,
    log_marginal,
    log_marginal_stderr,
    log_weights,
)
from ppvae.inference.objectives import IWAE_ELBO, KLWeighted_ELBO, make_objective
from ppvae.inference.posterior import compare_posteriors, posterior
from ppvae.inference.regularity import (
    ELBOSurgery,
    completeness,
    continuity,
    elbo_surgery,
    interpolate,
    regularity_summary,
)
from ppvae.inference.train import (
    FitResult,
    check_training_data,
    fit,
    read_metrics,
    resolve_device,
)

__all__ = [
    "AISResult",
    "BDMCResult",
    "GapResult",
    "ais_log_marginal",
    "bdmc",
    "gap_decomposition",
    "IWAE_ELBO",
    "ELBOSurgery",
    "EvaluationReport",
    "FitResult",
    "KLWeighted_ELBO",
    "active_units",
    "check_training_data",
    "collapse_metrics",
    "compare_posteriors",
    "completeness",
    "continuity",
    "effective_sample_size",
    "elbo",
    "elbo_surgery",
    "evaluate",
    "fit",
    "interpolate",
    "iwae_bound",
    "kl_per_dimension",
    "log_marginal",
    "log_marginal_stderr",
    "log_weights",
    "make_objective",
    "posterior",
    "read_metrics",
    "regularity_summary",
    "resolve_device",
]
