"""``evaluate`` against closed forms, for zoo models and for models written here.

References: probabilistic PCA (exact log p(x), posterior and KL), a Laplace-prior model with two
latent sites (log p(x) by quadrature), and 1-D Gaussian importance sampling, where a guide
N(posterior mean, (s · posterior sd)²) has ESS/K → √(2s² − 1)/s² (s > 1/√2) and a weight tail of
Pareto shape k = 1 − s² (s < 1).

Invariance is tested exactly where it can be exact (the exact-posterior guide gives deterministic
log-weights; a rerun with the same seed and batching is bitwise identical) and statistically
otherwise (different batching and particle chunking draw different particles: per-point results
must agree within 4 combined standard errors).
"""

import json
import math
import random

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from conftest import requires_cuda
from linear_gaussian_cases import data, make_model
from torch import nn

from ppvae.errors import ContractError, PPVAEError
from ppvae.inference.evaluate import EvaluationReport, evaluate
from ppvae.inference.importance import iwae_bound
from ppvae.models import VQVAE
from ppvae.models.linear_gaussian import LinearGaussian
from ppvae.plots.evaluation import plot_report


def run(module, *data, **kwargs):
    kwargs = {"device": "cpu", "progress": False, **kwargs}
    return evaluate(module, *data, **kwargs)


PER_POINT = ("elbo", "log_px", "log_px_stderr", "gap", "ess", "khat", "reconstruction_mse")


# --- closed forms -------------------------------------------------------------------------------


def test_exact_guide_every_bound_is_log_marginal():
    module = make_model(guide_family="exact")
    x = data(module, 12)
    exact = module.exact_log_marginal(x).detach()
    report = run(module, x, num_samples=500, ladder=(1, 5, 50), batch_size=5)
    assert sorted(report.ladder) == [1, 5, 50, 500]
    for bound in (
        report.elbo_per_point,
        report.log_px_per_point,
        *report.ladder_per_point.values(),
    ):
        torch.testing.assert_close(bound, exact, atol=1e-9, rtol=0)
    assert report.gap_per_point.abs().max() < 1e-9
    assert report.log_px_stderr_per_point.max() < 1e-9
    torch.testing.assert_close(report.ess_per_point, torch.full((12,), 500.0, dtype=torch.float64))
    assert (report.khat_per_point == -math.inf).all()  # equal weights: nothing to smooth
    assert report.khat_share_above == 0.0
    assert report.log_px == pytest.approx(float(exact.mean()), abs=1e-9)


def test_imperfect_guide_log_marginal_and_elbo_match_closed_forms():
    module = make_model(factor=1.2, dtype=torch.float32)
    x = data(module, 10)
    exact = module.exact_log_marginal(x).detach().double()
    kl = module.kl_to_posterior(x).detach().double()
    report = run(module, x, num_samples=5000, batch_size=4)
    error = (report.log_px_per_point - exact).abs()
    assert (error < 3 * report.log_px_stderr_per_point).all()
    assert (error < 0.05).all()
    # E[ELBO] = log p(x) - KL(q || p(z|x)); the mean over points has s.e. sqrt(sum se^2) / N
    elbo_stderr = report.elbo_stderr_per_point
    assert ((report.elbo_per_point - (exact - kl)).abs() < 4 * elbo_stderr).all()
    mean_stderr = float(elbo_stderr.pow(2).sum().sqrt()) / 10
    assert report.elbo == pytest.approx(float((exact - kl).mean()), abs=4 * mean_stderr)
    assert report.gap == pytest.approx(float(kl.mean()), abs=4 * mean_stderr + 0.01)


