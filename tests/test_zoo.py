"""The model zoo: shapes under the data and particle plates, training on digits, checkpoints, and
the mathematics particular to each model (VQ-VAE gradients, CVAE labels, HVAE ladder, AE refusal).
"""

from __future__ import annotations

import inspect
import json
import math
from dataclasses import dataclass
from pathlib import Path

import pyro
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import Trace_ELBO
from pyro.poutine.util import site_is_subsample

from ppvae.checkpoint import load_checkpoint, restore_module
from ppvae.errors import ContractError, PPVAEError
from ppvae.inference import elbo, fit, iwae_bound, log_marginal, log_weights
from ppvae.inference.objectives import IWAE_ELBO, KLWeighted_ELBO
from ppvae.models import MODELS
from ppvae.models.likelihoods import observation_dist

N, K = 5, 3  # data points and particles in the shape tests
EPOCHS = 5
SMALL = {
    "ae": dict(latent_dim=4, hidden=[32]),
    "vae": dict(latent_dim=4, hidden=[32]),
    "cvae": dict(latent_dim=4, hidden=[32]),
    "vqvae": dict(latent_dim=3, num_positions=4, codebook_size=16, hidden=[32]),
    "hvae": dict(latent_dim=8, latent_dim2=4, hidden=[32, 32], hidden2=[16, 16]),
    "linear-gaussian": dict(latent_dim=4),
}
LATENT_EVENT_SHAPES = {
    "ae": {"z": (4,)},
    "vae": {"z": (4,)},
    "cvae": {"z": (4,)},
    "vqvae": {"code": (4,)},
    "hvae": {"z1": (8,), "z2": (4,)},
    "linear-gaussian": {"z": (4,)},
}
DETERMINISTIC_GUIDES = {"ae", "vqvae"}
CONV_MODELS = ("ae", "cvae", "vqvae", "hvae")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny networks: one thread is faster and steady on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build(name: str, data, seed: int = 0, **overrides):
    cls = MODELS[name]
    kwargs = {"input_dim": data.input_dim, **SMALL[name], **overrides}
    if "num_classes" in inspect.signature(cls).parameters:
        kwargs["num_classes"] = data.num_classes
    torch.manual_seed(seed)
    return cls(**kwargs)


def val_batch(data, n: int | None = None):
    x, y = data.split("val")
    return x[:n], y[:n]


def objective(module, x, y) -> float:
    """−Trace_ELBO loss per point (the quantity SVI maximises), seeded, no updates."""
    module.eval()
    pyro.set_rng_seed(123)
    with torch.no_grad():
        return -Trace_ELBO(num_particles=4).loss(module.model, module.guide, x, y) / x.shape[0]


def latent_names(trace) -> set[str]:
    return {
        name
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site)
    }


@dataclass
class Trained:
    module: torch.nn.Module
    before: float
    after: float
    run_dir: Path


@pytest.fixture(scope="module")
def trained(digits, tmp_path_factory):
    """Each zoo model fitted once for EPOCHS epochs on digits (with checkpoints), on demand."""
    cache: dict[str, Trained] = {}

    def get(name: str) -> Trained:
        if name not in cache:
            module = build(name, digits)
            x, y = val_batch(digits)
            before = objective(module, x, y)
            run_dir = tmp_path_factory.mktemp(name)
            fit(
                module,
                digits.train,
                epochs=EPOCHS,
                lr=3e-3,
                batch_size=100,
                device="cpu",
                run_dir=run_dir,
                seed=0,
                progress=False,
            )
            cache[name] = Trained(module, before, objective(module, x, y), run_dir)
        return cache[name]

    return get


# --- every model --------------------------------------------------------------------------------


def test_models_mapping_names_and_constructors():
    assert set(MODELS) == {"ae", "vae", "cvae", "vqvae", "hvae", "linear-gaussian"}
    for cls in MODELS.values():
        kinds = {p.kind for p in inspect.signature(cls).parameters.values()}
        assert inspect.Parameter.VAR_KEYWORD not in kinds, cls  # no hidden **kwargs


@pytest.mark.parametrize("name", sorted(SMALL))
def test_hparams_rebuild_the_same_model(name, digits):
    module = build(name, digits)
    hparams = json.loads(json.dumps(module.hparams))  # JSON-able, lists not tuples
    assert hparams == module.hparams
    rebuilt = MODELS[name](**hparams)
    assert rebuilt.hparams == module.hparams
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in module.state_dict().items()
    }


