"""Anomaly and out-of-distribution scores of a trained latent-variable model, one per input.

Higher means more anomalous for every score:

.. math::

    s_{\\text{nll}}(x) = -\\log \\hat p_θ(x), \\qquad
    s_{\\text{elbo}}(x) = -\\frac{1}{K} \\sum_k \\log w_k, \\qquad
    s_{\\text{rec}}(x) = \\lVert x - \\mathbb{E}_θ[x \\mid z = μ_φ(x)] \\rVert_2^2,

where :math:`\\log w_k = \\log p_θ(x, z_k) - \\log q_φ(z_k \\mid x)` are the K importance weights of
:func:`ppvae.inference.log_weights` and :math:`\\log \\hat p_θ(x)` their log-mean-exp (with its
delta-method standard error and the PSIS :math:`\\hat k` of the same weights). The likelihood of a
generative model is a poor anomaly score on its own: inputs simpler than the training data (a
constant image, a digit 1) can get a *higher* likelihood than the training data themselves [1].
Two published corrections are implemented:

- **Likelihood ratio** [2]: a background model :math:`p_{θ_0}` of the same family is trained on
  perturbed inputs (each entry replaced, with probability μ, by a uniform draw; :func:`perturb`),
  which learns the population-level statistics (background) but not the semantics, and

  .. math:: s_{\\text{LR}}(x) = -\\mathrm{LLR}(x) = \\log \\hat p_{θ_0}(x) - \\log \\hat p_θ(x).

- **Input complexity** [3]: a lossless compressor is a universal model of the input's complexity;
  with :math:`L(x)` the compressor's code length of x in nats,

  .. math:: s_{\\text{IC}}(x) = -\\log \\hat p_θ(x) - L(x),
            \\qquad L(x) = 8 \\ln 2 \\cdot |C(\\operatorname{quant}(x))|,

  where quant(x) = round(255·clip(x, 0, 1)) as unsigned bytes and |C(·)| is the length in bytes of
  the compressor's *complete* output: ``"png"`` — a greyscale (``L``) PNG file written by Pillow at
  ``compress_level=9`` (image shape from ``image_shape``; a flat input is a 1×D image), or
  ``"zlib"`` — ``zlib.compress`` at level 9 of the flat byte string. Headers add the same constant
  to every input's code length, which shifts every score equally and changes no ranking.
  Serrà et al. write both terms in bits per dimension; dividing by :math:`D \\ln 2` gives theirs.

AUROC and AUPRC (anomalies as the positive class) come from scikit-learn.

[1] Do Deep Generative Models Know What They Don't Know?, Nalisnick, Matsukawa, Teh, Gorur,
    Lakshminarayanan (ICLR 2019).
[2] Likelihood Ratios for Out-of-Distribution Detection, Ren, Liu, Fertig, Snoek, Poplin,
    DePristo, Dillon, Lakshminarayanan (NeurIPS 2019).
[3] Input Complexity and Out-of-Distribution Detection with Likelihood-based Generative Models,
    Serrà, Álvarez, Gómez, Slizovskaia, Núñez, Luque (ICLR 2020).
"""

from __future__ import annotations

import csv
import io
import json
import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyro
import torch
from torch import nn

from ppvae.data import DynamicBinarization
from ppvae.errors import PPVAEError
from ppvae.inference import fit, log_marginal_stderr, log_weights
from ppvae.inference.evaluate import pareto_khat, reconstruction

COMPRESSORS = ("png", "zlib")
SCORE_NAMES = ("neg_log_marginal", "neg_elbo", "reconstruction", "likelihood_ratio", "complexity")


