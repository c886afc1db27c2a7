"""Posterior-collapse diagnostics against closed forms on linear-Gaussian models."""

import json
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

from ppvae.errors import PPVAEError
from ppvae.inference import fit
from ppvae.inference.collapse import active_units, collapse_metrics, kl_per_dimension
from ppvae.models import HVAE, VAE, VQVAE, LinearGaussian
from ppvae.nets import MIN_SCALE


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


def test_kl_per_dimension_is_monte_carlo_where_the_guide_draws_a_prior_parent_later():
    # HVAE with linear z1 <-> z2 maps: q(z1|x) = N(m, s²), q(z2|z1) = N(a z1, t²), p(z2) = N(0, 1),
    # p(z1|z2) = N(c/a · z2, 1). Under the guide z1 − c/a · z2 = (1 − c) z1 − (c t / a) ε, so
    # E[log q(z1) − log p(z1|z2)] = −log s − 1/2 + ((1 − c)²(m² + s²) + (c t / a)²) / 2, while the
    # closed form at z2 ~ q(z2|z1) (taken for every site before) is larger by c s².
    a, c, t = 2.0, 0.9, 0.3
    torch.manual_seed(0)
    module = HVAE(12, latent_dim=3, latent_dim2=3, hidden=(16,), hidden2=())
    raw_t, raw_one = (math.log(math.expm1(v - MIN_SCALE)) for v in (t, 1.0))
    eye, zeros = torch.eye(3), torch.zeros(3)
    with torch.no_grad():
        module.encoder2[0].weight.copy_(torch.cat([a * eye, 0 * eye]))
        module.encoder2[0].bias.copy_(torch.cat([zeros, torch.full((3,), raw_t)]))
        module.decoder2[0].weight.copy_(torch.cat([c / a * eye, 0 * eye]))
        module.decoder2[0].bias.copy_(torch.cat([zeros, torch.full((3,), raw_one)]))
        x = torch.bernoulli(torch.rand(20, 12))
        m, s = module.encode(x)
    second_moment = m.square() + s.square()
    expected_z1 = -s.log() - 0.5 + 0.5 * ((1 - c) ** 2 * second_moment + (c * t / a) ** 2)
    expected_z2 = 0.5 * (a**2 * second_moment + t**2 - 1) - math.log(t)  # closed form, E over z1
    kl = kl_per_dimension(module, x, num_samples=4000)
    torch.testing.assert_close(kl["z1"], expected_z1, rtol=0.0, atol=0.05)
    torch.testing.assert_close(kl["z2"].mean(0), expected_z2.mean(0), rtol=0.0, atol=0.03)
    assert (c * s.square()).min() > 0.25  # the closed form for z1 would be off by this much
    monte_carlo = kl_per_dimension(module, x, num_samples=4000, analytic=False)
    torch.testing.assert_close(monte_carlo["z1"], kl["z1"], rtol=0.0, atol=1e-6)  # same draws
    torch.testing.assert_close(monte_carlo["z2"].mean(0), expected_z2.mean(0), rtol=0, atol=0.05)


def test_active_units_are_not_defined_for_discrete_codes_and_unchanged_for_a_vae():
    torch.manual_seed(0)
    x = torch.bernoulli(torch.rand(30, 16))
    vqvae = VQVAE(16, latent_dim=3, num_positions=4, codebook_size=16, hidden=(32,)).eval()
    units = active_units(vqvae, x)
    assert units.variances == {} and units.excluded == {"code": "discrete support"}
    assert units.num_active is None and units.num_units is None  # was 0: NaN means of one-hots
    metrics = collapse_metrics(vqvae, x)
    assert metrics["active_units"] is None and metrics["latent_units"] is None
    assert metrics["kl"] == pytest.approx(4 * math.log(16), rel=1e-5)  # one-hot vs uniform
    assert json.loads(json.dumps(units.to_dict()))["num_active"] is None

    vae = VAE(16, 4, hidden=(8,))
    with torch.no_grad():
        expected = vae.encode(x)[0].var(dim=0)  # Var_x of the guide mean
    units = active_units(vae, x)
    torch.testing.assert_close(units.variances["z"], expected, rtol=1e-5, atol=1e-8)
    assert units.excluded == {} and units.num_units == 4
    assert units.num_active == int((expected > 0.01).sum())


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
