import pyro
import pyro.poutine as poutine
import pytest
import torch

from ppvae.errors import PPVAEError
from ppvae.models import VAE


def _traces(module, x, particles=None):
    def run():
        guide = poutine.trace(module.guide).get_trace(x)
        model = poutine.trace(poutine.replay(module.model, trace=guide)).get_trace(x)
        return model, guide

    if particles is None:
        return run()
    with pyro.plate("particles", particles, dim=-2):
        return run()


@pytest.mark.parametrize("likelihood", ["bernoulli", "continuous-bernoulli", "gaussian"])
@pytest.mark.parametrize("net", ["mlp", "conv"])
def test_sites_shapes_and_data_plate(likelihood, net):
    torch.manual_seed(0)
    module = VAE(
        64, latent_dim=3, hidden=(32,), likelihood=likelihood, net=net, image_shape=(1, 8, 8)
    )
    x = torch.bernoulli(torch.full((5, 64), 0.3))
    model, guide = _traces(module, x)
    sites = {n: s for n, s in model.nodes.items() if s["type"] == "sample"}
    assert set(sites) == {"data", "z", "x"}  # "data" is the plate's own subsample site
    latent = {n for n, s in sites.items() if n != "data" and not s["is_observed"]}
    assert latent == {"z"}
    assert model.nodes["x"]["is_observed"] and torch.equal(model.nodes["x"]["value"], x)
    assert model.nodes["z"]["value"].shape == (5, 3)
    assert model.nodes["x"]["fn"].batch_shape == (5,) and model.nodes["x"]["fn"].event_shape == (
        64,
    )
    for trace in (model, guide):
        for name in ("z",) + (("x",) if trace is model else ()):
            frames = [f for f in trace.nodes[name]["cond_indep_stack"] if f.name == "data"]
            assert len(frames) == 1 and frames[0].size == 5 and frames[0].dim == -1

    # unchanged under an extra particle plate on the left
    model, guide = _traces(module, x, particles=7)
    assert guide.nodes["z"]["value"].shape == (7, 5, 3)
    assert model.nodes["x"]["fn"].batch_shape == (7, 5)
    assert model.nodes["x"]["fn"].log_prob(x).shape == (7, 5)
    # guide draws are q(z|x): same encoder mean for every particle
    loc, scale = module.encode(x)
    draws = guide.nodes["z"]["value"]
    assert torch.all(((draws - loc) / scale).abs() < 8)


def test_no_hard_coded_sizes():
    module = VAE(13, latent_dim=2, hidden=(7, 5), likelihood="gaussian")
    x = torch.randn(4, 13)
    model, _ = _traces(module, x)
    assert model.nodes["x"]["fn"].event_shape == (13,)
    assert module.sample_prior(6).shape == (6, 13)
    assert module.reconstruct(x).shape == (4, 13)


def test_likelihood_support_is_checked():
    with pytest.raises(PPVAEError, match="binary data"):
        VAE(4, likelihood="bernoulli").check_data(torch.full((2, 4), 0.5))
    with pytest.raises(PPVAEError, match=r"\[0, 1\]"):
        VAE(4, likelihood="continuous-bernoulli").check_data(torch.full((2, 4), 1.5))
    VAE(4, likelihood="continuous-bernoulli").check_data(torch.full((2, 4), 0.5))
    VAE(4, likelihood="gaussian").check_data(torch.full((2, 4), -7.0))
    with pytest.raises(PPVAEError, match="unknown likelihood"):
        VAE(4, likelihood="poisson")


def test_bernoulli_log_likelihood_matches_closed_form():
    torch.manual_seed(1)
    module = VAE(6, latent_dim=2, hidden=(8,))
    x = torch.bernoulli(torch.full((3, 6), 0.5))
    z = torch.randn(3, 2)
    logits = module.decoder(z)
    expected = x * torch.log(torch.sigmoid(logits)) + (1 - x) * torch.log1p(-torch.sigmoid(logits))
    trace = poutine.trace(poutine.condition(module.model, data={"z": z})).get_trace(x)
    assert torch.allclose(trace.nodes["x"]["fn"].log_prob(x), expected.sum(-1), atol=1e-5)
