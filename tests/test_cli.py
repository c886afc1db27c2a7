import contextlib
import io
import json
import math
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO

from ppvae.checkpoint import load_checkpoint
from ppvae.cli import build_parsers, main
from ppvae.data import load_data
from ppvae.models import MODELS

FAST = [
    "--epochs",
    "3",
    "--hidden",
    "32",
    "--latent-dim",
    "2",
    "--eval-samples",
    "50",
    "--no-progress",
]


# a tiny run: 90 train / 10 val / 90 test points of digits, two SVI steps per epoch
SMALL = [
    "--epochs",
    "2",
    "--limit",
    "100",
    "--batch-size",
    "50",
    "--test-fraction",
    "0.05",
    "--eval-samples",
    "5",
    "--no-progress",
]


def _run(argv, capsys):
    """Exit code (also of an argparse exit), stdout and stderr of ``ppvae ARGV``."""
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def _metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A trained run directory and what 'ppvae train' printed."""
    run = tmp_path_factory.mktemp("cli") / "run"
    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert main(["train", "--run-dir", str(run), *FAST]) == 0
    return run, out.getvalue()


@pytest.fixture(scope="module")
def trained_run(trained):
    return trained[0]


def test_train_writes_run_and_reports_consistent_numbers(trained_run):
    names = {p.name for p in trained_run.iterdir()}
    assert {
        "config.json",
        "checkpoint.pt",
        "checkpoint-best.pt",
        "metrics.jsonl",
        "report.json",
        "reconstructions.png",
        "samples.png",
        "training_curves.png",
        "latent_map.png",
        "manifold_grid.png",
    } <= names
    report = json.loads((trained_run / "report.json").read_text())
    # log p(x) >= ELBO on average, and the gap is their difference
    assert report["log_px"] >= report["elbo"]
    assert report["gap"] == pytest.approx(report["log_px"] - report["elbo"], abs=1e-6)
    assert report["num_points"] == 359
    assert [m["epoch"] for m in _metrics(trained_run)] == [1, 2, 3]


def test_train_summary_names_train_val_and_test_numbers(trained):
    run, out = trained
    rows = {line.split("  ")[1].strip(): line for line in out.splitlines() if line.startswith("  ")}
    last = _metrics(run)[-1]
    report = json.loads((run / "report.json").read_text())
    assert "3 trained now, 3 in total" in rows["epochs"]
    assert f"{-last['train_loss']:.3f} (−train loss per point" in rows["train ELBO"]
    assert "val ELBO" in rows and f"{report['elbo']:.3f}" in rows["test ELBO"]
    assert f"{report['log_px']:.3f} (K=50)" in rows["test log p(x)"]
    assert f"{report['gap']:.3f} nats" in rows["ELBO gap"]


def test_evaluate_sample_and_plot_commands(trained_run, capsys):
    code, out, _ = _run(
        ["evaluate", str(trained_run), "--num-samples", "20", "--split", "val", "--no-progress"],
        capsys,
    )
    assert code == 0 and "log p(x)" in out
    # the evaluation is written beside the training run's report, which stays as it was
    folder = trained_run / "evaluations" / "val-K20"
    assert json.loads((folder / "report.json").read_text())["num_points"] == 144
    assert json.loads((trained_run / "report.json").read_text())["num_points"] == 359
    assert str(folder) in out
    code, out, _ = _run(
        ["sample", str(trained_run), "--num", "5", "--out", str(trained_run / "s.npy")], capsys
    )
    samples = np.load(trained_run / "s.npy")
    assert code == 0 and samples.shape == (5, 64) and 0 <= samples.min() <= samples.max() <= 1
    code, _, err = _run(["sample", str(trained_run), "--label", "3"], capsys)
    assert code == 2 and "conditional model" in err
    code, out, _ = _run(["plot", str(trained_run)], capsys)
    assert code == 0 and "latent_map.png" in out


def test_sample_out_creates_folders_and_refuses_unknown_suffixes(trained_run, tmp_path, capsys):
    out = tmp_path / "missing" / "dir" / "x.png"
    code, stdout, _ = _run(["sample", str(trained_run), "--num", "4", "--out", str(out)], capsys)
    assert code == 0 and str(out) in stdout
    assert out.read_bytes().startswith(b"\x89PNG")
    for name in ("s.txt", "no-suffix"):
        code, _, err = _run(["sample", str(trained_run), "--out", str(tmp_path / name)], capsys)
        assert code == 2 and ".png, .npy" in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / name).exists()


def test_plot_skips_a_cut_off_last_metrics_line(trained_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(lines) + '\n{"epoch": 4, "train_lo')
    code, out, err = _run(["plot", str(run)], capsys)
    assert code == 0 and "training_curves.png" in out, err
    assert (run / "figures" / "best" / "training_curves.png").exists()
    # a broken line before the end is not a killed write: a one-line error
    (run / "metrics.jsonl").write_text("\n".join(["{oops", *lines]) + "\n")
    code, _, err = _run(["plot", str(run)], capsys)
    assert code == 2 and "line 1" in err and len(err.strip().splitlines()) == 1


def test_help_documents_every_option():
    for name, command in build_parsers()[1].items():
        text = command.format_help()
        for action in command._actions:
            for flag in action.option_strings:
                assert flag in text, (name, flag)
            assert action.help, (name, action.dest)
            if action.option_strings and action.dest != "help":
                assert "default" in action.help, (name, action.dest)


def _option_blocks(help_text: str) -> dict[str, str]:
    """``--flag`` -> its usage and help text, from the options part of ``--help``."""
    blocks: dict[str, str] = {}
    flag = None
    for line in help_text.splitlines():
        if line.startswith("  -"):
            flag = line.split()[0].rstrip(",")
            blocks[flag] = line
        elif line.startswith("    ") and flag is not None:
            blocks[flag] += " " + line.strip()
        else:
            flag = None
    return blocks


def test_train_help_shows_every_default(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "100")
    code, out, _ = _run(["train", "--help"], capsys)
    assert code == 0
    blocks = _option_blocks(out)
    train = build_parsers()[1]["train"]
    for action in train._actions:
        if action.dest == "help":
            continue
        block = " ".join(blocks[action.option_strings[0]].split())
        assert "(default: " in block or "; default: " in block, block
        if not any(action.default is value for value in (None, True, False)):
            assert f"default: {action.default}" in block, block
    # model options default per model, read off the constructors
    assert "8 for ae, cvae, vae; 16 for hvae, vqvae; 2 for linear-gaussian" in " ".join(
        blocks["--latent-dim"].split()
    )
    assert "relu for ae, cvae, hvae, vae, vqvae" in " ".join(blocks["--activation"].split())


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--no-such-option"], "unrecognized arguments: --no-such-option"),
        (["train", "--binarize", "sometimes"], "invalid choice"),
        (["train", "--val-fraction", "1.5"], "strictly between 0 and 1"),
    ],
)
def test_bad_options_exit_2_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and message in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--lr", "-1"], "--lr: expected a finite number > 0"),
        (["--lr", "nan"], "--lr: expected a finite number > 0"),
        (["--lr", "inf"], "--lr: expected a finite number > 0"),
        (["--beta", "-1"], "--beta: expected a finite number >= 0"),
        (["--free-bits", "-1"], "--free-bits: expected a finite number >= 0"),
        (["--kl-warmup", "-3"], "--kl-warmup: expected an integer >= 0"),
        (["--epochs", "0"], "--epochs: expected a positive integer"),
        (["--seed", "-1"], "--seed: expected an integer in [0, 2**32)"),
        (["--model", "vqvae", "--ema-decay", "1"], "--ema-decay: expected a number in [0, 1)"),
        (["--objective", "iwae", "--beta", "2"], "--beta"),
        (["--objective", "iwae", "--num-particles", "1"], "--num-particles"),
        # objectives that cannot train the model fail before the run directory exists
        (["--model", "ae", "--objective", "iwae", "--num-particles", "2"], "--model ae"),
        (["--model", "vqvae", "--objective", "iwae", "--num-particles", "5"], "--model vqvae"),
        (["--model", "vqvae", "--beta", "2"], "--model vqvae"),
    ],
)
def test_bad_numeric_options_exit_2_and_write_nothing(argv, message, tmp_path, capsys):
    run = tmp_path / "run"
    code, out, err = _run(["train", "--run-dir", str(run), "--hidden", "8", *SMALL, *argv], capsys)
    assert code == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1 and not out
    assert not run.exists()


def test_every_split_is_checked_before_anything_is_written(tmp_path, capsys):
    # grey values only in rows of the test split: the training and validation splits pass the
    # Bernoulli likelihood's check, the test split (evaluated after training) does not
    split = {"binarize": "none", "val_fraction": 0.1, "test_fraction": 0.2, "seed": 0}
    np.save(tmp_path / "index.npy", np.arange(200.0)[:, None].repeat(3, axis=1) / 1000)
    test_x = load_data(str(tmp_path / "index.npy"), **split).test_x
    test_rows = np.round(test_x[:, 0].numpy() * 1000).astype(int)
    x = (np.arange(200)[:, None] % 2).repeat(3, axis=1).astype(float)
    x[test_rows, 0] = 0.5
    np.save(tmp_path / "x.npy", x)
    run = tmp_path / "run"
    code, _, err = _run(
        ["train", "--run-dir", str(run), "--dataset", str(tmp_path / "x.npy")]
        + ["--binarize", "none", "--seed", "0", *FAST],
        capsys,
    )
    assert code == 2 and "binary data" in err and len(err.strip().splitlines()) == 1
    assert not run.exists()


def test_bad_data_exit_2_and_write_nothing(tmp_path, capsys):
    cases = {
        "nan.npy": (np.array([[0.5, np.nan]] * 10), ["--binarize", "none"], "NaN/inf"),
        "wide.npy": (np.full((10, 3), 2.0), ["--binarize", "none"], r"needs values in [0, 1]"),
        "grey.npy": (np.full((10, 3), 0.5), ["--binarize", "none"], "binary data"),
        "flat.npy": (np.arange(10.0), [], "expected [N, features]"),
    }
    for name, (array, extra, message) in cases.items():
        np.save(tmp_path / name, array)
        run = tmp_path / f"run-{name}"
        code, _, err = _run(
            ["train", "--dataset", str(tmp_path / name), "--run-dir", str(run), *extra, *FAST],
            capsys,
        )
        assert code == 2, name
        assert message in err and len(err.strip().splitlines()) == 1, err
        assert not run.exists()


def test_missing_mnist_names_data_dir_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    code, _, err = _run(["train", "--dataset", "mnist", "--data-dir", "data", *FAST], capsys)
    assert code == 2 and "--data-dir" in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == [tmp_path / "data"]
    assert not any((tmp_path / "data").iterdir())


def test_resume_checks_and_foreign_checkpoints(trained_run, tmp_path, capsys):
    code, _, err = _run(["train", "--run-dir", str(trained_run), *FAST], capsys)
    assert code == 2 and "--resume" in err
    code, _, err = _run(
        ["train", "--run-dir", str(trained_run), "--resume", "--latent-dim", "5", "--epochs", "4"],
        capsys,
    )
    assert code == 2 and "--latent-dim differ" in err
    # a run whose config names another architecture than its checkpoint
    other = tmp_path / "other"
    other.mkdir()
    config = json.loads((trained_run / "config.json").read_text())
    options = {**config["model_options"], "latent_dim": 3}
    (other / "config.json").write_text(json.dumps({**config, "model_options": options}))
    (other / "checkpoint.pt").write_bytes((trained_run / "checkpoint.pt").read_bytes())
    code, _, err = _run(["evaluate", str(other)], capsys)
    assert code == 2 and "latent_dim=2" in err and "latent_dim=3" in err
    (other / "checkpoint.pt").write_bytes(b"not a checkpoint")
    code, _, err = _run(["evaluate", str(other)], capsys)
    assert code == 2 and "corrupt" in err


def test_cli_resume_matches_straight_run(tmp_path, capsys):
    args = ["--hidden", "32", "--latent-dim", "3", "--limit", "300", "--test-fraction", "0.05"]
    args += ["--eval-samples", "5", "--no-progress"]
    assert main(["train", "--run-dir", str(tmp_path / "a"), "--epochs", "4", *args]) == 0
    assert main(["train", "--run-dir", str(tmp_path / "b"), "--epochs", "2", *args]) == 0
    capsys.readouterr()
    code, out, _ = _run(
        ["train", "--run-dir", str(tmp_path / "b"), "--epochs", "4", "--resume", "--no-progress"],
        capsys,
    )
    assert code == 0
    assert "2 trained now after resuming at epoch 2, 4 in total" in out
    a = load_checkpoint(tmp_path / "a" / "checkpoint.pt")["state_dict"]
    b = load_checkpoint(tmp_path / "b" / "checkpoint.pt")["state_dict"]
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6), name


def test_console_script_entry_point_runs():
    out = subprocess.run(
        [sys.executable, "-m", "ppvae", "train", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "--data-dir" in out and "PPVAE_DATA" in out


# every model of the zoo, each with one of the objective options
MODEL_RUNS = {
    "ae": [],
    "vae": ["--beta", "2", "--kl-warmup", "3", "--free-bits", "0.1"],
    "cvae": ["--objective", "mean-field"],
    "hvae": ["--objective", "iwae-dreg", "--num-particles", "5"]
    + ["--latent-dim2", "2", "--hidden2", "8"],
    "linear-gaussian": ["--objective", "iwae", "--num-particles", "5"],
    "vqvae": ["--codebook-size", "8", "--num-positions", "2"],
}


def test_every_model_has_a_cli_run():
    assert set(MODEL_RUNS) == set(MODELS)


@pytest.mark.parametrize("name", sorted(MODEL_RUNS))
def test_train_every_model_from_the_cli(name, tmp_path, capsys):
    run = tmp_path / "run"
    network = [] if name == "linear-gaussian" else ["--hidden", "16"]
    argv = ["train", "--model", name, "--run-dir", str(run), "--latent-dim", "2", *network]
    code, out, err = _run([*argv, *SMALL, *MODEL_RUNS[name]], capsys)
    assert code == 0, err
    config = json.loads((run / "config.json").read_text())
    report = json.loads((run / "report.json").read_text())
    metrics = _metrics(run)
    assert config["model"] == name and [m["epoch"] for m in metrics] == [1, 2]
    assert report["num_points"] == 90 and "2 trained now, 2 in total" in out
    if name == "ae":  # a point-mass guide: no bound at all, reconstruction error instead
        assert not report["likelihood_available"] and "no likelihood bound" in report["note"]
        assert report["log_px"] is None and report["elbo"] is None
        assert 0 < report["reconstruction_mse"] < 1 and report["extra"]["reconstruction_nll"] > 0
        assert all("val_loss" in m and "val_elbo" not in m for m in metrics)
        assert "recon MSE" in out and "train loss" in out
        assert "test ELBO" not in out and "test log p(x)" not in out and "ELBO gap" not in out
        return
    assert all(math.isfinite(m["val_elbo"]) for m in metrics)
    if name == "vqvae":  # one-hot codes: every bound is the ELBO, no log p(x) estimate or gap
        assert report["point_mass_sites"] == ["code"]
        assert report["log_px"] == pytest.approx(report["elbo"], rel=1e-6)
        assert 0 < report["extra"]["codebook_usage"] <= 1
        assert 1 <= report["extra"]["perplexity"] <= 8
        assert "test log p(x)" not in out and "ELBO gap" not in out
        assert "codebook usage" in out and "perplexity" in out and "train objective" in out
        return
    assert report["log_px"] >= report["elbo"]
    assert report["gap"] == pytest.approx(report["log_px"] - report["elbo"], abs=1e-6)
    assert "test log p(x)" in out and "ELBO gap" in out
    if name == "vae":
        assert (config["beta"], config["kl_warmup"], config["free_bits"]) == (2.0, 3, 0.1)
        assert [m["kl_weight"] for m in metrics] == pytest.approx([2 / 3, 4 / 3])
        assert "train weighted ELBO" in out
    if name in ("hvae", "linear-gaussian"):
        assert config["objective"] == ("iwae-dreg" if name == "hvae" else "iwae")
        assert config["num_particles"] == 5 and "train IWAE bound (K=5)" in out
    if name == "cvae":
        assert config["objective"] == "mean-field"
        code, stdout, err = _run(["sample", str(run), "--label", "3", "--num", "4"], capsys)
        assert code == 0, err
        assert (run / "samples" / "samples_label3.png").read_bytes().startswith(b"\x89PNG")
        assert "samples_label3.png" in stdout


def test_version_matches_the_package_metadata(capsys):
    import importlib.metadata

    import ppvae

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"ppvae {ppvae.__version__}"
    assert ppvae.__version__ == importlib.metadata.version("ppvae")
    out = subprocess.run(
        [sys.executable, "-m", "ppvae", "--version"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.strip() == f"ppvae {ppvae.__version__}"
