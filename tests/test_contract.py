"""The model contract beyond the zoo: factors, training-only losses, parameters, data kinds."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO
from torch import nn

from ppvae.contract import auxiliary_loss
from ppvae.inference import evaluate, fit, log_weights
from ppvae.inference.train import validation_elbo
from ppvae.models import VAE, LinearGaussian


class FactorModel(nn.Module):
    """z ~ N(0, 1), x ~ N(z, 1) written as a pyro.factor, plus a training-only penalty."""

    def __init__(self, penalty: float):
        super().__init__()
        self.loc = nn.Parameter(torch.tensor(0.3))
        self.penalty = penalty

    def model(self, x, y=None):
        pyro.module("factor_model", self)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.factor("likelihood", dist.Normal(z, 1.0).log_prob(x))
            auxiliary_loss("penalty", -self.penalty * z**2)

    def guide(self, x, y=None):
        pyro.module("factor_model", self)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(self.loc + 0.5 * x, 0.8))


def test_factor_is_part_of_the_density_but_auxiliary_loss_is_not():
    module = FactorModel(penalty=2.0)
    x = torch.tensor([0.5, -1.0, 2.0])
    pyro.set_rng_seed(0)
    log_w = log_weights(module.model, module.guide, x, num_particles=4000)
    # exact: log p(x) = log N(x; 0, 2), E_q[log w] = log p(x) - KL(q || p(z|x)),
    # with p(z|x) = N(x/2, 1/2)
    q = dist.Normal(0.3 + 0.5 * x, 0.8)
    posterior = dist.Normal(x / 2, 0.5**0.5)
    expected = dist.Normal(0.0, 2**0.5).log_prob(x) - torch.distributions.kl_divergence(
        q, posterior
    )
    assert torch.allclose(log_w.mean(0), expected, atol=0.03)
    # Trace_ELBO trains on the penalty too: loss = -(ELBO - penalty * E[z^2])
    pyro.set_rng_seed(1)
    loss = Trace_ELBO(num_particles=20000, vectorize_particles=True, max_plate_nesting=1).loss(
        module.model, module.guide, x
    )
    penalty = 2.0 * (q.mean**2 + q.variance).sum()
    assert loss == pytest.approx(float(-expected.sum() + penalty), abs=0.15)


@pytest.mark.parametrize("kind", ["pair", "dataset", "loader"])
def test_every_data_kind_trains(digits, kind):
    x, y = digits.split("train")
    data = {
        "pair": (x, y),
        "dataset": torch.utils.data.TensorDataset(x, y),
        "loader": torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=50),
    }[kind]
    torch.manual_seed(0)
    module = VAE(digits.input_dim, latent_dim=4, hidden=(64,))
    val_x, val_y = digits.split("val")
    before = validation_elbo(module, val_x, val_y, batch_size=500)
    result = fit(module, data, validation=(val_x, val_y), epochs=3, batch_size=50, progress=False)
    assert result.history[-1]["val_elbo"] > before + 8


def test_zero_learning_rate_schedule_leaves_parameters_unchanged(digits):
    torch.manual_seed(0)
    module = VAE(digits.input_dim, latent_dim=4, hidden=(32,))
    start = {k: v.clone() for k, v in module.state_dict().items()}
    fit(module, digits.train, epochs=2, lr_schedule=lambda epoch: 0.0, progress=False)
    assert all(torch.equal(start[k], v) for k, v in module.state_dict().items())


def test_evaluate_reports_kl_per_dimension_in_closed_form():
    torch.manual_seed(0)
    module = LinearGaussian(5, latent_dim=3)
    with torch.no_grad():
        module.guide_weight.normal_(0, 0.3)
        module.guide_raw_scale.copy_(torch.tensor([-1.0, 0.0, 1.0]))
    x = module.marginal().sample((200,))
    report = evaluate(module, x, num_samples=50, progress=False)
    with torch.no_grad():
        loc, scale = module.guide_params(x)
    kl = (0.5 * (loc**2 + scale**2 - 1) - scale.log()).mean(0)  # KL(N(m, s^2) || N(0, 1))
    assert torch.allclose(torch.tensor(report.kl_per_dim["z"]), kl, atol=1e-4)
    assert report.kl == pytest.approx(float(kl.sum()), abs=1e-4)
    # active units: Var_x of the guide mean per dimension, all well above 0.01 here
    assert report.active_units == 3 and report.latent_units == 3
