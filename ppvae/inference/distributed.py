"""Past one process: data-parallel training and sharded evaluation with ``torch.distributed``.

DESIGN §7. ``torchrun --nproc_per_node N -m ppvae train ...`` starts N ranks; ``fit`` and
``evaluate`` called inside an initialised process group (one the caller started, or
:func:`init_from_environment` under ``torchrun``) use it. The user's Pyro program is not rewritten:
every rank runs it on its own shard of the data.

- **Training.** Every rank holds the same parameters (broadcast from rank 0 when ``fit`` starts).
  Each epoch's order of the points is the permutation of ``(seed, epoch)`` a one-process run uses,
  cut into global batches of ``world_size × batch_size`` points; each global batch is split into
  contiguous per-rank shares. After ``backward`` the gradients are summed over the ranks (one
  ``all_reduce`` of a flat buffer per step). Pyro's losses are sums over a batch's points
  (a plate without subsampling), so a step is the one-process step on the global batch

  .. math::

      \\nabla \\sum_{n \\in B} \\ell_n = \\sum_{r} \\nabla \\sum_{n \\in B_r} \\ell_n,

  and the parameters stay identical on every rank. (A program that scales its plate to the data
  set size, ``pyro.plate("data", N, subsample=...)``, gets ``world_size`` times its gradient;
  Adam is invariant to that scale, SGD needs its learning rate divided by ``world_size``.)
  The latent draws of a step come from each rank's own RNG, reseeded every epoch from
  ``(seed, epoch, rank)``, so a resumed run repeats an uninterrupted one exactly. A dynamically
  binarised set is drawn whole from ``(seed, epoch)`` on every rank (the draw a one-process run
  makes) and each rank trains on its shard: a fresh draw per epoch, different points per rank.
- **Validation and evaluation** shard the points across ranks and combine them in order:
  ``evaluate`` deals its batches round-robin to the ranks, draws each batch's particles from an
  RNG seeded by ``(seed, batch index)`` (the report does not depend on the number of ranks) and
  gathers the per-point results in the points' order.
- **Failures.** A collective that fails (a rank died, or nothing arrived within the process
  group's timeout) raises a one-line :class:`~ppvae.errors.PPVAEError` on the ranks still alive.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta

import pyro
import torch
import torch.distributed as dist

from ppvae.errors import PPVAEError

DEFAULT_TIMEOUT = timedelta(minutes=5)
_TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def active() -> bool:
    """Whether a ``torch.distributed`` process group is initialised in this process."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_writer() -> bool:
    """Whether this process writes files (checkpoints, metrics, figures, reports): rank 0."""
    return rank() == 0


def launched_by_torchrun() -> bool:
    return all(name in os.environ for name in _TORCHRUN_VARIABLES)


def init_from_environment(timeout: timedelta = DEFAULT_TIMEOUT) -> bool:
    """Start the process group ``torchrun`` describes in the environment; returns whether a group
    is active. Outside ``torchrun`` nothing happens. CPU tensors go through gloo; on a machine
    with CUDA, CUDA tensors go through nccl and each rank uses GPU ``LOCAL_RANK``. A collective
    that waits longer than ``timeout`` fails."""
    if active() or not launched_by_torchrun():
        return active()
    backend = "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "cpu:gloo,cuda:nccl"
    dist.init_process_group(backend, timeout=timeout)
    return True


def _collective_device() -> torch.device:
    if active() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@contextmanager
def _collective(what: str, training: bool = True) -> Iterator[None]:
    """A failed collective as one line on the ranks still alive (``training``: with the hint that
    completed epochs resume)."""
    try:
        yield
    except RuntimeError as error:  # torch.distributed.DistError and backend errors
        text = re.sub(r"^\[[^\]]*\]\s*", "", str(error).strip())  # gloo's "[file.cc:561] "
        detail = re.split(r"\.\s|\n", text)[0][:160] or type(error).__name__
        raise PPVAEError(
            f"rank {rank()} of {world_size()}: {what} failed because another rank stopped (it "
            f"died or raised an error; see its own message) or did not answer within the process "
            f"group's timeout ({detail}); the job ends"
            + ("; completed epochs are checkpointed: continue with --resume" if training else "")
        ) from None


