import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO, requires_cuda

from ppvae.checkpoint import load_checkpoint, restore_module
from ppvae.errors import DivergenceError, PPVAEError
from ppvae.inference import fit
from ppvae.inference.train import validation_elbo
from ppvae.models import VAE


def _vae(digits, seed=0):
    torch.manual_seed(seed)
    return VAE(digits.input_dim, latent_dim=4, hidden=(64,))


def test_training_raises_validation_elbo(digits):
    module = _vae(digits)
    val_x, val_y = digits.split("val")
    torch.manual_seed(0)
    before = validation_elbo(module, val_x, val_y, batch_size=500, num_particles=10)
    result = fit(module, digits.train, validation=(val_x, val_y), epochs=5, seed=0, progress=False)
    after = [r["val_elbo"] for r in result.history]
    # an untrained decoder costs about 64 log 2 = 44 nats per 8x8 image
    assert before < -40
    assert after[-1] > before + 10
    assert after[-1] > after[0]
    assert result.best_val_elbo == max(after)


def _params(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_resume_reproduces_uninterrupted_run(digits, tmp_path):
    val = digits.split("val")
    straight = _vae(digits)
    fit(
        straight,
        digits.train,
        validation=val,
        epochs=4,
        seed=3,
        run_dir=tmp_path / "a",
        progress=False,
    )

    first = _vae(digits)
    fit(
        first,
        digits.train,
        validation=val,
        epochs=2,
        seed=3,
        run_dir=tmp_path / "b",
        progress=False,
    )
    resumed = _vae(digits, seed=99)  # different init: everything must come from the checkpoint
    result = fit(
        resumed,
        digits.train,
        validation=val,
        epochs=4,
        run_dir=tmp_path / "b",
        resume=True,
        progress=False,
    )
    assert result.resumed_from_epoch == 2 and [r["epoch"] for r in result.history] == [1, 2, 3, 4]
    for name, value in _params(straight).items():
        assert torch.allclose(value, _params(resumed)[name], atol=1e-6), name
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3, 4]
    assert load_checkpoint(tmp_path / "b" / "checkpoint.pt")["epoch"] == 4


def test_divergence_stops_and_keeps_last_good_checkpoint(digits, tmp_path):
    module = _vae(digits)

    def poison(record):
        if record["epoch"] == 2:
            with torch.no_grad():
                module.decoder[0].weight.fill_(float("nan"))

    with pytest.raises(DivergenceError, match=r"diverged at epoch 3, step 1.*checkpoint\.pt"):
        fit(
            module,
            digits.train,
            validation=digits.split("val"),
            epochs=5,
            run_dir=tmp_path,
            progress=False,
            on_epoch_end=poison,
        )
    checkpoint = load_checkpoint(tmp_path / "checkpoint.pt")
    assert checkpoint["epoch"] == 2
    assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values())


def test_bad_checkpoints_are_refused(digits, tmp_path):
    module = _vae(digits)
    fit(module, digits.train, epochs=1, run_dir=tmp_path, progress=False)
    other = VAE(digits.input_dim, latent_dim=5, hidden=(64,))
    with pytest.raises(
        PPVAEError, match=r"holds VAE\(.*latent_dim=4.*this run builds VAE\(.*latent_dim=5"
    ):
        restore_module(other, load_checkpoint(tmp_path / "checkpoint.pt"))
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes((tmp_path / "checkpoint.pt").read_bytes()[:500])
    with pytest.raises(PPVAEError, match="corrupt or not a ppvae checkpoint"):
        load_checkpoint(corrupt)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(PPVAEError, match="not a ppvae checkpoint"):
        load_checkpoint(foreign)


def _train_cmd(run_dir, epochs, *extra):
    return [
        sys.executable,
        "-m",
        "ppvae",
        "train",
        "--run-dir",
        str(run_dir),
        "--epochs",
        str(epochs),
        "--batch-size",
        "10",
        "--hidden",
        "64",
        "--latent-dim",
        "4",
        "--eval-samples",
        "10",
        "--no-progress",
        "--seed",
        "5",
        *extra,
    ]


