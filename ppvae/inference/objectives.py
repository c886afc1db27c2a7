"""Training objectives as Pyro ``ELBO`` subclasses: IWAE (reparameterised or DReG gradients) and
the ELBO with a weighted, annealed or floored KL term.

**IWAE** [1]. With :math:`\\log w_{kn}` from :func:`ppvae.inference.importance.log_weights`,

.. math::

    \\mathcal{L}_K = \\frac{N_\\text{total}}{B} \\sum_{n \\in \\text{batch}}
        \\log \\frac{1}{K} \\sum_{k=1}^K w_{kn}

— the log-sum-exp over particles is taken per data point *first*, then the mini-batch scale
:math:`N_\\text{total}/B` is applied. ``RenyiELBO(alpha=0)`` [3] scales every site's log-density
by :math:`N_\\text{total}/B` before the log-sum-exp, i.e. it averages :math:`w^{N/B}`; that is not
an unbiased estimate of the full-data bound. The mini-batch scale is read off the ``"data"``
plate (``pyro.plate("data", N_total, subsample=...)`` with ``len(x) == B``: the frame's
``full_size / size``); a model whose plate is ``len(x)`` (every ppvae model, as ``fit`` feeds it
mini-batches) gets scale 1 and a batch-sum loss, like ``Trace_ELBO``. Any other
``poutine.scale`` factor is a per-site weight and stays inside the log-weights.

Gradients, with normalised weights :math:`\\tilde w_{kn} = w_{kn} / \\sum_j w_{jn}` and
:math:`z_k = g_φ(ε_k, x)`:

- ``estimator="reparam"``: :math:`\\sum_k \\tilde w_k \\nabla_{θ,φ} \\log w_k` (autograd through
  the bound).
- ``estimator="dreg"`` [2]: model parameters as above; guide parameters
  :math:`\\sum_k \\tilde w_k^2 \\, (\\partial \\log w_k / \\partial z_k)
  (\\partial z_k / \\partial φ)`, the path derivative only: :math:`\\log q` is re-evaluated at
  the detached samples and that score-function part subtracted, which stays right for guides
  whose sites depend on other latents. The guide's parameters are those the guide's samples
  depend on (found by autograd on a probe trace); a parameter that also enters the model
  directly is refused.

**KL-weighted ELBO** (β-VAE [4], linear KL warm-up [5], free bits [6]). Per mini-batch of B
points with latent dimensions (groups) d,

.. math::

    \\mathcal{L} = \\frac{N_\\text{total}}{B} \\Big[ \\sum_n \\mathbb{E}_q \\log p(x_n \\mid z)
        - β\\, c(e) \\, R \\Big], \\qquad
    c(e) = \\min(1, e / E_\\text{warm-up}),

    R = \\sum_{n,d} \\mathrm{KL}_{nd} \\;\\text{(no free bits)}, \\qquad
    R = B \\sum_d \\max\\Big(λ, \\frac{1}{B} \\sum_n \\mathrm{KL}_{nd}\\Big)
        \\;\\text{(free bits λ)},

where :math:`\\mathrm{KL}_{nd}` is per latent dimension, averaged over particles, and :math:`e`
the 1-based epoch set by ``set_epoch`` (``fit`` calls it). With ``analytic_kl`` a site's KL is
the closed form :math:`\\mathrm{KL}(q(z \\mid \\cdot) \\,\\|\\, p(z \\mid \\cdot))` only where every
latent that precedes it in the model also precedes it in the guide (its prior's parents are
drawn first), else :math:`\\log q(z) - \\log p(z)` (:func:`ppvae.inference.collapse.kl_terms`):
unbiased for any guide order. ``TraceMeanField_ELBO`` takes the closed form for every site, which
is biased when :math:`p(z_1 \\mid z_2)` meets a guide that draws :math:`z_2 \\sim q(z_2 \\mid z_1)`
after :math:`z_1` (the HVAE). With β = 1, no warm-up and no free bits this is ``Trace_ELBO``
(Monte Carlo KL; ``analytic_kl=False``) in value and gradient, and ``TraceMeanField_ELBO`` where
every site passes the rule (mean-field guides).

[1] Importance Weighted Autoencoders, Burda, Grosse, Salakhutdinov (2015).
[2] Doubly Reparameterized Gradient Estimators for Monte Carlo Objectives, Tucker, Lawson, Gu,
    Maddison (2018).
[3] Rényi Divergence Variational Inference, Li, Turner (2016).
[4] β-VAE: Learning Basic Visual Concepts with a Constrained Variational Framework, Higgins et al.
    (2017).
[5] Generating Sentences from a Continuous Space, Bowman et al. (2016).
[6] Improved Variational Inference with Inverse Autoregressive Flow, Kingma et al. (2016).
"""

