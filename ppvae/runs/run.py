"""A run directory as a library object (DESIGN §5).

A run directory holds ``config.json`` (a :class:`~ppvae.runs.config.RunConfig`),
``checkpoint.pt`` and ``checkpoint-best.pt``, ``metrics.jsonl``, ``report.json`` (the best
checkpoint on the test split) and PNG figures: the training run's own files. Results derived
later from a run are written into folders of their own and never over these:
``evaluations/<split>-K<k>[-last]/`` (:meth:`Run.evaluate`), ``samples/`` (:meth:`Run.sample`)
and ``figures/<checkpoint>/`` (:meth:`Run.figures`).

>>> run = Run.create("runs/demo", model="vae", latent_dim=2, epochs=5)   # checks, writes config
>>> outcome = run.train()                                               # fit, report, figures
>>> run = load_run("runs/demo"); run.module                             # the best checkpoint
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ppvae.checkpoint import (
    LAST_CHECKPOINT,
    atomic_write_json,
    atomic_write_text,
    best_checkpoint,
    refuse_existing_run,
)
from ppvae.errors import PPVAEError
from ppvae.inference import distributed
from ppvae.runs.config import RunConfig, flag
from ppvae.runs.directory import RunLock, remove_temporary_files
from ppvae.runs.training import TrainOutcome, build_model, preflight, train_run

CONFIG_FILE = "config.json"
REPORT_FILE = "report.json"
RUN_FILES = (CONFIG_FILE, REPORT_FILE, "metrics.jsonl")
CHECKPOINTS = ("best", "last")
DERIVED_FOLDERS = ("evaluations", "samples", "figures", "posterior")
SAMPLE_SUFFIXES = (".png", ".npy")
# options that may change when a run is resumed: none of them changes the model or the data
RESUMABLE = ("epochs", "eval_samples", "eval_points", "device", "lr")


@dataclass
class Evaluation:
    """A report of :meth:`Run.evaluate` and the files it wrote into ``folder``."""

    report: Any
    folder: Path
    written: list[Path] = field(default_factory=list)


def default_run_dir(config: RunConfig) -> Path:
    """``runs/MODEL-DATASET-TIMESTAMP``."""
    name = config.dataset if config.dataset == "digits" else Path(config.dataset).stem
    return Path("runs") / f"{config.model}-{name}-{time.strftime('%Y%m%d-%H%M%S')}"


class Run:
    """One run directory: its configuration, data, model, metrics and reports.

    ``Run.create`` starts a new run (everything that can fail on bad input is checked before the
    folder is written), ``Run.load`` / :func:`load_run` opens an existing one. ``checkpoint``
    (``best`` or ``last``) and ``device`` choose the weights :attr:`module` holds.
    """

    def __init__(
        self, path: str | Path, config: RunConfig, *, checkpoint: str = "best", device="auto"
    ):
        if checkpoint not in CHECKPOINTS:
            raise PPVAEError(f"checkpoint must be best or last, got {checkpoint!r}")
        self.path = Path(path)
        self.config = config
        self.checkpoint = checkpoint
        self.device = device
        self.notices: list[str] = []  # what the run's writer cleaned up or repaired
        self._lock = RunLock(self.path)

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r}, model={self.config.model!r})"

    # -- opening ----------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        path: str | Path | None = None,
        config: RunConfig | None = None,
        *,
        overwrite: bool = False,
        **options: Any,
    ) -> Run:
        """A new run in ``path`` (default ``runs/MODEL-DATASET-TIMESTAMP``) from ``config`` or
        from flat options (``model="vae", latent_dim=2, epochs=5``; see :class:`RunConfig`).

        The data are loaded, the model built and the objective evaluated once on a few points
        before ``config.json`` is written; a folder that holds a run is refused unless
        ``overwrite`` (its training files and derived folders are then removed).
        """
        if config is None:
            config = RunConfig.from_options(**options)
        elif options:
            raise PPVAEError("pass either config or options to Run.create, not both")
        path = default_run_dir(config) if path is None else path
        refuse_existing_run(path, resume=False, overwrite=overwrite)
        run = cls(path, config)
        run.preflight()
        try:
            run.path.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise PPVAEError(f"cannot create --run-dir {run.path}: {error.strerror}") from None
        run.take_lock()
        refuse_existing_run(path, resume=False, overwrite=overwrite)  # under the lock now
        if overwrite:
            run._remove_run_files()
        try:
            atomic_write_json(config.to_dict(), run.path / CONFIG_FILE)
        except OSError as error:
            raise PPVAEError(f"cannot write {run.path / CONFIG_FILE}: {error.strerror}") from None
        return run

    def take_lock(self) -> None:
        """Become the one writer of the run directory (:class:`~ppvae.runs.directory.RunLock`)
        and remove what interrupted writes left; notices go to :attr:`notices`."""
        notice = self._lock.acquire()
        if notice:
            self.notices.append(notice)
        removed = remove_temporary_files(self.path)
        if removed:
            self.notices.append(
                f"removed {len(removed)} temporary file(s) of interrupted writes from {self.path}"
            )

    def release_lock(self) -> None:
        self._lock.release()

    @classmethod
    def load(cls, path: str | Path, *, checkpoint: str = "best", device="auto") -> Run:
        """The run in ``path``; a one-line error when it is not a ppvae run directory."""
        path = Path(path)
        config_path = path / CONFIG_FILE
        if not path.is_dir():
            what = "is a file" if path.exists() else "does not exist"
            raise PPVAEError(f"{path} {what}; pass a run directory written by ppvae train")
        if not config_path.is_file():
            raise PPVAEError(f"{path} is not a ppvae run directory (no config.json); pass one")
        try:
            data = json.loads(config_path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise PPVAEError(
                f"{config_path} is not JSON ({error}); restore it or train a new run"
            ) from None
        config = RunConfig.from_dict(data, str(config_path))
        return cls(path, config, checkpoint=checkpoint, device=device)

    # -- contents ---------------------------------------------------------------------------
    @cached_property
    def data(self):
        """The run's data (``ppvae.data.DataSplits``), split as when it was trained."""
        from ppvae.data import load_data

        return load_data(**self.config.data_options())

    def build_module(self) -> nn.Module:
        """The untrained model, initialised from the run's seed."""
        torch.manual_seed(self.config.seed)
        return build_model(self.config, self.data)

    @cached_property
    def module(self) -> nn.Module:
        """The model with the weights of :attr:`checkpoint`, on :attr:`device`, in eval mode."""
        return self.restore(self.checkpoint, self.device)

    def checkpoint_path(self, checkpoint: str = "best") -> Path:
        """The file of the ``best`` checkpoint (:func:`~ppvae.checkpoint.best_checkpoint`: the
        one holding the epoch ``checkpoint.pt`` names as best) or of the ``last`` one."""
        if checkpoint == "last":
            return self.path / LAST_CHECKPOINT
        return best_checkpoint(self.path)

    def restore(self, checkpoint: str = "best", device="auto") -> nn.Module:
        """A new module holding the weights of the ``best`` or ``last`` checkpoint."""
        from ppvae.checkpoint import load_checkpoint, restore_module
        from ppvae.inference.train import resolve_device

        if checkpoint not in CHECKPOINTS:
            raise PPVAEError(f"checkpoint must be best or last, got {checkpoint!r}")
        module = build_model(self.config, self.data)
        path = self.checkpoint_path(checkpoint)
        restore_module(module, load_checkpoint(path), source=str(path))
        return module.to(resolve_device(device)).eval()

    @property
    def metrics(self) -> list[dict]:
        """The per-epoch records of ``metrics.jsonl`` (a cut-off last line is skipped)."""
        from ppvae.inference.train import read_metrics

        return read_metrics(self.path)

    @property
    def report(self):
        """The training run's ``EvaluationReport`` (``report.json``), or None before it exists."""
        from ppvae.inference.evaluate import EvaluationReport

        path = self.path / REPORT_FILE
        if not path.is_file():
            return None
        try:
            return EvaluationReport.from_dict(json.loads(path.read_text()))
        except (ValueError, TypeError, KeyError) as error:
            raise PPVAEError(
                f"{path} is not a ppvae report ({error}); resume the run to rewrite it"
            ) from None

    # -- training ---------------------------------------------------------------------------
    def preflight(self) -> bool:
        """Check the data and the objective before anything is written (:func:`preflight`);
        returns whether the model has training-only auxiliary losses."""
        return preflight(self.config, self.data, self.build_module())

    def resume_with(self, **options: Any) -> Run:
        """This run with the options a resumed run may change (``epochs``, ``lr``,
        ``eval_samples``, ``device``) recorded in ``config.json``; other options must equal the
        saved ones. The returned run holds this one's lock."""
        saved = self.config.flat()
        changed = sorted(
            k for k, v in options.items() if k not in RESUMABLE and saved.get(k, v) != v
        )
        if changed:
            flags = ", ".join(map(flag, changed))
            verb = "differs" if len(changed) == 1 else "differ"
            raise PPVAEError(
                f"{flags} {verb} from the run being resumed; resume uses its saved options "
                "(only --epochs, --lr, --device and --eval-samples may change) — start a new "
                "--run-dir instead"
            )
        config = self.config.replace(**options)
        resumed = Run(self.path, config, checkpoint=self.checkpoint, device=self.device)
        resumed._lock, resumed.notices = self._lock, self.notices
        if config != self.config:
            resumed.take_lock()
            try:
                atomic_write_json(config.to_dict(), self.path / CONFIG_FILE)
            except OSError as error:
                raise PPVAEError(
                    f"cannot write {self.path / CONFIG_FILE}: {error.strerror}"
                ) from None
        return resumed

    def train(
        self,
        *,
        resume: bool = False,
        progress: bool = True,
        log: Callable[[str], None] | None = None,
    ) -> TrainOutcome:
        """Train (or with ``resume`` continue) to ``config.epochs``, then evaluate the best
        checkpoint on the test split with ``config.eval_samples`` importance samples and draw
        the figures into the run directory (:func:`ppvae.runs.training.train_run`: the lock,
        the clean-up of interrupted writes, the completion of a finished run). ``log`` receives
        the lines worth showing before training starts."""
        outcome = train_run(self, resume=resume, progress=progress, log=log)
        self.__dict__.pop("module", None)
        return outcome

    # -- derived results --------------------------------------------------------------------
    def evaluate(
        self,
        *,
        split: str = "test",
        num_samples: int = 5000,
        batch_size: int = 100,
        seed: int = 0,
        progress: bool = False,
        folder: str | Path | None = None,
        num_points: int | None = None,
    ) -> Evaluation:
        """Evaluate :attr:`module` per data point of ``split`` (ELBO, IWAE ladder, log p(x),
        gap, PSIS k̂) and write ``report.json`` and its figures into ``folder`` (default
        ``RUN/evaluations/<split>-K<num_samples>``, ``-N<num_points>`` added for a seeded subset
        of ``num_points`` points, ``-last`` for the last checkpoint)."""
        if folder is None:
            suffix = "" if num_points is None else f"-N{num_points}"
            suffix += "" if self.checkpoint == "best" else f"-{self.checkpoint}"
            folder = self.path / "evaluations" / f"{split}-K{num_samples}{suffix}"
        return self._evaluate_into(
            Path(folder),
            self.module,
            split=split,
            num_samples=num_samples,
            batch_size=batch_size,
            device=self.device,
            seed=seed,
            progress=progress,
            num_points=num_points,
        )

    def _evaluate_into(self, folder: Path, module, *, split, num_samples, **options) -> Evaluation:
        from ppvae.plots.evaluation import plot_report

        report = self.report_of(module, split=split, num_samples=num_samples, **options)
        if not distributed.is_writer():  # torchrun: every rank evaluates its share, rank 0 writes
            return Evaluation(report, folder, [])
        folder.mkdir(parents=True, exist_ok=True)
        figures = plot_report(report, folder)
        atomic_write_text(report.to_json(), folder / REPORT_FILE)  # last: the folder is complete
        return Evaluation(report, folder, [folder / REPORT_FILE, *figures])

    def report_of(self, module, *, split: str, num_samples: int, **options):
        """``ppvae.inference.evaluate`` of ``module`` on ``split`` with the ladder
        1, 5, 50, 500, 5000 below ``num_samples``; nothing is written."""
        from ppvae.inference.evaluate import evaluate

        x, y = self.data.split(split)
        ladder = tuple(k for k in (1, 5, 50, 500, 5000) if k < num_samples) + (num_samples,)
        return evaluate(module, (x, y), num_samples=num_samples, ladder=ladder, **options)

    def sample(
        self,
        num: int = 64,
        *,
        label: int | None = None,
        out: str | Path | None = None,
        seed: int = 0,
    ) -> Path:
        """Decode ``num`` draws from the prior (of class ``label`` for a conditional model) into
        an image grid ``.png`` or an array ``.npy`` at ``out`` (default
        ``RUN/samples/samples[_labelL][-last].png``). Returns the path written."""
        import numpy as np

        from ppvae.plots.figures import is_conditional
        from ppvae.plots.samples import save_image_grid

        out = self._sample_path(out, label)
        module, data = self.module, self.data
        if label is not None:
            if not is_conditional(module):
                raise PPVAEError(
                    f"--label needs a conditional model (cvae); this run is {self.config.model}"
                )
            if not 0 <= label < data.num_classes:
                raise PPVAEError(f"--label must be in 0..{data.num_classes - 1}, got {label}")
        if out.suffix.lower() != ".npy" and data.image_shape is None:
            raise PPVAEError("these data are not images; pass --out FILE.npy to save the samples")
        torch.manual_seed(seed)
        device = next(module.parameters()).device
        labels = None
        if label is not None:
            labels = torch.full((num,), label, dtype=torch.long, device=device)
        with torch.no_grad():
            samples = module.sample_prior(num, labels).cpu()
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            if out.suffix.lower() == ".npy":
                with open(out, "wb") as handle:  # np.save(path) would append ".npy" to ".NPY"
                    np.save(handle, samples.numpy())
            else:
                title = f"{num} samples" + ("" if label is None else f", label {label}")
                save_image_grid(samples, data.image_shape, out, title=title)
        except OSError as error:
            raise PPVAEError(f"cannot write --out {out}: {error.strerror or error}") from None
        return out

    def _sample_path(self, out: str | Path | None, label: int | None) -> Path:
        if out is None:
            name = "samples" + ("" if label is None else f"_label{label}")
            name += "" if self.checkpoint == "best" else f"-{self.checkpoint}"
            return self.path / "samples" / f"{name}.png"
        path = Path(out).expanduser()
        if path.is_dir():
            raise PPVAEError(f"--out {out} is a directory; name a file in it")
        if path.suffix.lower() not in SAMPLE_SUFFIXES:
            kind = f"{path.suffix} files" if path.suffix else "a file without a suffix"
            raise PPVAEError(
                f"--out {out}: cannot write {kind}; use one of {', '.join(SAMPLE_SUFFIXES)}"
            )
        return path

    def figures(
        self, folder: str | Path | None = None, *, left_out: list[str] | None = None
    ) -> list[Path]:
        """Draw the run's figures for :attr:`module` into ``folder`` (default
        ``RUN/figures/<checkpoint>``); returns the paths written. ``left_out``, if given,
        receives one line per figure the model cannot have, saying why."""
        from ppvae.plots.figures import run_figures

        folder = self.path / "figures" / self.checkpoint if folder is None else Path(folder)
        return run_figures(self.module, self.data, folder, self.metrics or None, left_out=left_out)

    def _remove_run_files(self) -> None:
        """Before ``overwrite``: the training files and derived folders of the old run."""
        if not self.path.is_dir():
            return
        for path in self.path.iterdir():
            if path.is_dir() and path.name in DERIVED_FOLDERS:
                shutil.rmtree(path)
            elif path.is_file() and (path.name in RUN_FILES or path.suffix in (".pt", ".png")):
                path.unlink()


def load_run(path: str | Path, *, checkpoint: str = "best", device="auto") -> Run:
    """The run in ``path`` (:meth:`Run.load`): ``load_run("runs/demo").module`` is its best
    model, ``.data`` its data, ``.metrics`` / ``.report`` its records."""
    return Run.load(path, checkpoint=checkpoint, device=device)
