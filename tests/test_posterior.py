"""``posterior`` and ``compare_posteriors`` against the closed-form posterior of probabilistic PCA:
p(z | x) = N(Σ Wᵀ(x − b)/σ², Σ). Tolerances are Monte Carlo errors: 4 standard errors of a mean
(sd / √ESS) and of a variance (√(2 / ESS) relative)."""

import math
from types import SimpleNamespace

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from linear_gaussian_cases import data, make_model

from ppvae.errors import PPVAEError
from ppvae.inference.posterior import compare_posteriors, posterior, wasserstein_1d


def exact_moments(module, x):
    with torch.no_grad():
        mean, cov = module.posterior(x)
    return mean.numpy(), cov.diagonal().numpy()


def assert_matches_exact(idata, module, x, ess):
    """Draws' mean and variance per point and dimension within 4 Monte Carlo errors."""
    mean, var = exact_moments(module, x)
    draws = idata.posterior["z"]
    error_mean = (draws.mean(("chain", "draw")).values - mean) / np.sqrt(var / ess)
    error_var = (draws.var(("chain", "draw")).values / var - 1) / np.sqrt(2 / ess)
    assert np.abs(error_mean).max() < 4, error_mean
    assert np.abs(error_var).max() < 4, error_var
    return error_mean, error_var


@pytest.mark.slow
def test_nuts_recovers_the_exact_posterior_with_converged_chains():
    module = make_model(latent_dim=2, factor=1.5)
    x = data(module, 2)
    # a larger step than the default 0.8 acceptance asks for: ~30 s of CPU for 2400 iterations
    idata = posterior(
        module, x, method="nuts", num_samples=500, warmup=100, target_accept_prob=0.65
    )
    stats = idata.sample_stats
    # measured: R-hat 1.001 and 1.003, bulk ESS 2760 and 2240 of 2000 draws, no divergence
    assert float(stats["rhat"].max()) < 1.01
    assert not bool(stats["diverging"].any())
    ess = min(float(stats["ess"].min()), 2000.0)
    assert ess > 1000
    assert_matches_exact(idata, module, x, ess)
    assert idata.posterior.attrs["method"] == "nuts"
    assert idata.posterior.attrs["num_warmup"] == 100
    assert stats["lp"].dims == ("chain", "draw", "point")


def test_importance_resampling_recovers_the_exact_posterior():
    # an over-dispersed guide (sd 1.5x the posterior's): PSIS weights are well behaved
    module = make_model(latent_dim=2, factor=1.5)
    x = data(module, 3)
    idata = posterior(module, x, method="importance", num_samples=1000, num_chains=4)
    khat, ess = idata.sample_stats["khat"].values, idata.sample_stats["ess"].values
    assert (khat < 0.5).all(), khat  # measured -1.08 .. -0.92
    assert (ess > 2000).all(), ess  # Kish ESS of the 4000 weights, measured 2740
    assert_matches_exact(idata, module, x, ess.min())
    # the guide's own draws do not match: their variance is 1.5² = 2.25 times too large
    guide = posterior(module, x, method="guide", num_samples=1000, num_chains=4)
    _, var = exact_moments(module, x)
    ratio = guide.posterior["z"].var(("chain", "draw")).values / var
    np.testing.assert_allclose(ratio, 2.25, rtol=4 * math.sqrt(2 / 4000))


def test_importance_with_the_exact_guide_is_the_guide():
    module = make_model(latent_dim=2, guide_family="exact")
    x = data(module, 3)
    idata = posterior(module, x, method="importance", num_samples=500, num_chains=4)
    stats = idata.sample_stats
    # equal weights: nothing to smooth (k̂ = -inf) and every draw counts
    assert np.isneginf(stats["khat"].values).all()
    np.testing.assert_allclose(stats["ess"].values, 2000, rtol=1e-9)
    # ... each equal to log p(x): p(x, z) / p(z | x)
    log_px = module.exact_log_marginal(x).detach().numpy()
    np.testing.assert_allclose(stats["log_weight"].values.min((0, 1)), log_px, atol=1e-9)
    np.testing.assert_allclose(stats["log_weight"].values.max((0, 1)), log_px, atol=1e-9)
    assert_matches_exact(idata, module, x, 2000 / 2)  # resampling with replacement halves ESS


