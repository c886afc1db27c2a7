"""``ppvae anomaly`` and ``ppvae denoise``: thin layers over ppvae.applications (the numbers they
write are the library's for the same seed), their files, and one-line errors with exit code 2."""

from __future__ import annotations

import contextlib
import csv
import io
import json

import numpy as np
import pytest
import torch

from ppvae.applications import anomaly_scores, purification_table
from ppvae.cli import main
from ppvae.runs import load_run


def _run(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("apps") / "run"
    argv = ["train", "--run-dir", str(run), "--epochs", "8", "--latent-dim", "4"]
    argv += ["--hidden", "64", "--lr", "0.003", "--eval-samples", "20", "--no-progress"]
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(argv) == 0
    return run


def test_anomaly_writes_the_library_scores_and_metrics(run_dir, capsys):
    code, out, err = _run(
        ["anomaly", str(run_dir), "--anomalous-labels", "1", "--num-samples", "30"]
        + ["--likelihood-ratio", "--background-epochs", "2", "--no-progress"],
        capsys,
    )
    assert code == 0, err
    folder = run_dir / "anomaly" / "digits-test"
    assert {p.name for p in folder.iterdir()} == {
        "scores.csv",
        "scores.json",
        "histograms.png",
        "roc.png",
    }
    document = json.loads((folder / "scores.json").read_text())
    run = load_run(run_dir)
    x, y = run.data.split("test")
    with open(folder / "scores.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(x) == len(document["labels"])
    assert [int(r["label"]) for r in rows] == y.tolist()
    # the CLI's -log p(x), -ELBO and complexity are the library's with the same seed
    expected = anomaly_scores(run.module, x, num_samples=30, image_shape=(1, 8, 8), seed=0)
    for name in ("neg_log_marginal", "neg_elbo", "reconstruction", "complexity"):
        written = torch.tensor([float(r[name]) for r in rows], dtype=torch.float64)
        assert torch.allclose(written, getattr(expected, name), rtol=1e-5, atol=1e-5), name
    metrics = document["metrics"]
    assert set(metrics) == {
        "neg_log_marginal",
        "neg_elbo",
        "reconstruction",
        "likelihood_ratio",
        "complexity",
    }
    assert 0 <= metrics["likelihood_ratio"]["auroc"] <= 1
    assert "AUROC" in out and "likelihood_ratio" in out


def test_anomaly_scores_a_file_and_refuses_bad_inputs(run_dir, tmp_path, capsys):
    generator = torch.Generator().manual_seed(0)
    binary = torch.bernoulli(torch.full((6, 64), 0.3), generator=generator)
    x = torch.cat([torch.zeros(6, 64), binary]).numpy()
    np.savez(tmp_path / "odd.npz", x=x.reshape(12, 8, 8), y=np.repeat([0, 1], 6))
    code, out, err = _run(
        ["anomaly", str(run_dir), "--data", str(tmp_path / "odd.npz"), "--num-samples", "20"]
        + ["--anomalous-labels", "1", "--compressor", "zlib", "--out", str(tmp_path / "o")],
        capsys,
    )
    assert code == 0, err
    metrics = json.loads((tmp_path / "o" / "scores.json").read_text())["metrics"]
    # random binary images are far less likely and far more complex than blank ones
    assert metrics["neg_log_marginal"]["auroc"] == 1.0
    np.save(tmp_path / "grey.npy", np.full((4, 64), 0.5, dtype=np.float32))
    np.save(tmp_path / "wide.npy", np.zeros((4, 65), dtype=np.float32))
    for argv, message in [
        (["--data", str(tmp_path / "grey.npy")], "likelihood at x: the bernoulli likelihood"),
        (["--data", str(tmp_path / "wide.npy")], "65 values per input"),
        (["--data", str(tmp_path / "grey.npy"), "--anomalous-labels", "1"], "no labels"),
        (["--data", str(tmp_path / "none.npy")], "does not exist"),
    ]:
        code, out, err = _run(["anomaly", str(run_dir), *argv], capsys)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    code, _, err = _run(
        ["anomaly", str(run_dir), "--data", str(tmp_path / "grey.npy"), "--binarize-file"]
        + ["--num-samples", "5", "--compressor", "none", "--out", str(tmp_path / "g")],
        capsys,
    )
    assert code == 0, err
    code, _, err = _run(["anomaly", str(tmp_path / "nowhere")], capsys)
    assert code == 2 and "does not exist" in err


def test_denoise_writes_the_library_table(run_dir, capsys):
    code, out, err = _run(
        ["denoise", str(run_dir), "--num", "40", "--num-particles", "40", "--no-progress"],
        capsys,
    )
    assert code == 0, err
    folder = run_dir / "denoise" / "digits-test"
    table = json.loads((folder / "table.json").read_text())
    run = load_run(run_dir)
    x = run.data.split("test")[0][:40]
    rows, examples = purification_table(
        run.module, x, image_shape=(1, 8, 8), num_particles=40, seed=0
    )
    assert table["rows"] == json.loads(json.dumps(rows))
    # a Bernoulli run cannot weigh grey noisy inputs: that pair is skipped, with the reason
    skipped = [(r["corruption"], r["method"]) for r in rows if "skipped" in r]
    assert skipped == [("gaussian-noise", "importance")]
    assert len(rows) == 3 + 3 + 4 + 4
    assert len(list(folder.glob("*.png"))) == len(examples) == 13
    assert "skipped" in out and "PSNR" in out
    # imputation of binary digits at half the pixels missing beats leaving them blank
    impute = next(
        r for r in rows if r["corruption"] == "missing-pixels" and "impute" == r["method"]
    )
    assert impute["mse_after"] < impute["mse_before"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--level", "blur=2"], "expected CORRUPTION=VALUE"),
        (["--level", "occlusion=2"], "corruption level 2.0 out of range"),
        (["--corruptions", "blur"], "invalid choice"),
    ],
)
def test_denoise_bad_options_exit_2(run_dir, argv, message, capsys):
    code, _, err = _run(["denoise", str(run_dir), "--num", "4", *argv], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