@pytest.mark.parametrize(
    "name,net",
    [(name, "mlp") for name in sorted(SMALL)] + [(name, "conv") for name in CONV_MODELS],
)
def test_trace_shapes_under_data_and_particle_plates(name, net, digits):
    conv = dict(net="conv", image_shape=digits.image_shape) if net == "conv" else {}
    module = build(name, digits, **conv).eval()
    x, y = val_batch(digits, N)
    with pyro.plate("particles", K, dim=-2):
        guide_trace = poutine.trace(module.guide).get_trace(x, y)
        model_trace = poutine.trace(poutine.replay(module.model, trace=guide_trace)).get_trace(x, y)
    guide_trace.compute_log_prob()
    model_trace.compute_log_prob()

    latents = {n: s for n, s in guide_trace.nodes.items() if n in LATENT_EVENT_SHAPES[name]}
    assert latent_names(guide_trace) == set(LATENT_EVENT_SHAPES[name])
    assert latent_names(model_trace) == set(LATENT_EVENT_SHAPES[name])
    for site_name, event_shape in LATENT_EVENT_SHAPES[name].items():
        value = latents[site_name]["value"]
        assert value.shape == (K, N, *event_shape), site_name
        assert torch.equal(model_trace.nodes[site_name]["value"], value)  # replayed
        # particles are independent draws, except for point-mass / one-hot guides
        assert torch.equal(value[0], value[1]) == (name in DETERMINISTIC_GUIDES)
    assert model_trace.nodes["x"]["value"].shape == (N, digits.input_dim)
    for trace in (guide_trace, model_trace):
        for site in trace.nodes.values():
            if site["type"] != "sample" or site_is_subsample(site):
                continue
            assert site["log_prob"].shape == (K, N), site["name"]
            frames = {f.name: f.size for f in site["cond_indep_stack"]}
            assert frames == {"particles": K, "data": N}, site["name"]
    if name != "ae":
        assert log_weights(module.model, module.guide, x, y, num_particles=K).shape == (K, N)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_a_few_epochs_on_digits_improve_the_objective(name, trained):
    run = trained(name)
    assert math.isfinite(run.after)
    assert run.after > run.before + 5.0, (run.before, run.after)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_checkpoint_round_trip_gives_identical_outputs(name, trained, digits):
    run = trained(name)
    checkpoint = load_checkpoint(run.run_dir / "checkpoint.pt")
    assert checkpoint["epoch"] == EPOCHS
    fresh = MODELS[name](**checkpoint["model"]["hparams"]).eval()
    x, y = val_batch(digits, 50)
    with torch.no_grad():
        assert not torch.allclose(fresh.reconstruct(x, y), run.module.reconstruct(x, y))
    restore_module(fresh, checkpoint)
    for key, value in run.module.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    with torch.no_grad():
        assert torch.equal(fresh.reconstruct(x, y), run.module.reconstruct(x, y))
        if name == "ae":
            return
        outputs = []
        for module in (run.module, fresh):
            pyro.set_rng_seed(7)
            labels = torch.arange(8) % 10 if name == "cvae" else None
            outputs.append(
                (
                    module.sample_prior(8, labels),
                    elbo(module.model, module.guide, x, y, num_particles=4),
                )
            )
    assert torch.equal(outputs[0][0], outputs[1][0])
    assert torch.equal(outputs[0][1], outputs[1][1])


# --- AE -----------------------------------------------------------------------------------------


def test_ae_is_refused_by_the_likelihood_estimators(digits):
    module = build("ae", digits).eval()
    x, _ = val_batch(digits, 10)
    message = r"no ELBO, IWAE bound or log p\(x\) exists"
    for estimator in (log_weights, iwae_bound):
        with pytest.raises(ContractError, match=message):
            estimator(module.model, module.guide, x, num_particles=2)
    with pytest.raises(ContractError, match=message):
        log_marginal(module.model, module.guide, x, num_samples=10)
    with pytest.raises(PPVAEError, match="no prior to sample from"):
        module.sample_prior(4)


