"""Programs written the way Pyro's documentation writes them (issue 9, DESIGN §1): their own
signatures, plate names, batch-shaped code, deterministic, masked and enumerated sites, plain
``pyro.param`` functions and PyroModules — passed to ``fit``, the estimators and ``evaluate``
unchanged. Every check compares with a closed form, an equivalent program or an exact identity.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pyro
import pyro.distributions as dist
import pyro.optim
import pytest
import torch
from pyro.infer import Trace_ELBO, TraceEnum_ELBO, config_enumerate
from pyro.nn import PyroModule, PyroParam, PyroSample, pyro_method
from torch import nn
from torch.distributions import constraints

from ppvae.errors import ContractError
from ppvae.inference import elbo, evaluate, fit, iwae_bound, log_marginal, log_weights
from ppvae.inference.importance import chunk_log_weights
from ppvae.inference.program import REPLICATED, VECTORISED, ProgramData, program_info
from ppvae.inference.svi_step import SVIStep

D, LATENT = 4, 2


def gaussian_setup(seed=0, dtype=torch.float64):
    """W, b, σ of a probabilistic PCA and its exact posterior p(z|x) = N(G (x - b), Σ)."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(D, LATENT, generator=generator, dtype=dtype)
    bias = torch.randn(D, generator=generator, dtype=dtype)
    sigma = 0.5
    cov = torch.linalg.inv(torch.eye(LATENT, dtype=dtype) + weight.T @ weight / sigma**2)
    gain = cov @ weight.T / sigma**2
    return weight, bias, sigma, cov, gain


def exact_log_px(x, weight, bias, sigma):
    cov = weight @ weight.T + sigma**2 * torch.eye(weight.shape[0], dtype=weight.dtype)
    return dist.MultivariateNormal(bias, covariance_matrix=cov).log_prob(x)


def sample_data(num=30, seed=1):
    weight, bias, sigma, _, _ = gaussian_setup()
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(num, LATENT, generator=generator, dtype=weight.dtype)
    return z @ weight.T + bias + sigma * torch.randn(num, D, generator=generator, dtype=z.dtype)


class TutorialPPCA(nn.Module):
    """``model(self, x)`` / ``guide(self, x)``, ``pyro.module``, a plate named after the data
    and a latent shape fixed from ``x.shape[0]`` — as Pyro's VAE tutorial writes them. The
    guide is the exact posterior mean with its marginal sds times ``factor``."""

    def __init__(self, factor=1.0, plate="documents", sized=True, deterministic=False):
        super().__init__()
        weight, bias, sigma, cov, gain = gaussian_setup()
        self.weight, self.bias, self.sigma = nn.Parameter(weight), nn.Parameter(bias), sigma
        self.gain, self.cov, self.factor = gain, cov, factor
        self.plate, self.sized, self.deterministic = plate, sized, deterministic

    def _plate(self, x):
        return pyro.plate(self.plate, x.shape[0]) if self.sized else pyro.plate(self.plate)

    def model(self, x):
        pyro.module("ppca", self)
        with self._plate(x):
            z_loc = x.new_zeros(torch.Size((x.shape[0], LATENT)))
            z = pyro.sample("latent", dist.Normal(z_loc, 1.0).to_event(1))
            loc = z @ self.weight.T + self.bias
            if self.deterministic:
                pyro.deterministic("decoded", loc, event_dim=1)
            pyro.sample("obs", dist.Normal(loc, self.sigma).to_event(1), obs=x)

    def guide(self, x):
        pyro.module("ppca", self)
        with self._plate(x):
            loc = (x - self.bias) @ self.gain.T
            scale = self.factor * self.cov.diagonal().sqrt().expand_as(loc)
            pyro.sample("latent", dist.Normal(loc, scale).to_event(1))


# 1. signatures ---------------------------------------------------------------------------------


def test_model_x_signature_gets_exact_numbers_from_every_estimator():
    module, x = TutorialPPCA(factor=1.6), sample_data()  # a guide too wide by 60 %
    exact = exact_log_px(x, module.weight, module.bias, module.sigma).detach()
    with torch.no_grad():
        estimate, stderr = log_marginal(
            module.model, module.guide, x, num_samples=4000, return_stderr=True
        )
        lower = elbo(module.model, module.guide, x, num_particles=2000)
        middle = iwae_bound(module.model, module.guide, x, num_particles=20)
    assert torch.allclose(estimate, exact, atol=float(6 * stderr.max()) + 1e-3)
    # ELBO < IWAE_20 < log p(x): the gap is KL(q || p(z|x)) > 0.1 nats per point here
    assert float(lower.mean()) + 0.1 < float(middle.mean()) < float(exact.mean())
    report = evaluate(module, x, num_samples=500, progress=False)
    assert report.density_name == "log p(obs)" and report.observed_sites == ["obs"]
    assert report.log_px == pytest.approx(float(exact.mean()), abs=0.05)


def test_a_signature_that_cannot_take_the_data_is_one_contract_line():
    module, x = TutorialPPCA(), sample_data()
    labels = torch.zeros(x.shape[0])
    with pytest.raises(ContractError, match=r"model .*model\(x\) cannot take the data passed"):
        log_marginal(module.model, module.guide, x, labels, num_samples=10)
    with pytest.raises(ContractError, match=r"cannot take the data passed") as error:
        fit(module, (x, labels), epochs=1, progress=False, device="cpu")
    assert "\n" not in str(error.value)


