"""``fit``: the SVI training loop (DESIGN §2, §6).

Each epoch: a seeded shuffle, SVI steps over mini-batches
(:class:`~ppvae.inference.svi_step.SVIStep`: ``pyro.infer.SVI``'s update with one fused optimizer
and no host sync per step on a GPU), the validation ELBO per data point
(``ppvae.inference.elbo``), then an atomic checkpoint (model, optimizer, RNG states, epoch, config)
and an atomic rewrite of ``metrics.jsonl``. Randomness that changes per epoch (shuffle, dynamic
binarisation) is derived from ``(seed, epoch)`` and the global RNG state is checkpointed, so
``resume=True`` continues exactly where the last completed epoch left off.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyro
import pyro.optim
import torch
from pyro.infer import Trace_ELBO, TraceEnum_ELBO, TraceGraph_ELBO, TraceMeanField_ELBO
from torch import nn
from tqdm.auto import tqdm

from ppvae.checkpoint import (
    CHECKPOINT_FORMAT,
    atomic_write_text,
    commit_epoch,
    load_checkpoint,
    model_identity,
    refuse_existing_run,
    restore_module,
    rng_state,
    set_rng_state,
)
from ppvae.data import DynamicBinarization, check_finite, check_unit_interval
from ppvae.errors import ContractError, DivergenceError, PPVAEError
from ppvae.inference import distributed
from ppvae.inference.importance import elbo
from ppvae.inference.objectives import IWAE_ELBO, KLWeighted_ELBO
from ppvae.inference.program import ProgramData
from ppvae.inference.svi_step import SVIStep, objective_list

LAST_CHECKPOINT = "checkpoint.pt"
BEST_CHECKPOINT = "checkpoint-best.pt"
METRICS_FILE = "metrics.jsonl"
# Pyro's NaN/inf warnings: a divergence is reported once, as a DivergenceError
_PYRO_NAN_WARNING = r"Encountered (NaN|[+-]inf)"


@dataclass
class FitResult:
    """What ``fit`` did: one dict per epoch (also in ``metrics.jsonl``) and where it wrote."""

    history: list[dict] = field(default_factory=list)
    best_epoch: int | None = None
    best_validation: float | None = None  # the best val_elbo, or the best −val_loss
    validation_metric: str | None = None  # "val_elbo", or "val_loss" when no ELBO exists
    run_dir: Path | None = None
    resumed_from_epoch: int = 0
    epochs_this_call: int = 0  # epochs trained by this call (after a resume: the new ones only)

    @property
    def best_val_elbo(self) -> float | None:
        return self.best_validation if self.validation_metric == "val_elbo" else None

    @property
    def epochs_run(self) -> int:
        """Epochs in the run's history, including those before a resume."""
        return len(self.history)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise PPVAEError(
            "--device cuda was asked for but no CUDA device is available; use auto/cpu"
        )
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise PPVAEError(f"unknown device {device!r}; use auto, cpu or cuda")
    return torch.device(device)


def as_program_data(data) -> ProgramData:
    """``fit``'s tensor / ``(x, y)`` / tuple / dict data as the program's arguments."""
    try:
        return ProgramData.of(data)
    except PPVAEError:
        raise PPVAEError(
            "data must be a tensor [N, ...], a pair (x, y) or tuple of tensors (positional "
            "arguments), a dict of tensors (keyword arguments), a torch Dataset or a DataLoader"
        ) from None


