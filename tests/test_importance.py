"""The per-point estimators of ``ppvae.inference.importance`` against closed forms.

Reference: probabilistic PCA (``LinearGaussian``), whose log p(x), posterior p(z|x) and
KL(q(z|x) || p(z|x)) are exact. Its amortised diagonal guide is set by ``set_guide`` to the exact
posterior mean with ``factor`` times the posterior marginal standard deviations: ``factor > 1``
gives bounded, well-behaved weights; ``factor < 1`` heavy-tailed ones.
"""

import math

import pyro
import pytest
import torch
from linear_gaussian_cases import data, make_model

from ppvae.inference.importance import (
    effective_sample_size,
    elbo,
    iwae_bound,
    log_marginal,
    log_marginal_stderr,
    log_mean_exp,
    log_weights,
    normalized_weights,
)


@pytest.mark.parametrize(("dtype", "atol"), [(torch.float64, 1e-9), (torch.float32, 2e-4)])
def test_exact_posterior_guide_gives_constant_log_weights(dtype, atol):
    module = make_model(guide_family="exact", dtype=dtype)
    x = data(module, 8)
    exact = module.exact_log_marginal(x).detach()
    with torch.no_grad():
        log_w = log_weights(module.model, module.guide, x, num_particles=1000, chunk_size=128)
        assert log_w.shape == (1000, 8)
        torch.testing.assert_close(log_w, exact.expand(1000, 8), atol=atol, rtol=0)
        for estimate in (
            elbo(module.model, module.guide, x, num_particles=200),
            iwae_bound(module.model, module.guide, x, num_particles=200),
            log_marginal(module.model, module.guide, x, num_samples=200),
        ):
            torch.testing.assert_close(estimate, exact, atol=atol, rtol=0)
    assert float(log_marginal_stderr(log_w).max()) < 10 * atol
    torch.testing.assert_close(
        effective_sample_size(log_w), torch.full((8,), 1000.0, dtype=dtype), atol=0, rtol=1e-3
    )


def test_log_marginal_imperfect_guide_within_stderr_of_exact():
    module = make_model(latent_dim=2, factor=1.2, dtype=torch.float32)
    x = data(module, 10)
    exact = module.exact_log_marginal(x).detach()
    pyro.set_rng_seed(0)
    estimate, stderr = log_marginal(module.model, module.guide, x, return_stderr=True)
    error = (estimate - exact).abs()
    assert (stderr > 1e-4).all(), "the diagonal guide is not exact: the weights must vary"
    assert (error < 3 * stderr).all(), (error / stderr).max()
    assert (error < 0.05).all(), error.max()


def test_elbo_is_log_marginal_minus_kl_in_expectation():
    module = make_model(latent_dim=2, factor=0.8)
    x = data(module, 6)
    expected = (module.exact_log_marginal(x) - module.kl_to_posterior(x)).detach()
    num_particles = 20000
    pyro.set_rng_seed(3)
    with torch.no_grad():
        log_w = log_weights(module.model, module.guide, x, num_particles=num_particles)
        pyro.set_rng_seed(3)
        estimate = elbo(module.model, module.guide, x, num_particles=num_particles)
    torch.testing.assert_close(estimate, log_w.mean(dim=0), atol=0, rtol=0)
    stderr = log_w.std(dim=0) / math.sqrt(num_particles)
    assert ((estimate - expected).abs() < 4 * stderr).all(), (estimate - expected) / stderr


def test_iwae_bound_increases_with_k_in_expectation():
    """E[ELBO] < E[IWAE_5] < E[IWAE_50] <= log p(x): repeats of each bound, heavy-tailed weights."""
    module = make_model(latent_dim=2, factor=0.6)
    x = data(module, 4)
    exact = module.exact_log_marginal(x).detach()
    repeats = 2000
    x_rep = x.repeat(repeats, 1)  # each copy gets its own particles
    means, stderrs = [], []
    pyro.set_rng_seed(0)
    with torch.no_grad():
        for k in (1, 5, 50):
            bound = iwae_bound(module.model, module.guide, x_rep, num_particles=k, chunk_size=k)
            bound = bound.reshape(repeats, x.shape[0])
            means.append(bound.mean(dim=0))
            stderrs.append(bound.std(dim=0) / math.sqrt(repeats))
    for lower, upper, se_lower, se_upper in zip(
        means, means[1:], stderrs, stderrs[1:], strict=False
    ):
        assert (upper - lower > 3 * torch.sqrt(se_lower**2 + se_upper**2)).all()
    assert (means[-1] < exact + 3 * stderrs[-1]).all()
    # with one particle the bound is the ELBO, draw for draw
    pyro.set_rng_seed(5)
    one = iwae_bound(module.model, module.guide, x, num_particles=1).detach()
    pyro.set_rng_seed(5)
    torch.testing.assert_close(one, elbo(module.model, module.guide, x).detach(), atol=0, rtol=0)


def test_log_marginal_stderr_matches_spread_of_repeated_estimates():
    """The delta-method s.e. agrees with the standard deviation of independent estimates."""
    module = make_model(latent_dim=2, factor=1.2)
    x = data(module, 3)
    repeats, num_samples = 300, 500
    pyro.set_rng_seed(0)
    estimate, stderr = log_marginal(
        module.model,
        module.guide,
        x.repeat(repeats, 1),
        num_samples=num_samples,
        chunk_size=num_samples,
        return_stderr=True,
    )
    spread = estimate.reshape(repeats, 3).std(dim=0)
    reported = stderr.reshape(repeats, 3).mean(dim=0)
    # the s.d. of 300 draws is itself known to about 1/sqrt(2*300) = 4%
    torch.testing.assert_close(reported, spread, rtol=0.15, atol=0)


def test_effective_sample_size_matches_closed_form():
    """1-D latent, guide N(posterior mean, (s * posterior sd)^2): ESS/K -> sqrt(2s^2 - 1) / s^2."""
    factor = 1.5
    module = make_model(latent_dim=1, factor=factor)
    x = data(module, 20)
    pyro.set_rng_seed(0)
    with torch.no_grad():
        log_w = log_weights(module.model, module.guide, x, num_particles=5000)
    ratio = effective_sample_size(log_w).mean() / 5000
    expected = math.sqrt(2 * factor**2 - 1) / factor**2
    assert abs(float(ratio) - expected) < 0.01, (float(ratio), expected)


def test_log_mean_exp_and_normalized_weights_are_stable():
    log_w = torch.tensor(
        [[1000.0, -1000.0], [1000.0 + math.log(3.0), -1000.0]], dtype=torch.float64
    )
    torch.testing.assert_close(
        log_mean_exp(log_w), torch.tensor([1000.0 + math.log(2.0), -1000.0], dtype=torch.float64)
    )
    torch.testing.assert_close(
        normalized_weights(log_w), torch.tensor([[0.25, 0.5], [0.75, 0.5]], dtype=torch.float64)
    )
    torch.testing.assert_close(
        log_marginal_stderr(log_w), torch.tensor([0.5**0.5 * 0.5, 0.0], dtype=torch.float64)
    )