from __future__ import annotations

from collections.abc import Callable

import pyro.poutine as poutine
import torch
from pyro.infer import ELBO, Trace_ELBO
from pyro.infer.enum import get_importance_trace
from pyro.infer.util import is_validation_enabled
from pyro.poutine.runtime import _PYRO_STACK
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import site_is_subsample
from pyro.util import check_if_enumerated, warn_if_nan

from ppvae.errors import PPVAEError
from ppvae.inference.collapse import data_dim, kl_terms, latent_sites, points_by_dimension
from ppvae.inference.importance import (
    PARTICLE_PLATE,
    chunked_log_weights,
    forked_rng,
    log_mean_exp,
    site_log_prob,
)
from ppvae.inference.program import ProgramData, ProgramInfo, density_sites, program_info

OBJECTIVES = ("elbo", "mean-field", "iwae", "iwae-dreg")
ESTIMATORS = ("reparam", "dreg")


def _active_particle_plate():
    for messenger in _PYRO_STACK:
        if getattr(messenger, "name", None) == PARTICLE_PLATE:
            return messenger
    return None


def _data_scale(trace, data_plate: str) -> float:
    """The mini-batch scale ``full_size / size`` of the data plate (1 without subsampling)."""
    for _, site in latent_sites(trace):
        for frame in site["cond_indep_stack"]:
            if frame.name == data_plate:
                full_size = frame.size if frame.full_size is None else frame.full_size
                return float(full_size) / float(frame.size)
    return 1.0


def _check_reparameterised(trace, objective: str) -> None:
    for name, site in latent_sites(trace):
        if not site["fn"].has_rsample:
            raise PPVAEError(
                f"guide site {name!r} ({type(site['fn']).__name__}) has no reparameterised "
                f"sampler, which {objective} needs; train this guide with the ELBO "
                "(--objective elbo; Trace_ELBO uses score-function gradients for such sites)"
            )


def _detached(trace) -> Trace:
    """A trace holding only the sample sites of ``trace``, values detached (for replay)."""
    copy = Trace()
    for name, site in trace.nodes.items():
        if site["type"] == "sample":
            copy.add_node(name, **{**site, "value": site["value"].detach()})
    return copy


def _unconstrained(value: torch.Tensor) -> torch.Tensor:
    unconstrained = getattr(value, "unconstrained", None)
    return value if unconstrained is None else unconstrained()


class _RecordingGuide:
    """The guide as ``chunked_log_weights`` runs it: keeps each particle chunk's guide trace and,
    for DReG, log q evaluated at the detached samples (its φ-gradient is the score-function
    term), ``[chunk, N]``."""

    def __init__(self, guide: Callable, info: ProgramInfo, num_data: int, with_score: bool):
        self.guide, self.info, self.num_data = guide, info, num_data
        self.with_score = with_score
        self.traces: list = []
        self.scores: list[torch.Tensor] = []

    def __call__(self, *args, **kwargs):
        handler = poutine.trace(self.guide)
        result = handler(*args, **kwargs)
        self.traces.append(handler.trace)
        if self.with_score:
            self.scores.append(self._score(handler.trace, args, kwargs))
        return result

    def _score(self, trace, args, kwargs) -> torch.Tensor:
        with poutine.block():
            replay = poutine.replay(self.guide, trace=_detached(trace))
            replayed = poutine.trace(replay).get_trace(*args, **kwargs)
        particles = _active_particle_plate()
        if particles is not None:
            particle_dim, num = particles.dim, particles.size
        else:  # replicated: the data plate holds num * N rows
            particle_dim = None
            num = ProgramData(args, kwargs).num_points // self.num_data
        score = 0.0
        for _, site in latent_sites(replayed):
            score = score + site_log_prob(
                site, self.info.data_plate, particle_dim, num, self.num_data, scaled=True
            )
        return score  # [chunk, N]