@dataclass
class AnomalyScores:
    """Per-input scores ``[N]`` (higher = more anomalous) and the diagnostics of −log p(x)."""

    neg_log_marginal: torch.Tensor
    neg_elbo: torch.Tensor
    reconstruction: torch.Tensor
    log_marginal_stderr: torch.Tensor
    khat: torch.Tensor
    likelihood_ratio: torch.Tensor | None = None
    complexity: torch.Tensor | None = None
    num_samples: int = 0
    compressor: str | None = None
    notes: list[str] = field(default_factory=list)

    def scores(self) -> dict[str, torch.Tensor]:
        """The scores that were computed, by name (see ``SCORE_NAMES``)."""
        named = {name: getattr(self, name) for name in SCORE_NAMES}
        return {name: value for name, value in named.items() if value is not None}

    def columns(self) -> dict[str, torch.Tensor]:
        """Scores and diagnostics, one column each."""
        return {
            **self.scores(),
            "log_marginal_stderr": self.log_marginal_stderr,
            "khat": self.khat,
        }

    def to_csv(self, path: str | Path, labels: torch.Tensor | None = None) -> Path:
        """One row per input: ``index[, label], <columns>``."""
        columns = {k: v.detach().cpu().double().numpy() for k, v in self.columns().items()}
        path = Path(path)
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            head = ["index"] + (["label"] if labels is not None else []) + list(columns)
            writer.writerow(head)
            for i in range(len(self.neg_log_marginal)):
                row = [i] + ([int(labels[i])] if labels is not None else [])
                writer.writerow(row + [repr(float(c[i])) for c in columns.values()])
        return path

    def to_dict(self) -> dict:
        def clean(value: float) -> float | None:
            return value if math.isfinite(value) else None

        return {
            "num_samples": self.num_samples,
            "compressor": self.compressor,
            "notes": self.notes,
            **{k: [clean(float(v)) for v in t.tolist()] for k, t in self.columns().items()},
        }

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict())
        if path is not None:
            Path(path).write_text(text)
        return text


# --- the pieces, each exactly as defined in the module docstring --------------------------------


def quantize(x: torch.Tensor) -> np.ndarray:
    """round(255·clip(x, 0, 1)) as ``uint8``, same shape (round half to even)."""
    return torch.round(x.detach().cpu().double().clamp(0, 1) * 255).to(torch.uint8).numpy()


def code_length_bytes(
    x: torch.Tensor, compressor: str = "png", image_shape: Sequence[int] | None = None
) -> torch.Tensor:
    """|C(quant(x_n))| in bytes for each row of ``x [N, D]``: ``[N]`` (float64)."""
    if compressor not in COMPRESSORS:
        raise PPVAEError(f"unknown compressor {compressor!r}; use one of {', '.join(COMPRESSORS)}")
    if x.dim() != 2:
        x = x.reshape(x.shape[0], -1)
    size = x.shape[1]
    if compressor == "png":
        channels, height, width = _image_dims(image_shape, size)
    lengths = []
    for row in quantize(x):
        if compressor == "zlib":
            lengths.append(len(zlib.compress(row.tobytes(), 9)))
        else:
            lengths.append(_png_length(row, channels, height, width))
    return torch.tensor(lengths, dtype=torch.float64)


def code_length_nats(
    x: torch.Tensor, compressor: str = "png", image_shape: Sequence[int] | None = None
) -> torch.Tensor:
    """L(x_n) = 8 ln 2 · |C(quant(x_n))| nats: ``[N]`` (float64)."""
    return 8 * math.log(2) * code_length_bytes(x, compressor, image_shape)


def _image_dims(image_shape: Sequence[int] | None, size: int) -> tuple[int, int, int]:
    if image_shape is None:
        return 1, 1, size
    dims = tuple(int(d) for d in image_shape)
    if len(dims) == 2:
        dims = (1, *dims)
    if len(dims) != 3 or dims[0] not in (1, 3) or math.prod(dims) != size:
        raise PPVAEError(
            f"image_shape {tuple(image_shape)} does not describe a grey or RGB image of {size} "
            "values; pass (C, H, W) with C = 1 or 3, or use compressor='zlib'"
        )
    return dims


def _png_length(row: np.ndarray, channels: int, height: int, width: int) -> int:
    from PIL import Image

    array = row.reshape(channels, height, width)
    image = (
        Image.fromarray(array[0], mode="L")
        if channels == 1
        else Image.fromarray(np.ascontiguousarray(array.transpose(1, 2, 0)), mode="RGB")
    )
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=9)
    return buffer.tell()