def test_keyword_and_several_positional_tensors_pass_through():
    class Masked(TutorialPPCA):
        def model(self, x, keep):  # two per-point tensors, positional
            pyro.module("ppca", self)
            with pyro.plate("data", x.shape[0]):
                z = pyro.sample("latent", dist.Normal(x.new_zeros(LATENT), 1.0).to_event(1))
                loc = z @ self.weight.T + self.bias
                likelihood = dist.Normal(loc, self.sigma).mask(keep).to_event(1)
                pyro.sample("obs", likelihood, obs=x)

        def guide(self, x, keep):
            super().guide(x)

    module, x = Masked(factor=1.0, plate="data"), sample_data()
    keep = torch.ones_like(x, dtype=torch.bool)
    keep[:, 0] = False  # the first coordinate is never observed
    with torch.no_grad():
        by_tuple, stderr = log_marginal(
            module.model, module.guide, (x, keep), num_samples=3000, return_stderr=True
        )
        torch.manual_seed(0)
        by_kwargs = log_weights(module.model, module.guide, {"x": x, "keep": keep}, num_particles=3)
        torch.manual_seed(0)
        by_args = log_weights(module.model, module.guide, (x, keep), num_particles=3)
    torch.testing.assert_close(by_kwargs, by_args)
    # the masked coordinate is marginalised: log p(x[1:]) under the model's marginal
    exact = exact_log_px(x[:, 1:], module.weight[1:], module.bias[1:], module.sigma).detach()
    assert ((by_tuple - exact).abs() < 5 * stderr + 0.01).all()


# 2. the data plate is found --------------------------------------------------------------------


@pytest.mark.parametrize("sized", [True, False])
def test_data_plate_found_under_any_name_sized_or_not(sized):
    module, x = TutorialPPCA(factor=1.0, plate="documents", sized=sized), sample_data()
    info = program_info(module.model, module.guide, ProgramData.of(x))
    assert info.data_plate == "documents" and info.particles == VECTORISED
    torch.manual_seed(3)
    log_w = log_weights(module.model, module.guide, x, num_particles=5)
    reference = TutorialPPCA(factor=1.0, plate="data")
    torch.manual_seed(3)
    torch.testing.assert_close(
        log_w, log_weights(reference.model, reference.guide, x, num_particles=5)
    )


def test_fit_validates_with_the_elbo_on_a_found_plate():
    module, x = TutorialPPCA(factor=1.0, plate="documents"), sample_data(60)
    result = fit(
        module,
        x[:40],
        validation=x[40:],
        epochs=2,
        batch_size=20,
        progress=False,
        device="cpu",
        lr=1e-3,
    )
    assert result.validation_metric == "val_elbo"
    torch.manual_seed(0)
    with torch.no_grad():
        expected = float(elbo(module.model, module.guide, x[40:], num_particles=4000).mean())
    assert result.history[-1]["val_elbo"] == pytest.approx(expected, abs=0.5)


# 3. batch-shaped code ------------------------------------------------------------------------


