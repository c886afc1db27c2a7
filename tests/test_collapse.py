"""Posterior-collapse diagnostics against closed forms on linear-Gaussian models."""

import json

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

from ppvae.errors import PPVAEError
from ppvae.inference import fit
from ppvae.inference.collapse import active_units, collapse_metrics, kl_per_dimension
from ppvae.models import VAE, LinearGaussian


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def collapsed_linear_gaussian(num_data: int = 40, **kwargs):
    """PPCA whose diagonal guide ignores x in latent dimension 1 (a collapsed unit)."""
    torch.manual_seed(0)
    module = LinearGaussian(6, 3, noise_scale=0.5, **kwargs)
    with torch.no_grad():
        module.guide_weight.copy_(torch.randn(3, 6) * torch.tensor([[0.5], [0.0], [0.05]]))
        module.guide_bias.copy_(torch.tensor([0.3, -0.2, 0.0]))
        module.guide_raw_scale.copy_(torch.tensor([-1.0, 0.5, 0.0]))
    x = torch.randn(num_data, 6)
    return module, x


def test_kl_per_dimension_is_the_closed_form_gaussian_kl():
    module, x = collapsed_linear_gaussian()
    with torch.no_grad():
        loc, scale = module.guide_params(x)
        expected = 0.5 * (loc.square() + scale.square() - 1.0) - scale.log()  # [N, d]
    kl = kl_per_dimension(module, x, num_samples=1)
    assert list(kl) == ["z"] and kl["z"].shape == (40, 3)
    torch.testing.assert_close(kl["z"], expected, rtol=1e-5, atol=1e-6)
    # Monte Carlo (log q − log p per dimension) agrees on average
    monte_carlo = kl_per_dimension(module, x, num_samples=4000, analytic=False)["z"]
    torch.testing.assert_close(monte_carlo.mean(0), expected.mean(0), rtol=0.0, atol=0.03)
    # batching does not change the answer
    torch.testing.assert_close(kl_per_dimension(module, x, batch_size=7)["z"], kl["z"])


def test_active_units_are_the_variance_of_the_posterior_mean_over_x():
    module, x = collapsed_linear_gaussian()
    units = active_units(module, x, num_samples=1)
    with torch.no_grad():
        expected = (x @ module.guide_weight.T).var(dim=0)  # Var_x(A x + c), unbiased
    torch.testing.assert_close(units.variances["z"], expected, rtol=1e-5, atol=1e-8)
    assert units.variances["z"][1] == 0.0
    assert units.active["z"].tolist() == [True, False, expected[2].item() > 0.01]
    assert units.num_units == 3
    assert units.num_active == int((expected > 0.01).sum())
    loose = active_units(module, x, threshold=0.0, num_samples=1)
    assert loose.num_active == 2
    assert json.loads(json.dumps(units.to_dict()))["num_active"] == units.num_active


def test_a_guide_that_does_not_factorise_is_one_group_per_site():
    # the exact posterior is a full-covariance MultivariateNormal: no per-dimension KL exists
    module, x = collapsed_linear_gaussian(num_data=8, guide_family="exact")
    kl = kl_per_dimension(module, x, num_samples=20_000)["z"]
    assert kl.shape == (8, 1)
    with torch.no_grad():
        mean, cov = module.posterior(x)
        expected = 0.5 * (torch.trace(cov) + mean.square().sum(-1) - 3 - torch.logdet(cov))
    torch.testing.assert_close(kl[:, 0], expected, rtol=0.0, atol=0.03)
    # the mean still has one entry per dimension
    units = active_units(module, x, num_samples=1)
    torch.testing.assert_close(units.variances["z"], mean.var(dim=0), rtol=1e-5, atol=1e-7)


class TwoSites(nn.Module):
    """Two latent sites of different shapes (not in the zoo)."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Linear(3, 4 + 1)

    def model(self, x, y=None):
        with pyro.plate("data", x.shape[0]):
            a = pyro.sample("a", dist.Normal(x.new_zeros(4), 1.0).to_event(1))
            b = pyro.sample("b", dist.Normal(a.sum(-1), 1.0))
            loc = b.unsqueeze(-1) + x.new_zeros(x.shape[-1])  # [..., N, D]
            pyro.sample("x", dist.Normal(loc, 1.0).to_event(1), obs=x)

    def guide(self, x, y=None):
        pyro.module("two_sites", self)
        with pyro.plate("data", x.shape[0]):
            out = self.encoder(x)
            pyro.sample("a", dist.Normal(out[..., :4], 0.5).to_event(1))
            pyro.sample("b", dist.Normal(out[..., 4], 0.1))


def test_diagnostics_are_per_site_for_any_model():
    torch.manual_seed(0)
    module, x = TwoSites(), torch.randn(10, 3)
    kl = kl_per_dimension(module, x, num_samples=3)
    assert {name: tuple(v.shape) for name, v in kl.items()} == {"a": (10, 4), "b": (10, 1)}
    units = active_units(module, x)
    assert {name: tuple(v.shape) for name, v in units.variances.items()} == {"a": (4,), "b": (1,)}


def test_collapse_metrics_are_json_ready_and_leave_the_rng_alone():
    torch.manual_seed(0)
    module = VAE(16, 4, hidden=(8,))
    x = torch.bernoulli(torch.rand(30, 16))
    state = torch.get_rng_state()
    metrics = collapse_metrics(module, x)
    assert torch.equal(torch.get_rng_state(), state)
    assert set(metrics) == {"active_units", "latent_units", "kl", "kl_per_dim"}
    assert metrics["latent_units"] == 4 and 0 <= metrics["active_units"] <= 4
    assert len(metrics["kl_per_dim"]["z"]) == 4
    assert metrics["kl"] == pytest.approx(sum(metrics["kl_per_dim"]["z"]), rel=1e-5)
    json.dumps(metrics)


def test_collapse_metrics_log_during_fit():
    module, x = collapsed_linear_gaussian()
    result = fit(
        module,
        x,
        epochs=2,
        batch_size=20,
        device="cpu",
        progress=False,
        epoch_metrics=lambda m: collapse_metrics(m, x[:20]),
    )
    assert [r["latent_units"] for r in result.history] == [3, 3]
    assert all(len(r["kl_per_dim"]["z"]) == 3 for r in result.history)


def test_active_units_need_two_points():
    module, x = collapsed_linear_gaussian()
    with pytest.raises(PPVAEError, match="at least 2 data points"):
        active_units(module, x[:1])
