import json
import os
import signal
import subprocess
import sys
import time

import pyro
import pyro.distributions as dist
import pyro.optim
import pytest
import torch
from conftest import REPO, requires_cuda
from pyro.nn import PyroModule, PyroParam, pyro_method
from torch.distributions import constraints

import ppvae.inference.train as train
from ppvae.checkpoint import load_checkpoint, restore_module
from ppvae.data import DynamicBinarization
from ppvae.errors import DivergenceError, PPVAEError
from ppvae.inference import fit
from ppvae.inference.train import check_training_data, read_metrics, validation_elbo
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


def test_divergence_stops_and_keeps_last_good_checkpoint(digits, tmp_path, recwarn):
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
    assert not [w for w in recwarn if "Encountered" in str(w.message)]  # only the one error


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
def test_training_on_cuda_matches_cpu(digits):
    """The same run on CUDA and on the CPU: the same objective (the trained CUDA model's
    deterministic outputs and exact-guide log-weights agree with the CPU's) and statistically the
    same training curve (different random streams, so not bit-equal)."""
    from ppvae.inference import log_weights
    from ppvae.models import LinearGaussian

    val_x, val_y = digits.split("val")
    final = {}
    for device in ("cpu", "cuda"):
        module = _vae(digits)
        result = fit(
            module,
            digits.train,
            validation=(val_x, val_y),
            epochs=5,
            seed=0,
            device=device,
            progress=False,
        )
        assert next(module.parameters()).device.type == device
        final[device] = (result.history[-1]["val_elbo"], module)
    assert abs(final["cuda"][0] - final["cpu"][0]) < 1.5  # nats per digit, after 5 epochs

    module = final["cuda"][1]
    with torch.no_grad():
        on_cuda = module.reconstruct(val_x[:200].cuda()).cpu()
        on_cpu = module.cpu().reconstruct(val_x[:200])
    torch.testing.assert_close(on_cuda, on_cpu, atol=1e-4, rtol=1e-4)

    torch.manual_seed(0)
    exact = LinearGaussian(5, 2, noise_scale=0.5, guide_family="exact").double()
    x = torch.randn(50, 5, dtype=torch.float64)
    reference = exact.exact_log_marginal(x).detach()
    exact.cuda()
    with torch.no_grad():
        log_w = log_weights(exact.model, exact.guide, x.cuda(), num_particles=64, chunk_size=16)
    torch.testing.assert_close(log_w.cpu(), reference.expand(64, -1), atol=1e-8, rtol=0)
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


class _PyroModuleVAE(PyroModule):
    """A user's ``PyroModule`` with a constrained (positive) and an unconstrained ``PyroParam``."""

    def __init__(self, input_dim, latent_dim=3):
        super().__init__()
        self.latent_dim = latent_dim
        self.encoder = PyroModule[torch.nn.Linear](input_dim, latent_dim)
        self.decoder = PyroModule[torch.nn.Linear](latent_dim, input_dim)
        self.guide_scale = PyroParam(
            torch.full((latent_dim,), 0.5), constraint=constraints.positive
        )
        self.guide_shift = PyroParam(torch.zeros(latent_dim))

    def model(self, x, y=None):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(self.latent_dim), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)

    @pyro_method
    def guide(self, x, y=None):
        with pyro.plate("data", x.shape[0]):
            loc = self.encoder(x) + self.guide_shift
            pyro.sample("z", dist.Normal(loc, self.guide_scale).to_event(1))


def _svi_case(digits, kind):
    torch.manual_seed(0)
    if kind == "pyro-module":
        return _PyroModuleVAE(digits.input_dim)
    if kind == "plain-pyro-module":
        return _PlainPyroVAE(digits.input_dim)
    return VAE(digits.input_dim, latent_dim=4, hidden=(32,))


@pytest.mark.filterwarnings("ignore:TraceEnum_ELBO found no sample sites")
@pytest.mark.parametrize(
    "kind, objective",
    [
        ("zoo", "trace"),
        ("plain-pyro-module", "trace"),
        ("pyro-module", "trace"),
        ("zoo", "enum"),
        ("zoo", "iwae"),
        ("zoo", "dreg"),
        ("pyro-module", "dreg"),
    ],
)
def test_svi_step_reproduces_pyro_svi(digits, kind, objective):
    """ppvae's training step (fused optimizer, param-store shortcut, Pyro's checks on the first
    step only) performs the same updates as ``pyro.infer.SVI`` with the same objective."""
    from pyro.infer import SVI, Trace_ELBO, TraceEnum_ELBO

    from ppvae.inference import IWAE_ELBO
    from ppvae.inference.svi_step import SVIStep

    def loss():
        return {
            "trace": Trace_ELBO,
            "enum": lambda: TraceEnum_ELBO(max_plate_nesting=1),
            "iwae": lambda: IWAE_ELBO(3),
            "dreg": lambda: IWAE_ELBO(3, estimator="dreg"),
        }[objective]()

    x = (digits.train_x[:200] > 0.5).float()
    batches = [x[i : i + 40] for i in range(0, 200, 40)] * 3
    reference = _svi_case(digits, kind)
    pyro.clear_param_store()
    svi = SVI(reference.model, reference.guide, pyro.optim.Adam({"lr": 1e-2}), loss())
    pyro.set_rng_seed(7)
    reference_losses = [svi.step(b) for b in batches]

    ours = _svi_case(digits, kind)
    pyro.clear_param_store()
    step = SVIStep(ours, loss(), pyro.optim.Adam({"lr": 1e-2}), (batches[0], None))
    pyro.set_rng_seed(7)
    our_losses = [float(step.step(b, None)) for b in batches]

    assert our_losses == pytest.approx(reference_losses, rel=1e-5)
    for (name, p), q in zip(ours.named_parameters(), reference.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-5), name
    assert reference_losses[-1] < reference_losses[0] - 5  # it trained: the comparison has teeth


