"""``ppvae.Run``: a run directory as a library object, its typed configuration, and the rule that
nothing derived from a run writes over the training run's own files."""

import hashlib
import json

import pytest
import torch

import ppvae
from ppvae.cli import main
from ppvae.errors import PPVAEError
from ppvae.inference import fit
from ppvae.models import VAE
from ppvae.runs import Run, RunConfig

# 90 train / 10 val / 5 test points of digits, a small VAE with a 2-D latent space
TINY = dict(
    latent_dim=2,
    hidden=[16],
    epochs=1,
    limit=100,
    batch_size=50,
    test_fraction=0.05,
    eval_samples=5,
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run created and trained for one epoch through the Python API."""
    path = tmp_path_factory.mktemp("runs") / "run"
    run = Run.create(path, model="vae", **TINY)
    outcome = run.train(progress=False)
    return run, outcome


DERIVED = ("evaluations", "samples", "figures")


def _digest(folder) -> dict[str, str]:
    """sha256 of every file under ``folder`` except the folders of derived results."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
        and p.relative_to(folder).parts[0] not in ("evaluations", "samples", "figures")
    }


def test_round_trip_gives_the_same_config_and_module_outputs(trained):
    run, outcome = trained
    loaded = ppvae.load_run(run.path, device="cpu")
    assert loaded.config == run.config
    assert loaded.config.model_options == {
        "activation": "relu",
        "hidden": [16],
        "latent_dim": 2,
        "likelihood": "bernoulli",
        "net": "mlp",
    }
    assert json.loads((run.path / "config.json").read_text())["format"] == "ppvae-run-1"
    assert [m["epoch"] for m in loaded.metrics] == [1]
    assert loaded.report.to_dict() == outcome.report.to_dict()
    # the restored best checkpoint is the module training ended with (one epoch: best = last)
    x, _ = loaded.data.split("test")
    best, last = loaded.module, loaded.restore("last", "cpu")
    trained_module = run.restore("best", "cpu")
    with torch.no_grad():
        for module in (last, trained_module):
            for a, b in zip(best.encode(x), module.encode(x), strict=True):
                assert torch.equal(a, b)
    # the loaded run evaluates to the report training wrote (same seed, same draws)
    again = loaded.evaluate(num_samples=5, batch_size=50, folder=run.path.parent / "again")
    assert again.report.log_px == pytest.approx(outcome.report.log_px, abs=1e-5)
    assert again.report.elbo == pytest.approx(outcome.report.elbo, abs=1e-5)


def test_config_round_trips_through_json_and_reads_the_flat_layout():
    config = RunConfig.from_options(model="hvae", latent_dim2=3, beta=2, epochs=7)
    assert RunConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert config.beta == 2.0 and isinstance(config.beta, float)
    assert config.model_options["latent_dim2"] == 3 and "codebook_size" not in config.model_options
    # config.json as written before model_options: every model key at the top level, unset ones
    # null, and the run directory
    flat = {k: v for k, v in config.to_dict().items() if k not in ("format", "model_options")}
    flat.update(latent_dim2=3, codebook_size=None, run_dir="runs/x")
    legacy = RunConfig.from_dict(flat)
    assert legacy == config


