"""One process against N (``torchrun``; gloo on CPUs, nccl on GPUs) for ``fit`` and ``evaluate``.

Model: ``VAE(784, 50, hidden=(200, 200), activation="tanh")`` on dynamically binarised MNIST.
Training: ``--num-points`` training points per epoch with the same global batch
(``--batch-size``, split across the ranks), the second epoch's training pass timed (fit's
``seconds``; the first carries the start-up probes) and scaled to a 60,000-image epoch.
Evaluation: ``evaluate`` with K = ``--num-samples`` on ``--eval-points`` test points (the points
sharded across the ranks and gathered), points per second. Settings, run one after the other in
every one of ``--repeats`` rounds (medians reported): one process with one thread, one process with
``--procs`` threads, and ``--procs`` processes of one thread each. Speed-up is against one process
of one thread; scaling efficiency = speed-up / ``--procs``.

    .venv/bin/python benchmarks/distributed.py --data-dir ../shared/data --procs 2 --repeats 3
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def worker(args: argparse.Namespace) -> None:
    """One setting, in one process or as one rank of a torchrun job; rank 0 prints the result."""
    from ppvae.data import load_data
    from ppvae.inference import distributed, evaluate, fit
    from ppvae.models.vae import VAE

    distributed.init_from_environment()
    ranks = distributed.world_size()
    if args.batch_size % ranks:
        raise SystemExit(f"--batch-size {args.batch_size} is not divisible by {ranks} ranks")
    splits = load_data("mnist", data_dir=args.data_dir, limit=args.num_points, seed=0)
    torch.manual_seed(0)
    vae = VAE(784, 50, hidden=(200, 200), activation="tanh")
    result = fit(
        vae,
        splits.train,
        epochs=2,
        batch_size=args.batch_size // ranks,
        device=args.device,
        progress=False,
        seed=0,
    )
    epoch_seconds = result.history[-1]["seconds"] * 60_000 / args.num_points
    test_x, _ = splits.split("test")
    distributed.barrier()
    tic = time.perf_counter()
    evaluate(
        vae,
        test_x[: args.eval_points],
        num_samples=args.num_samples,
        batch_size=args.eval_batch,
        device=args.device,
        progress=False,
    )
    eval_seconds = time.perf_counter() - tic
    if distributed.is_writer():
        record = {
            "ranks": ranks,
            "threads": torch.get_num_threads(),
            "epoch_seconds_60k": epoch_seconds,
            "eval_points_per_second": args.eval_points / eval_seconds,
        }
        print("RESULT " + json.dumps(record), flush=True)


def run_setting(args, procs: int, threads: int) -> dict:
    script = [__file__, "--worker", *sys.argv[1:]]
    if procs == 1:
        command = [sys.executable, *script]
    else:
        torchrun = str(Path(sys.executable).with_name("torchrun"))
        command = [torchrun, "--standalone", "--nproc_per_node", str(procs), *script]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    load_before = os.getloadavg()[0]
    finished = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    lines = [line for line in finished.stdout.splitlines() if line.startswith("RESULT ")]
    if finished.returncode != 0 or not lines:
        raise SystemExit(f"{command} failed:\n{finished.stderr[-3000:]}")
    record = json.loads(lines[-1].removeprefix("RESULT "))
    record["load_average_1min"] = [load_before, os.getloadavg()[0]]  # a shared machine's load
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num-points", type=int, default=10_000)
    parser.add_argument("--batch-size", type=int, default=100, help="global batch")
    parser.add_argument("--eval-points", type=int, default=100)
    parser.add_argument("--eval-batch", type=int, default=10)
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    settings = {
        "1 process, 1 thread": (1, 1),
        f"1 process, {args.procs} threads": (1, args.procs),
        f"{args.procs} processes, 1 thread each": (args.procs, 1),
    }
    runs: dict[str, list[dict]] = {name: [] for name in settings}
    for repeat in range(args.repeats):
        for name, (procs, threads) in settings.items():
            runs[name].append(run_setting(args, procs, threads))
            print(f"round {repeat + 1}: {name}: {runs[name][-1]}", flush=True)
    summary = {}
    base = None
    for name, records in runs.items():
        epoch = statistics.median(r["epoch_seconds_60k"] for r in records)
        rate = statistics.median(r["eval_points_per_second"] for r in records)
        base = base or (epoch, rate)
        procs = settings[name][0] * settings[name][1]
        summary[name] = {
            "epoch_seconds_60k": epoch,
            "eval_points_per_second": rate,
            "train_speedup": base[0] / epoch,
            "eval_speedup": rate / base[1],
            "train_efficiency": base[0] / epoch / procs,
            "eval_efficiency": rate / base[1] / procs,
        }
        print(
            f"{name:32s} epoch {epoch:7.2f} s ({base[0] / epoch:.2f}x)   "
            f"evaluate {rate:7.2f} points/s ({rate / base[1]:.2f}x)"
        )
    RESULTS.mkdir(exist_ok=True)
    out = {
        "date": datetime.date.today().isoformat(),
        "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "arguments": {k: v for k, v in vars(args).items() if k != "worker"},
        "runs": runs,
        "summary": summary,
    }
    (RESULTS / "distributed.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