def test_ae_training_loss_is_the_reconstruction_error(digits):
    """Flat prior + point-mass guide: −Trace_ELBO = −Σ log p(x | z = g(x)) exactly."""
    module = build("ae", digits, likelihood="bernoulli").eval()
    x, _ = val_batch(digits, 40)
    with torch.no_grad():
        logits = module.decoder(module.encoder(x))
        bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, x, reduction="sum")
        loss = Trace_ELBO().loss(module.model, module.guide, x)
        metrics = module.evaluation_metrics(x)
    assert loss == pytest.approx(float(bce), rel=1e-6)
    assert metrics["reconstruction_nll"] == pytest.approx(float(bce) / 40, rel=1e-6)


# --- VQ-VAE -------------------------------------------------------------------------------------


def _vq_traces(module, x):
    guide_trace = poutine.trace(module.guide).get_trace(x)
    model_trace = poutine.trace(poutine.replay(module.model, trace=guide_trace)).get_trace(x)
    return guide_trace, model_trace


def site_log_prob(trace, name: str) -> torch.Tensor:
    site = trace.nodes[name]
    return site["fn"].log_prob(site["value"])  # [N]


def _grads(output: torch.Tensor, module) -> dict[str, torch.Tensor]:
    named = dict(module.named_parameters())
    grads = torch.autograd.grad(output, list(named.values()), allow_unused=True, retain_graph=True)
    return {
        n: torch.zeros_like(p) if g is None else g
        for (n, p), g in zip(named.items(), grads, strict=True)
    }


def _vq_setup(digits, **overrides):
    module = build("vqvae", digits, commitment_beta=0.5, **overrides).eval()
    with torch.no_grad():  # codebook rows spread over the encoder outputs: several codes in use
        module.codebook.copy_(module.encoder_output(val_batch(digits, 16)[0]).reshape(-1, 3)[:16])
    x, _ = val_batch(digits, 20)
    guide_trace, model_trace = _vq_traces(module, x)
    codes = guide_trace.nodes["code"]["value"]  # [N, P]
    return module, x, codes, model_trace


def _last_encoder_bias(module) -> str:
    return f"encoder.{len(module.encoder) - 1}.bias"


def test_vqvae_straight_through_gradient_reaches_the_encoder(digits):
    module, x, codes, model_trace = _vq_setup(digits)
    assert len(codes.unique()) > 1
    reconstruction = site_log_prob(model_trace, "x").sum()
    grads = _grads(reconstruction, module)

    e = module.codebook[codes].detach().requires_grad_()  # [N, P, C]
    direct = observation_dist("bernoulli", module.decoder(e.flatten(-2))).log_prob(x).sum()
    (grad_e,) = torch.autograd.grad(direct, e)
    # the model's density is exactly p(x | e_k) ...
    assert torch.equal(reconstruction.detach(), direct.detach())
    # ... and the decoder's gradient with respect to its input reaches z_e unchanged:
    # z_e = W h + b, so d/db = Σ_n dlogp/dz_q[n]
    assert torch.allclose(grads[_last_encoder_bias(module)], grad_e.sum(0).flatten(), atol=1e-5)
    assert grads[_last_encoder_bias(module)].abs().sum() > 0
    assert torch.count_nonzero(grads["codebook"]) == 0  # the codebook learns from its own loss


def test_vqvae_codebook_loss_moves_only_the_codebook(digits):
    module, x, codes, model_trace = _vq_setup(digits)
    codebook_term = site_log_prob(model_trace, "codebook_loss")  # [N] = −‖sg[z_e] − e‖²
    with torch.no_grad():
        z_e = module.encoder_output(x)
        e = module.codebook[codes]
    assert torch.allclose(codebook_term, -((z_e - e) ** 2).sum((-2, -1)))
    grads = _grads(codebook_term.sum(), module)
    for name, grad in grads.items():
        if name != "codebook":
            assert torch.count_nonzero(grad) == 0, name
    # d/de_k Σ −‖z − e_k‖² = 2 Σ_{positions assigned to k} (z − e_k)
    expected = torch.zeros_like(module.codebook).index_add_(
        0, codes.reshape(-1), 2.0 * (z_e - e).reshape(-1, 3)
    )
    assert torch.allclose(grads["codebook"], expected, atol=1e-6)
    assert grads["codebook"].abs().sum() > 0