def test_ladder_is_ordered_in_expectation():
    """ELBO < IWAE_5 < IWAE_50 < IWAE_500 <= IWAE_5000 <= log p(x), with heavy-tailed weights."""
    module = make_model(factor=0.6, dtype=torch.float32)
    x = data(module, 100)
    exact = module.exact_log_marginal(x).detach().double()
    report = run(module, x, num_samples=5000, batch_size=50)
    ks = sorted(report.ladder)
    assert ks == [1, 5, 50, 500, 5000]
    torch.testing.assert_close(report.ladder_per_point[1], report.elbo_per_point)
    torch.testing.assert_close(report.ladder_per_point[5000], report.log_px_per_point)
    for lower, upper in zip(ks, ks[1:], strict=False):
        # per-point estimates are independent across points: the mean difference has s.e. sd/√N
        diff = report.ladder_per_point[upper] - report.ladder_per_point[lower]
        stderr = float(diff.std()) / math.sqrt(diff.numel())
        threshold = -3 * stderr if upper == 5000 else 3 * stderr  # strict where the gap is large
        assert float(diff.mean()) > threshold, (lower, upper, float(diff.mean()), stderr)
    assert report.log_px < float(exact.mean()) + 3 * report.log_px_stderr
    assert report.elbo < report.log_px


def test_ladder_rung_is_unbiased_for_the_k_sample_bound():
    """Block-averaged IWAE_5 from K=5000 has the expectation of iwae_bound(num_particles=5)."""
    module = make_model(factor=0.6)
    x = data(module, 4)
    report = run(module, x, num_samples=5000)
    repeats = 2000
    pyro.set_rng_seed(1)
    with torch.no_grad():
        direct = iwae_bound(
            module.model, module.guide, x.repeat(repeats, 1), num_particles=5, chunk_size=5
        ).reshape(repeats, 4)
    # the rung averages 1000 independent 5-sample bounds, the direct estimate 2000
    stderr = direct.std(dim=0) * math.sqrt(1 / repeats + 1 / 1000)
    assert ((report.ladder_per_point[5] - direct.mean(dim=0)).abs() < 4 * stderr).all()


@pytest.mark.parametrize("factor", [1.5, 0.4])
def test_ess_and_khat_match_one_dimensional_theory(factor):
    module = make_model(latent_dim=1, factor=factor, dtype=torch.float32)
    x = data(module, 40)
    report = run(module, x, num_samples=5000, batch_size=20)
    if factor > 1:
        assert report.mean_ess / 5000 == pytest.approx(
            math.sqrt(2 * factor**2 - 1) / factor**2, abs=0.01
        )
        assert report.khat_per_point.max() < 0.5  # bounded weights: true k < 0
        assert report.khat_share_above == 0.0
    else:
        # infinite-variance weights with tail shape k = 1 - s^2 = 0.84; PSIS with a finite tail
        # sample is known to estimate such slowly varying tails somewhat low
        assert 0.65 < float(report.khat_per_point.mean()) < 0.95
        assert report.khat_share_above > 0.4
        assert report.mean_ess / 5000 < 0.2


def test_reconstruction_of_a_nearly_deterministic_guide():
    module = make_model(dtype=torch.float64)
    with torch.no_grad():
        module.guide_raw_scale.fill_(-40.0)  # scale = 1e-5 (the guide's floor)
    x = data(module, 7)
    report = run(module, x, num_samples=10)
    expected = ((x - module.decode(module.encode(x)[0])) ** 2).mean(dim=1).detach()
    # z = mean + 1e-5 noise moves E[x|z] by ~1e-5, the MSE (~0.1) by less than 1e-4
    torch.testing.assert_close(report.reconstruction_mse_per_point, expected, atol=1e-4, rtol=0)
    assert report.reconstruction_site == "x" and report.reconstruction_bce is None
    assert report.khat_per_point.isnan().all() and report.khat_share_above is None  # K < 25


# --- invariance -------------------------------------------------------------------------------


def test_exact_guide_results_do_not_depend_on_batching_or_chunking():
    module = make_model(guide_family="exact")
    x = data(module, 12)
    a = run(module, x, num_samples=300, batch_size=12, chunk_size=None, seed=0)
    b = run(module, x, num_samples=300, batch_size=5, chunk_size=7, seed=11)
    for name in PER_POINT[:4]:
        torch.testing.assert_close(
            getattr(a, f"{name}_per_point"), getattr(b, f"{name}_per_point"), atol=1e-10, rtol=0
        )
    for k in a.ladder:
        torch.testing.assert_close(a.ladder_per_point[k], b.ladder_per_point[k], atol=1e-10, rtol=0)


