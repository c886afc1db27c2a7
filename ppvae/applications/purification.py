"""Purification: corrupt inputs with seeded generators, restore them with a trained model.

Corruptions (``corrupt``), all clipped to [0, 1], each with a visibility mask
:math:`m \\in \\{0, 1\\}^D` (1 where the corrupted entry is the clean one or carries information):

- ``gaussian-noise``: :math:`\\tilde x = \\operatorname{clip}(x + σ ε)`, ε ~ N(0, I); m = 1.
- ``salt-and-pepper``: a fraction of entries set to 0 or 1 (probability ½ each); m = 1
  (which entries were hit is not known to the restorer).
- ``occlusion``: a square of side ⌈level·H⌉ at a uniform position per image set to 0; m = 0 there.
- ``missing-pixels``: a fraction of entries set to 0; m = 0 there.

Restorations (``restore``):

- ``encoder-mean``: :math:`\\hat x = \\mathbb{E}_θ[x \\mid z = μ_φ(\\tilde x)]` (``module.decode``
  at ``module.encode``'s mean) [1].
- ``iterate``: the same map applied T times from :math:`x_0 = \\tilde x`,
  :math:`x_{t+1} = m \\odot \\tilde x + (1 - m) \\odot \\mathbb{E}_θ[x \\mid μ_φ(x_t)]` when
  entries were removed (the visible ones stay clamped), else :math:`x_{t+1} =
  \\mathbb{E}_θ[x \\mid μ_φ(x_t)]`.
- ``importance``: the posterior mean of the decoder's mean by self-normalised importance sampling
  with the guide as proposal, :math:`z_k \\sim q_φ(z \\mid \\tilde x)`,

  .. math::

      \\log w_k = \\log p(z_k) + \\log p_θ(\\tilde x \\mid z_k) - \\log q_φ(z_k \\mid \\tilde x),
      \\quad \\bar w_k = w_k / \\textstyle\\sum_j w_j,

      \\hat x = \\textstyle\\sum_k \\bar w_k\\, μ_θ(z_k), \\qquad
      \\operatorname{sd}_d^2 = \\textstyle\\sum_k \\bar w_k (μ_θ(z_k)_d - \\hat x_d)^2,

  the per-pixel spread of the restoration over the posterior (the predictive spread adds the
  observation variance: :math:`\\sum_k \\bar w_k (\\operatorname{Var}_θ[x_d \\mid z_k] +
  (μ_θ(z_k)_d - \\hat x_d)^2)`).
- ``impute`` (occlusion, missing pixels): Bayesian imputation. The same model program with its
  observed site masked by m (``poutine``: the site's distribution becomes ``.mask(m)``), so the
  weights target :math:`p(z \\mid x_{\\text{vis}}) \\propto p(z) \\prod_{d: m_d = 1} p_θ(x_d \\mid
  z)`, and the missing entries are filled with :math:`\\mathbb{E}[x_{\\text{mis}} \\mid
  x_{\\text{vis}}]` estimated as above; the proposal is the guide fed the zero-filled input.

The log-weights are the sum of the traced sites' log-densities, the math of
:func:`ppvae.inference.log_weights`, here computed on traces this module keeps, since it also
needs every particle's decoder mean μ_θ(z_k) from the replayed model trace.

Errors to the clean input (``restoration_errors``), per point: MSE (mean over entries), BCE (mean
over entries of −[x log x̂ + (1−x) log(1−x̂)], x̂ clipped to [1e-6, 1−1e-6]) and
PSNR = 10 log₁₀(1 / MSE) dB (peak value 1).

Imputation by self-normalised importance sampling under the observed-entries likelihood follows
[2]; here the model is trained on complete data and only the restoration masks it.

[1] Auto-Encoding Variational Bayes, Kingma, Welling (2014).
[2] MIWAE: Deep Generative Modelling and Imputation of Incomplete Data Sets, Mattei, Frellsen
    (ICML 2019).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

from ppvae.errors import ContractError, PPVAEError
from ppvae.inference.importance import chunk_log_weights, sample_sites
from ppvae.inference.program import VECTORISED, ProgramData, program_info

CORRUPTIONS = ("gaussian-noise", "salt-and-pepper", "occlusion", "missing-pixels")
DEFAULT_LEVELS = {
    "gaussian-noise": 0.3,
    "salt-and-pepper": 0.2,
    "occlusion": 0.5,
    "missing-pixels": 0.5,
}
METHODS = ("encoder-mean", "iterate", "importance", "impute")
# at most this many particle x point x entry values per forward pass
ELEMENT_BUDGET = 2**24


@dataclass
class Corrupted:
    kind: str
    level: float
    x: torch.Tensor  # [N, D] corrupted inputs
    visible: torch.Tensor  # [N, D] bool: False where the entry was removed


def corrupt(
    x: torch.Tensor,
    kind: str,
    *,
    level: float | None = None,
    image_shape: Sequence[int] | None = None,
    seed: int = 0,
) -> Corrupted:
    """One corruption of the module docstring applied to ``x [N, D]`` (values in [0, 1])."""
    if kind not in CORRUPTIONS:
        raise PPVAEError(f"unknown corruption {kind!r}; use one of {', '.join(CORRUPTIONS)}")
    level = DEFAULT_LEVELS[kind] if level is None else float(level)
    if level < 0 or (kind != "gaussian-noise" and level > 1):
        raise PPVAEError(f"corruption level {level} out of range for {kind}")
    generator = torch.Generator().manual_seed(seed)
    device, x = x.device, x.detach().cpu().float()
    visible = torch.ones_like(x, dtype=torch.bool)
    if kind == "gaussian-noise":
        out = (x + level * torch.randn(x.shape, generator=generator)).clamp(0, 1)
    elif kind == "salt-and-pepper":
        hit = torch.rand(x.shape, generator=generator) < level
        salt = (torch.rand(x.shape, generator=generator) < 0.5).float()
        out = torch.where(hit, salt, x)
    elif kind == "missing-pixels":
        visible = torch.rand(x.shape, generator=generator) >= level
        out = torch.where(visible, x, torch.zeros_like(x))
    else:
        if image_shape is None:
            raise PPVAEError("the occlusion corruption needs image_shape (C, H, W)")
        channels, height, width = (int(d) for d in image_shape)
        side = min(height, width, math.ceil(level * min(height, width)))
        rows = torch.randint(height - side + 1, (x.shape[0],), generator=generator)
        cols = torch.randint(width - side + 1, (x.shape[0],), generator=generator)
        grid = visible.reshape(-1, channels, height, width)
        for n, (r, c) in enumerate(zip(rows.tolist(), cols.tolist(), strict=True)):
            grid[n, :, r : r + side, c : c + side] = False
        visible = grid.reshape(x.shape)
        out = torch.where(visible, x, torch.zeros_like(x))
    return Corrupted(kind=kind, level=level, x=out.to(device), visible=visible.to(device))


# --- traces of particles ------------------------------------------------------------------------


class MaskObserved(Messenger):
    """Mask the log-density of one observed site entry by entry: its distribution ``d`` becomes
    ``d.base_dist.mask(visible).to_event(...)``, so only visible entries are observed."""

    def __init__(self, visible: torch.Tensor, site: str | None = None):
        super().__init__()
        self.visible = visible
        self.site = site

    def _process_message(self, msg):
        if msg["type"] != "sample" or not msg["is_observed"] or site_is_subsample(msg):
            return
        if self.site is not None and msg["name"] != self.site:
            return
        fn, event_dims = msg["fn"], 0
        while isinstance(fn, torch.distributions.Independent):
            event_dims += fn.reinterpreted_batch_ndims
            fn = fn.base_dist
        try:
            masked = fn.mask(self.visible.reshape(self.visible.shape[0], *fn.batch_shape[-1:]))
        except (RuntimeError, ValueError):
            raise ContractError(
                f"cannot mask observed site {msg['name']!r} (batch shape {tuple(fn.batch_shape)}) "
                "entry by entry; imputation needs a likelihood with one batch entry per input value"
            ) from None
        msg["fn"] = masked.to_event(event_dims) if event_dims else masked


def _cuda(x: torch.Tensor) -> list[torch.device]:
    """The devices whose RNG a seeded block must fork: x's, when it is a CUDA device."""
    return [x.device] if x.device.type == "cuda" else []