def test_vqvae_commitment_loss_moves_only_the_encoder(digits):
    module, x, codes, model_trace = _vq_setup(digits)
    commitment_term = site_log_prob(model_trace, "commitment_loss")  # −β‖z_e − sg[e]‖²
    with torch.no_grad():
        z_e = module.encoder_output(x)
        e = module.codebook[codes]
    assert torch.allclose(commitment_term, -0.5 * ((z_e - e) ** 2).sum((-2, -1)))
    grads = _grads(commitment_term.sum(), module)
    for name, grad in grads.items():
        if not name.startswith("encoder."):
            assert torch.count_nonzero(grad) == 0, name
    expected_bias = (-2.0 * 0.5 * (z_e - e)).sum(0).flatten()
    assert torch.allclose(grads[_last_encoder_bias(module)], expected_bias, atol=1e-5)


def test_vqvae_losses_train_but_stay_out_of_the_likelihood_bounds(digits):
    module, x, codes, model_trace = _vq_setup(digits)
    num_positions, codebook_size = codes.shape[1], module.codebook_size
    with torch.no_grad():
        log_lik = site_log_prob(model_trace, "x")  # [N]
        auxiliary = site_log_prob(model_trace, "codebook_loss") + site_log_prob(
            model_trace, "commitment_loss"
        )
        log_w_expected = log_lik - num_positions * math.log(codebook_size)
        loss = Trace_ELBO().loss(module.model, module.guide, x)
        log_w = log_weights(module.model, module.guide, x, num_particles=3)
        bound = iwae_bound(module.model, module.guide, x, num_particles=10)
    # Trace_ELBO sums the auxiliary factors into the training loss ...
    assert loss == pytest.approx(-float((log_w_expected + auxiliary).sum()), rel=1e-5)
    # ... log_weights skips them: log w = log p(x|e_k) + log p(k) − log q(k|x), log q = 0
    assert torch.allclose(log_w, log_w_expected.expand(3, -1), atol=1e-4)
    assert torch.allclose(bound, log_w_expected, atol=1e-4)  # a flat ladder: q is one-hot


def test_vqvae_ema_update_follows_the_formula(digits):
    decay = 0.8
    module = build("vqvae", digits, ema_decay=decay)
    assert "codebook" not in dict(module.named_parameters())
    x, _ = val_batch(digits, 30)
    codebook, counts, sums = (
        module.codebook.clone(),
        module.ema_counts.clone(),
        module.ema_sums.clone(),
    )
    with torch.no_grad():
        z_e = module.encoder_output(x).reshape(-1, 3)
        nearest = ((z_e[:, None, :] - codebook) ** 2).sum(-1).argmin(-1)
    module.eval()
    _vq_traces(module, x)  # evaluation: no update
    assert torch.equal(module.codebook, codebook)
    module.train()
    guide_trace, model_trace = _vq_traces(module, x)
    assert "codebook_loss" not in model_trace.nodes and "commitment_loss" in model_trace.nodes
    assert torch.equal(guide_trace.nodes["code"]["value"].reshape(-1), nearest)

    batch_counts = torch.bincount(nearest, minlength=16).float()
    batch_sums = torch.zeros(16, 3).index_add_(0, nearest, z_e)
    new_counts = decay * counts + (1 - decay) * batch_counts
    new_sums = decay * sums + (1 - decay) * batch_sums
    total = new_counts.sum()
    smoothed = (new_counts + 1e-5) / (total + 16 * 1e-5) * total
    assert torch.allclose(module.ema_counts, new_counts)
    assert torch.allclose(module.codebook, new_sums / smoothed[:, None], atol=1e-6)


def _collapsed_vqvae(digits, seed: int):
    """Code 0 at the origin, every other code far away: all positions pick code 0."""
    module = build("vqvae", digits, dead_code_restart=2).train()
    with torch.no_grad():
        module.codebook.fill_(1e3)
        module.codebook[0] = 0.0
    x, _ = val_batch(digits, 30)
    pyro.set_rng_seed(seed)
    return module, x


def _optimizer_step(module) -> None:
    """Stands in for an optimizer step between two training forwards: the encoder moves."""
    with torch.no_grad():
        module.encoder[-1].bias.add_(1e-3)


