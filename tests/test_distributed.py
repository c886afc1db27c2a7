"""Training and evaluation in a process group of two gloo ranks on the CPU (DESIGN §7).

One ``torchrun --nproc_per_node 2`` job (this file run as a script: :func:`_worker`) trains and
evaluates once, then kills a rank in the middle of a last run; the tests compare what each rank
saved with each other and with one process, and read how the job ended.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import pyro
import pytest
import torch
import torch.distributed as dist

from ppvae import cli
from ppvae.data import load_data
from ppvae.errors import PPVAEError
from ppvae.inference import distributed, evaluate, fit
from ppvae.inference import train as train_module
from ppvae.models.ae import AE
from ppvae.models.vae import VAE
from ppvae.runs import load_run

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")
TRAIN_POINTS = 310  # global batch 2 × 25: six full global batches and a last one of 10 points
PER_RANK_BATCH, EPOCHS = 25, 3
EVAL_POINTS, EVAL_BATCH, EVAL_SAMPLES, EVAL_SEED = 130, 20, 64, 3  # 7 batches: 4 + 3 per rank
TIMEOUT_S = 30  # the process group's timeout in the jobs


def _splits():
    return load_data("digits", limit=TRAIN_POINTS, seed=0)


def _fit(module, splits, batch_size: int, **kwargs):
    return fit(
        module,
        splits.train,  # dynamic binarisation: epoch e's draw from (seed, e)
        batch_size=batch_size,
        epochs=kwargs.pop("epochs", EPOCHS),
        lr=3e-3,
        validation=splits.split("val"),
        device="cpu",
        progress=False,
        seed=0,
        **kwargs,
    )


def _ae(splits) -> AE:
    torch.manual_seed(0)
    return AE(splits.input_dim, latent_dim=4, hidden=(32,))


def _vae(splits) -> VAE:
    torch.manual_seed(0)
    return VAE(splits.input_dim, latent_dim=4, hidden=(32,))


def _evaluate(module, splits):
    x, _ = splits.split("test")
    return evaluate(
        module,
        x[:EVAL_POINTS],
        num_samples=EVAL_SAMPLES,
        batch_size=EVAL_BATCH,
        seed=EVAL_SEED,
        device="cpu",
        progress=False,
    )


def _state(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# --------------------------------------------------------------------- the jobs (torchrun)


def _count_writes() -> dict[str, int]:
    """Wrap fit's file writers so a rank can tell how often it called them."""
    counts = {"history": 0, "checkpoint": 0}
    for name, key in (("_write_history", "history"), ("_save_epoch", "checkpoint")):
        original = getattr(train_module, name)

        def counted(*args, _original=original, _key=key, **kwargs):
            counts[_key] += 1
            return _original(*args, **kwargs)

        setattr(train_module, name, counted)
    return counts


def _train_job(out: Path) -> None:
    splits = _splits()
    rank = distributed.rank()
    counts = _count_writes()
    saved: dict = {"world_size": distributed.world_size()}
    ae = _ae(splits)
    saved["ae_history"] = _fit(ae, splits, PER_RANK_BATCH).history
    saved["ae"] = _state(ae)
    resumed, full = out / "vae-resumed", out / "vae-full"
    _fit(_vae(splits), splits, PER_RANK_BATCH, epochs=EPOCHS - 1, run_dir=resumed)
    vae = _vae(splits)  # a new process would build it anew
    saved["resume_from"] = _fit(vae, splits, PER_RANK_BATCH, run_dir=resumed, resume=True)
    saved["resume_from"] = saved["resume_from"].resumed_from_epoch
    saved["vae_resumed"] = _state(vae)
    vae = _vae(splits)
    saved["vae_history"] = _fit(vae, splits, PER_RANK_BATCH, run_dir=full).history
    saved["vae"] = _state(vae)
    saved["writes"] = dict(counts)
    saved["report"] = _evaluate(vae, splits).to_dict()
    torch.save(saved, out / f"rank{rank}.pt")


CLI_RUN = ["--limit", "200", "--latent-dim", "2", "--hidden", "16", "--batch-size", "25"]
CLI_RUN += ["--eval-samples", "8", "--eval-points", "40", "--device", "cpu", "--no-progress"]


CLI_EVALUATE = ["--num-samples", "16", "--eval-points", "50", "--batch-size", "10"]
CLI_EVALUATE += ["--device", "cpu", "--no-progress"]


def _cli_job(out: Path) -> None:
    """``ppvae train`` in the group (as ``torchrun -m ppvae train`` runs it), then ``--resume``."""
    run_dir = str(out / "cli-run")
    for epochs, more in (("1", []), ("2", ["--resume"])):
        code = cli.main(["train", "--run-dir", run_dir, "--epochs", epochs, *more, *CLI_RUN])
        assert code == 0, code
    assert cli.main(["evaluate", run_dir, *CLI_EVALUATE]) == 0