def _base(fn):
    while hasattr(fn, "base_dist"):
        fn = fn.base_dist
    return fn


def _weights_and_moments(module, data: ProgramData, num_particles, visible, site, info):
    """(log w ``[K, N]``, decoder means and variances ``[K, N, ...]``) of one chunk: the one
    log-weight implementation (``chunk_log_weights``) on the model with its observed site
    masked to ``visible`` when given."""
    model = module.model if visible is None else MaskObserved(visible, site)(module.model)
    log_w, (model_trace, _) = chunk_log_weights(
        model, module.guide, data, num_particles, info, keep_traces=True
    )
    observed = {name: s for name, s in sample_sites(model_trace) if s["is_observed"]}
    wanted = site if site is not None else ("x" if "x" in observed else next(iter(observed), None))
    if wanted not in observed:
        raise ContractError(
            f"the model observes no site named {wanted!r}; observed sites: {sorted(observed)}"
        )
    x = data.first
    base = _base(observed[wanted]["fn"])
    mean = base.mean.expand(num_particles, *x.shape)
    variance = _variance(base).expand(num_particles, *x.shape)
    return log_w, mean, variance


def _variance(base) -> torch.Tensor:
    if isinstance(base, torch.distributions.ContinuousBernoulli):
        # torch's float32 formula goes negative for logits within ~0.01 of 0; float64 does not
        logits = base.logits.double()
        return type(base)(logits=logits).variance.to(base.logits.dtype)
    return base.variance