def test_vqvae_dead_codes_restart_onto_encoder_outputs(digits):
    module, x = _collapsed_vqvae(digits, seed=1)
    metrics = module.evaluation_metrics(x)
    assert metrics["codebook_usage"] == 1 / 16 and metrics["perplexity"] == pytest.approx(1.0)
    _vq_traces(module, x)  # step 1: codes 1..15 unused once
    assert module.steps_unused.tolist() == [0] + [1] * 15
    assert (module.codebook[1:] == 1e3).all()
    _vq_traces(module, x)  # the same forward again (another particle): not another step
    assert module.steps_unused.tolist() == [0] + [1] * 15
    _optimizer_step(module)
    _vq_traces(module, x)  # step 2: unused twice -> restarted
    assert module.steps_unused.tolist() == [0] * 16
    assert torch.equal(module.codebook[0], torch.zeros(3))
    with torch.no_grad():
        z_e = module.encoder_output(x).reshape(-1, 3)
    is_encoder_output = (module.codebook[1:, None, :] == z_e).all(dim=-1).any(dim=-1)
    assert is_encoder_output.all()  # each restarted code is a copy of an encoder output
    assert module.evaluation_metrics(x)["codebook_usage"] > 1 / 16

    again, x = _collapsed_vqvae(digits, seed=1)
    _vq_traces(again, x)
    _vq_traces(again, x)
    _optimizer_step(again)
    _vq_traces(again, x)
    assert torch.equal(again.codebook, module.codebook)  # deterministic given the seed


@pytest.mark.parametrize("ema_decay", [0.0, 0.8])
def test_vqvae_bookkeeping_counts_training_steps_not_particles(digits, ema_decay):
    module = build("vqvae", digits, dead_code_restart=1000, ema_decay=ema_decay)
    x, _ = val_batch(digits, 30)
    with torch.no_grad():
        module.codebook.fill_(1e3)  # code 0 at the origin takes every position: 1..15 unused
        module.codebook[0] = 0.0
        if ema_decay:
            module.ema_sums.copy_(module.codebook)
        z_e = module.encoder_output(x).reshape(-1, 3)
    # one step with three particles (Trace_ELBO calls the guide three times): one EMA update
    Trace_ELBO(num_particles=3).differentiable_loss(module.train().model, module.guide, x)
    assert module.steps_unused.tolist() == [0] + [1] * 15  # was [0] + [3] * 15
    if ema_decay:
        counts = torch.zeros(16).index_fill_(0, torch.tensor([0]), float(z_e.shape[0]))
        torch.testing.assert_close(module.ema_counts, ema_decay + (1 - ema_decay) * counts)
        torch.testing.assert_close(module.ema_sums[0], (1 - ema_decay) * z_e.sum(0))
    # fit: 2 epochs of 3 batches, 3 particles per step
    fit(
        module,
        x,
        loss=Trace_ELBO(num_particles=3),
        epochs=2,
        batch_size=10,
        lr=1e-3,
        device="cpu",
        progress=False,
    )
    assert module.steps_unused.tolist() == [0] + [1 + 6] * 15


def test_vqvae_usage_and_perplexity_when_every_code_is_used_once(digits):
    module = build("vqvae", digits, num_positions=1, codebook_size=16).eval()
    x, _ = val_batch(digits, 16)
    with torch.no_grad():
        module.codebook.copy_(module.encoder_output(x)[:, 0])  # code j is x_j's own output
    assert torch.equal(module.encode(x)[1][:, 0], torch.arange(16))
    metrics = module.evaluation_metrics(x)
    assert metrics["codebook_usage"] == 1.0
    assert metrics["perplexity"] == pytest.approx(16.0)


# --- CVAE ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_cvae(digits):
    module = build("cvae", digits, hidden=[64], latent_dim=4)
    fit(module, digits.train, epochs=30, lr=3e-3, batch_size=100, device="cpu", progress=False)
    return module.eval()


def test_cvae_samples_follow_their_label(trained_cvae, digits):
    class_means = torch.stack(
        [digits.train_x[digits.train_y == c].mean(0) for c in range(10)]
    )  # [10, D]
    labels = torch.arange(10).repeat_interleave(30)
    pyro.set_rng_seed(0)
    with torch.no_grad():
        samples = trained_cvae.sample_prior(len(labels), labels)
    predicted = torch.cdist(samples, class_means).argmin(dim=1)
    accuracy = float((predicted == labels).float().mean())
    assert accuracy > 0.6, accuracy  # chance is 0.1