class IWAE_ELBO(ELBO):
    """The K-sample importance-weighted bound [1], per data point under mini-batching.

    :param num_particles: K, the number of importance samples per data point.
    :param estimator: ``"reparam"`` (autograd through the bound) or ``"dreg"`` (doubly
        reparameterised guide gradients [2]).
    :param chunk_size: particles per forward pass (``log_weights``' default if None).
    :param data_plate: name of the plate over data points (None: found, see
        :func:`ppvae.inference.program.find_data_plate`).

    ``loss`` / ``differentiable_loss`` are ``−(N_total/B) Σ_n IWAE_n`` (a batch sum, like
    ``Trace_ELBO``). For DReG, ``differentiable_loss`` computes the gradient itself and returns
    a surrogate that is linear in the parameters: first-order use (``.backward()``) only.
    """

    def __init__(
        self,
        num_particles: int,
        *,
        estimator: str = "reparam",
        chunk_size: int | None = None,
        data_plate: str | None = None,
    ):
        if estimator not in ESTIMATORS:
            raise PPVAEError(f"unknown IWAE gradient estimator {estimator!r}; use reparam or dreg")
        if not isinstance(num_particles, int) or num_particles < 1:
            raise PPVAEError(f"num_particles must be an integer >= 1, got {num_particles!r}")
        if chunk_size is not None and chunk_size < 1:
            raise PPVAEError(f"chunk_size must be >= 1 or None, got {chunk_size}")
        super().__init__(num_particles=num_particles)
        self.estimator = estimator
        self.chunk_size = chunk_size
        self.data_plate = data_plate
        self._parameter_split = None  # (key, model leaves, guide leaves), see _split_parameters

    @property
    def needs_param_sites(self) -> bool:
        """DReG finds the parameters it trains through ``pyro.param`` sites (``pyro.module``)."""
        return self.estimator == "dreg"

    def _get_trace(self, model, guide, args, kwargs):
        raise NotImplementedError("IWAE_ELBO draws its particles through log_weights")

    def _log_weights(self, model, guide, args, kwargs):
        """Unscaled-by-batch log-weights ``[K, N]``, their DReG twin (or None), the batch scale."""
        data = ProgramData(args, kwargs)
        info = program_info(model, guide, data, self.data_plate)
        recorder = _RecordingGuide(
            guide, info, data.num_points, with_score=self.estimator == "dreg"
        )
        log_w = chunked_log_weights(
            model, recorder, data, info, self.num_particles, self.chunk_size, scaled=True
        )
        name = "the IWAE objective" if self.estimator == "reparam" else "DReG"
        _check_reparameterised(recorder.traces[0], name)
        scale = _data_scale(recorder.traces[0], info.data_plate)
        log_w = log_w / scale  # [K, N]; every site carries the data plate's factor
        if self.estimator == "reparam":
            return log_w, None, scale
        score = torch.cat(recorder.scores, dim=0) / scale  # [K, N]: ∇φ of this is the score term
        return log_w, log_w + score - score.detach(), scale

    def per_point(self, model, guide, *args, **kwargs) -> torch.Tensor:
        """IWAE_n for each point of the batch, ``[B]`` (differentiable, no batch scale)."""
        return log_mean_exp(self._log_weights(model, guide, args, kwargs)[0])

    @torch.no_grad()
    def loss(self, model, guide, *args, **kwargs) -> float:
        log_w, _, scale = self._log_weights(model, guide, args, kwargs)
        loss = -scale * float(log_mean_exp(log_w).sum())
        warn_if_nan(loss, "loss")
        return loss

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        if self.estimator == "reparam":
            log_w, _, scale = self._log_weights(model, guide, args, kwargs)
            loss = -scale * log_mean_exp(log_w).sum()
            warn_if_nan(loss, "loss")
            return loss
        return self._dreg_loss(model, guide, args, kwargs)

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        if loss.requires_grad:
            loss.backward(retain_graph=self.retain_graph)
        return float(loss.detach())

    # DReG ---------------------------------------------------------------------------------
    def _dreg_loss(self, model, guide, args, kwargs) -> torch.Tensor:
        with poutine.trace(param_only=True) as captured:
            log_w, log_w_path, scale = self._log_weights(model, guide, args, kwargs)
        leaves = {_unconstrained(site["value"]) for site in captured.trace.nodes.values()}
        model_leaves, guide_leaves = self._split_parameters(model, guide, args, kwargs, leaves)
        normalized = torch.softmax(log_w.detach(), dim=0)  # [K, N]
        model_surrogate = -scale * (normalized * log_w_path).sum()
        guide_surrogate = -scale * (normalized.square() * log_w_path).sum()
        gradients = []
        for surrogate, params, retain in (
            (model_surrogate, model_leaves, True),
            (guide_surrogate, guide_leaves, False),
        ):
            if params and surrogate.requires_grad:
                grads = torch.autograd.grad(
                    surrogate, params, retain_graph=retain, allow_unused=True
                )
                gradients += [(p, g) for p, g in zip(params, grads, strict=True) if g is not None]
        loss = -scale * log_mean_exp(log_w.detach()).sum()
        warn_if_nan(loss, "loss")
        if not gradients:
            return loss
        linear = sum((p * g).sum() for p, g in gradients)
        return loss + (linear - linear.detach())

    def _split_parameters(self, model, guide, args, kwargs, leaves) -> tuple[list, list]:
        """(model parameters, guide parameters): a guide parameter is one the guide's samples
        depend on. Probed on two data points with a forked RNG, cached per parameter set."""
        key = (
            id(getattr(model, "__func__", model)),
            id(getattr(model, "__self__", None)),
            id(getattr(guide, "__func__", guide)),
            id(getattr(guide, "__self__", None)),
            frozenset(id(leaf) for leaf in leaves),
        )
        if self._parameter_split is not None and self._parameter_split[0] == key:
            return self._parameter_split[1], self._parameter_split[2]
        probe = ProgramData(args, kwargs).select(slice(0, 2))
        with (
            forked_rng(probe.device),
            torch.enable_grad(),
            poutine.trace(param_only=True) as param_capture,  # what SVI would optimise
        ):
            guide_trace = poutine.trace(guide).get_trace(*probe.args, **probe.kwargs)
            model_trace = poutine.trace(poutine.replay(model, trace=_detached(guide_trace)))
            model_trace = model_trace.get_trace(*probe.args, **probe.kwargs)
        params: dict[str, torch.Tensor] = {}
        for name, site in param_capture.trace.nodes.items():
            if site["type"] == "param" and _unconstrained(site["value"]).requires_grad:
                params.setdefault(name, _unconstrained(site["value"]))
        names = [n for n, p in params.items() if any(p is leaf for leaf in leaves)]
        samples = [s["value"] for _, s in latent_sites(guide_trace) if s["value"].requires_grad]
        guide_names: list[str] = []
        if samples and names:
            reach = torch.autograd.grad(
                sum(v.sum() for v in samples),
                [params[n] for n in names],
                allow_unused=True,
                retain_graph=True,
            )
            guide_names = [n for n, g in zip(names, reach, strict=True) if g is not None]
        model_log_prob = sum(
            site["fn"].log_prob(site["value"]).sum()
            for site in model_trace.nodes.values()
            if site["type"] == "sample" and not site_is_subsample(site)
        )
        if guide_names and torch.is_tensor(model_log_prob) and model_log_prob.requires_grad:
            direct = torch.autograd.grad(
                model_log_prob, [params[n] for n in guide_names], allow_unused=True
            )
            shared = [n for n, g in zip(guide_names, direct, strict=True) if g is not None]
            if shared:
                raise PPVAEError(
                    f"DReG needs separate guide and model parameters, but {shared[0]!r}"
                    f"{f' (and {len(shared) - 1} more)' if len(shared) > 1 else ''} both shapes "
                    "the guide's samples and enters the model directly (an exact-posterior guide "
                    "or a shared layer); use --objective iwae (estimator='reparam')"
                )
        guide_leaves = [params[n] for n in guide_names]
        model_leaves = [leaf for leaf in leaves if not any(leaf is g for g in guide_leaves)]
        self._parameter_split = (key, model_leaves, guide_leaves)
        return model_leaves, guide_leaves