def derived_seed(*parts: object) -> int:
    """A 63-bit seed from ``parts`` (e.g. ``(seed, epoch, rank)``), the same on every machine."""
    digest = hashlib.sha256("/".join(str(part) for part in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


# ---------------------------------------------------------------------------------- training


def shard_bounds(num_items: int, shard: int, num_shards: int) -> tuple[int, int]:
    """``[start, stop)`` of shard ``shard`` when ``num_items`` are split into ``num_shards``
    contiguous shares whose sizes differ by at most one."""
    return shard * num_items // num_shards, (shard + 1) * num_items // num_shards


def batch_indices(
    order: torch.Tensor, batch_size: int, shard: int | None = None, shards: int | None = None
) -> Iterator[torch.Tensor]:
    """This rank's batches of an epoch's point ``order``: in one process ``batch_size`` points at a
    time; in a group, this rank's share of each global batch of ``world_size × batch_size``
    points. A last global batch with fewer points than ranks is left out, so that every rank takes
    the same number of steps. ``shard`` / ``shards`` default to this rank and the world size."""
    shard = rank() if shard is None else shard
    shards = world_size() if shards is None else shards
    step = shards * batch_size
    for start in range(0, order.shape[0], step):
        chunk = order[start : start + step]
        if chunk.shape[0] < shards:
            return
        low, high = shard_bounds(chunk.shape[0], shard, shards)
        yield chunk[low:high]


def num_batches(num_points: int, batch_size: int, shards: int | None = None) -> int:
    """How many batches :func:`batch_indices` yields for ``num_points`` points."""
    shards = world_size() if shards is None else shards
    full, rest = divmod(num_points, shards * batch_size)
    return full + (rest >= shards)


def sampler(dataset, seed: int) -> torch.utils.data.DistributedSampler | None:
    """A ``DistributedSampler`` (shuffled, seeded; ``fit`` calls its ``set_epoch``) for a
    ``Dataset`` in a group; None in one process."""
    if not active():
        return None
    return torch.utils.data.DistributedSampler(
        dataset, num_replicas=world_size(), rank=rank(), shuffle=True, seed=seed
    )


def check_loader(loader: torch.utils.data.DataLoader) -> None:
    """A ``DataLoader`` given to ``fit`` in a group must shard its data itself."""
    if active() and not isinstance(loader.sampler, torch.utils.data.DistributedSampler):
        raise PPVAEError(
            f"fit in a process group of {world_size()} ranks got a DataLoader without a "
            "DistributedSampler, so every rank would train on the same points; build it with "
            "sampler=torch.utils.data.DistributedSampler(dataset), or pass the tensors or Dataset"
        )


def seed_epoch(seed: int, epoch: int) -> None:
    """In a group: this rank's RNGs (torch, CUDA, Python, NumPy) seeded from
    ``(seed, epoch, rank)`` before the epoch. One process keeps its checkpointed stream."""
    if active():
        pyro.set_rng_seed(derived_seed(seed, "epoch", epoch, rank()) % 2**32)


def broadcast_tensors(tensors: Iterable[torch.Tensor]) -> None:
    """Overwrite ``tensors`` (parameters, buffers) in place with rank 0's values."""
    if not active() or world_size() == 1:
        return
    with torch.no_grad(), _collective("copying rank 0's parameters"):
        for tensor in tensors:
            dist.broadcast(tensor.data, src=0)


def all_reduce_gradients(params: Sequence[torch.Tensor]) -> None:
    """Sum every parameter's gradient over the ranks (one ``all_reduce`` per dtype and device).

    A parameter without a gradient on every rank keeps none, as in one process; one that has a
    gradient on some ranks gets the sum, the others counting zero."""
    if not active() or world_size() == 1:
        return
    groups: dict[tuple, list[torch.Tensor]] = {}
    for p in params:
        groups.setdefault((p.dtype, p.device), []).append(p)
    for group in groups.values():
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in group]
        present = torch.tensor([p.grad is not None for p in group], dtype=group[0].dtype)
        flat = torch.cat([g.reshape(-1) for g in grads] + [present.to(group[0].device)])
        with _collective("summing the gradients"):
            dist.all_reduce(flat)
        offset, flags = 0, None
        for index, (p, grad) in enumerate(zip(group, grads, strict=True)):
            value = flat[offset : offset + grad.numel()].view_as(grad)
            offset += grad.numel()
            if p.grad is not None:
                p.grad.copy_(value)
                continue
            if flags is None:  # a host sync on a GPU, only where a gradient is missing here
                flags = flat[-len(group) :].tolist()
            if flags[index] > 0:
                p.grad = value.clone()


def sum_over_ranks(*values: float | torch.Tensor) -> tuple[float, ...]:
    """The sums of ``values`` over the ranks (the values themselves in one process)."""
    if not active():
        return tuple(float(v) for v in values)
    total = torch.tensor([float(v) for v in values], dtype=torch.float64)
    total = total.to(_collective_device())
    with _collective("summing the epoch's loss"):
        dist.all_reduce(total)
    return tuple(total.tolist())


def from_rank0(value, what: str = "sharing rank 0's epoch record", training: bool = True):
    """Rank 0's ``value`` (a picklable object) on every rank; ``what`` and ``training`` word the
    error when it fails."""
    if not active() or world_size() == 1:
        return value
    box = [value]
    with _collective(what, training):
        dist.broadcast_object_list(box, src=0, device=_collective_device())
    return box[0]


def barrier() -> None:
    if active() and world_size() > 1:
        with _collective("waiting for the other ranks"):
            dist.barrier()


def sharded_mean(metrics: Callable, data) -> dict[str, float]:
    """``metrics(part) -> {name: per-point mean}`` on this rank's contiguous share of ``data`` (a
    ``ProgramData``), combined into the per-point means over all of it, the same on every rank.
    Fewer points than ranks: rank 0's value for all of them."""
    if not active() or world_size() == 1:
        return metrics(data)
    num_points = data.num_points
    if num_points < world_size():
        return from_rank0(metrics(data) if is_writer() else None)
    low, high = shard_bounds(num_points, rank(), world_size())
    mine = metrics(data.select(slice(low, high)))
    parts: list = [None] * world_size()
    with _collective("combining the validation shards"):
        dist.all_gather_object(parts, (mine, high - low))
    names = list(parts[0][0])
    if any(list(part) != names for part, _ in parts):
        raise PPVAEError(f"the ranks' validation metrics differ in name: {[p for p, _ in parts]}")
    return {name: sum(part[name] * count for part, count in parts) / num_points for name in names}


# -------------------------------------------------------------------------------- evaluation


def batch_starts(num_points: int, batch_size: int) -> list[int]:
    """The first points of this rank's evaluation batches (all of them in one process): batch
    ``b`` goes to rank ``b mod world_size``."""
    return list(range(0, num_points, batch_size))[rank() :: world_size()]


def _seed_torch(seed: int, device: torch.device) -> None:
    torch.random.default_generator.manual_seed(seed)
    if device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.manual_seed(seed)


def reseeded(starts: Sequence[int], seed: int, batch_size: int, device) -> Iterator[int]:
    """``starts`` one by one; in a group, torch's RNG is seeded from ``(seed, batch index)``
    before each, so a batch's draws do not depend on the rank that evaluates it."""
    for start in starts:
        if active():
            _seed_torch(derived_seed(seed, "evaluate", start // batch_size), torch.device(device))
        yield start


def gather_batches(parts: dict, ladder_parts: dict, first: tuple, seed: int, device) -> tuple:
    """In a group: every rank's per-batch results (``parts``: name → list of per-batch tensors;
    ``ladder_parts``: k → list) gathered into the order of the batches, and ``first`` (what
    ``evaluate`` reads off the first batch: site, point-mass sites, whether a bound exists,
    one-hot sites) combined: rank 0's, the one-hot sites kept where every rank found them. Then
    torch's RNG is seeded from ``(seed, "whole")`` for what ``evaluate`` computes on all points.
    One process: the arguments unchanged."""
    if not active():
        return parts, ladder_parts, first
    shards = world_size()
    everything: list = [None] * shards
    with _collective("gathering the evaluation results", training=False):
        dist.all_gather_object(everything, (parts, ladder_parts, first))

    def interleave(pieces: list[dict]) -> dict:
        """Batch ``b`` is entry ``b // shards`` of rank ``b % shards``'s list."""
        merged = {}
        for name in dict.fromkeys(name for piece in pieces for name in piece):
            lists = [piece.get(name, []) for piece in pieces]
            total = sum(len(values) for values in lists)
            merged[name] = [lists[b % shards][b // shards] for b in range(total)]
        return merged

    parts = interleave([p for p, _, _ in everything])
    ladder_parts = interleave([ladder for _, ladder, _ in everything])
    site, point_mass, likelihood_available, one_hot = everything[0][2]
    for theirs, _, (_, _, _, their_one_hot) in everything:
        if theirs:  # a rank with batches
            one_hot = [name for name in one_hot if name in their_one_hot]
    _seed_torch(derived_seed(seed, "whole"), torch.device(device))
    return parts, ladder_parts, (site, point_mass, likelihood_available, one_hot)