def test_dreg_refuses_a_module_whose_parameters_are_not_pyro_params(digits):
    from ppvae.errors import ContractError
    from ppvae.inference import IWAE_ELBO
    from ppvae.inference.svi_step import SVIStep

    class Unregistered(_PlainPyroVAE):  # no pyro.module: DReG could not find the guide's params
        def model(self, x, y=None):
            with pyro.plate("data", x.shape[0]):
                z = pyro.sample("z", dist.Normal(x.new_zeros(self.latent_dim), 1.0).to_event(1))
                pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)

        def guide(self, x, y=None):
            with pyro.plate("data", x.shape[0]):
                loc, raw = self.encoder(x).chunk(2, dim=-1)
                scale = torch.nn.functional.softplus(raw)
                pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    x = (digits.train_x[:40] > 0.5).float()
    module = Unregistered(digits.input_dim)
    with pytest.raises(ContractError, match="pyro.module"):
        SVIStep(module, IWAE_ELBO(3, estimator="dreg"), pyro.optim.Adam({"lr": 1e-2}), (x, None))
    SVIStep(module, IWAE_ELBO(3), pyro.optim.Adam({"lr": 1e-2}), (x, None))  # reparam: fine


def test_an_error_mid_step_leaves_validation_flags_as_they_were(digits):
    from pyro.infer import Trace_ELBO

    from ppvae.inference.svi_step import SVIStep

    class Failing(_PlainPyroVAE):
        def check_data(self, x):  # a zoo-like model: Pyro's checks on the first step only
            pass

        def guide(self, x, y=None):
            if self.fail:
                raise RuntimeError("boom")
            super().guide(x, y)

    x = (digits.train_x[:40] > 0.5).float()
    module = Failing(digits.input_dim)
    module.fail = False
    step = SVIStep(module, Trace_ELBO(), pyro.optim.Adam({"lr": 1e-2}), (x, None))
    step.step(x, None)
    for pyro_flag, torch_flag in ((True, True), (True, False), (False, False)):
        pyro.enable_validation(pyro_flag)
        torch.distributions.Distribution.set_default_validate_args(torch_flag)
        module.fail = True
        with pytest.raises(RuntimeError, match="boom"):
            step.step(x, None)
        assert pyro.infer.is_validation_enabled() is pyro_flag
        assert torch.distributions.Distribution._validate_args is torch_flag
    pyro.enable_validation(True)


@pytest.mark.parametrize(
    "model, kind, bad",
    [
        ("vae", "tensor", float("nan")),
        ("vae", "tensor", 0.5),  # a grey value under a Bernoulli likelihood
        ("vae", "pair", float("inf")),
        ("vae", "epoch-object", float("nan")),
        ("plain", "tensor", float("nan")),  # no check_data: a NaN/inf check
    ],
)
def test_bad_value_in_last_training_point_is_refused_before_writing(
    digits, tmp_path, model, kind, bad
):
    x, y = digits.split("train")
    x = x.clone()
    x[-1, 5] = bad
    if kind == "epoch-object":
        grey = digits.train_x.clone()
        grey[-1, 5] = bad
        with pytest.raises(PPVAEError, match="NaN/inf"):
            DynamicBinarization(grey, y)  # refused where it is built ...
        data = DynamicBinarization(digits.train_x.clone(), y)
        data.x[-1, 5] = bad  # ... and by fit, if the values go bad afterwards
    else:
        data = x if kind == "tensor" else (x, y)
    module = _vae(digits) if model == "vae" else _PlainPyroVAE(digits.input_dim)
    run_dir = tmp_path / "run"
    with pytest.raises(PPVAEError, match="NaN/inf|binary data") as info:
        fit(module, data, epochs=1, batch_size=100, run_dir=run_dir, progress=False)
    assert not isinstance(info.value, DivergenceError)
    assert "\n" not in str(info.value)
    assert not run_dir.exists()
    with pytest.raises(PPVAEError, match="NaN/inf|binary data"):
        check_training_data(module, data)  # the same checks, for the CLI to run first


