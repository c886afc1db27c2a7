"""``ppvae compare``: one table and one figure for several runs, on the same test points."""

import json

import pytest
import torch

from ppvae.cli import main
from ppvae.inference.evaluate import subset_points
from ppvae.inference.regularity import continuity
from ppvae.runs import Run


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    for model in ("vae", "ae"):
        Run.create(root / model, model=model, epochs=4, eval_samples=10).train(progress=False)
    return root


def test_compare_prints_one_table_and_writes_numbers_and_figure(runs, tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", str(runs / "vae"), str(runs / "ae"), "--num-samples", "10"]
    code = main([*argv, "--eval-points", "100", "--out", str(out), "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 0
    table = [line for line in printed.splitlines() if line.startswith("  ")][1:]  # after names
    rows = {line.split("  ")[1].strip(): line.split() for line in table}
    assert rows["test points"][-2:] == ["100", "100"]
    assert rows["ELBO"][-1] == "n/a" and float(rows["ELBO"][-2]) < 0  # no bound for the AE
    assert rows["active units"][-3:] == ["of", "8", "n/a"]  # a count for the VAE, none for the AE
    assert "point-mass encoder" in printed  # why the AE's KL terms are missing
    numbers = json.loads((out / "compare.json").read_text())
    assert set(numbers) == {"vae", "ae"} and (out / "compare.png").stat().st_size > 0
    # the numbers are the library's on the same seeded subset of the test split
    vae = Run.load(runs / "vae")
    x, _ = subset_points(*vae.data.split("test"), 100, 0)
    expected = continuity(vae.module, x.to(next(vae.module.parameters()).device))
    assert numbers["vae"]["continuity"]["detour"] == pytest.approx(expected.detour)
    assert numbers["vae"]["report"]["num_points"] == 100
    surgery = numbers["vae"]["elbo_surgery"]
    assert surgery["mutual_information"] + surgery["marginal_kl"] == pytest.approx(
        surgery["average_kl"]
    )
    assert numbers["ae"]["elbo_surgery"]["mutual_information"] == pytest.approx(
        float(torch.log(torch.tensor(100.0)))
    )


def test_compare_refuses_a_folder_that_is_not_a_run(runs, tmp_path, capsys):
    code = main(["compare", str(runs / "vae"), str(tmp_path), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "not a ppvae run directory" in err and len(err.strip().splitlines()) == 1


# --- the other CLI pieces of issue 12 -------------------------------------------------------------


def test_eval_points_reach_the_report_of_train_and_evaluate(tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train", "--run-dir", str(run), "--epochs", "1", "--eval-samples", "5"]
    assert main([*argv, "--eval-points", "50", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((run / "report.json").read_text())
    assert (report["num_points"], report["split_points"]) == (50, 359)
    assert "50 of 359 (seeded subset)" in printed
    assert json.loads((run / "config.json").read_text())["eval_points"] == 50
    argv = ["evaluate", str(run), "--num-samples", "5", "--eval-points", "30", "--no-progress"]
    assert main(argv) == 0
    report = json.loads((run / "evaluations" / "test-K5-N30" / "report.json").read_text())
    assert (report["num_points"], report["split_points"]) == (30, 359)
    assert "30 of 359 (seeded subset, seed 0)" in capsys.readouterr().out


def test_vqvae_codebook_usage_reads_as_codes_used(tmp_path, capsys):
    argv = ["train", "--model", "vqvae", "--run-dir", str(tmp_path / "vq"), "--epochs", "1"]
    assert main([*argv, "--eval-samples", "2", "--no-progress"]) == 0
    row = [line for line in capsys.readouterr().out.splitlines() if "codebook usage" in line][0]
    report = json.loads((tmp_path / "vq" / "report.json").read_text())
    usage = report["extra"]["codebook_usage"]
    assert f"{round(usage * 64)} of 64 codes ({100 * usage:.0f} %)" in row  # measured: 6 of 64
    # no bound ladder, gap or k-hat figures for a one-hot guide; plot says what it leaves out
    assert not (tmp_path / "vq" / "bound_ladder.png").exists()
    assert main(["plot", str(tmp_path / "vq")]) == 0
    printed = capsys.readouterr().out
    assert "ppvae: no latent map: latent site 'code' is discrete" in printed
    assert "samples.png" in printed and "latent_map.png" not in printed


def test_a_collapsed_run_prints_a_warning_with_the_fix(tmp_path, capsys):
    argv = ["train", "--run-dir", str(tmp_path / "c"), "--epochs", "3", "--beta", "50"]
    assert main([*argv, "--eval-samples", "2", "--no-progress"]) == 0
    err = capsys.readouterr().err
    report = json.loads((tmp_path / "c" / "report.json").read_text())
    assert report["active_units"] == 0  # measured: a KL weight of 50 switches every unit off
    assert "posterior collapse: 0 of 8 latent units are active" in err and "--free-bits" in err


def test_model_training_defaults_fill_options_not_given():
    from ppvae.runs.config import RunConfig

    assert RunConfig.from_options(model="hvae").epochs == 100
    assert RunConfig.from_options(model="hvae", epochs=3).epochs == 3
    assert RunConfig.from_options(model="linear-gaussian").lr == 0.01
    assert RunConfig.from_options(model="vae").epochs == 50