def test_same_seed_rerun_is_identical():
    module = make_model(factor=0.8, dtype=torch.float32)
    x = data(module, 9)
    a = run(module, x, num_samples=400, batch_size=4, chunk_size=64, seed=3)
    b = run(module, x, num_samples=400, batch_size=4, chunk_size=64, seed=3)
    c = run(module, x, num_samples=400, batch_size=4, chunk_size=64, seed=4)
    assert a.to_dict() == b.to_dict()
    for name in PER_POINT:
        assert torch.equal(getattr(a, f"{name}_per_point"), getattr(b, f"{name}_per_point"))
    assert not torch.equal(a.log_px_per_point, c.log_px_per_point)


def test_evaluate_leaves_the_callers_rng_state_and_module_alone():
    module = make_model(factor=0.8, dtype=torch.float32).train()
    x = data(module, 9)
    torch.manual_seed(123)  # a training loop's RNG, mid-run
    states = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    a = run(module, x, num_samples=100, seed=3)
    assert torch.equal(torch.get_rng_state(), states[0])  # was reseeded with `seed`
    assert random.getstate() == states[1]
    assert np.array_equal(np.random.get_state()[1], states[2])
    assert module.training and next(module.parameters()).device.type == "cpu"
    torch.manual_seed(7)  # another caller state: same seed, same report
    b = run(module, x, num_samples=100, seed=3)
    assert torch.equal(a.log_px_per_point, b.log_px_per_point)


@requires_cuda
def test_evaluate_on_cuda_puts_the_module_back_and_leaves_the_cuda_rng_alone():
    module = make_model(factor=0.8, dtype=torch.float32)
    x = data(module, 9)
    torch.cuda.manual_seed(5)
    state = torch.cuda.get_rng_state()
    on_cuda = run(module, x, num_samples=100, seed=3, device="cuda")
    assert torch.equal(torch.cuda.get_rng_state(), state)
    assert next(module.parameters()).device.type == "cpu"
    on_cpu = run(module, x, num_samples=100, seed=3)
    assert abs(on_cuda.log_px - on_cpu.log_px) < 4 * on_cpu.log_px_stderr


def test_results_agree_across_batching_and_chunking_within_standard_errors():
    module = make_model(factor=1.2, dtype=torch.float32)
    x = data(module, 20)
    a = run(module, x, num_samples=5000, batch_size=20, chunk_size=None)
    b = run(module, x, num_samples=5000, batch_size=7, chunk_size=700)
    assert not torch.equal(a.log_px_per_point, b.log_px_per_point)  # different particles
    for name in ("log_px", "elbo"):
        va, vb = getattr(a, f"{name}_per_point"), getattr(b, f"{name}_per_point")
        sa, sb = getattr(a, f"{name}_stderr_per_point"), getattr(b, f"{name}_stderr_per_point")
        assert ((va - vb).abs() < 4 * torch.sqrt(sa**2 + sb**2)).all(), name
    torch.testing.assert_close(a.ess_per_point / 5000, b.ess_per_point / 5000, atol=0.03, rtol=0)


# --- models written here, not in the zoo --------------------------------------------------------