class KLWeighted_ELBO(ELBO):
    """The ELBO with its KL term weighted by β, linearly warmed up, and floored by free bits.

    :param num_particles: Monte Carlo draws of z per data point (a loop, like ``Trace_ELBO``).
    :param beta: weight β >= 0 of the KL term [4].
    :param kl_warmup: E; the KL weight of epoch e is ``beta * min(1, e / E)`` (e is 1-based and set
        by :meth:`set_epoch`; before any call e = 1). 0 turns warm-up off.
    :param free_bits: λ >= 0 nats per latent dimension [6]; each dimension contributes
        ``B * max(λ, mean_n KL_nd)`` (mean over the B points of the mini-batch and the particles).
        0 turns it off (the plain sum, so a negative Monte Carlo KL estimate is not clipped).
    :param analytic_kl: closed-form KL for each site where ``kl_divergence`` knows the pair and
        the guide draws the parents of the site's prior before the site, else the Monte Carlo
        estimate log q(z) − log p(z); False: Monte Carlo for every site.
    :param data_plate: name of the plate over data points (None: found, see
        :func:`ppvae.inference.program.find_data_plate`).
    """

    def __init__(
        self,
        num_particles: int = 1,
        *,
        beta: float = 1.0,
        kl_warmup: int = 0,
        free_bits: float = 0.0,
        analytic_kl: bool = True,
        data_plate: str | None = None,
    ):
        if not isinstance(num_particles, int) or num_particles < 1:
            raise PPVAEError(f"num_particles must be an integer >= 1, got {num_particles!r}")
        if not beta >= 0.0 or beta == float("inf"):
            raise PPVAEError(f"beta must be a finite number >= 0, got {beta}")
        if not isinstance(kl_warmup, int) or kl_warmup < 0:
            raise PPVAEError(f"kl_warmup is a number of epochs >= 0 (0: off), got {kl_warmup!r}")
        if not free_bits >= 0.0 or free_bits == float("inf"):
            raise PPVAEError(f"free_bits is nats per latent dimension >= 0, got {free_bits}")
        super().__init__(num_particles=num_particles)
        self.beta, self.kl_warmup, self.free_bits = float(beta), kl_warmup, float(free_bits)
        self.analytic_kl, self.data_plate = analytic_kl, data_plate
        self.epoch = 1

    def set_epoch(self, epoch: int) -> None:
        """Set the (1-based) epoch for the warm-up schedule; ``fit`` calls this every epoch."""
        self.epoch = epoch

    @property
    def reweighted(self) -> bool:
        """Whether β, warm-up or free bits change the ELBO's KL term."""
        return reweights_kl(self.beta, self.kl_warmup, self.free_bits)

    @property
    def warmup_factor(self) -> float:
        """c(e) = min(1, e / E), or 1 without warm-up."""
        return 1.0 if self.kl_warmup == 0 else min(1.0, self.epoch / self.kl_warmup)

    @property
    def kl_weight(self) -> float:
        """β · c(e): the weight on the KL term this epoch."""
        return self.beta * self.warmup_factor

    def _get_trace(self, model, guide, args, kwargs):
        model_trace, guide_trace = get_importance_trace(
            "flat", self.max_plate_nesting, model, guide, args, kwargs
        )
        if is_validation_enabled():
            check_if_enumerated(guide_trace)
        return model_trace, guide_trace

    def _objective(self, model, guide, args, kwargs) -> torch.Tensor:
        """The (scaled, batch-summed) objective to maximise, differentiable."""
        reconstruction = 0.0
        kl_sum: dict[str, torch.Tensor] = {}
        scale = 1.0
        data = ProgramData(args, kwargs)
        num_points = data.num_points
        data_plate = program_info(model, guide, data, self.data_plate).data_plate
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            _check_reparameterised(guide_trace, "the KL-weighted ELBO")
            scale = _data_scale(guide_trace, data_plate)
            for _, site in density_sites(model_trace):
                if site["is_observed"]:
                    reconstruction = reconstruction + site["log_prob_sum"] / self.num_particles
            for name, guide_site, kl, event_ndim in kl_terms(
                model_trace, guide_trace, analytic=self.analytic_kl
            ):
                kl = kl * (guide_site["scale"] / scale)  # weights other than the batch scale
                kl = points_by_dimension(
                    kl, event_ndim, data_dim(guide_site, data_plate), num_points
                )[0]  # [B, G]
                kl_sum[name] = kl_sum.get(name, 0.0) + kl / self.num_particles
        if self.free_bits > 0.0:
            penalty = sum(
                num_points * torch.clamp(kl.mean(dim=0), min=self.free_bits).sum()
                for kl in kl_sum.values()
            )
        else:
            penalty = sum(kl.sum() for kl in kl_sum.values())
        return reconstruction - self.kl_weight * scale * penalty

    @torch.no_grad()
    def loss(self, model, guide, *args, **kwargs) -> float:
        loss = -float(self._objective(model, guide, args, kwargs))
        warn_if_nan(loss, "loss")
        return loss

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        loss = -self._objective(model, guide, args, kwargs)
        warn_if_nan(loss, "loss")
        return loss

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        if torch.is_tensor(loss) and loss.requires_grad:
            loss.backward(retain_graph=self.retain_graph)
        return float(loss.detach())