class BatchShaped(nn.Module):
    """A VAE-like program that assumes ``[batch, features]`` tensors: ``reshape(-1, D)``,
    ``torch.cat(..., dim=1)``, ``softmax(dim=1)``, mask indexing and ``BatchNorm1d``."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Linear(D, 2 * LATENT)
        self.decoder = nn.Linear(2 * LATENT, D)
        self.norm = nn.BatchNorm1d(D)
        with torch.no_grad():
            self.norm.running_mean.normal_()
            self.norm.running_var.uniform_(0.5, 2.0)

    def _decode(self, z):
        z = z.reshape(-1, LATENT)
        h = torch.cat([z, torch.softmax(z, dim=1)], dim=1)
        loc = self.norm(self.decoder(h))
        positive = loc > 0
        loc = loc.clone()
        loc[positive] = loc[positive] * 0.5  # mask indexing
        return loc

    def model(self, x):
        pyro.module("batch_shaped", self)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], LATENT), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(self._decode(z), 0.7).to_event(1), obs=x)

    def guide(self, x):
        pyro.module("batch_shaped", self)
        with pyro.plate("data", x.shape[0]):
            loc, raw = self.encoder(x).split(LATENT, dim=1)
            pyro.sample("z", dist.Normal(loc, nn.functional.softplus(raw) + 0.1).to_event(1))


class BatchShapedBroadcasting(BatchShaped):
    """The same density written to broadcast over leading dimensions."""

    def _decode(self, z):
        h = torch.cat([z, torch.softmax(z, dim=-1)], dim=-1)
        out = self.decoder(h)
        loc = (out - self.norm.running_mean) / torch.sqrt(self.norm.running_var + self.norm.eps)
        loc = loc * self.norm.weight + self.norm.bias
        return torch.where(loc > 0, 0.5 * loc, loc)


def test_batch_shaped_code_falls_back_to_replicated_particles_with_the_same_numbers():
    x = sample_data(12).float()
    shaped, broadcasting = BatchShaped().eval(), BatchShapedBroadcasting().eval()
    broadcasting.load_state_dict(shaped.state_dict())
    info = program_info(shaped.model, shaped.guide, ProgramData.of(x))
    assert info.particles == REPLICATED and "replicated" in info.particle_note
    assert program_info(broadcasting.model, broadcasting.guide, ProgramData.of(x)).particles == (
        VECTORISED
    )
    running_mean = shaped.norm.running_mean.clone()
    with torch.no_grad():
        torch.manual_seed(5)
        replicated = log_weights(shaped.model, shaped.guide, x, num_particles=7, chunk_size=3)
        torch.manual_seed(5)
        vectorised = log_weights(
            broadcasting.model, broadcasting.guide, x, num_particles=7, chunk_size=3
        )
    # [K, N] in the same order: row k*N + n of the replicated draws is particle k of point n
    torch.testing.assert_close(replicated, vectorised, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(shaped.norm.running_mean, running_mean)  # probes leave no trace
    report = evaluate(shaped, x, num_samples=50, progress=False)
    assert report.particle_path.startswith("particles replicated")
    assert math.isfinite(report.log_px)


def test_both_particle_paths_agree_on_a_program_that_supports_both():
    module, x = TutorialPPCA(factor=1.3), sample_data(9)
    data = ProgramData.of(x)
    info = program_info(module.model, module.guide, data)
    replicated = type(info)(**{**info.__dict__, "particles": REPLICATED})
    with torch.no_grad():
        torch.manual_seed(2)
        a, _ = chunk_log_weights(module.model, module.guide, data, 6, info)
        torch.manual_seed(2)
        b, _ = chunk_log_weights(module.model, module.guide, data, 6, replicated)
    torch.testing.assert_close(a, b)


def test_batch_shaped_program_trains_and_validates():
    x = sample_data(40).float()
    module = BatchShaped()
    result = fit(
        module, x[:30], validation=x[30:], epochs=3, batch_size=10, progress=False, device="cpu"
    )
    assert result.validation_metric == "val_elbo"
    assert all(math.isfinite(r["val_elbo"]) for r in result.history)


# 4. sites -------------------------------------------------------------------------------------


def test_deterministic_sites_are_neither_latents_nor_observations():
    module, x = TutorialPPCA(factor=1.0, deterministic=True), sample_data()
    info = program_info(module.model, module.guide, ProgramData.of(x))
    assert info.observed == ("obs",) and info.latents == ("latent",)
    plain = TutorialPPCA(factor=1.0)
    torch.manual_seed(0)
    with torch.no_grad():
        a = log_weights(module.model, module.guide, x, num_particles=4)
        torch.manual_seed(0)
        b = log_weights(plain.model, plain.guide, x, num_particles=4)
    torch.testing.assert_close(a, b)
    assert a.abs().min() > 1.0  # not the log p(x) = 0 of a deterministic "observation"


def test_masked_reconstruction_counts_only_unmasked_elements():
    class HalfObserved(TutorialPPCA):
        def model(self, x):
            pyro.module("ppca", self)
            with pyro.plate("data", x.shape[0]):
                z = pyro.sample("latent", dist.Normal(x.new_zeros(LATENT), 1.0).to_event(1))
                loc = z @ self.weight.T + self.bias
                keep = torch.tensor([True, True, False, False]).expand_as(x)
                pyro.sample("obs", dist.Normal(loc, self.sigma).mask(keep).to_event(1), obs=x)

    from ppvae.inference.evaluate import reconstruction

    module, x = HalfObserved(factor=1e-6, plate="data"), sample_data()  # q(z|x) ≈ its mean
    with torch.no_grad():
        result = reconstruction(module.model, module.guide, x)
        z = (x - module.bias) @ module.gain.T
        mean = z @ module.weight.T + module.bias
    expected = ((x - mean)[:, :2] ** 2).mean(dim=1)
    torch.testing.assert_close(result.mse, expected, rtol=1e-4, atol=1e-6)


class PPCAWithLabel(TutorialPPCA):
    """Observes x and a real 'label' y = c·z + noise; y=None makes y a latent."""

    def __init__(self, with_guide_y=False):
        super().__init__(factor=1.0, plate="data")
        self.readout = torch.tensor([1.0, -0.5], dtype=torch.float64)
        self.with_guide_y = with_guide_y

    def model(self, x, y=None):
        pyro.module("ppca", self)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("latent", dist.Normal(x.new_zeros(LATENT), 1.0).to_event(1))
            pyro.sample(
                "obs", dist.Normal(z @ self.weight.T + self.bias, self.sigma).to_event(1), obs=x
            )
            pyro.sample("y", dist.Normal(z @ self.readout, 0.3), obs=y)

    def guide(self, x, y=None):
        pyro.module("ppca", self)
        with pyro.plate("data", x.shape[0]):
            loc = (x - self.bias) @ self.gain.T
            scale = self.cov.diagonal().sqrt().expand_as(loc)
            z = pyro.sample("latent", dist.Normal(loc, scale).to_event(1))
            if y is None and self.with_guide_y:
                pyro.sample("y", dist.Normal(z @ self.readout, 0.5))


def test_several_observed_sites_report_the_joint_and_name_it():
    module, x = PPCAWithLabel(), sample_data()
    torch.manual_seed(4)
    z = torch.randn(x.shape[0], LATENT, dtype=x.dtype)
    y = z @ module.readout + 0.3 * torch.randn(x.shape[0], dtype=x.dtype)
    joint_weight = torch.cat([module.weight.detach(), module.readout[None]], dim=0)
    joint_cov = joint_weight @ joint_weight.T + torch.diag(
        torch.tensor([module.sigma**2] * D + [0.3**2], dtype=x.dtype)
    )
    mean = torch.cat([module.bias.detach(), torch.zeros(1, dtype=x.dtype)])
    exact = dist.MultivariateNormal(mean, joint_cov).log_prob(torch.cat([x, y[:, None]], 1))
    with torch.no_grad():
        estimate, stderr = log_marginal(
            module.model, module.guide, x, y, num_samples=4000, return_stderr=True
        )
    assert (estimate - exact).abs().max() < 6 * float(stderr.max()) + 0.02
    report = evaluate(module, (x, y), num_samples=200, progress=False)
    assert report.density_name == "log p(obs, y)" and "log p(obs, y)" in report.summary_table()


def test_a_site_observed_only_when_given_is_a_latent_the_guide_must_sample():
    module, x = PPCAWithLabel(), sample_data()
    with pytest.raises(
        ContractError, match=r"model samples latent site\(s\) \['y'\] that the guide"
    ):
        log_marginal(module.model, module.guide, x, num_samples=10)
    sampled = PPCAWithLabel(with_guide_y=True)
    with torch.no_grad():
        estimate = log_marginal(sampled.model, sampled.guide, x, num_samples=3000)
    # y integrates out: log p(x) with a noisier proposal for y, close to the exact marginal
    exact = exact_log_px(x, sampled.weight, sampled.bias, sampled.sigma).detach()
    assert (estimate - exact).abs().mean() < 0.1


# 5. enumerated discrete latents ------------------------------------------------------------------


class MixturePrior(nn.Module):
    """A Gaussian-mixture prior over z, its component summed out in the model (enumerated) or
    sampled by the guide: log p(x) = log Σ_c π_c N(x; W μ_c + b, W Wᵀ + σ² I)."""

    def __init__(self, enumerate_component=True):
        super().__init__()
        weight, bias, sigma, cov, gain = gaussian_setup()
        self.weight, self.bias, self.sigma, self.gain, self.cov = weight, bias, sigma, gain, cov
        self.means = torch.tensor([[-2.0, 0.0], [2.0, 1.0], [0.0, -2.0]], dtype=weight.dtype)
        self.weights = torch.tensor([0.5, 0.3, 0.2], dtype=weight.dtype)
        self.enumerate_component = enumerate_component
        self.dummy = nn.Parameter(torch.zeros(1))

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            infer = {"enumerate": "parallel"} if self.enumerate_component else {}
            c = pyro.sample("c", dist.Categorical(self.weights), infer=infer)
            z = pyro.sample("z", dist.Normal(self.means[c], 1.0).to_event(1))
            pyro.sample(
                "x", dist.Normal(z @ self.weight.T + self.bias, self.sigma).to_event(1), obs=x
            )

    def guide(self, x):
        with pyro.plate("data", x.shape[0]):
            if not self.enumerate_component:
                pyro.sample("c", dist.Categorical(self.weights.expand(x.shape[0], 3)))
            loc = (x - self.bias) @ self.gain.T
            scale = 1.5 * self.cov.diagonal().sqrt().expand_as(loc)
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    def exact_log_px(self, x):
        cov = self.weight @ self.weight.T + self.sigma**2 * torch.eye(D, dtype=x.dtype)
        components = dist.MultivariateNormal(self.means @ self.weight.T + self.bias, cov)
        return torch.logsumexp(components.log_prob(x[:, None, :]) + self.weights.log(), dim=1)


def test_enumerated_mixture_matches_the_closed_form_with_lower_variance():
    x = sample_data(20)
    enumerated, sampled = MixturePrior(True), MixturePrior(False)
    exact = enumerated.exact_log_px(x)
    info = program_info(enumerated.model, enumerated.guide, ProgramData.of(x))
    assert info.enumerated and info.latents == ("z",)
    with torch.no_grad():
        estimate, stderr = log_marginal(
            enumerated.model, enumerated.guide, x, num_samples=3000, return_stderr=True
        )
        assert (estimate - exact).abs().max() < 5 * float(stderr.max()) + 0.01
        spread = {}
        for name, module in (("enumerated", enumerated), ("sampled", sampled)):
            torch.manual_seed(0)
            log_w = log_weights(module.model, module.guide, x, num_particles=200)
            spread[name] = float(log_w.var(dim=0).mean())
    assert spread["enumerated"] < 0.5 * spread["sampled"], spread


class SemiSupervised(nn.Module):
    """Pyro's semi-supervised VAE pattern on a linear model: the label y is observed when given,
    otherwise enumerated in the guide (``config_enumerate``); x | y, z ~ N(W z + B_y, σ² I)."""

    def __init__(self):
        super().__init__()
        weight, bias, sigma, cov, gain = gaussian_setup()
        self.weight, self.sigma, self.gain, self.cov = weight, sigma, gain, cov
        self.offsets = torch.stack([bias, -bias, 0.5 * bias])  # B_y, 3 classes
        self.prior = torch.tensor([0.2, 0.5, 0.3], dtype=weight.dtype)
        self.classifier = nn.Linear(D, 3).double()

    def model(self, xs, ys=None):
        pyro.module("ss", self)
        with pyro.plate("data", xs.shape[0]):
            ys = pyro.sample("y", dist.Categorical(self.prior), obs=ys)
            z = pyro.sample("z", dist.Normal(xs.new_zeros(LATENT), 1.0).to_event(1))
            loc = z @ self.weight.T + self.offsets[ys]
            pyro.sample("x", dist.Normal(loc, self.sigma).to_event(1), obs=xs)

    @config_enumerate
    def guide(self, xs, ys=None):
        pyro.module("ss", self)
        with pyro.plate("data", xs.shape[0]):
            if ys is None:
                ys = pyro.sample("y", dist.Categorical(logits=self.classifier(xs)))
            loc = (xs - self.offsets[ys]) @ self.gain.T
            scale = 1.2 * self.cov.diagonal().sqrt().expand_as(loc)
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    def classifier_model(self, xs, ys=None):
        pyro.module("ss", self)
        with pyro.plate("data", xs.shape[0]):
            pyro.sample("y_aux", dist.Categorical(logits=self.classifier(xs)), obs=ys)

    def classifier_guide(self, xs, ys=None):
        pass

    def exact(self, xs, ys=None):
        cov = self.weight @ self.weight.T + self.sigma**2 * torch.eye(D, dtype=xs.dtype)
        per_class = dist.MultivariateNormal(self.offsets, cov).log_prob(xs[:, None, :])
        joint = per_class + self.prior.log()
        return joint.logsumexp(dim=1) if ys is None else joint.gather(1, ys[:, None])[:, 0]


def test_semi_supervised_guide_enumeration_is_exact_for_labelled_and_unlabelled_points():
    module = SemiSupervised()
    x = sample_data(15)
    ys = torch.tensor([0, 1, 2] * 5)
    with torch.no_grad():
        unlabelled, se_u = log_marginal(
            module.model, module.guide, x, num_samples=2000, return_stderr=True
        )
        labelled, se_l = log_marginal(
            module.model, module.guide, x, ys, num_samples=2000, return_stderr=True
        )
    assert (unlabelled - module.exact(x)).abs().max() < 5 * float(se_u.max()) + 0.01
    assert (labelled - module.exact(x, ys)).abs().max() < 5 * float(se_l.max()) + 0.01
    report = evaluate(module, (x, ys), num_samples=100, progress=False)
    assert report.density_name == "log p(y, x)"


def test_semi_supervised_trains_two_objectives_in_one_step(monkeypatch):
    module = SemiSupervised()
    x, ys = sample_data(30), torch.tensor([0, 1, 2] * 10)

    def unsupervised_model(xs, ys):  # the ELBO of the unlabelled view: y enumerated
        return module.model(xs)

    def unsupervised_guide(xs, ys):
        return module.guide(xs)

    elbo_loss = TraceEnum_ELBO(max_plate_nesting=1)
    objectives = [
        (elbo_loss, unsupervised_model, unsupervised_guide),
        (Trace_ELBO(), module.classifier_model, module.classifier_guide),
    ]
    before = [p.detach().clone() for p in module.classifier.parameters()]
    states = []  # the RNG state at the step, to replay its draws in the reference
    original_step = SVIStep._step
    monkeypatch.setattr(
        SVIStep,
        "_step",
        lambda self, batch: states.append(torch.get_rng_state()) or original_step(self, batch),
    )
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, ys), batch_size=30)
    result = fit(
        module,
        loader,
        loss=objectives,
        validation=(x, ys),
        epochs=1,
        progress=False,
        device="cpu",
        optimizer=pyro.optim.SGD({"lr": 0.01}),
        seed=7,
    )
    # one SGD step on the summed losses: the classifier's gradient is the sum of both parts
    pyro.clear_param_store()  # the reference module's parameters, not the trained ones
    reference = SemiSupervised()
    params = list(reference.classifier.parameters())
    for p, value in zip(params, before, strict=True):
        p.data.copy_(value)
    torch.set_rng_state(states[0])
    total = elbo_loss.differentiable_loss(reference.model, reference.guide, x)
    total = total + Trace_ELBO().differentiable_loss(
        reference.classifier_model, reference.classifier_guide, x, ys
    )
    grads = torch.autograd.grad(total, params)
    for p, value, grad in zip(module.classifier.parameters(), before, grads, strict=True):
        torch.testing.assert_close(p.detach(), value - 0.01 * grad, rtol=1e-6, atol=1e-8)
    assert result.validation_metric == "val_loss"  # two objectives: their summed loss


def test_traceenum_training_validates_with_its_own_enumerated_elbo():
    module = SemiSupervised()
    x = sample_data(30)
    elbo_loss = TraceEnum_ELBO(max_plate_nesting=1)
    result = fit(
        module,
        x,
        loss=elbo_loss,
        validation=x,
        epochs=1,
        batch_size=30,
        lr=0.0,
        progress=False,
        device="cpu",
    )
    assert result.validation_metric == "val_elbo"
    losses = [elbo_loss.loss(module.model, module.guide, x) / 30 for _ in range(200)]
    assert result.history[0]["val_elbo"] == pytest.approx(-sum(losses) / 200, abs=0.3)
    # the Rao-Blackwellised importance weights bound it from above: E log W >= enumerated ELBO
    with torch.no_grad():
        bound = float(elbo(module.model, module.guide, x, num_particles=200).mean())
    assert bound > -sum(losses) / 200


# 7. pyro.param sites and PyroModules -----------------------------------------------------------


def conjugate_program():
    """Plain functions with ``pyro.param``, as Pyro's SVI tutorial writes them: z_n ~ N(0, 1),
    x_n ~ N(z_n, 1); per-point guide parameters q(z_n) = N(a x_n, s)."""

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros_like(x), 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        gain = pyro.param("gain", torch.tensor(0.1))
        scale = pyro.param("scale", torch.tensor(1.0), constraint=constraints.positive)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(gain * x, scale))

    return SimpleNamespace(model=model, guide=guide)


def test_plain_pyro_param_programs_train_to_the_exact_posterior_and_resume(tmp_path):
    x = torch.randn(200) * math.sqrt(2.0)
    program = conjugate_program()
    fit(
        program,
        x,
        epochs=120,
        batch_size=50,
        lr=0.05,
        progress=False,
        device="cpu",
        lr_schedule=lambda epoch: 0.05 if epoch <= 80 else 0.005,
    )
    # exact posterior: N(x / 2, 1/2)
    assert pyro.param("gain").item() == pytest.approx(0.5, abs=0.05)
    assert pyro.param("scale").item() == pytest.approx(math.sqrt(0.5), abs=0.05)
    # checkpointed and restored: 3 + 3 epochs == 6 epochs
    runs = {}
    for name, splits in (("straight", [6]), ("resumed", [3, 6])):
        for i, epochs in enumerate(splits):
            fit(
                conjugate_program(),
                x,
                epochs=epochs,
                batch_size=50,
                lr=0.05,
                progress=False,
                device="cpu",
                run_dir=tmp_path / name,
                resume=i > 0,
            )
        runs[name] = (pyro.param("gain").item(), pyro.param("scale").item())
    assert runs["straight"] == runs["resumed"]


class BayesianPPCA(PyroModule):
    """A PyroModule with a PyroParam (constrained) and a PyroSample latent."""

    def __init__(self):
        super().__init__()
        weight, bias, sigma, cov, gain = gaussian_setup(dtype=torch.float32)
        self.weight = PyroParam(weight)
        self.bias = PyroParam(bias)
        self.sigma = PyroParam(torch.tensor(1.0), constraint=constraints.positive)
        self.guide_gain = PyroParam(gain)
        self.guide_scale = PyroParam(cov.diagonal().sqrt(), constraint=constraints.positive)
        self.z = PyroSample(lambda self: dist.Normal(torch.zeros(LATENT), 1.0).to_event(1))

    @pyro_method
    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            z = self.z
            pyro.sample(
                "x", dist.Normal(z @ self.weight.T + self.bias, self.sigma).to_event(1), obs=x
            )

    @pyro_method
    def guide(self, x):
        with pyro.plate("data", x.shape[0]):
            loc = (x - self.bias) @ self.guide_gain.T
            pyro.sample("z", dist.Normal(loc, self.guide_scale).to_event(1))


def test_pyro_module_programs_train_and_their_params_are_checkpointed(tmp_path):
    x = sample_data(80).float()
    module = BayesianPPCA()
    before = module.sigma.item()
    fit(
        module,
        x,
        epochs=30,
        batch_size=40,
        lr=0.03,
        progress=False,
        device="cpu",
        run_dir=tmp_path / "run",
    )
    sigma = module.sigma.item()
    assert abs(sigma - 0.5) < abs(before - 0.5) - 0.2  # the constrained PyroParam moved to 0.5
    saved = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert any("sigma" in key for key in saved["state_dict"])
    with torch.no_grad():
        exact = exact_log_px(x, module.weight, module.bias, module.sigma)
        estimate = log_marginal(module.model, module.guide, x, num_samples=2000)
    assert (estimate - exact).abs().mean() < 0.05


# 8. the contract before the first step; train_loss per point -----------------------------------


class MissingSite(TutorialPPCA):
    def guide(self, x):
        pass


@pytest.mark.parametrize("num_particles", [1, 5])
def test_a_guide_missing_a_site_is_the_same_one_line_error_whatever_k(num_particles):
    module, x = MissingSite(), sample_data()
    with pytest.raises(ContractError, match=r"\['latent'\] that the guide does not"):
        log_marginal(module.model, module.guide, x, num_samples=num_particles)


def test_fit_checks_the_contract_before_the_first_step(tmp_path):
    module, x = MissingSite(), sample_data()
    weight = module.weight.detach().clone()
    with pytest.raises(ContractError, match=r"\['latent'\] that the guide does not"):
        fit(module, x, epochs=2, progress=False, device="cpu", run_dir=tmp_path / "run")
    assert torch.equal(module.weight.detach(), weight) and not (tmp_path / "run").exists()


def test_train_loss_is_per_point_whatever_the_loader_yields():
    module, x = TutorialPPCA(factor=1e-3), sample_data(40)  # q ≈ a point: loss ≈ −log p(x, ẑ)
    whole_batches = torch.utils.data.DataLoader(list(x.split(10)), batch_size=None)
    losses = {}
    for name, data in (("tensor", x), ("whole batches", whole_batches)):
        result = fit(module, data, epochs=1, batch_size=10, lr=0.0, progress=False, device="cpu")
        losses[name] = result.history[0]["train_loss"]
    assert losses["whole batches"] == pytest.approx(losses["tensor"], rel=0.02)
    torch.manual_seed(0)
    with torch.no_grad():
        expected = -float(elbo(module.model, module.guide, x, num_particles=50).mean())
    assert losses["tensor"] == pytest.approx(expected, rel=0.02)


# the "done when": a topic model as Pyro's ProdLDA tutorial writes it ---------------------


class ProdLDA(nn.Module):
    """Pyro's ProdLDA pattern: ``model(docs)``, a "documents" plate, a fixed-shape latent,
    BatchNorm1d and ``softmax(dim=1)`` in the decoder, a Multinomial likelihood."""

    def __init__(self, vocab=20, topics=3, hidden=16):
        super().__init__()
        self.topics = topics
        self.fc = nn.Linear(vocab, hidden)
        self.loc, self.logvar = nn.Linear(hidden, topics), nn.Linear(hidden, topics)
        self.bn_loc = nn.BatchNorm1d(topics, affine=False)
        self.bn_logvar = nn.BatchNorm1d(topics, affine=False)
        self.beta = nn.Linear(topics, vocab, bias=False)
        self.bn = nn.BatchNorm1d(vocab, affine=False)

    def model(self, docs):
        pyro.module("decoder", self)
        with pyro.plate("documents", docs.shape[0]):
            loc = docs.new_zeros((docs.shape[0], self.topics))
            logtheta = pyro.sample("logtheta", dist.Normal(loc, 1.0).to_event(1))
            theta = nn.functional.softmax(logtheta, -1)
            count_param = nn.functional.softmax(self.bn(self.beta(theta)), dim=1)
            total_count = int(docs.sum(-1).max())
            pyro.sample("obs", dist.Multinomial(total_count, count_param), obs=docs)

    def guide(self, docs):
        pyro.module("encoder", self)
        with pyro.plate("documents", docs.shape[0]):
            h = nn.functional.softplus(self.fc(docs))
            loc, logvar = self.bn_loc(self.loc(h)), self.bn_logvar(self.logvar(h))
            pyro.sample("logtheta", dist.Normal(loc, (0.5 * logvar).exp()).to_event(1))


def test_a_prodlda_topic_model_trains_and_is_evaluated_unchanged():
    generator = torch.Generator().manual_seed(0)
    topics = torch.distributions.Dirichlet(torch.full((20,), 0.3)).sample((3,))
    mixture = torch.distributions.Dirichlet(torch.ones(3)).sample((80,))
    docs = torch.distributions.Multinomial(30, mixture @ topics).sample()
    del generator
    module = ProdLDA()
    result = fit(
        module,
        docs[:60],
        validation=docs[60:],
        epochs=5,
        batch_size=20,
        lr=0.01,
        progress=False,
        device="cpu",
    )
    assert result.validation_metric == "val_elbo"
    assert result.history[-1]["val_elbo"] > result.history[0]["val_elbo"]
    module.eval()
    info = program_info(module.model, module.guide, ProgramData.of(docs[60:]))
    assert info.data_plate == "documents" and info.particles == REPLICATED
    report = evaluate(module, docs[60:], num_samples=200, progress=False)
    assert report.particle_path.startswith("particles replicated")
    # bounds ordered: ELBO < IWAE_5 < IWAE_50 < log p̂(x) (K = 200), per the report's ladder
    assert report.elbo < report.ladder[5] < report.ladder[50] < report.log_px
    torch.manual_seed(1)
    with torch.no_grad():
        direct = log_marginal(module.model, module.guide, docs[60:], num_samples=200)
    assert float(direct.mean()) == pytest.approx(report.log_px, abs=0.5)


class TutorialCVAE(nn.Module):
    """Pyro's conditional-VAE tutorial pattern (image completion): ``model(xs, ys=None)``, an
    unsized plate, a prior network on the visible part, mask indexing with
    ``.view(batch_size, -1)`` on the hidden pixels, and ``pyro.deterministic`` when ys is None."""

    def __init__(self, pixels=16, latent=2, hidden=16):
        super().__init__()
        self.pixels = pixels
        self.prior_net = nn.Sequential(
            nn.Linear(pixels, hidden), nn.ReLU(), nn.Linear(hidden, 2 * latent)
        )
        self.recognition_net = nn.Sequential(
            nn.Linear(2 * pixels, hidden), nn.ReLU(), nn.Linear(hidden, 2 * latent)
        )
        self.generation_net = nn.Sequential(
            nn.Linear(latent, hidden), nn.ReLU(), nn.Linear(hidden, pixels)
        )

    @staticmethod
    def _gaussian(out):
        loc, raw = out.chunk(2, dim=-1)
        return loc, nn.functional.softplus(raw) + 1e-3

    def model(self, xs, ys=None):
        pyro.module("generation_net", self)
        batch_size = xs.shape[0]
        with pyro.plate("data"):
            prior_loc, prior_scale = self._gaussian(self.prior_net(xs))
            zs = pyro.sample("z", dist.Normal(prior_loc, prior_scale).to_event(1))
            loc = torch.sigmoid(self.generation_net(zs))
            if ys is not None:
                hidden = (xs == -1).view(-1, self.pixels)
                mask_loc = loc[hidden].view(batch_size, -1)
                mask_ys = ys[hidden].view(batch_size, -1)
                pyro.sample("y", dist.Bernoulli(mask_loc).to_event(1), obs=mask_ys)
            else:
                pyro.deterministic("y", loc.detach())

    def guide(self, xs, ys=None):
        with pyro.plate("data"):
            if ys is None:
                loc, scale = self._gaussian(self.prior_net(xs))
            else:
                loc, scale = self._gaussian(self.recognition_net(torch.cat([xs, ys], dim=1)))
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))


def test_the_cvae_tutorial_pattern_trains_and_is_evaluated_unchanged():
    generator = torch.Generator().manual_seed(0)
    prototypes = (torch.rand(4, 16, generator=generator) < 0.5).float()
    images = prototypes[torch.randint(0, 4, (90,), generator=generator)]  # visible half → hidden
    xs = images.clone()
    xs[:, 8:] = -1.0  # hidden pixels, as in the tutorial
    module = TutorialCVAE()
    result = fit(
        module,
        (xs[:60], images[:60]),
        validation=(xs[60:], images[60:]),
        epochs=30,
        batch_size=20,
        lr=0.01,
        progress=False,
        device="cpu",
    )
    assert result.validation_metric == "val_elbo"
    assert result.history[-1]["val_elbo"] > result.history[0]["val_elbo"] + 1.0
    info = program_info(module.model, module.guide, ProgramData.of((xs[60:], images[60:])))
    assert info.particles == REPLICATED and info.observed == ("y",)
    report = evaluate(module, (xs[60:], images[60:]), num_samples=100, progress=False)
    assert report.density_name == "log p(y)"
    assert report.elbo < report.ladder[5] < report.log_px <= 0.0
    # the visible half names the prototype: the hidden half is predicted far better than chance
    assert report.log_px > 8 * math.log(0.5) + 2.0


@pytest.mark.parametrize("program", ["broadcasting", "batch-shaped"])
def test_posterior_target_densities_on_both_particle_paths(program):
    """``PosteriorTarget`` (what AIS, NUTS and the gap split move latents with) gives the same
    per-point densities on the vectorised and the replicated path: log p(z) is N(0, I)'s,
    log p(x, z) − log q(z|x) are the log-weights of the same draws."""
    from ppvae.inference.importance import PosteriorTarget

    x = sample_data(6).float()
    module = (BatchShaped() if program == "batch-shaped" else BatchShapedBroadcasting()).eval()
    target = PosteriorTarget(module.model, module.guide, x)
    assert target.vectorised == (program == "broadcasting")
    assert target.site_shapes == {"z": (slice(0, LATENT), (LATENT,))}
    with torch.no_grad():
        torch.manual_seed(0)
        z, log_q = target.sample_guide(5)
        torch.manual_seed(0)
        expected = log_weights(module.model, module.guide, x, num_particles=5)
        torch.testing.assert_close(target.log_joint(z) - log_q, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(target.log_guide(z), log_q)
        standard = dist.Normal(0.0, 1.0).log_prob(z).sum(-1)
        torch.testing.assert_close(target.log_prior(z), standard)
        prior = target.sample_prior(4000)
    assert prior.shape == (4000, 6, LATENT)
    assert prior.mean().abs() < 0.03 and (prior.var() - 1).abs() < 0.05
    loc = target.guide_distributions()["z"].mean
    assert loc.shape == (6, LATENT)
    torch.testing.assert_close(loc, module.encoder(x).split(LATENT, dim=1)[0])


# issue 11: the Python API validates the data against the program on entry -----------------------


def test_a_single_one_dimensional_point_is_refused_not_read_as_many_points(digits):
    from ppvae.errors import PPVAEError
    from ppvae.models import VAE

    module = VAE(digits.input_dim, latent_dim=2, hidden=(16,))
    x, _ = digits.split("test")
    with torch.no_grad():
        one = log_marginal(module.model, module.guide, x[:1], num_samples=20)
    assert one.shape == (1,)
    for call in (
        lambda: log_marginal(module.model, module.guide, x[0], num_samples=20),
        lambda: elbo(module.model, module.guide, x[0]),
    ):
        with pytest.raises(PPVAEError, match=r"one point .*keep its batch dimension") as error:
            call()
        assert "\n" not in str(error.value)
    with pytest.raises(PPVAEError, match=r"takes \[N, 64\]"):
        log_marginal(module.model, module.guide, x[:, :63], num_samples=5)


def test_user_programs_get_the_layout_nan_and_complex_checks():
    from ppvae.errors import PPVAEError

    module, x = TutorialPPCA(plate="data"), sample_data()
    with pytest.raises(
        ContractError, match=r"guide TutorialPPCA.guide\(x\) failed on data"
    ) as error:
        log_marginal(module.model, module.guide, x[0], num_samples=5)  # 4 "points" of one value
    assert "\n" not in str(error.value)
    bad = x.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(PPVAEError, match="NaN/inf"):
        log_marginal(module.model, module.guide, bad, num_samples=5)
    with pytest.raises(PPVAEError, match="complex"):
        log_marginal(module.model, module.guide, x.to(torch.complex128), num_samples=5)


def test_fit_refuses_complex_data_before_writing(tmp_path):
    from ppvae.errors import PPVAEError

    module, x = TutorialPPCA(plate="data"), sample_data()
    with pytest.raises(PPVAEError, match="complex"):
        fit(
            module,
            x.to(torch.complex128),
            epochs=1,
            progress=False,
            device="cpu",
            run_dir=tmp_path / "run",
        )
    assert not (tmp_path / "run").exists()
