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