class _Batches:
    """Uniform access to fit's kinds of ``data``: yields :class:`ProgramData` batches on
    ``device`` (the program is called with each batch's arguments as they are)."""

    def __init__(self, data, batch_size: int, device: torch.device, seed: int):
        self.batch_size, self.device, self.seed = batch_size, device, seed
        self.check: Callable[[torch.Tensor], None] | None = None  # for batches drawn later
        self.recheck_epochs = hasattr(data, "epoch") and not isinstance(data, DynamicBinarization)
        self.loader = None
        self.epoch_fn: Callable[[int], ProgramData] | None = None
        if isinstance(data, torch.utils.data.DataLoader):
            distributed.check_loader(data)  # in a process group: it shards itself
            self.loader = data
        elif hasattr(data, "epoch"):
            self.epoch_fn = lambda epoch: as_program_data(data.epoch(epoch))
            self.num_data = len(data)
        elif isinstance(data, torch.utils.data.Dataset) and not isinstance(data, (tuple, list)):
            generator = torch.Generator().manual_seed(seed)
            sampler = distributed.sampler(data, seed)  # None in one process
            self.loader = torch.utils.data.DataLoader(
                data, batch_size, shuffle=sampler is None, sampler=sampler, generator=generator
            )
        else:
            self.fixed = as_program_data(data).to(device)
            self.epoch_fn = lambda epoch: self.fixed
            self.num_data = self.fixed.num_points
        if self.loader is not None:
            self.num_data = len(self.loader.dataset)

    def __len__(self) -> int:
        if self.loader is not None:
            return len(self.loader)
        return distributed.num_batches(self.num_data, self.batch_size)

    def first(self, view: ProgramData | None = None) -> ProgramData:
        """The first batch; ``view``: epoch 0's data when the caller already holds them."""
        if self.loader is not None:
            return as_program_data(next(iter(self.loader))).to(self.device)
        view = self.epoch_fn(0) if view is None else view
        return view.select(slice(0, self.batch_size)).to(self.device)

    def epoch(self, epoch: int) -> Iterator[ProgramData]:
        if self.loader is not None:
            if hasattr(self.loader.sampler, "set_epoch"):
                self.loader.sampler.set_epoch(epoch)
            for batch in self.loader:
                batch = as_program_data(batch)
                if self.check is not None:
                    self.check(batch.first)
                yield batch.to(self.device)
            return
        view = self.epoch_fn(epoch)
        if self.check is not None and self.recheck_epochs:
            self.check(view.first)
        view = view.to(self.device)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(view.num_points, generator=generator).to(self.device)
        for index in distributed.batch_indices(order, self.batch_size):  # this rank's share
            yield view.select(index)


def _module_device(module) -> torch.device | None:
    parameters = getattr(module, "parameters", None)
    first = next(iter(parameters()), None) if callable(parameters) else None
    return None if first is None else first.device


def _points(data: ProgramData, batch_size: int, device) -> Iterator[ProgramData]:
    for start in range(0, data.num_points, batch_size):
        batch = data.select(slice(start, start + batch_size))
        yield batch if device is None else batch.to(device)


def validation_elbo(
    module,
    x,
    y=None,
    batch_size: int = 1000,
    num_particles: int = 1,
    data_plate: str | None = None,
) -> float:
    """Mean per-point ELBO on held-out data (no gradients, batched); ``x`` (and ``y``) as the
    program takes them."""
    data = ProgramData.of(x, y)
    total = 0.0
    with torch.no_grad():
        for batch in _points(data, batch_size, _module_device(module)):
            total += float(
                elbo(
                    module.model,
                    module.guide,
                    batch,
                    num_particles=num_particles,
                    data_plate=data_plate,
                ).sum()
            )
    return total / data.num_points


# objectives whose per-point value is the ELBO (ppvae's elbo estimator computes it per point)
_ELBO_FAMILY = (Trace_ELBO, TraceMeanField_ELBO, TraceGraph_ELBO, KLWeighted_ELBO, IWAE_ELBO)


def validation_metrics(
    module, data, batch_size: int, loss=None, data_plate: str | None = None
) -> dict[str, float]:
    """The validation number of the objective ``fit`` trains with, per data point.

    ``{"val_elbo": ...}`` for the ELBO family (``Trace_ELBO``, ``TraceMeanField_ELBO``, ppvae's
    objectives: the per-point ELBO from the log-weights; ``TraceEnum_ELBO``: its own enumerated
    ELBO); otherwise, or where a program has no per-point weights (a point-mass guide, a global
    latent), ``{"val_loss": ...}``, the training objective's own loss (all objectives summed) per
    data point.
    """
    objectives = objective_list(module, Trace_ELBO() if loss is None else loss)
    data = as_program_data(data)
    first = objectives[0][0]
    entries = loss if isinstance(loss, (list, tuple)) else [loss]
    own_pair = len(entries) == 1 and not isinstance(entries[0], (list, tuple))
    if own_pair and isinstance(first, _ELBO_FAMILY):
        try:
            elbo_value = validation_elbo(module, data, None, batch_size, data_plate=data_plate)
            return {"val_elbo": elbo_value}
        except ContractError:
            pass
    total = 0.0
    with torch.no_grad():
        for batch in _points(data, batch_size, _module_device(module)):
            for objective, model, guide in objectives:
                total += objective.loss(model, guide, *batch.args, **batch.kwargs)
    metric = "val_elbo" if own_pair and isinstance(first, TraceEnum_ELBO) else "val_loss"
    value = total / data.num_points
    return {metric: -value if metric == "val_elbo" else value}