def test_cvae_same_noise_different_labels_give_different_images(trained_cvae):
    with torch.no_grad():
        pyro.set_rng_seed(0)
        threes = trained_cvae.sample_prior(50, 3)
        pyro.set_rng_seed(0)
        threes_again = trained_cvae.sample_prior(50, torch.full((50,), 3))
        pyro.set_rng_seed(0)
        sevens = trained_cvae.sample_prior(50, 7)
    assert torch.equal(threes, threes_again)
    assert (threes - sevens).abs().mean() > 0.1


def test_cvae_rejects_missing_or_out_of_range_labels(digits):
    module = build("cvae", digits)
    x, y = val_batch(digits, 4)
    with pytest.raises(PPVAEError, match="needs labels"):
        module.guide(x, None)
    with pytest.raises(PPVAEError, match=r"labels must lie in 0\.\.9"):
        module.model(x, torch.tensor([0, 1, 2, 10]))


# --- HVAE ---------------------------------------------------------------------------------------


def test_hvae_iwae_ladder_is_ordered(trained, digits):
    """E[ELBO] < E[IWAE_10] < E[IWAE_100] <= log p(x), with shrinking steps [Burda et al., thm 1].

    Each rung uses its own independent particles (rungs read off shared particles are ordered
    by Jensen's inequality whatever the model), so the ordering is a statistical statement about
    the model's and guide's densities; the per-rung Monte Carlo error is about 0.003 nats.
    """
    module = trained("hvae").module
    x, _ = val_batch(digits)
    pyro.set_rng_seed(0)
    ladder = {}
    with torch.no_grad():
        for k in (1, 10, 100):  # mean of the k-sample bound over 1000 // k independent blocks
            log_w = log_weights(module.model, module.guide, x, num_particles=1000)  # [1000, N]
            blocks = log_w.reshape(1000 // k, k, -1)
            ladder[k] = float((torch.logsumexp(blocks, dim=1) - math.log(k)).mean())
        log_px, stderr = log_marginal(
            module.model, module.guide, x, num_samples=2000, return_stderr=True
        )
        elbo_mean = float(elbo(module.model, module.guide, x, num_particles=1000).mean())
        iwae_10 = float(iwae_bound(module.model, module.guide, x, num_particles=10).mean())
    steps = [ladder[10] - ladder[1], ladder[100] - ladder[10], float(log_px.mean()) - ladder[100]]
    assert steps[0] > 0.03 and steps[1] > 0.005 and steps[2] > -0.005, (ladder, steps)
    assert steps[0] > steps[1] > steps[2], steps  # diminishing returns in k
    assert abs(elbo_mean - ladder[1]) < 0.02  # the public estimators agree with the ladder
    assert abs(iwae_10 - ladder[10]) < 0.05
    assert torch.all(torch.isfinite(stderr)) and float(stderr.mean()) < 0.1


@pytest.mark.parametrize(
    "loss",
    [
        lambda: IWAE_ELBO(5),
        lambda: IWAE_ELBO(5, estimator="dreg"),
        lambda: KLWeighted_ELBO(beta=1.0, free_bits=0.1),  # z1: Monte Carlo KL, z2: closed form
    ],
    ids=["iwae", "dreg", "kl-weighted"],
)
def test_hvae_trains_with_the_iwae_dreg_and_kl_weighted_objectives(loss, digits):
    module = build("hvae", digits)
    test_x, _ = digits.split("test")

    def test_iwae_5() -> float:
        pyro.set_rng_seed(1)
        with torch.no_grad():
            return float(iwae_bound(module.model, module.guide, test_x, num_particles=5).mean())

    before = test_iwae_5()
    fit(module, digits.train, loss=loss(), epochs=3, lr=3e-3, device="cpu", progress=False)
    after = test_iwae_5()
    # measured -45.04 -> -27.85 (IWAE_5), -27.84 (DReG), -28.24 (KL-weighted, free bits 0.1)
    assert after > before + 12.0, (before, after)


def test_hvae_evaluation_report(trained, digits):
    evaluate = pytest.importorskip("ppvae.inference.evaluate").evaluate
    module = trained("hvae").module
    x, _ = val_batch(digits, 50)
    report = evaluate(module, x, num_samples=500, ladder=(1, 5, 50), progress=False, device="cpu")
    bounds = [report.ladder[k] for k in sorted(report.ladder)]
    assert sorted(report.ladder) == [1, 5, 50, 500]
    assert all(b > a for a, b in zip(bounds, bounds[1:], strict=False)), bounds
    assert report.gap == pytest.approx(report.log_px - report.elbo)
    assert report.gap > 0