@pytest.mark.parametrize(
    "options, cli, message",
    [
        ({"lr": -1}, ["--lr", "-1"], "--lr: expected a finite number > 0"),
        ({"lr": float("nan")}, ["--lr", "nan"], "--lr: expected a finite number > 0"),
        ({"epochs": 0}, ["--epochs", "0"], "--epochs: expected a positive integer"),
        ({"seed": -5}, ["--seed", "-5"], "--seed: expected an integer in [0, 2**32)"),
        ({"kl_warmup": -3}, ["--kl-warmup", "-3"], "--kl-warmup: expected an integer >= 0"),
        ({"val_fraction": 1.5}, ["--val-fraction", "1.5"], "strictly between 0 and 1"),
        (
            {"model": "vqvae", "ema_decay": 1.0},
            ["--model", "vqvae", "--ema-decay", "1"],
            "--ema-decay: expected a number in [0, 1)",
        ),
        (
            {"model": "vae", "codebook_size": 8},
            ["--model", "vae", "--codebook-size", "8"],
            "--codebook-size does not apply to --model vae",
        ),
        (
            {"objective": "iwae", "num_particles": 1},
            ["--objective", "iwae", "--num-particles", "1"],
            "pass --num-particles K >= 2",
        ),
    ],
)
def test_config_refuses_bad_values_with_the_cli_messages(options, cli, message, tmp_path, capsys):
    with pytest.raises(PPVAEError) as error:
        RunConfig.from_options(**options)
    assert message in str(error.value) and "\n" not in str(error.value)
    try:
        code = main(["train", "--run-dir", str(tmp_path / "run"), *cli])
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: [c], "holds list, not a run configuration"),
        (lambda c: {k: v for k, v in c.items() if k != "lr"}, "missing key(s) lr"),
        (lambda c: {**c, "colour": "red"}, "unknown key(s) 'colour'"),
        (lambda c: {**c, "seed": -5}, "--seed: expected an integer in [0, 2**32)"),
        (lambda c: {**c, "epochs": "3"}, "--epochs: expected a positive integer, got '3'"),
    ],
)
def test_hostile_config_files_get_one_line_naming_the_file(trained, edit, message, tmp_path):
    run, _ = trained
    config = json.loads((run.path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(edit(config)))
    with pytest.raises(PPVAEError) as error:
        Run.load(tmp_path)
    text = str(error.value)
    assert message in text and str(tmp_path / "config.json") in text and "\n" not in text
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(PPVAEError, match="is not JSON"):
        Run.load(tmp_path)


def test_fit_refuses_an_existing_run_unless_resumed_or_overwritten(digits, tmp_path):
    vae = VAE(digits.input_dim, latent_dim=2, hidden=(16,))
    x = (digits.train_x[:100] > 0.5).float()
    fit(vae, x, epochs=2, batch_size=50, run_dir=tmp_path, progress=False)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(PPVAEError, match=r"already holds a run; add --resume \(resume=True\)"):
        fit(vae, x, epochs=2, batch_size=50, run_dir=tmp_path, progress=False)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # nothing touched
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
    resumed = fit(vae, x, epochs=3, batch_size=50, run_dir=tmp_path, resume=True, progress=False)
    assert resumed.epochs_run == 3
    fresh = fit(vae, x, epochs=1, batch_size=50, run_dir=tmp_path, overwrite=True, progress=False)
    assert fresh.epochs_run == 1 and len((tmp_path / "metrics.jsonl").read_text().split("\n")) == 2
    with pytest.raises(PPVAEError, match="--run-dir is empty"):
        fit(vae, x, epochs=1, run_dir="", progress=False)


def test_create_refuses_an_existing_run_and_overwrite_replaces_it(trained, tmp_path):
    run, _ = trained
    with pytest.raises(PPVAEError, match="already holds a run"):
        Run.create(run.path, model="vae", **TINY)
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("config.json", "checkpoint.pt", "report.json"):
        (copy / name).write_bytes((run.path / name).read_bytes())
    (copy / "evaluations" / "test-K9").mkdir(parents=True)
    (copy / "notes.txt").write_text("mine")
    replaced = Run.create(copy, model="ae", overwrite=True, **TINY)
    assert sorted(p.name for p in copy.iterdir()) == [".lock", "config.json", "notes.txt"]
    assert Run.load(copy).config == replaced.config and replaced.config.model == "ae"


def test_resume_with_records_epochs_and_refuses_other_changes(trained, tmp_path):
    run, _ = trained
    with pytest.raises(PPVAEError, match=r"--batch-size, --latent-dim differ from the run being"):
        run.resume_with(latent_dim=3, batch_size=10, epochs=4)
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "config.json").write_bytes((run.path / "config.json").read_bytes())
    resumed = Run.load(copy).resume_with(epochs=4, latent_dim=2)  # an unchanged option is fine
    assert resumed.config.epochs == 4 and Run.load(copy).config.epochs == 4


def test_derived_commands_leave_the_training_run_byte_identical(trained, capsys):
    run, _ = trained
    before = _digest(run.path)
    commands = [
        ["evaluate", str(run.path), "--num-samples", "7", "--no-progress"],
        ["evaluate", str(run.path), "--num-samples", "5", "--checkpoint", "last", "--no-progress"],
        ["sample", str(run.path), "--num", "4"],
        ["plot", str(run.path)],
    ]
    printed = []
    for argv in commands:
        assert main(argv) == 0
        printed.append(capsys.readouterr().out)
    assert _digest(run.path) == before
    assert str(run.path / "evaluations" / "test-K7") in printed[0]
    assert (run.path / "evaluations" / "test-K5-last" / "report.json").is_file()
    assert str(run.path / "samples" / "samples.png") in printed[2]
    assert str(run.path / "figures" / "best" / "latent_map.png") in printed[3]
    # the training run's report was evaluated with K=5; the derived one says K=7
    report = json.loads((run.path / "evaluations" / "test-K7" / "report.json").read_text())
    assert report["num_samples"] == 7 and run.report.num_samples == 5