def read_metrics(path: str | Path) -> list[dict]:
    """The per-epoch records in ``metrics.jsonl`` (the file, or the run directory that holds it).

    A missing file gives ``[]``; a last line cut off by a killed write is skipped; an unreadable
    line before it (not a JSON object with an integer ``"epoch"``) is a ``PPVAEError``.
    """
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        return []
    lines = path.read_text(errors="replace").splitlines()
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    records = []
    for i, line in enumerate(lines[: last + 1]):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict) and isinstance(record.get("epoch"), int):
            records.append(record)
        elif i < last:
            raise PPVAEError(
                f"{path} line {i + 1} is not a JSON record; delete the line (or the file), retry"
            )
    return records


def _read_history(path: Path, upto_epoch: int) -> list[dict]:
    return [record for record in read_metrics(path) if record["epoch"] <= upto_epoch]


def _write_history(path: Path, history: list[dict]) -> None:
    atomic_write_text("".join(json.dumps(record) + "\n" for record in history), path)


def fit(
    module: nn.Module,
    data,
    *,
    loss: pyro.infer.ELBO | None = None,
    optimizer: pyro.optim.PyroOptim | None = None,
    lr: float = 1e-3,
    epochs: int = 10,
    batch_size: int = 100,
    device: str | torch.device = "auto",
    validation=None,
    run_dir: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    seed: int = 0,
    config: dict[str, Any] | None = None,
    progress: bool = True,
    lr_schedule: Callable[[int], float] | None = None,
    epoch_metrics: Callable[[nn.Module], dict] | None = None,
    on_epoch_end: Callable[[dict], None] | None = None,
    validate_every_step: bool | None = None,
    data_plate: str | None = None,
) -> FitResult:
    """Train ``module.model`` / ``module.guide`` with SVI.

    ``data``: a tensor ``[N, ...]``, a pair ``(x, y)``, a ``Dataset`` (an object with an
    ``epoch(e) -> (x, y)`` method, such as ``ppvae.data.DynamicBinarization``, gets a fresh view
    per epoch) or a ``DataLoader``. ``validation``: a tensor or ``(x, y)`` pair for the
    per-epoch validation ELBO. With ``run_dir``, checkpoints and ``metrics.jsonl`` are written
    there after every epoch; ``resume=True`` continues from ``run_dir/checkpoint.pt`` up to
    ``epochs`` in total, which must exceed the checkpoint's epoch.
    A ``run_dir`` that holds a checkpoint is refused unless ``resume`` or ``overwrite``.
    ``optimizer`` defaults to ``pyro.optim.Adam({"lr": lr})`` (its constructor and arguments build
    one torch optimizer over the module's parameters); ``loss`` to ``Trace_ELBO()``.
    ``lr_schedule(epoch) -> lr`` (1-based epochs) sets the learning rate before each epoch.
    If ``loss`` has a ``set_epoch(epoch)`` method (KL warm-up, β schedules) it is called before
    every epoch (1-based). ``epoch_metrics(module) -> dict`` adds entries to each epoch's record.
    ``validate_every_step``: Pyro's argument and support checks on every SVI step (True) or on the
    first only (False, faster); the default (None) checks every step unless the module has a
    ``check_data`` method (the zoo's models), whose data are checked as described below.
    The global Pyro param store is cleared first, so parameters of an earlier run cannot leak in.

    The program is called with the data as they are (DESIGN §1): ``model(x)``,
    ``model(x, y)``, keyword tensors from a dict, or a loader's batches. ``loss`` may be one ELBO
    or a list of objectives summed in each step (ELBOs for the module's pair, or
    ``(elbo, model, guide)`` triples). The contract (signatures, the guide covering the model's
    latents) is checked on the first batch before any step; the program's own ``pyro.param``
    sites outside the module are trained and checkpointed. Validation uses the objective trained
    with (see :func:`validation_metrics`); ``data_plate`` names the plate over data points when
    it cannot be found. ``train_loss`` is per data point, whatever size the batches are.

    Before anything is written, the data go through ``module.check_data`` (or a NaN/inf check):
    every training point of a tensor or pair, epoch 0's view of an ``epoch(e)`` object (and the
    tensor ``x`` it draws from), the first batch of a ``DataLoader`` or other ``Dataset``, and the
    validation inputs; every loader batch and every epoch's view are checked again as they are
    drawn (a ``DynamicBinarization``'s draws are binary by construction and are not re-checked).
    A non-finite loss, parameters or validation ELBO raises a ``DivergenceError`` that names the
    last good checkpoint; non-finite parameters are never saved.

    Inside a ``torch.distributed`` process group (``torchrun``; :mod:`ppvae.inference.distributed`)
    ``batch_size`` is per rank: each rank trains on its share of every global batch of
    ``world_size × batch_size`` points with the gradients summed over the ranks, validation is
    sharded, and only rank 0 writes ``run_dir``.
    """
    if epochs < 0 or batch_size < 1:
        raise PPVAEError(f"epochs must be >= 0 and batch_size >= 1, got {epochs} and {batch_size}")
    if resume and run_dir is None:
        raise PPVAEError("resume=True needs run_dir (where the checkpoint is)")
    if run_dir is not None:  # an existing run is only resumed or deliberately replaced
        refuse_existing_run(run_dir, resume=resume, overwrite=overwrite)
    device = resolve_device(device)
    run_dir = None if run_dir is None else Path(run_dir)
    loss = loss if loss is not None else Trace_ELBO()
    optimizer = optimizer if optimizer is not None else pyro.optim.Adam({"lr": lr})
    config = dict(config or {})

    pyro.clear_param_store()
    _to_device(module, device)
    result = FitResult(run_dir=run_dir)
    start_epoch = 1
    if resume:
        checkpoint = load_checkpoint(run_dir / LAST_CHECKPOINT)
        if epochs <= checkpoint["epoch"]:
            raise PPVAEError(
                f"{run_dir} already has {checkpoint['epoch']} epochs, and epochs={epochs}; "
                f"pass a larger epochs (--epochs) than {checkpoint['epoch']} to train more"
            )
        if isinstance(module, nn.Module):
            restore_module(module, checkpoint, source=str(run_dir / LAST_CHECKPOINT))
        _to_device(module, device)
        set_rng_state(checkpoint["rng"])
        start_epoch = checkpoint["epoch"] + 1
        result.resumed_from_epoch = checkpoint["epoch"]
        result.best_epoch = checkpoint.get("best_epoch")
        result.best_validation = checkpoint.get("best_validation")
        result.validation_metric = checkpoint.get("validation_metric")
        result.history = _read_history(run_dir / METRICS_FILE, checkpoint["epoch"])
        seed = checkpoint["seed"]
    else:
        pyro.set_rng_seed(seed)

    # everything that can fail on bad input happens before anything is written
    batches = _Batches(data, batch_size, device, seed)
    first_batch = _check_data(module, data, batches, validation)
    svi = SVIStep(module, loss, optimizer, first_batch, validate_every_step=validate_every_step)
    del first_batch  # it may be a view of the whole of epoch 0
    if resume:
        svi.load_state_dict(checkpoint["optimizer"])
        svi.load_param_state(
            checkpoint.get("program_params", {}), source=str(run_dir / LAST_CHECKPOINT)
        )
    distributed.broadcast_tensors([*svi.params, *_buffers(module)])  # rank 0's start
    if run_dir is not None and distributed.is_writer():
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_history(run_dir / METRICS_FILE, result.history)

    sync_every = 1 if device.type == "cpu" else 50  # .item() is free on a CPU, a sync on a GPU
    bar = tqdm(
        total=max(0, epochs - start_epoch + 1) * len(batches),
        disable=None if progress else True,  # None: off when stderr is not a terminal
        unit="step",
        dynamic_ncols=True,
        leave=False,
    )
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_PYRO_NAN_WARNING, category=UserWarning)
            for epoch in range(start_epoch, epochs + 1):
                _set_mode(module, train=True)
                for objective, _, _ in svi.objectives:
                    if hasattr(objective, "set_epoch"):
                        objective.set_epoch(epoch)
                if lr_schedule is not None:
                    svi.set_lr(lr_schedule(epoch))
                bar.set_description(f"epoch {epoch}/{epochs}")
                distributed.seed_epoch(seed, epoch)  # a process group: from (seed, epoch, rank)
                tic = time.perf_counter()
                total_loss, steps, points = _train_epoch(
                    svi, batches, epoch, bar, sync_every, run_dir
                )
                if not _finite_state(module, svi):
                    raise _divergence(
                        epoch, steps, "parameters became NaN/inf in the last step", run_dir
                    )
                _set_mode(module, train=False)
                distributed.broadcast_tensors(_buffers(module))  # e.g. batch-norm statistics
                total_loss, points = distributed.sum_over_ranks(total_loss, points)
                record = {
                    "epoch": epoch,
                    "train_loss": total_loss / points,
                    "seconds": time.perf_counter() - tic,
                }
                if validation is not None:
                    metrics = _validate(module, validation, loss, epoch, steps, run_dir, data_plate)
                    record.update(metrics)
                    ((metric, value),) = metrics.items()
                    score = value if metric == "val_elbo" else -value
                    result.validation_metric = metric
                    if result.best_validation is None or score > result.best_validation:
                        result.best_validation, result.best_epoch = score, epoch
                if epoch_metrics is not None:
                    record.update(epoch_metrics(module))
                record = distributed.from_rank0(record)
                result.history.append(record)
                bar.set_postfix(
                    {
                        k: f"{v:.3f}"
                        for k, v in record.items()
                        if k in ("train_loss", "val_elbo", "val_loss")
                    }
                )
                if run_dir is not None and distributed.is_writer():
                    # metrics first: resume drops records past the checkpoint's epoch
                    _write_history(run_dir / METRICS_FILE, result.history)
                    _save_epoch(module, svi, run_dir, epoch, seed, config, result)
                result.epochs_this_call += 1
                if on_epoch_end is not None:
                    on_epoch_end(record)
    finally:
        bar.close()
    distributed.barrier()  # rank 0's last checkpoint is written when fit returns on any rank
    return result