def reweights_kl(beta: float, kl_warmup: int, free_bits: float) -> bool:
    """Whether these settings make the KL term differ from the plain ELBO's."""
    return beta != 1.0 or kl_warmup != 0 or free_bits != 0.0


def make_objective(
    name: str,
    *,
    num_particles: int = 1,
    beta: float = 1.0,
    kl_warmup: int = 0,
    free_bits: float = 0.0,
) -> ELBO:
    """The objective behind ``--objective``: ``elbo`` (``Trace_ELBO``), ``mean-field``
    (:class:`KLWeighted_ELBO` with analytic KL, β = 1), ``iwae`` and ``iwae-dreg``
    (:class:`IWAE_ELBO`).

    ``mean-field`` is not Pyro's ``TraceMeanField_ELBO``: that takes the closed-form KL of every
    site and is biased on hierarchical guides (HVAE); ours takes it only where it is the
    expectation (see :class:`KLWeighted_ELBO`) and equals ``TraceMeanField_ELBO`` on mean-field
    guides. ``beta`` / ``kl_warmup`` / ``free_bits`` turn ``elbo`` into a :class:`KLWeighted_ELBO`
    with Monte Carlo KL and set those of ``mean-field``; the IWAE bound has no KL term, so they
    are refused with it, as is an IWAE with fewer than two particles (that is the ELBO).
    """
    if name not in OBJECTIVES:
        raise PPVAEError(f"unknown objective {name!r}; use one of {', '.join(OBJECTIVES)}")
    if not isinstance(num_particles, int) or num_particles < 1:
        raise PPVAEError(f"--num-particles must be an integer >= 1, got {num_particles!r}")
    weighted = reweights_kl(beta, kl_warmup, free_bits)
    if name in ("iwae", "iwae-dreg"):
        if weighted:
            raise PPVAEError(
                f"--beta, --kl-warmup and --free-bits reweight the ELBO's KL term, which the "
                f"IWAE bound does not have; use --objective elbo or mean-field with them, or "
                f"drop them for --objective {name}"
            )
        if num_particles < 2:
            raise PPVAEError(
                f"--objective {name} with one particle is the ELBO; pass --num-particles K >= 2 "
                "(e.g. 5 or 50), or use --objective elbo"
            )
        estimator = "dreg" if name == "iwae-dreg" else "reparam"
        return IWAE_ELBO(num_particles, estimator=estimator)
    if name == "elbo" and not weighted:
        return Trace_ELBO(num_particles=num_particles)
    return KLWeighted_ELBO(
        num_particles,
        beta=beta,
        kl_warmup=kl_warmup,
        free_bits=free_bits,
        analytic_kl=name == "mean-field",
    )