class _PoisonedAdam(torch.optim.Adam):
    """Adam that fills its first parameter with ``value`` after its ``poison_at``-th step."""

    def __init__(self, params, lr, poison_at, value):
        super().__init__(params, lr=lr)
        self.poison_at, self.value, self.steps = poison_at, value, 0

    def step(self, closure=None):
        loss = super().step(closure)
        self.steps += 1
        if self.steps == self.poison_at:
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(self.value)
        return loss


@pytest.mark.parametrize(
    "value, with_validation",
    [
        (float("nan"), True),
        (float("nan"), False),
        (1e37, True),  # finite parameters, NaN (a Pyro ValueError) in the validation ELBO
    ],
)
def test_nan_on_last_step_of_an_epoch_is_a_divergence(
    digits, tmp_path, recwarn, value, with_validation
):
    import pyro.optim

    x = digits.split("train")[0]
    steps_per_epoch = -(-x.shape[0] // 200)
    poison = {"lr": 1e-3, "poison_at": 2 * steps_per_epoch, "value": value}
    optimizer = pyro.optim.PyroOptim(_PoisonedAdam, poison)
    with pytest.raises(
        DivergenceError,
        match=rf"diverged at epoch 2, step {steps_per_epoch} \(.*NaN.*\).*checkpoint\.pt",
    ):
        fit(
            _vae(digits),
            x,
            optimizer=optimizer,
            epochs=4,
            batch_size=200,
            validation=digits.split("val") if with_validation else None,
            run_dir=tmp_path,
            progress=False,
        )
    for name in ("checkpoint.pt", "checkpoint-best.pt"):
        checkpoint = load_checkpoint(tmp_path / name)
        assert checkpoint["epoch"] == 1
        assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values())
    assert [r["epoch"] for r in read_metrics(tmp_path)] == [1]
    assert not [w for w in recwarn if "Encountered" in str(w.message)]


def test_resume_survives_a_cut_off_metrics_line(digits, tmp_path, monkeypatch):
    writes = []
    atomic_write_text = train.atomic_write_text
    monkeypatch.setattr(
        train,
        "atomic_write_text",
        lambda text, path: writes.append(path.name) or atomic_write_text(text, path),
    )
    fit(_vae(digits), digits.train, epochs=2, run_dir=tmp_path, progress=False)
    assert writes == ["metrics.jsonl"] * 3  # the whole file, atomically, at start and per epoch
    with open(tmp_path / "metrics.jsonl", "a") as handle:
        handle.write('{"epoch": 3, "train_lo')  # a write killed half-way
    assert [r["epoch"] for r in read_metrics(tmp_path)] == [1, 2]
    result = fit(
        _vae(digits), digits.train, epochs=3, run_dir=tmp_path, resume=True, progress=False
    )
    assert [r["epoch"] for r in result.history] == [1, 2, 3]
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]


def test_read_metrics_refuses_a_broken_line_before_the_last(tmp_path):
    assert read_metrics(tmp_path / "missing.jsonl") == []
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"epoch": 1, "train_loss": 3.5}\n\n{"epoch": 2, "tr\n{"epoch": 3}\n')
    with pytest.raises(PPVAEError, match=r"metrics\.jsonl line 3 is not a JSON record"):
        read_metrics(path)
    path.write_text('{"epoch": 1, "train_loss": 3.5}\n{"epoch": 2, "tr\n\n')
    assert read_metrics(path) == [{"epoch": 1, "train_loss": 3.5}]


def test_resume_without_new_epochs_is_refused(digits, tmp_path):
    fit(_vae(digits), digits.train, epochs=2, run_dir=tmp_path, progress=False)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    for epochs in (1, 2):
        with pytest.raises(PPVAEError, match=r"already has 2 epochs.*larger epochs \(--epochs\)"):
            fit(
                _vae(digits),
                digits.train,
                epochs=epochs,
                run_dir=tmp_path,
                resume=True,
                progress=False,
            )
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_fit_result_counts_the_epochs_of_this_call(digits, tmp_path):
    first = fit(_vae(digits), digits.train, epochs=2, run_dir=tmp_path, progress=False)
    assert (first.epochs_this_call, first.epochs_run, first.resumed_from_epoch) == (2, 2, 0)
    resumed = fit(
        _vae(digits), digits.train, epochs=3, run_dir=tmp_path, resume=True, progress=False
    )
    assert (resumed.epochs_this_call, resumed.epochs_run, resumed.resumed_from_epoch) == (1, 3, 2)


def test_bad_values_in_later_loader_batches_are_found(digits):
    """A loader is checked batch by batch: by the module's check_data for the zoo, by Pyro's
    support checks on every step for a model without one (the default)."""
    x = (digits.split("train")[0][:400] > 0.5).float()
    x[200:] = 0.5  # outside the Bernoulli support, but not in the first batch
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=100)
    with pytest.raises(PPVAEError, match="binary data"):
        fit(_vae(digits), loader, epochs=1, progress=False)
    with pytest.raises(ValueError, match="support"):
        fit(_PlainPyroVAE(digits.input_dim), loader, epochs=1, progress=False)