def complexity_score(neg_log_marginal: torch.Tensor, code_length: torch.Tensor) -> torch.Tensor:
    """s_IC = −log p(x) − L(x), both in nats: ``[N]`` (float64)."""
    return neg_log_marginal.detach().cpu().double() - code_length.detach().cpu().double()


def likelihood_ratio_score(
    neg_log_marginal: torch.Tensor, background_neg_log_marginal: torch.Tensor
) -> torch.Tensor:
    """s_LR = log p_θ0(x) − log p_θ(x) = (−log p_θ(x)) − (−log p_θ0(x)): ``[N]`` (float64)."""
    return (
        neg_log_marginal.detach().cpu().double()
        - background_neg_log_marginal.detach().cpu().double()
    )


# --- the background model of [2] ----------------------------------------------------------------


def perturb(x: torch.Tensor, rate: float, *, seed: int = 0) -> torch.Tensor:
    """Each entry independently, with probability ``rate``, replaced by a uniform draw [2].

    The draw is from {0, 1/255, ..., 1} (Ren et al.'s uniform over the 256 grey levels); for binary
    inputs (every entry 0 or 1) it is from {0, 1}, so the result stays binary.
    """
    if not 0.0 <= rate <= 1.0:
        raise PPVAEError(f"the perturbation rate must lie in [0, 1], got {rate}")
    generator = torch.Generator().manual_seed(seed)
    x_cpu = x.detach().cpu()
    replace = torch.rand(x_cpu.shape, generator=generator) < rate
    binary = bool(((x_cpu == 0) | (x_cpu == 1)).all())
    levels = 2 if binary else 256
    values = torch.randint(levels, x_cpu.shape, generator=generator).to(x_cpu.dtype) / (levels - 1)
    return torch.where(replace, values, x_cpu).to(x.device)


def train_background(
    module: nn.Module,
    data: torch.Tensor | DynamicBinarization,
    *,
    rate: float = 0.2,
    epochs: int = 20,
    batch_size: int = 100,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    seed: int = 0,
    device: str | torch.device = "auto",
    progress: bool = False,
):
    """Train ``module`` (a fresh model of the foreground's family) on ``perturb(data, rate)``.

    ``data`` is the foreground's training set: a tensor, or a ``DynamicBinarization`` whose grey
    values are perturbed and then redrawn every epoch like the foreground's. Ren et al. also add an
    L2 penalty (``weight_decay``). Returns ``ppvae.inference.fit``'s ``FitResult``.
    """
    if isinstance(data, DynamicBinarization):
        perturbed = DynamicBinarization(perturb(data.x, rate, seed=seed), data.y, seed=data.seed)
    elif isinstance(data, torch.Tensor):
        perturbed = perturb(data, rate, seed=seed)
    else:
        raise PPVAEError(
            "the background model's data must be a tensor or a DynamicBinarization (data.train)"
        )
    return fit(
        module,
        perturbed,
        optimizer=pyro.optim.Adam({"lr": lr, "weight_decay": weight_decay}),
        epochs=epochs,
        batch_size=batch_size,
        seed=seed,
        progress=progress,
        device=device,
    )


# --- all scores at once -------------------------------------------------------------------------


def _neg_log_marginal(module, x, y, num_samples, chunk_size, data_plate):
    with torch.no_grad():
        log_w = log_weights(
            module.model,
            module.guide,
            x,
            y,
            num_particles=num_samples,
            chunk_size=chunk_size,
            data_plate=data_plate,
        )  # [K, N]
    return log_w, math.log(log_w.shape[0]) - torch.logsumexp(log_w, dim=0)