class LaplaceTwoSites:
    """z1 ~ Laplace(0, 1), z2 ~ N(0, 1), x ~ N(a z1 + c z2 + b, σ² I): not a zoo model, not an
    nn.Module, registered nowhere. The guide is a ridge-regression Gaussian."""

    def __init__(self):
        self.a = torch.tensor([1.0, -0.5, 0.8], dtype=torch.float64)
        self.c = torch.tensor([0.3, 1.0, -0.7], dtype=torch.float64)
        self.b = torch.tensor([0.2, 0.0, -0.1], dtype=torch.float64)
        self.sigma = 0.5
        basis = torch.stack([self.a, self.c], dim=1)  # [3, 2]
        precision = basis.T @ basis / self.sigma**2 + torch.eye(2, dtype=torch.float64)
        self.gain = torch.linalg.solve(precision, basis.T / self.sigma**2)  # [2, 3]
        self.scale = 1.3 * torch.linalg.inv(precision).diagonal().sqrt()

    def model(self, x, y=None):
        with pyro.plate("data", x.shape[0]):
            z1 = pyro.sample("z1", dist.Laplace(x.new_zeros(()), 1.0))
            z2 = pyro.sample("z2", dist.Normal(x.new_zeros(()), 1.0))
            loc = z1.unsqueeze(-1) * self.a + z2.unsqueeze(-1) * self.c + self.b
            pyro.sample("x", dist.Normal(loc, self.sigma).to_event(1), obs=x)

    def guide(self, x, y=None):
        loc = (x - self.b) @ self.gain.T  # [N, 2]
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z1", dist.Normal(loc[:, 0], self.scale[0]))
            pyro.sample("z2", dist.Normal(loc[:, 1], self.scale[1]))

    def sample(self, num_points):
        z1 = dist.Laplace(0.0, 1.0).sample((num_points, 1)).double()
        z2 = torch.randn(num_points, 1, dtype=torch.float64)
        return z1 * self.a + z2 * self.c + self.b + self.sigma * torch.randn(num_points, 3)

    def quadrature_log_marginal(self, x, half_width=6.0, step=0.025):
        """Riemann sum on a grid; within 2e-4 nats of a 4x finer, wider grid here."""
        grid = torch.arange(-half_width, half_width + step / 2, step, dtype=torch.float64)
        z1, z2 = torch.meshgrid(grid, grid, indexing="ij")
        z1, z2 = z1.reshape(-1, 1), z2.reshape(-1, 1)
        log_prior = dist.Laplace(0.0, 1.0).log_prob(z1) + dist.Normal(0.0, 1.0).log_prob(z2)
        out = []
        for point in x:
            loc = z1 * self.a + z2 * self.c + self.b
            log_lik = dist.Normal(loc, self.sigma).log_prob(point).sum(-1, keepdim=True)
            out.append(torch.logsumexp(log_prior + log_lik, dim=0) + 2 * math.log(step))
        return torch.cat(out)


def test_model_defined_here_with_two_latent_sites_evaluates_without_registration():
    module = LaplaceTwoSites()
    torch.manual_seed(0)
    x = module.sample(6)
    exact = module.quadrature_log_marginal(x)
    report = run(module, x, num_samples=5000, batch_size=4)
    error = (report.log_px_per_point - exact).abs()
    assert (error < 3 * report.log_px_stderr_per_point + 1e-3).all(), error
    assert (error < 0.05).all()
    assert (report.elbo_per_point < exact).all()
    assert (report.khat_per_point < 0.7).all()
    assert report.reconstruction_site == "x" and report.reconstruction_mse > 0


class GlobalShift:
    """μ ~ N(0, 1) shared by all points (a global latent), x_n ~ N(μ, I)."""

    def model(self, x, y=None):
        mu = pyro.sample("mu", dist.Normal(x.new_zeros(()), 1.0))
        with pyro.plate("data", x.shape[0]):
            loc = mu.unsqueeze(-1) + torch.zeros_like(x)  # [..., N, D]
            pyro.sample("x", dist.Normal(loc, 1.0).to_event(1), obs=x)

    def guide(self, x, y=None):
        pyro.sample("mu", dist.Normal(x.mean().detach(), 0.1))


def test_global_latent_gets_the_contract_error():
    with pytest.raises(ContractError, match="'mu' is outside the 'data' plate \\(a global latent"):
        run(GlobalShift(), torch.randn(5, 3), num_samples=10)