def check_training_data(module: nn.Module, data, validation=None) -> None:
    """The data checks ``fit`` runs before it writes anything (see ``fit``), for callers that
    write files of their own first; ``data`` and ``validation`` as for ``fit``."""
    _check_data(module, data, _Batches(data, 1, torch.device("cpu"), seed=0), validation)


def _to_device(module, device: torch.device) -> None:
    if isinstance(module, nn.Module):
        module.to(device)


def _buffers(module) -> list[torch.Tensor]:
    return list(module.buffers()) if isinstance(module, nn.Module) else []


def _set_mode(module, train: bool) -> None:
    if isinstance(module, nn.Module):
        module.train(train)


def _check_data(module, data, batches: _Batches, validation) -> ProgramData:
    """Check the training inputs that are cheap to reach (see ``fit``) and the validation inputs;
    return the first training batch."""
    module_check = getattr(module, "check_data", None)

    def check(x: torch.Tensor, source: str) -> None:
        if x.is_complex():
            raise PPVAEError(f"{source} are complex ({x.dtype}); pass real values")
        if module_check is not None:
            module_check(x)
        else:
            check_finite(x, source)

    if batches.loader is not None:
        first = batches.first()
        check(first.first, "the training data")
    else:
        source = getattr(data, "x", None)
        if isinstance(data, DynamicBinarization):
            check_unit_interval(source, "dynamic binarisation")  # NaN/inf included
        elif hasattr(data, "epoch") and isinstance(source, torch.Tensor):
            check_finite(source, "the training data")
        view = batches.epoch_fn(0)
        check(view.first, "the training data")
        first = batches.first(view)
    if validation is not None:
        check(as_program_data(validation).first, "the validation data")
    batches.check = lambda x: check(x, "the training data")
    return first


