import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO

from ppvae.checkpoint import load_checkpoint
from ppvae.cli import build_parser, main

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


def _run(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", "--run-dir", str(run), *FAST]) == 0
    return run


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
    metrics = [
        json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()
    ]
    assert [m["epoch"] for m in metrics] == [1, 2, 3]


def test_evaluate_sample_and_plot_commands(trained_run, capsys):
    code, out, _ = _run(
        ["evaluate", str(trained_run), "--num-samples", "20", "--split", "val", "--no-progress"],
        capsys,
    )
    assert code == 0 and "log p(x)" in out
    assert json.loads((trained_run / "report.json").read_text())["num_points"] == 144
    code, out, _ = _run(
        ["sample", str(trained_run), "--num", "5", "--out", str(trained_run / "s.npy")], capsys
    )
    samples = np.load(trained_run / "s.npy")
    assert code == 0 and samples.shape == (5, 64) and 0 <= samples.min() <= samples.max() <= 1
    code, _, err = _run(["sample", str(trained_run), "--label", "3"], capsys)
    assert code == 2 and "conditional model" in err
    code, out, _ = _run(["plot", str(trained_run)], capsys)
    assert code == 0 and "latent_map.png" in out


def test_help_documents_every_option():
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices
    for name, command in sub.items():
        text = command.format_help()
        for action in command._actions:
            for flag in action.option_strings:
                assert flag in text, (name, flag)
            assert action.help, (name, action.dest)


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


def test_missing_mnist_names_data_dir(tmp_path, capsys):
    code, _, err = _run(["train", "--dataset", "mnist", "--data-dir", str(tmp_path), *FAST], capsys)
    assert code == 2 and "--data-dir" in err and len(err.strip().splitlines()) == 1


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
    (other / "config.json").write_text(json.dumps({**config, "latent_dim": 3}))
    (other / "checkpoint.pt").write_bytes((trained_run / "checkpoint.pt").read_bytes())
    code, _, err = _run(["evaluate", str(other)], capsys)
    assert code == 2 and "latent_dim=2" in err and "latent_dim=3" in err
    (other / "checkpoint.pt").write_bytes(b"not a checkpoint")
    code, _, err = _run(["evaluate", str(other)], capsys)
    assert code == 2 and "corrupt" in err


def test_cli_resume_matches_straight_run(tmp_path):
    args = ["--hidden", "32", "--latent-dim", "2", "--eval-samples", "10", "--no-progress"]
    assert main(["train", "--run-dir", str(tmp_path / "a"), "--epochs", "4", *args]) == 0
    assert main(["train", "--run-dir", str(tmp_path / "b"), "--epochs", "2", *args]) == 0
    assert (
        main(
            [
                "train",
                "--run-dir",
                str(tmp_path / "b"),
                "--epochs",
                "4",
                "--resume",
                "--no-progress",
            ]
        )
        == 0
    )
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