class TinyAutoencoder(nn.Module):
    """A deterministic encoder (Delta guide) with a Bernoulli decoder."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.encoder, self.decoder = nn.Linear(6, 2), nn.Linear(2, 6)

    def model(self, x, y=None):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)

    def guide(self, x, y=None):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Delta(self.encoder(x), event_dim=1))


def test_point_mass_guide_reports_no_bound_and_exact_reconstruction(tmp_path):
    module = TinyAutoencoder()
    x = torch.bernoulli(torch.full((9, 6), 0.4), generator=torch.Generator().manual_seed(0))
    report = run(module, x, batch_size=4)
    assert not report.likelihood_available
    assert report.elbo is None and report.log_px is None and report.gap is None
    assert report.ladder == {} and report.log_px_per_point is None
    assert report.point_mass_sites == ["z"] and report.num_samples == 0
    assert "point-mass guide" in report.note and "no likelihood bound" in report.note
    with torch.no_grad():
        probs = torch.sigmoid(module.decoder(module.encoder(x)))
        mse = ((x - probs) ** 2).mean(dim=1)
        bce = torch.nn.functional.binary_cross_entropy(probs, x, reduction="none").sum(dim=1)
    torch.testing.assert_close(report.reconstruction_mse_per_point, mse.double())
    torch.testing.assert_close(report.reconstruction_bce_per_point, bce.double(), rtol=1e-5, atol=0)
    assert report.reconstruction_bce == pytest.approx(float(bce.mean()), rel=1e-5)
    saved = json.loads(report.to_json())
    assert saved["elbo"] is None and saved["likelihood_available"] is False
    table = report.summary_table()
    assert "point-mass" in table and "reconstruction BCE" in table
    assert not any(line.startswith(("ELBO", "log p(x)")) for line in table.splitlines())
    assert plot_report(report, tmp_path) == [] and list(tmp_path.iterdir()) == []


class OneHotMixture:
    """z ~ Uniform{0, 1, 2}, x ~ N(μ_z, I); the guide puts all its mass on the nearest μ_z (as a
    VQ-VAE's does). Closed forms: log p(x) = logsumexp_k log N(x; μ_k, I) − log 3 and
    ELBO = log N(x; μ_k*, I) − log 3 < log p(x)."""

    means = torch.tensor([[-2.0, 0.0], [0.0, 2.0], [2.0, -1.0]], dtype=torch.float64)

    def model(self, x, y=None):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Categorical(logits=x.new_zeros(3)))
            pyro.sample("x", dist.Normal(self.means[z], 1.0).to_event(1), obs=x)

    def guide(self, x, y=None):
        nearest = torch.cdist(x, self.means).argmin(dim=-1)  # [N]
        logits = torch.full((x.shape[0], 3), -math.inf, dtype=x.dtype).scatter_(
            -1, nearest.unsqueeze(-1), 0.0
        )
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Categorical(logits=logits))

    def log_joint(self, x):  # [N, 3]
        return dist.Normal(self.means, 1.0).log_prob(x.unsqueeze(-2)).sum(-1) - math.log(3)


def test_one_hot_discrete_guide_reports_only_the_elbo_as_such():
    module = OneHotMixture()
    torch.manual_seed(0)
    x = module.means[torch.randint(3, (8,))] + torch.randn(8, 2, dtype=torch.float64)
    log_joint = module.log_joint(x)
    exact = torch.logsumexp(log_joint, dim=-1)
    expected_elbo = log_joint.gather(-1, torch.cdist(x, module.means).argmin(-1, keepdim=True))
    report = run(module, x, num_samples=100, batch_size=3)
    torch.testing.assert_close(report.elbo_per_point, expected_elbo.squeeze(-1))
    for bound in report.ladder_per_point.values():  # a flat ladder: every weight is the same
        torch.testing.assert_close(bound, report.elbo_per_point)
    assert (report.log_px_per_point < exact - 1e-6).all()  # a lower bound, not log p(x)
    assert report.point_mass_sites == ["z"] and "only that lower bound" in report.note
    assert report.khat_share_above is None and report.khat_per_point.isnan().all()
    table = report.summary_table()
    assert "every IWAE bound equals it" in table
    rows = [line.split("  ")[0] for line in table.splitlines()]
    assert not any(row.startswith(("log p(x)", "gap", "IWAE")) for row in rows)
    assert report.active_units is None and report.kl is not None  # no continuous latent


def test_vqvae_report_says_active_units_are_not_defined():
    torch.manual_seed(0)
    module = VQVAE(16, latent_dim=3, num_positions=4, codebook_size=16, hidden=(32,))
    x = torch.bernoulli(torch.rand(12, 16))
    report = run(module, x, num_samples=10)
    assert report.active_units is None and report.latent_units is None  # was "0 of 4"
    assert report.kl == pytest.approx(4 * math.log(16), rel=1e-5)  # one-hot vs uniform codes
    rows = {line.split("  ")[0]: line for line in report.summary_table().splitlines()}
    assert rows["active units"].endswith("  not defined (no continuous latent)")
    assert json.loads(report.to_json())["active_units"] is None


# --- plumbing with values -----------------------------------------------------------------------


class ShiftedByLabel(LinearGaussian):
    """x | y ~ pPCA shifted by y · shift: log p(x | y) = log p_pPCA(x − y · shift)."""

    shift = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0], dtype=torch.float64)

    def model(self, x, y=None):
        super().model(x - y.unsqueeze(-1) * self.shift, None)

    def guide(self, x, y=None):
        super().guide(x - y.unsqueeze(-1) * self.shift, None)


def test_labels_reach_model_and_guide():
    module = make_model(guide_family="exact", cls=ShiftedByLabel)
    x, y = data(module, 6), torch.arange(6, dtype=torch.float64)
    exact = module.exact_log_marginal(x - y.unsqueeze(-1) * ShiftedByLabel.shift).detach()
    as_pair = run(module, (x, y), num_samples=50)
    as_keyword = run(module, x, y, num_samples=50)
    torch.testing.assert_close(as_pair.log_px_per_point, exact, atol=1e-9, rtol=0)
    torch.testing.assert_close(as_keyword.log_px_per_point, exact, atol=1e-9, rtol=0)
    with pytest.raises(PPVAEError, match="not both"):
        run(module, (x, y), y, num_samples=5)


def test_ladder_entries_above_k_are_dropped_and_k_is_the_top():
    module = make_model(factor=0.8)
    x = data(module, 5)
    report = run(module, x, num_samples=100, ladder=(1, 5, 50, 5000))
    assert sorted(report.ladder) == [1, 5, 50, 100]
    torch.testing.assert_close(report.ladder_per_point[100], report.log_px_per_point)
    torch.testing.assert_close(report.ladder_per_point[1], report.elbo_per_point)
    assert report.ladder[100] == report.log_px and report.ladder[1] == report.elbo


class WithMetrics(LinearGaussian):
    def evaluation_metrics(self, x, y=None):
        return {"mean_x": x.mean(), "num_points": x.shape[0]}


def test_evaluation_metrics_are_computed_on_the_whole_split():
    module = make_model(factor=1.2, cls=WithMetrics)
    x = data(module, 11)
    report = run(module, x, num_samples=30, batch_size=4)
    assert report.extra == {"mean_x": pytest.approx(float(x.mean())), "num_points": 11.0}


def test_json_round_trip_and_figures(tmp_path):
    module = make_model(guide_family="exact")
    x = data(module, 6)
    report = run(module, x, num_samples=200, ladder=(1, 10))
    path = tmp_path / "report.json"
    text = report.to_json(path)
    assert path.read_text() == text
    saved = json.loads(text)
    assert saved["ladder"] == {"1": report.ladder[1], "10": report.ladder[10], "200": report.log_px}
    assert saved["per_point"]["log_px"] == report.log_px_per_point.tolist()
    assert saved["per_point"]["khat"] == ["-inf"] * 6  # equal weights; not a JSON number
    restored = EvaluationReport.from_dict(saved)
    torch.testing.assert_close(restored.log_px_per_point, report.log_px_per_point)
    torch.testing.assert_close(restored.ladder_per_point[10], report.ladder_per_point[10])
    assert restored.log_px == report.log_px and restored.ladder == report.ladder
    assert f"{report.log_px:.3f}" in report.summary_table()
    written = plot_report(saved, tmp_path / "figures")
    assert [p.name for p in written] == ["bound_ladder.png", "gap_hist.png", "khat_hist.png"]
    assert all(p.stat().st_size > 1000 for p in written)