def test_compare_posteriors_reports_the_known_variance_ratio():
    factor = 0.6  # an over-confident guide: marginal sds 0.6x the posterior's
    module = make_model(latent_dim=2, factor=factor)
    exact = make_model(latent_dim=2, guide_family="exact")  # same seed: the same decoder
    torch.testing.assert_close(module.weight, exact.weight)
    x = data(module, 4)
    candidate = posterior(module, x, method="guide", num_samples=1000, num_chains=4)
    reference = posterior(exact, x, method="guide", num_samples=1000, num_chains=4, seed=1)
    result = compare_posteriors(candidate, reference)["z"]
    assert result["variance_ratio"].dims == ("point", "z_dim_0")
    tolerance = 4 * math.sqrt(2 / 4000) * math.sqrt(2)  # two independent variance estimates
    # measured 0.338 .. 0.379 for 0.36
    np.testing.assert_allclose(result["variance_ratio"].values, factor**2, rtol=tolerance)
    assert np.abs(result["mean_shift"].values).max() < 4 * math.sqrt((1 + factor**2) / 4000)
    # equal means, sds in ratio f: W1 / s_ref = |f - 1| √(2/π) = 0.319 (measured 0.312 .. 0.335)
    np.testing.assert_allclose(
        result["wasserstein"].values, (1 - factor) * math.sqrt(2 / math.pi), atol=0.03
    )
    # a guide of the right shape against itself (different draws): nothing to report
    same = compare_posteriors(reference, posterior(exact, x, num_samples=1000, seed=2))["z"]
    assert np.abs(same["variance_ratio"].values - 1).max() < 0.15  # measured 0.98 .. 1.07
    assert same["wasserstein"].values.max() < 0.1  # measured 0.014 .. 0.040


def test_wasserstein_of_a_shift_and_of_unequal_sizes():
    a = np.linspace(-1, 1, 1001)[:, None]
    np.testing.assert_allclose(wasserstein_1d(a + 0.3, a), [0.3])
    np.testing.assert_allclose(
        wasserstein_1d(a + 0.3, np.linspace(-1, 1, 301)[:, None]), [0.3], atol=1e-3
    )