def _train_epoch(
    svi: SVIStep, batches: _Batches, epoch: int, bar, sync_every: int, run_dir: Path | None
) -> tuple[float, int, int]:
    """One pass of SVI steps; returns the summed loss, the number of steps and of points."""
    total_loss = torch.zeros((), device=batches.device, dtype=torch.float64)
    steps = points = 0
    for batch in batches.epoch(epoch):
        steps += 1
        points += batch.num_points
        try:
            total_loss += svi.step(batch)
        except ValueError as error:
            # Pyro's argument validation is where NaN parameters usually surface
            if not _diverged(svi.module, error):
                raise
            raise _divergence(epoch, steps, "loss=nan", run_dir) from None
        if steps % sync_every == 0 and not torch.isfinite(total_loss):
            raise _divergence(epoch, steps, f"loss={float(total_loss)}", run_dir)
        bar.update(1)
    total = float(total_loss)
    if not math.isfinite(total):
        raise _divergence(epoch, steps, f"loss={total}", run_dir)
    return total, steps, max(points, 1)


def _validate(
    module, validation, loss, epoch: int, step: int, run_dir: Path | None, data_plate
) -> dict:
    """``validation_metrics``, with NaN turned into a ``DivergenceError``."""
    try:
        metrics = distributed.sharded_mean(  # in a process group: each rank its share
            lambda part: validation_metrics(module, part, 1000, loss=loss, data_plate=data_plate),
            as_program_data(validation),
        )
    except ValueError as error:
        if not _diverged(module, error):
            raise
        raise _divergence(epoch, step, "NaN in the validation pass", run_dir) from None
    ((metric, value),) = metrics.items()
    if math.isnan(value):
        raise _divergence(epoch, step, f"{metric}=nan", run_dir)
    return metrics


