"""Speed and memory of log p(x) with K importance samples: ``ppvae.inference.evaluate`` against a
loop calling ``pyro.infer.Importance`` one data point at a time.

Model: ``VAE(784, 50, hidden=(200, 200), activation="tanh")`` on the statically binarised MNIST
test set, untrained (seeded initialisation) unless ``--train-epochs`` is given: throughput does not
depend on the weights. Throughput is compared as points per second, since the loop is run on fewer
points. Peak memory of ``evaluate`` on one batch for several K and ``chunk_size``: on CUDA
``torch.cuda.max_memory_allocated``; on CPU the growth of the peak resident set (VmHWM, reset
through ``/proc/self/clear_refs`` before each setting) over the resident set before it, with glibc
told to mmap (and unmap on free) every block over 64 KiB so that RSS follows live memory.
``--loop-points 0`` skips the loop.

The roofline: the same arithmetic in plain torch (:func:`roofline_log_weights`: encoder once per
batch, then per particle chunk the decoder, the Bernoulli log-likelihood and the Gaussian
log-densities of p(z) and q(z|x)) in the same batches and particle chunks, with no Pyro program
around it: the limit the log-weights can reach on this machine. ``evaluate``, the bare
``log_weights`` and the roofline are timed ``--repeats`` times, interleaved with the order rotated
each repeat; medians are reported. The first ``evaluate`` call (probing the program, importing
arviz) is timed apart as one-off setup.

    .venv/bin/python benchmarks/evaluate_speed.py --data-dir ../shared/data \\
        --num-points 200 --loop-points 3 --repeats 3
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import json
import math
import re
import statistics
import sys
import time
from pathlib import Path

import pyro
import torch
import torch.nn.functional as F
from run_record import (  # benchmarks/run_record.py, beside this script
    commit,
    cpu_name,
    load_average,
)

from ppvae.data import load_data
from ppvae.inference import fit
from ppvae.inference.evaluate import evaluate
from ppvae.inference.importance import default_chunk_size, log_mean_exp, log_weights
from ppvae.inference.train import resolve_device
from ppvae.models.vae import VAE


def build(args, device: torch.device) -> tuple[VAE, torch.Tensor]:
    splits = load_data("mnist", data_dir=args.data_dir, binarize="static", seed=0)
    torch.manual_seed(0)
    vae = VAE(784, 50, hidden=(200, 200), activation="tanh")
    if args.train_epochs:
        fit(vae, splits.train_x, epochs=args.train_epochs, batch_size=100, device=device)
    vae.to(device).eval()
    return vae, splits.test_x


def _proc_status_mib(key: str) -> float:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{key}:\s+(\d+) kB", text, re.MULTILINE).group(1)) / 1024


def _live_memory_rss() -> None:
    """Make glibc serve every block over 64 KiB with mmap and unmap it on free, so the resident
    set follows live tensors instead of a heap that keeps (and fragments) freed memory. Called
    after the timings: it would slow them down."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak_rss() -> bool:
    """Reset the peak resident set (VmHWM) to the current one (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def memory_table(args, device: torch.device, vae, x) -> list[dict]:
    """Peak memory growth of ``evaluate`` on one batch, for several K and chunk sizes."""
    settings = [
        (500, 25),
        (args.num_samples, 25),
        (args.num_samples, 250),
        (args.num_samples, None),
    ]
    xb = x[: args.batch_size]
    if device.type != "cuda":
        _live_memory_rss()
    # one discarded run: allocations that happen once per process are not the batch's peak
    evaluate(
        vae,
        xb,
        num_samples=settings[0][0],
        chunk_size=settings[0][1],
        device=device,
        progress=False,
    )
    rows = []
    for num_samples, chunk in settings:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        elif not _reset_peak_rss():
            return [{"error": "cannot reset the peak RSS (/proc/self/clear_refs); not measured"}]
        else:
            base = _proc_status_mib("VmRSS")
        evaluate(vae, xb, num_samples=num_samples, chunk_size=chunk, device=device, progress=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
            growth = (torch.cuda.max_memory_allocated() - base) / 2**20
        else:
            growth = _proc_status_mib("VmHWM") - base
        rows.append(
            {
                "num_samples": num_samples,
                "chunk_size": chunk
                if chunk is not None
                else default_chunk_size(num_samples, len(xb)),
                "peak_growth_mib": round(growth, 1),
            }
        )
    return rows


def loop_baseline(vae, x, num_samples: int, device: torch.device):
    """pyro.infer.Importance on one data point at a time: wall and CPU seconds, log p(x)."""
    estimates = []
    tic, cpu_tic = time.perf_counter(), time.process_time()
    with torch.no_grad():
        for n in range(x.shape[0]):
            importance = pyro.infer.Importance(vae.model, vae.guide, num_samples=num_samples)
            importance.run(x[n : n + 1].to(device))
            estimates.append(float(importance.get_log_normalizer()))
    return time.perf_counter() - tic, time.process_time() - cpu_tic, torch.tensor(estimates)


def bare_log_marginal(vae, x, args, device) -> tuple[float, float]:
    """Wall and CPU seconds of batched log_weights + log_mean_exp alone (no PSIS, no
    reconstruction)."""
    tic, cpu_tic = time.perf_counter(), time.process_time()
    with torch.no_grad():
        for start in range(0, x.shape[0], args.batch_size):
            xb = x[start : start + args.batch_size].to(device)
            log_w = log_weights(
                vae.model, vae.guide, xb, num_particles=args.num_samples, chunk_size=args.chunk_size
            )
            log_mean_exp(log_w)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - tic, time.process_time() - cpu_tic


def roofline_log_weights(vae: VAE, xb: torch.Tensor, num_particles: int, chunk: int):
    """The arithmetic the log-weights need, in plain torch, for ``VAE`` with a Bernoulli
    likelihood: the encoder once per batch, then per chunk of particles z = μ + σε, the decoder on
    ``[chunk, B, latent]``, the Bernoulli log-likelihood of x and the Gaussian log-densities of z
    under p(z) and q(z|x). No Pyro, no checks, no bookkeeping: ``[K, B]``."""
    half_log_2pi = 0.5 * math.log(2 * math.pi)
    loc, scale = vae.encode(xb)  # [B, Z]
    log_scale_sum = scale.log().sum(-1)  # [B]
    latent = loc.shape[-1]
    parts = []
    for start in range(0, num_particles, chunk):
        size = min(chunk, num_particles - start)
        eps = torch.randn(size, *loc.shape, device=loc.device, dtype=loc.dtype)
        z = loc + scale * eps  # [chunk, B, Z]
        logits = vae.decoder(z)  # [chunk, B, D]
        log_px_z = -F.binary_cross_entropy_with_logits(
            logits, xb.expand_as(logits), reduction="none"
        ).sum(-1)
        log_pz = -0.5 * z.square().sum(-1) - latent * half_log_2pi
        log_qz = -0.5 * eps.square().sum(-1) - log_scale_sum - latent * half_log_2pi
        parts.append(log_px_z + log_pz - log_qz)
    return torch.cat(parts)


def roofline(vae: VAE, x: torch.Tensor, args, device: torch.device) -> tuple[float, float]:
    """Wall and CPU seconds of :func:`roofline_log_weights` + ``log_mean_exp`` over ``x`` in the
    same batches and particle chunks as ``evaluate``."""
    tic, cpu_tic = time.perf_counter(), time.process_time()
    with torch.no_grad():
        for start in range(0, x.shape[0], args.batch_size):
            xb = x[start : start + args.batch_size].to(device)
            chunk = args.chunk_size or default_chunk_size(args.num_samples, xb.shape[0])
            log_mean_exp(roofline_log_weights(vae, xb, args.num_samples, chunk))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - tic, time.process_time() - cpu_tic


def machine(device: torch.device) -> str:
    cpu = cpu_name()
    text = f"{cpu}, {torch.get_num_threads()} torch threads"
    if device.type == "cuda":
        text = f"{torch.cuda.get_device_name(device)}; host {text}"
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None, help="data root holding MNIST/raw")
    parser.add_argument("--num-points", type=int, default=200, help="test points for ppvae")
    parser.add_argument("--loop-points", type=int, default=3, help="test points for the loop")
    parser.add_argument("--num-samples", type=int, default=5000)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--chunk-size", type=int, default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--train-epochs", type=int, default=0)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument(
        "--repeats", type=int, default=3, help="interleaved timed runs of each path (medians)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--json", default=None, help="also write the numbers here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    vae, test_x = build(args, device)
    x = test_x[: args.num_points]
    results = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine(device),
        "device": str(device),
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "model": "VAE(784, 50, hidden=(200, 200), activation='tanh')"
        + (f", trained {args.train_epochs} epochs" if args.train_epochs else ", untrained"),
        "num_samples": args.num_samples,
        "batch_size": args.batch_size,
        "chunk_size": args.chunk_size,
        "load_average_at_start": load_average(),
        "commit": commit(),
    }

    # one-off setup, timed apart: the first call probes the program (cached per module) and
    # imports arviz; then a warm-up of every timed path, so first-call costs stay out of the rates
    tic = time.perf_counter()
    evaluate(vae, x[:2], num_samples=64, device=device, progress=False)
    setup_seconds = time.perf_counter() - tic
    bare_log_marginal(vae, x[:2], args, device)
    roofline(vae, x[:2], args, device)
    report = None

    def run_evaluate():
        nonlocal report
        tic, cpu_tic = time.perf_counter(), time.process_time()
        report = evaluate(
            vae,
            x,
            num_samples=args.num_samples,
            batch_size=args.batch_size,
            chunk_size=args.chunk_size,
            device=device,
            progress=False,
        )
        return time.perf_counter() - tic, time.process_time() - cpu_tic

    timed = {
        "evaluate": run_evaluate,
        "log_marginal": lambda: bare_log_marginal(vae, x, args, device),
        "roofline": lambda: roofline(vae, x, args, device),
    }
    wall: dict[str, list[float]] = {name: [] for name in timed}
    cpu: dict[str, list[float]] = {name: [] for name in timed}
    names = list(timed)
    for repeat in range(args.repeats):
        # interleaved, the order rotated each repeat, so load drifts hit every path alike
        for name in names[repeat % len(names) :] + names[: repeat % len(names)]:
            seconds, cpu_seconds = timed[name]()
            wall[name].append(seconds)
            cpu[name].append(cpu_seconds)
    median = {name: statistics.median(values) for name, values in wall.items()}
    median_cpu = {name: statistics.median(values) for name, values in cpu.items()}
    n = x.shape[0]
    results.update(
        {
            "num_points": n,
            "repeats": args.repeats,
            "setup_seconds_first_call": setup_seconds,
            "evaluate_points_per_s": n / median["evaluate"],
            "log_marginal_points_per_s": n / median["log_marginal"],
            "roofline_points_per_s": n / median["roofline"],
            "evaluate_vs_roofline_time_ratio": median["evaluate"] / median["roofline"],
            "log_marginal_vs_roofline_time_ratio": median["log_marginal"] / median["roofline"],
            "evaluate_cpu_seconds_per_point": median_cpu["evaluate"] / n,
            "log_marginal_cpu_seconds_per_point": median_cpu["log_marginal"] / n,
            "roofline_cpu_seconds_per_point": median_cpu["roofline"] / n,
            "raw_wall_seconds": wall,
            "mean_log_px": report.log_px,
            "khat_share_above_0.7": report.khat_share_above,
        }
    )
    if args.loop_points > 0:
        loop_seconds, loop_cpu_seconds, loop_estimates = loop_baseline(
            vae, test_x[: args.loop_points], args.num_samples, device
        )
        ours = report.log_px_per_point[: args.loop_points]
        loop_rate = args.loop_points / loop_seconds
        results.update(
            {
                "loop_points": args.loop_points,
                "loop_points_per_s": loop_rate,
                "loop_cpu_seconds_per_point": loop_cpu_seconds / args.loop_points,
                "speedup_evaluate_vs_loop": results["evaluate_points_per_s"] / loop_rate,
                "speedup_log_marginal_vs_loop": results["log_marginal_points_per_s"] / loop_rate,
                "loop_vs_ours_max_abs_diff": float((loop_estimates - ours.float()).abs().max()),
                "ours_max_stderr_on_those": float(
                    report.log_px_stderr_per_point[: args.loop_points].max()
                ),
            }
        )
    results["load_average_after_timings"] = load_average()
    if not args.skip_memory:
        results["peak_memory"] = memory_table(args, device, vae, test_x)

    for key, value in results.items():
        if key == "raw_wall_seconds":
            value = {name: [round(t, 2) for t in times] for name, times in value.items()}
        if key == "peak_memory":
            for row in value:
                print(f"{'peak_memory':36s} {row}")
            continue
        if isinstance(value, float):
            value = f"{value:.4g}" if math.isfinite(value) else str(value)
        print(f"{key:36s} {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