@pytest.mark.slow
def test_killed_run_resumes_losing_at_most_the_current_epoch(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    killed = tmp_path / "killed"
    process = subprocess.Popen(
        _train_cmd(killed, 200),
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    metrics = killed / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    time.sleep(0.2)  # land somewhere inside an epoch
    process.send_signal(signal.SIGKILL)
    process.wait()
    completed = len(metrics.read_text().splitlines())
    saved = load_checkpoint(killed / "checkpoint.pt")["epoch"]
    assert completed - 1 <= saved <= completed and saved >= 2  # at most one epoch lost
    target = saved + 2
    subprocess.run(
        _train_cmd(killed, target, "--resume"), cwd=REPO, env=env, check=True, capture_output=True
    )
    subprocess.run(
        _train_cmd(tmp_path / "straight", target),
        cwd=REPO,
        env=env,
        check=True,
        capture_output=True,
    )
    a = load_checkpoint(killed / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "straight" / "checkpoint.pt")
    assert a["epoch"] == b["epoch"] == target
    for name in b["state_dict"]:
        assert torch.allclose(a["state_dict"][name], b["state_dict"][name], atol=1e-6), name


@requires_cuda
def test_training_on_cuda_matches_cpu_objective(digits):
    module = _vae(digits)
    result = fit(
        module,
        digits.train,
        validation=digits.split("val"),
        epochs=3,
        device="cuda",
        progress=False,
    )
    assert next(module.parameters()).is_cuda
    assert result.history[-1]["val_elbo"] > result.history[0]["val_elbo"]
    assert result.history[-1]["val_elbo"] > -40


class _PlainPyroVAE(torch.nn.Module):
    """A user's model: plain ``pyro.module`` (not ppvae's ``register_module``)."""

    def __init__(self, input_dim, latent_dim=3):
        super().__init__()
        self.latent_dim = latent_dim
        self.encoder = torch.nn.Linear(input_dim, 2 * latent_dim)
        self.decoder = torch.nn.Linear(latent_dim, input_dim)

    def model(self, x, y=None):
        import pyro
        import pyro.distributions as dist

        pyro.module("plain", self)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(self.latent_dim), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)

    def guide(self, x, y=None):
        import pyro
        import pyro.distributions as dist

        pyro.module("plain", self)
        with pyro.plate("data", x.shape[0]):
            loc, raw = self.encoder(x).chunk(2, dim=-1)
            pyro.sample("z", dist.Normal(loc, torch.nn.functional.softplus(raw)).to_event(1))


@pytest.mark.parametrize("kind", ["zoo", "plain-pyro-module"])
def test_svi_step_reproduces_pyro_svi(digits, kind):
    """ppvae's training step (fused optimizer, param-store shortcut, Pyro's checks on the first
    step only) performs the same updates as ``pyro.infer.SVI`` with ``Trace_ELBO``."""
    import pyro
    import pyro.optim
    from pyro.infer import SVI, Trace_ELBO

    from ppvae.inference.svi_step import SVIStep

    def build():
        torch.manual_seed(0)
        if kind == "zoo":
            return VAE(digits.input_dim, latent_dim=4, hidden=(32,))
        return _PlainPyroVAE(digits.input_dim)

    x = (digits.train_x[:200] > 0.5).float()
    batches = [x[i : i + 40] for i in range(0, 200, 40)] * 3
    reference = build()
    pyro.clear_param_store()
    svi = SVI(reference.model, reference.guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    pyro.set_rng_seed(7)
    reference_losses = [svi.step(b) for b in batches]

    ours = build()
    pyro.clear_param_store()
    step = SVIStep(ours, Trace_ELBO(), pyro.optim.Adam({"lr": 1e-2}), (batches[0], None))
    pyro.set_rng_seed(7)
    our_losses = [float(step.step(b, None)) for b in batches]

    assert our_losses == pytest.approx(reference_losses, rel=1e-5)
    for (name, p), q in zip(ours.named_parameters(), reference.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-5), name
    assert reference_losses[-1] < reference_losses[0] - 5  # it trained: the comparison has teeth