def _finite_state(module, svi: SVIStep | None = None) -> bool:
    """Whether every floating parameter and buffer is finite (one host sync)."""
    values = list(module.state_dict().values()) if isinstance(module, nn.Module) else []
    if svi is not None:
        values += list(svi.program_params.values())
    flags = [torch.isfinite(v).all() for v in values if v.is_floating_point()]
    return not flags or bool(torch.stack(flags).all())


def _diverged(module: nn.Module, error: ValueError) -> bool:
    text = str(error).lower()
    return not _finite_state(module) or "nan" in text or "inf" in text


def _divergence(epoch: int, step: int, detail: str, run_dir: Path | None) -> DivergenceError:
    where = ""
    if run_dir is not None and (run_dir / LAST_CHECKPOINT).exists():
        where = f"; the last good checkpoint is {run_dir / LAST_CHECKPOINT}"
    return DivergenceError(
        f"training diverged at epoch {epoch}, step {step} ({detail}){where}; "
        "lower the learning rate (--lr) or check the data"
    )


def _save_epoch(module, svi: SVIStep, run_dir: Path, epoch: int, seed: int, config, result) -> None:
    checkpoint = {
        "format": CHECKPOINT_FORMAT,
        "model": model_identity(module),
        "state_dict": {k: v.detach().cpu() for k, v in module.state_dict().items()}
        if isinstance(module, nn.Module)
        else {},
        "program_params": svi.param_state(),
        "optimizer": svi.state_dict(),
        "rng": rng_state(),
        "epoch": epoch,
        "seed": seed,
        "config": config,
        "best_epoch": result.best_epoch,
        "best_validation": result.best_validation,
        "validation_metric": result.validation_metric,
    }
    # checkpoint.pt is the commit point; checkpoint-best.pt is kept at the epoch it names
    commit_epoch(checkpoint, run_dir, is_best=result.best_epoch in (epoch, None))