def _kill_job(out: Path) -> None:
    """Rank 1 dies (``os._exit``, no message, as an OOM kill would) in the middle of epoch 2."""
    splits = _splits()
    vae = _vae(splits)
    state = {"epoch": 1, "guide_calls": 0}
    guide = vae.guide

    def dying_guide(*args, **kwargs):
        if state["epoch"] == 2 and distributed.rank() == 1:
            state["guide_calls"] += 1
            if state["guide_calls"] == 3:
                os._exit(1)
        return guide(*args, **kwargs)

    vae.guide = dying_guide
    on_epoch_end = lambda record: state.update(epoch=record["epoch"] + 1)
    _fit(vae, splits, PER_RANK_BATCH, run_dir=out / "run", on_epoch_end=on_epoch_end)


def _worker(out: str) -> int:
    """Train and evaluate (saving what each rank holds), then kill rank 1 in a last run."""
    distributed.init_from_environment(timeout=timedelta(seconds=TIMEOUT_S))
    _train_job(Path(out))
    _cli_job(Path(out))
    tic = time.perf_counter()
    try:
        _kill_job(Path(out))
    except PPVAEError as error:
        print(f"ppvae train: error: {error}", file=sys.stderr)
        seconds = time.perf_counter() - tic
        (Path(out) / "killed.json").write_text(json.dumps({"seconds": seconds}))
        return 2  # no destroy_process_group: it would wait for the dead rank
    return 0