def two_site_program():
    """A program not in the zoo: a 2-D code z and a scalar offset s per point."""
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])

    def model(x):
        with pyro.plate("points", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            s = pyro.sample("s", dist.Normal(0.0, 1.0))
            loc = z @ weight.T + s.unsqueeze(-1)
            pyro.sample("obs", dist.Normal(loc, 0.5).to_event(1), obs=x)

    def guide(x):
        with pyro.plate("points", x.shape[0]):
            pyro.sample("z", dist.Normal(x[..., :2] * 0.5, 0.5).to_event(1))
            pyro.sample("s", dist.Normal(x[..., 2] * 0.1, 0.5))

    return SimpleNamespace(model=model, guide=guide)


def test_inference_data_layout_and_netcdf_round_trip(tmp_path):
    az = pytest.importorskip("arviz")
    program = two_site_program()
    x = torch.randn(3, 3, generator=torch.Generator().manual_seed(0))
    run = SimpleNamespace(module=program)  # anything with a .module is a run
    idata = posterior(
        run, x, method="importance", num_samples=50, num_chains=2, point_coords=[7, 11, 42]
    )
    assert set(idata.groups()) == {"posterior", "sample_stats", "observed_data"}
    post = idata.posterior
    assert post["z"].dims == ("chain", "draw", "point", "z_dim_0")
    assert post["s"].dims == ("chain", "draw", "point")
    assert post["z"].shape == (2, 50, 3, 2)
    assert list(post["point"].values) == [7, 11, 42]
    assert list(post["z_dim_0"].values) == [0, 1]
    assert post.attrs["method"] == "importance" and post.attrs["num_proposals"] == 100
    stats = idata.sample_stats
    assert stats["log_weight"].dims == ("chain", "draw", "point")
    assert stats["lp"].dims == ("chain", "draw", "point")
    assert stats["khat"].dims == ("point",) and stats["ess"].dims == ("point",)
    assert idata.observed_data["x"].dims == ("point", "x_dim_0")
    np.testing.assert_array_equal(idata.observed_data["x"].values, x.numpy())
    # the draws are the program's: log p(x, z) recomputed by hand at one draw
    z = torch.as_tensor(post["z"].values[0, 0, 1])
    s = torch.as_tensor(post["s"].values[0, 0, 1])
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    by_hand = (
        dist.Normal(0.0, 1.0).log_prob(z).sum()
        + dist.Normal(0.0, 1.0).log_prob(s)
        + dist.Normal(weight @ z + s, 0.5).log_prob(x[1]).sum()
    )
    assert float(stats["lp"].values[0, 0, 1]) == pytest.approx(float(by_hand), abs=1e-4)
    path = tmp_path / "posterior.nc"
    idata.to_netcdf(str(path))
    loaded = az.from_netcdf(str(path))
    for group in ("posterior", "sample_stats", "observed_data"):
        assert getattr(loaded, group).equals(getattr(idata, group)), group
    assert loaded.posterior.attrs["method"] == "importance"
    # ArviZ's own functions read it: one summary row per (point, latent element)
    summary = az.summary(loaded, kind="stats")
    assert len(summary) == 3 * 2 + 3


def test_same_seed_same_draws_and_the_callers_rng_is_left_alone():
    module = make_model(latent_dim=2)
    x = data(module, 2)
    state = torch.get_rng_state()
    first = posterior(module, x, method="importance", num_samples=20, num_chains=2, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    again = posterior(module, x, method="importance", num_samples=20, num_chains=2, seed=3)
    other = posterior(module, x, method="importance", num_samples=20, num_chains=2, seed=4)
    assert first.posterior.equals(again.posterior)
    assert not first.posterior.equals(other.posterior)


def test_bad_input_gets_one_line_errors():
    module = make_model(latent_dim=2)
    x = data(module, 2)
    with pytest.raises(PPVAEError, match="unknown posterior method 'hmc'"):
        posterior(module, x, method="hmc")
    with pytest.raises(PPVAEError, match="num_samples must be an integer >= 1"):
        posterior(module, x, num_samples=0)
    with pytest.raises(PPVAEError, match="no model/guide pair"):
        posterior(object(), x)
    with pytest.raises(PPVAEError, match="point_coords has 3 labels for 2 points"):
        posterior(module, x, num_samples=2, point_coords=[1, 2, 3])

    def model(x):
        with pyro.plate("data", x.shape[0]):
            rate = pyro.sample("rate", dist.LogNormal(0.0, 1.0))
            pyro.sample("x", dist.Poisson(rate), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("rate", dist.LogNormal(torch.log1p(x), 0.5))

    counts = torch.tensor([1.0, 4.0])
    positive = SimpleNamespace(model=model, guide=guide)
    with pytest.raises(PPVAEError, match="method='nuts' moves latents on the real line") as error:
        posterior(positive, counts, method="nuts", num_samples=5)
    assert "\n" not in str(error.value)
    # the other methods take it
    idata = posterior(positive, counts, method="guide", num_samples=30)
    assert (idata.posterior["rate"].values > 0).all()
    with pytest.raises(PPVAEError, match="different points"):
        compare_posteriors(idata, posterior(positive, counts[:1], num_samples=30))


def test_figures_draw_the_posteriors_they_are_given(tmp_path):
    from ppvae.plots.posterior import plot_overlay, point_draws, write_posterior_figures

    module = make_model(latent_dim=2, factor=0.6)
    x = data(module, 3)
    guide = posterior(
        module, x, method="guide", num_samples=100, num_chains=2, point_coords=[5, 6, 9]
    )
    resampled = posterior(
        module, x, method="importance", num_samples=100, num_chains=2, point_coords=[5, 6, 9]
    )
    draws = point_draws(guide, 6)
    np.testing.assert_array_equal(draws[:100], guide.posterior["z"].values[0, :, 1])
    fig = plot_overlay({"guide": guide, "PSIS": resampled}, 6, max_draws=150)
    clouds = [c.get_offsets() for c in fig.axes[0].collections]
    np.testing.assert_array_equal(clouds[0], draws[:150])
    np.testing.assert_array_equal(clouds[1], point_draws(resampled, 6)[:150])
    written = write_posterior_figures(
        {"guide": guide, "PSIS": resampled}, tmp_path, reference="PSIS", max_overlays=2
    )
    names = sorted(p.name for p in written)
    assert names == [
        "comparison.png",
        "khat.png",
        "overlay-5.png",
        "overlay-6.png",
        "pair-5.png",
        "pair-6.png",
    ]
    assert all(p.stat().st_size > 1000 for p in written)
    with pytest.raises(PPVAEError, match="point 4 is not in the posterior"):
        point_draws(guide, 4)


def test_cli_writes_the_library_posterior_and_refuses_bad_points(tmp_path, capsys):
    import contextlib
    import io
    import json

    import arviz as az

    from ppvae.cli import main
    from ppvae.runs import load_run

    run = tmp_path / "run"
    train = ["train", "--run-dir", str(run), "--model", "linear-gaussian", "--latent-dim", "2"]
    train += ["--epochs", "1", "--limit", "100", "--batch-size", "50", "--test-fraction", "0.05"]
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(train + ["--eval-samples", "5", "--no-progress"]) == 0
    argv = ["posterior", str(run), "--points", "0", "2", "--method", "guide", "importance"]
    assert main(argv + ["--num-samples", "30", "--num-chains", "2", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "guide vs importance, z" in out
    folder = run / "posterior" / "test"
    assert {p.name for p in folder.iterdir()} == {
        "guide.nc",
        "importance.nc",
        "comparison.json",
        "khat.png",
        "comparison.png",
        "overlay-0.png",
        "overlay-2.png",
        "pair-0.png",
        "pair-2.png",
    }
    # the files hold the library's draws for the same seed and points
    opened = load_run(run)
    x, y = opened.data.split("test")
    drawn = {
        method: posterior(
            opened.module,
            x[[0, 2]],
            y[[0, 2]],
            method=method,
            num_samples=30,
            num_chains=2,
            point_coords=[0, 2],
        )
        for method in ("guide", "importance")
    }
    for method, idata in drawn.items():
        loaded = az.from_netcdf(str(folder / f"{method}.nc"))
        assert loaded.posterior.equals(idata.posterior), method
        np.testing.assert_array_equal(loaded.observed_data["x"].values, x[[0, 2]].numpy())
    document = json.loads((folder / "comparison.json").read_text())
    expected = compare_posteriors(drawn["guide"], drawn["importance"])["z"]
    np.testing.assert_allclose(
        document["sites"]["z"]["variance_ratio"], expected["variance_ratio"].values
    )
    # bad points: one line, exit code 2, nothing written
    code = main(["posterior", str(run), "--points", "0", "999", "--out", str(tmp_path / "no")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "--points 999 out of range: the test split has" in err
    assert not (tmp_path / "no").exists()