@dataclass
class ImportanceRestoration:
    mean: torch.Tensor  # [N, D] Σ_k w̄_k μ(z_k)
    std: torch.Tensor  # [N, D] spread of μ(z_k) under the weights
    predictive_std: torch.Tensor  # [N, D] with the observation variance added
    effective_sample_size: torch.Tensor  # [N] 1 / Σ_k w̄_k²


def importance_restore(
    module,
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    num_particles: int = 1000,
    visible: torch.Tensor | None = None,
    data_plate: str | None = None,
    site: str | None = None,
    seed: int = 0,
) -> ImportanceRestoration:
    """Self-normalised importance-sampling posterior mean of the decoder output (module
    docstring), with the observed site masked by ``visible`` when given (imputation); ``y``:
    labels of a conditional model."""
    if num_particles < 1:
        raise PPVAEError(f"num_particles must be >= 1, got {num_particles}")
    if hasattr(module, "check_data"):
        try:
            module.check_data(x)
        except PPVAEError as error:
            raise PPVAEError(
                f"importance restoration evaluates the model's likelihood at the corrupted input: "
                f"{error}"
            ) from None
    parts = []
    with torch.no_grad(), torch.random.fork_rng(devices=_cuda(x)):
        torch.manual_seed(seed)
        info = program_info(module.model, module.guide, ProgramData.of(x, y), data_plate)
        if info.particles != VECTORISED:
            raise ContractError(
                "importance restoration and imputation need a program that broadcasts over a "
                f"particle dimension; this one does not ({info.particle_note})"
            )
        per_point = num_particles * max(1, x[0].numel())
        step = max(1, ELEMENT_BUDGET // per_point)
        for start in range(0, x.shape[0], step):
            xs = x[start : start + step]
            vs = None if visible is None else visible[start : start + step]
            ys = None if y is None else y[start : start + step]
            data = ProgramData.of(xs, ys)
            log_w, mean, variance = _weights_and_moments(
                module, data, num_particles, vs, site, info
            )
            weights = torch.softmax(log_w, dim=0)  # [K, n]
            w = weights.reshape(*weights.shape, *(1,) * (xs.dim() - 1))
            restored = (w * mean).sum(dim=0)
            spread = (w * (mean - restored) ** 2).sum(dim=0)
            parts.append(
                (restored, spread, spread + (w * variance).sum(dim=0), 1 / (weights**2).sum(0))
            )
    mean, spread, predictive, ess = (torch.cat(p) for p in zip(*parts, strict=True))
    return ImportanceRestoration(
        mean, spread.clamp(min=0).sqrt(), predictive.clamp(min=0).sqrt(), ess
    )


def _encode_decode(module, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    if not (hasattr(module, "encode") and hasattr(module, "decode")):
        raise PPVAEError(
            "the encoder-mean and iterate restorations need module.encode(x) -> (mean, scale) and "
            "module.decode(z) -> E[x|z]; use the importance restoration for other models"
        )
    if y is None:
        return module.decode(module.encode(x)[0]).reshape(x.shape)
    return module.decode(module.encode(x, y)[0], y).reshape(x.shape)


def restore(
    module,
    corrupted: Corrupted,
    method: str,
    y: torch.Tensor | None = None,
    *,
    num_particles: int = 1000,
    iterations: int = 5,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(restored ``[N, D]``, per-entry uncertainty ``[N, D]`` or None) by one method."""
    x, visible = corrupted.x, corrupted.visible
    if method not in METHODS:
        raise PPVAEError(f"unknown restoration {method!r}; use one of {', '.join(METHODS)}")
    with torch.no_grad():
        if method == "encoder-mean":
            return _encode_decode(module, x, y), None
        if method == "iterate":
            if iterations < 1:
                raise PPVAEError(f"iterations must be >= 1, got {iterations}")
            current, keep = x, (visible if not visible.all() else torch.zeros_like(visible))
            for _ in range(iterations):
                current = torch.where(keep, x, _encode_decode(module, current, y))
            return current, None
    if method == "importance":
        result = importance_restore(module, x, y, num_particles=num_particles, seed=seed)
        return result.mean, result.std
    if visible.all():
        raise PPVAEError(
            f"imputation needs missing entries; the {corrupted.kind} corruption removes none "
            "(use importance)"
        )
    result = importance_restore(
        module, x, y, num_particles=num_particles, visible=visible, seed=seed
    )
    return torch.where(visible, x, result.mean), torch.where(
        visible, torch.zeros_like(x), result.predictive_std
    )


def restoration_errors(clean: torch.Tensor, restored: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-point MSE, BCE (nats per entry) and PSNR (dB) of ``restored`` against ``clean``."""
    clean = clean.detach().cpu().double().reshape(clean.shape[0], -1)
    restored = restored.detach().cpu().double().reshape(clean.shape)
    mse = ((clean - restored) ** 2).mean(dim=1)
    probs = restored.clamp(1e-6, 1 - 1e-6)
    bce = -(clean * probs.log() + (1 - clean) * (1 - probs).log()).mean(dim=1)
    psnr = 10 * torch.log10(1 / mse.clamp(min=1e-12))
    return {"mse": mse, "bce": bce, "psnr": psnr}


def applicable(kind: str, method: str) -> bool:
    """Imputation needs removed entries; every other pair applies."""
    return method != "impute" or kind in ("occlusion", "missing-pixels")


def purification_table(
    module,
    clean: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    corruptions: Sequence[str] = CORRUPTIONS,
    methods: Sequence[str] = METHODS,
    levels: dict[str, float] | None = None,
    image_shape: Sequence[int] | None = None,
    num_particles: int = 1000,
    iterations: int = 5,
    seed: int = 0,
) -> tuple[list[dict], dict]:
    """Every corruption × applicable method on ``clean``: (rows of mean errors before and after,
    ``{(kind, method): (corrupted, restored, uncertainty)}`` for figures). A method the model
    cannot run on a corruption (a Bernoulli likelihood at grey noisy inputs) gets a row with the
    reason under ``"skipped"``."""
    rows, examples = [], {}
    for kind in corruptions:
        corrupted = corrupt(
            clean, kind, level=(levels or {}).get(kind), image_shape=image_shape, seed=seed
        )
        before = restoration_errors(clean, corrupted.x)
        for method in methods:
            if not applicable(kind, method):
                continue
            row = {"corruption": kind, "level": corrupted.level, "method": method}
            try:
                restored, uncertainty = restore(
                    module,
                    corrupted,
                    method,
                    y,
                    num_particles=num_particles,
                    iterations=iterations,
                    seed=seed,
                )
            except PPVAEError as error:  # e.g. a Bernoulli likelihood at grey noisy inputs
                rows.append({**row, "skipped": str(error)})
                continue
            after = restoration_errors(clean, restored)
            for name in ("mse", "bce", "psnr"):
                row[f"{name}_before"] = float(before[name].mean())
                row[f"{name}_after"] = float(after[name].mean())
            rows.append(row)
            examples[(kind, method)] = (corrupted.x, restored, uncertainty)
    return rows, examples