def reconstruction_error(
    module, x: torch.Tensor, y: torch.Tensor | None = None, *, data_plate: str = "data"
) -> torch.Tensor:
    """Σ_d (x_d − x̂_d)² with x̂ = ``module.reconstruct(x)`` (the decoder's mean at the encoder's
    mean), or, for modules without one, the mean of p(x|z) at one guide draw: ``[N]``."""
    with torch.no_grad():
        if hasattr(module, "reconstruct"):
            restored = module.reconstruct(x, y).reshape(x.shape)
            return ((x - restored) ** 2).reshape(x.shape[0], -1).sum(dim=1)
        result = reconstruction(module.model, module.guide, x, y, data_plate=data_plate)
    if result.mse is None:
        raise PPVAEError("the model's observed site has no mean; no reconstruction error exists")
    return result.mse * x[0].numel()


def anomaly_scores(
    module: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    num_samples: int = 1000,
    background: nn.Module | None = None,
    compressor: str | None = "png",
    image_shape: Sequence[int] | None = None,
    chunk_size: int | None = None,
    data_plate: str = "data",
    seed: int = 0,
) -> AnomalyScores:
    """Every score of the module docstring for the inputs ``x [N, D]`` (and labels ``y`` for
    conditional models, passed to ``model(x, y)`` / ``guide(x, y)``).

    ``background``: the model trained by :func:`train_background` (no likelihood-ratio score
    without it). ``compressor``: ``"png"``, ``"zlib"`` or None (no complexity score). The same
    K = ``num_samples`` importance weights give −log p(x), its standard error, k̂ and −ELBO; the
    random draws are seeded by ``seed`` and leave the caller's RNG alone.
    """
    if num_samples < 1:
        raise PPVAEError(f"num_samples must be >= 1, got {num_samples}")
    for model in (module, background):
        if hasattr(model, "check_data"):
            try:
                model.check_data(x)
            except PPVAEError as error:
                raise PPVAEError(
                    f"the scores evaluate the model's likelihood at x: {error}"
                ) from None
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        torch.manual_seed(seed)
        log_w, nll = _neg_log_marginal(module, x, y, num_samples, chunk_size, data_plate)
        rec = reconstruction_error(module, x, y, data_plate=data_plate)
        background_nll = None
        if background is not None:
            _, background_nll = _neg_log_marginal(
                background, x, y, num_samples, chunk_size, data_plate
            )
    result = AnomalyScores(
        neg_log_marginal=nll.cpu().double(),
        neg_elbo=-log_w.mean(dim=0).cpu().double(),
        reconstruction=rec.cpu().double(),
        log_marginal_stderr=log_marginal_stderr(log_w).cpu().double(),
        khat=pareto_khat(log_w),
        num_samples=num_samples,
        compressor=compressor,
    )
    if background_nll is not None:
        result.likelihood_ratio = likelihood_ratio_score(nll, background_nll)
    if compressor is not None:
        result.complexity = complexity_score(nll, code_length_nats(x, compressor, image_shape))
    bad = int((result.khat > 0.7).sum())
    if bad:
        result.notes.append(
            f"{bad} of {len(result.khat)} inputs have PSIS k-hat > 0.7: their log p(x) estimate is "
            "unreliable (more samples or a better guide)"
        )
    return result


def detection_metrics(
    scores: Mapping[str, torch.Tensor], is_anomaly: torch.Tensor
) -> dict[str, dict[str, float]]:
    """AUROC and AUPRC (average precision, anomalies positive) of each score: ``{name: {...}}``."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    labels = np.asarray(is_anomaly.detach().cpu().numpy(), dtype=bool)
    if labels.all() or not labels.any():
        raise PPVAEError(
            "AUROC/AUPRC need both normal and anomalous inputs; the labels mark "
            f"{int(labels.sum())} of {labels.size} as anomalous"
        )
    metrics = {}
    for name, values in scores.items():
        array = values.detach().cpu().double().numpy()
        if array.shape != labels.shape:
            raise PPVAEError(f"score {name!r} has {array.size} values for {labels.size} labels")
        if not np.isfinite(array).all():
            raise PPVAEError(f"score {name!r} has NaN/inf values; no AUROC is defined")
        metrics[name] = {
            "auroc": float(roc_auc_score(labels, array)),
            "auprc": float(average_precision_score(labels, array)),
        }
    return metrics