def _torchrun(out: Path, timeout: float) -> subprocess.CompletedProcess:
    command = [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "--monitor-interval", "2"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [*command, __file__, str(out)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=environment,
        cwd=REPO,
    )


# -------------------------------------------------------------------------------- the tests


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    out = tmp_path_factory.mktemp("distributed")
    finished = _torchrun(out, timeout=600)
    assert (out / "rank0.pt").exists() and (out / "rank1.pt").exists(), finished.stderr[-3000:]
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    return out, ranks, finished


@pytest.fixture(scope="module")
def splits():
    return _splits()


@contextmanager
def _one_rank_group(folder: Path):
    """A process group of this process alone: evaluate seeds its batches as in any group. One
    torch thread, as in the torchrun workers (OMP_NUM_THREADS=1): the same summation order, so
    the comparison can be exact whatever thread count the test process has."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
        torch.set_num_threads(threads)


def _max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def test_parameters_are_identical_on_every_rank(job):
    _, (rank0, rank1), _ = job
    assert rank0["world_size"] == rank1["world_size"] == 2
    for name in ("ae", "vae", "vae_resumed"):
        assert rank0[name].keys() == rank1[name].keys()
        for key in rank0[name]:
            assert torch.equal(rank0[name][key], rank1[name][key]), (name, key)
    assert rank0["vae_history"] == rank1["vae_history"]  # rank 0's record on every rank


def test_only_rank_0_writes(job):
    out, (rank0, rank1), _ = job
    assert rank1["writes"] == {"history": 0, "checkpoint": 0}
    assert rank0["writes"]["checkpoint"] == 2 * EPOCHS  # the resumed run's and the full run's
    records = [json.loads(line) for line in (out / "vae-full" / "metrics.jsonl").open()]
    assert [r["epoch"] for r in records] == list(range(1, EPOCHS + 1))


def test_two_processes_match_one_process_with_the_same_global_batch(job, splits):
    """The autoencoder's loss has no noise, so two ranks of batch 25 take the steps of one process
    of batch 50 (the last global batch: 5 + 5 points) up to float rounding."""
    _, (rank0, _), _ = job
    ae = _ae(splits)
    history = _fit(ae, splits, 2 * PER_RANK_BATCH).history
    assert _max_difference(_state(ae), rank0["ae"]) < 1e-6  # measured 4.5e-8
    for one, two in zip(history, rank0["ae_history"], strict=True):
        assert two["train_loss"] == pytest.approx(one["train_loss"], rel=1e-6)
        assert two["val_loss"] == pytest.approx(one["val_loss"], rel=1e-5)
    assert history[-1]["train_loss"] < history[0]["train_loss"] - 1.0  # it trained


def test_two_process_vae_matches_one_process_to_monte_carlo_tolerance(job, splits):
    """The VAE's latent draws differ (each rank has its own stream), so only the validation ELBO
    after training is compared, to a tolerance."""
    _, (rank0, _), _ = job
    history = _fit(_vae(splits), splits, 2 * PER_RANK_BATCH).history
    # measured: 0.42 nats apart after 3 epochs; each epoch gains about 2.5 nats
    assert rank0["vae_history"][-1]["val_elbo"] == pytest.approx(history[-1]["val_elbo"], abs=1.0)


def test_resume_under_two_processes_repeats_the_uninterrupted_run(job):
    out, (rank0, rank1), _ = job
    for rank in (rank0, rank1):
        assert rank["resume_from"] == EPOCHS - 1
        for key in rank["vae"]:
            assert torch.equal(rank["vae_resumed"][key], rank["vae"][key]), key
    resumed = [json.loads(line) for line in (out / "vae-resumed" / "metrics.jsonl").open()]
    for a, b in zip(resumed, rank0["vae_history"], strict=True):
        assert (a["train_loss"], a["val_elbo"]) == (b["train_loss"], b["val_elbo"])


def test_sharded_evaluation_equals_unsharded(job, splits, tmp_path):
    _, (rank0, rank1), _ = job
    assert rank0["report"] == rank1["report"]
    sharded = rank0["report"]
    vae = _vae(splits)
    vae.load_state_dict(rank0["vae"])
    with _one_rank_group(tmp_path):
        one_rank = _evaluate(vae, splits).to_dict()
    # the same batches with the same draws: equal up to float summation order
    for name, values in sharded["per_point"].items():
        if name == "ladder":
            continue
        assert len(values) == EVAL_POINTS, name
        assert values == pytest.approx(one_rank["per_point"][name], rel=1e-9, nan_ok=True), name
    assert sharded["log_px"] == pytest.approx(one_rank["log_px"], rel=1e-12)
    # one process without a group: the same points, other draws (Monte Carlo tolerance)
    plain = _evaluate(vae, splits).to_dict()
    stderr = sharded["log_px_stderr"]
    assert abs(sharded["log_px"] - plain["log_px"]) < 4 * math.sqrt(2) * stderr
    assert sharded["elbo"] == pytest.approx(plain["elbo"], abs=0.1)


def test_the_command_line_trains_and_resumes_with_rank_0_writing(job):
    out, _, finished = job
    run_dir = out / "cli-run"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    assert [record["epoch"] for record in records] == [1, 2]
    assert json.loads((run_dir / "config.json").read_text())["epochs"] == 2  # --resume saved it
    report = json.loads((run_dir / "report.json").read_text())
    assert report["num_points"] == 40 and len(report["per_point"]["log_px"]) == 40
    assert math.isfinite(report["log_px"])
    assert finished.stdout.count("ppvae: done") == 2  # rank 0 prints; rank 1 says nothing
    assert "after resuming at epoch 1" in finished.stdout


def test_the_command_line_evaluates_in_shards(job, tmp_path):
    """``ppvae evaluate`` under torchrun: rank 0's report equals one rank's, point by point."""
    out, _, finished = job
    written = out / "cli-run" / "evaluations" / "test-K16-N50" / "report.json"
    sharded = json.loads(written.read_text())
    with _one_rank_group(tmp_path):
        one_rank = load_run(out / "cli-run").evaluate(
            num_samples=16, num_points=50, batch_size=10, folder=tmp_path / "one"
        )
    one_rank = one_rank.report.to_dict()
    for name in ("elbo", "log_px", "gap", "ess", "reconstruction_bce"):
        assert sharded["per_point"][name] == pytest.approx(one_rank["per_point"][name], rel=1e-9)
    assert finished.stdout.count("evaluations/test-K16-N50") == 1  # rank 0's table only


@pytest.mark.parametrize("num_points", [1, 3, 13, 50, 51, 52])
@pytest.mark.parametrize("shards", [1, 2, 3])
def test_rank_shares_make_up_the_one_process_batches(num_points, shards):
    """Step by step, the ranks' shares of an epoch's order are the one-process batch of
    ``shards × batch_size`` points, in order, sizes within one of each other; only a last global
    batch with fewer points than ranks is left out."""
    batch_size = 4
    order = torch.randperm(num_points, generator=torch.Generator().manual_seed(num_points))
    shares = [list(distributed.batch_indices(order, batch_size, r, shards)) for r in range(shards)]
    one_process = list(distributed.batch_indices(order, shards * batch_size, 0, 1))
    steps = distributed.num_batches(num_points, batch_size, shards)
    assert all(len(rank_shares) == steps for rank_shares in shares)
    for step in range(steps):
        parts = [rank_shares[step] for rank_shares in shares]
        assert torch.equal(torch.cat(parts), one_process[step])
        assert max(map(len, parts)) - min(map(len, parts)) <= 1 and min(map(len, parts)) >= 1
    left_out = one_process[steps:]
    assert len(left_out) <= 1 and all(len(batch) < shards for batch in left_out)


def test_a_killed_rank_ends_the_job_with_one_line(job):
    """Rank 1 exits mid-epoch 2 without a word; rank 0 stops with one line at once, not after
    the timeout, and the first epoch's checkpoint is there to resume from."""
    out, _, finished = job
    assert finished.returncode != 0
    lines = [line for line in finished.stderr.splitlines() if "ppvae train: error:" in line]
    assert len(lines) == 1, finished.stderr[-3000:]
    assert lines[0].startswith("ppvae train: error: rank 0 of 2: summing the gradients failed")
    assert "another rank stopped" in lines[0] and "by peer" in lines[0]  # closed or reset
    seconds = json.loads((out / "killed.json").read_text())["seconds"]
    assert seconds < TIMEOUT_S  # from the start of that run to the error, start-up included
    records = [json.loads(line) for line in (out / "run" / "metrics.jsonl").open()]
    assert [record["epoch"] for record in records] == [1]


if __name__ == "__main__":
    pyro.set_rng_seed(0)
    sys.exit(_worker(sys.argv[1]))
