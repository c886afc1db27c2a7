"""Annealed importance sampling (AIS) of log p(x) per data point, and its bidirectional sandwich.

AIS [1] moves particles along a path of unnormalised densities from a normalised start
:math:`f_0(z)` — the guide :math:`q(z \\mid x)` or the prior :math:`p(z)` — to the joint
:math:`f_1(z) = p(x, z)`, whose normaliser is :math:`p(x)`:

.. math::

    \\log γ_t(z) = (1 - β_t) \\log f_0(z) + β_t \\log f_1(z), \\qquad 0 = β_0 < β_1 < … < β_T = 1,

    \\log W = \\sum_{t=1}^{T} (β_t - β_{t-1}) \\bigl[\\log f_1(z_{t-1}) - \\log f_0(z_{t-1})\\bigr],

with :math:`z_0 \\sim f_0` and :math:`z_t` drawn by a Markov kernel that leaves :math:`γ_t`
invariant. :math:`\\mathbb{E}[W] = p(x)`, so :math:`\\log \\frac{1}{C} \\sum_c W_c` over C
independent chains is a stochastic lower bound of log p(x) (Jensen), tight as T grows.

The kernel is Hamiltonian Monte Carlo with ``leapfrog_steps`` leapfrog steps and a diagonal mass
matrix :math:`M^{-1} = \\mathrm{diag}(\\mathrm{Var}_q[z])` read off independent guide draws. Step
sizes are one per data point and per stretch of the schedule. They are adapted in a *separate
warm-up run* (its own chains, ``num_warmup_steps`` annealing steps): after each transition,
:math:`\\log ε_n \\mathrel{+}= κ(\\bar a_n - a^*)`, with :math:`\\bar a_n` the acceptance
probability averaged over the warm-up chains of point n and :math:`a^*` = ``target_accept``. The
final run uses the frozen table :math:`ε_n(β)` with fresh chains, so each of its kernels is fixed
in advance and the estimator stays unbiased (adapting on the fly from the chains' own past would
make the kernel at step t depend on :math:`z_{t-1}` and break the invariance argument).

Bidirectional Monte Carlo (BDMC) [2, 3] checks AIS on data simulated from the model: for
:math:`(z^*, x) \\sim p(z)p(x \\mid z)`, :math:`z^*` is an exact posterior sample, and AIS run in
reverse from it (β from 1 to 0) gives :math:`\\mathbb{E}[W^{\\text{rev}}] = 1/p(x)`, hence the
stochastic upper bound :math:`-\\log \\frac{1}{C}\\sum_c W^{\\text{rev}}_c \\ge \\log p(x)` in
expectation. The gap between the forward and reverse estimates bounds the error of both.

Only real-valued latents are supported (``PosteriorTarget.real_support``). ``initial="prior"``
gets :math:`\\log p(z)` as the model's density with its observed sites hidden, so it needs every
latent of the model to have a normalised prior (no improper priors, no ``pyro.factor`` on
latents).

[1] Annealed Importance Sampling, Neal (2001).
[2] Sandwiching the marginal likelihood using bidirectional Monte Carlo, Grosse, Ghahramani,
    Adams (2015).
[3] On the Quantitative Analysis of Decoder-Based Generative Models, Wu, Burda, Salakhutdinov,
    Grosse (2017).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import pyro.poutine as poutine
import torch

from ppvae.errors import ContractError, PPVAEError
from ppvae.inference.importance import (
    PosteriorTarget,
    log_marginal_stderr,
    log_mean_exp,
    sample_sites,
)
from ppvae.inference.program import ProgramData, forked_rng

SCHEDULES = ("sigmoid", "linear")
INITIALS = ("guide", "prior")
ADAPT_GAIN = 1.0  # κ: log step size moves by κ·(acceptance − target) per warm-up transition
PRECONDITION_DRAWS = 64  # guide draws used to estimate the diagonal inverse mass matrix


def annealing_schedule(num_steps: int, schedule: str = "sigmoid", sharpness: float = 4.0):
    """β_0 = 0 < … < β_T = 1, ``[num_steps + 1]`` (float64).

    ``"sigmoid"``: :math:`β_t ∝ σ(δ(2t/T - 1))` rescaled to [0, 1] ([2]; δ = ``sharpness``), dense
    at both ends where the density changes fastest; ``"linear"``: :math:`β_t = t/T`.
    """
    if num_steps < 1:
        raise PPVAEError(f"num_steps must be >= 1, got {num_steps}")
    if schedule not in SCHEDULES:
        raise PPVAEError(f"unknown schedule {schedule!r}; use one of {', '.join(SCHEDULES)}")
    grid = torch.linspace(0.0, 1.0, num_steps + 1, dtype=torch.float64)
    if schedule == "linear":
        return grid
    sig = torch.sigmoid(sharpness * (2.0 * grid - 1.0))
    return (sig - sig[0]) / (sig[-1] - sig[0])


@dataclass
class AISResult:
    """Per-point AIS estimates. ``log_marginal`` is a lower bound of log p(x) in expectation for
    forward runs; ``stderr`` the delta-method standard error across chains."""

    log_marginal: torch.Tensor  # [N]
    stderr: torch.Tensor  # [N]
    log_weights: torch.Tensor  # [num_chains, N]
    acceptance: torch.Tensor  # [N], mean HMC acceptance probability in the final run
    step_size: torch.Tensor  # [N], median over the schedule of the adapted step sizes
    num_steps: int
    num_chains: int
    leapfrog_steps: int
    schedule: str
    initial: str
    seconds: float
    num_warmup_steps: int = 0

    @property
    def evaluations_per_point(self) -> int:
        """Gradient evaluations of log p(x, z) per data point, warm-up included."""
        return self.num_chains * (self.num_steps + self.num_warmup_steps) * self.leapfrog_steps

    def to_dict(self) -> dict:
        out = asdict(self)
        out["evaluations_per_point"] = self.evaluations_per_point
        for key, value in out.items():
            if isinstance(value, torch.Tensor):
                out[key] = value.detach().cpu().tolist()
        return out


class _Path:
    """The two ends of the path, with gradients: :math:`\\log f_0` and :math:`\\log f_1`."""

    def __init__(self, target: PosteriorTarget, initial: str):
        self.target, self.initial = target, initial

    def log_start(self, z: torch.Tensor) -> torch.Tensor:
        if self.initial == "guide":
            return self.target.log_guide(z)
        return self.target.log_prior(z)

    @torch.no_grad()
    def sample_start(self, num_chains: int) -> torch.Tensor:
        """``z_0 ~ f_0``, ``[C, N, D]`` (no graph to the guide's or model's parameters)."""
        if self.initial == "guide":
            return self.target.sample_guide(num_chains)[0]
        return self.target.sample_prior(num_chains)

    def evaluate(self, z: torch.Tensor):
        """``(log f_0, log f_1, ∇ log f_0, ∇ log f_1)`` at ``z`` (all detached)."""
        with torch.enable_grad():
            z = z.detach().requires_grad_(True)
            log_f0 = self.log_start(z)
            (grad_f0,) = torch.autograd.grad(log_f0.sum(), z)
            log_f1 = self.target.log_joint(z)
            (grad_f1,) = torch.autograd.grad(log_f1.sum(), z)
        return _State(z.detach(), log_f0.detach(), log_f1.detach(), grad_f0, grad_f1)


@dataclass
class _State:
    z: torch.Tensor  # [C, N, D]
    log_f0: torch.Tensor  # [C, N]
    log_f1: torch.Tensor  # [C, N]
    grad_f0: torch.Tensor  # [C, N, D]
    grad_f1: torch.Tensor  # [C, N, D]

    def log_density(self, beta: float) -> torch.Tensor:
        return (1.0 - beta) * self.log_f0 + beta * self.log_f1

    def grad(self, beta: float) -> torch.Tensor:
        return (1.0 - beta) * self.grad_f0 + beta * self.grad_f1

    def where(self, keep: torch.Tensor, other: _State) -> _State:
        """Per (chain, point): ``self`` where ``keep`` else ``other``."""
        k3 = keep.unsqueeze(-1)
        return _State(
            torch.where(k3, self.z, other.z),
            torch.where(keep, self.log_f0, other.log_f0),
            torch.where(keep, self.log_f1, other.log_f1),
            torch.where(k3, self.grad_f0, other.grad_f0),
            torch.where(k3, self.grad_f1, other.grad_f1),
        )


def _hmc_step(
    path: _Path,
    state: _State,
    beta: float,
    step_size: torch.Tensor,  # [N]
    inv_mass: torch.Tensor,  # [1, N, D]
    leapfrog_steps: int,
) -> tuple[_State, torch.Tensor]:
    """One HMC transition leaving γ_β invariant; returns the new state and the acceptance
    probability ``[C, N]``."""
    eps = step_size.to(state.z.dtype)[None, :, None]
    momentum = torch.randn_like(state.z) / inv_mass.sqrt()  # p ~ N(0, M)
    kinetic = 0.5 * (momentum**2 * inv_mass).sum(-1)
    energy = -state.log_density(beta) + kinetic
    proposal = state
    momentum = momentum + 0.5 * eps * proposal.grad(beta)
    for leap in range(leapfrog_steps):
        proposal = path.evaluate(proposal.z + eps * inv_mass * momentum)
        scale = 0.5 if leap == leapfrog_steps - 1 else 1.0
        momentum = momentum + scale * eps * proposal.grad(beta)
    new_energy = -proposal.log_density(beta) + 0.5 * (momentum**2 * inv_mass).sum(-1)
    log_accept = torch.clamp(energy - new_energy, max=0.0)
    log_accept = torch.nan_to_num(log_accept, nan=-math.inf)
    accept_prob = log_accept.exp()
    accept = torch.rand_like(accept_prob) < accept_prob
    return proposal.where(accept, state), accept_prob


def _anneal(
    path: _Path,
    state: _State,
    betas: torch.Tensor,
    step_size: Callable[[float], torch.Tensor],
    inv_mass: torch.Tensor,
    leapfrog_steps: int,
    adapt: Callable[[torch.Tensor], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the chains along ``betas`` (increasing: forward; decreasing: reverse). Returns
    ``log W [C, N]`` and the mean acceptance probability ``[N]``."""
    log_w = torch.zeros_like(state.log_f0)
    accept_sum = torch.zeros_like(state.log_f0[0])
    num_steps = len(betas) - 1
    for t in range(1, num_steps + 1):
        beta_prev, beta = float(betas[t - 1]), float(betas[t])
        increment = (beta - beta_prev) * (state.log_f1 - state.log_f0)
        log_w = log_w + torch.nan_to_num(increment, nan=-math.inf)
        if t < num_steps:  # a transition at the last β would not change the weight
            state, accept_prob = _hmc_step(
                path, state, beta, step_size(beta), inv_mass, leapfrog_steps
            )
            mean_accept = accept_prob.mean(0)
            accept_sum = accept_sum + mean_accept
            if adapt is not None:
                adapt(mean_accept)
        if progress is not None:
            progress(t, num_steps)
    return log_w, accept_sum / max(num_steps - 1, 1)


class _StepSizeTable:
    """Per-point step sizes ε_n(β), piecewise constant on the warm-up run's β grid."""

    def __init__(self, betas: torch.Tensor, initial: torch.Tensor):
        self.betas = betas
        self.log_steps = initial.log().expand(len(betas), -1).clone()  # [W + 1, N]
        self.current = 0

    def index(self, beta: float) -> int:
        where = int(torch.searchsorted(self.betas, torch.tensor(beta, dtype=torch.float64)))
        return min(where, len(self.betas) - 1)

    def __call__(self, beta: float) -> torch.Tensor:
        return self.log_steps[self.index(beta)].exp()


def _warm_up(path, target, betas, step_size, inv_mass, leapfrog_steps, num_chains, accept):
    table = _StepSizeTable(betas, step_size)
    log_step = table.log_steps[0].clone()

    def current(beta: float) -> torch.Tensor:
        table.current = table.index(beta)
        return log_step.exp()

    def adapt(mean_accept: torch.Tensor) -> None:
        log_step.add_(ADAPT_GAIN * (mean_accept.to(log_step.dtype) - accept))
        table.log_steps[table.current :] = log_step

    z = path.sample_start(num_chains)
    _anneal(path, path.evaluate(z), betas, current, inv_mass, leapfrog_steps, adapt=adapt)
    return table


def _check_arguments(num_steps, num_chains, leapfrog_steps, initial, target_accept, step_size):
    if num_chains < 1:
        raise PPVAEError(f"num_chains must be >= 1, got {num_chains}")
    if leapfrog_steps < 1:
        raise PPVAEError(f"leapfrog_steps must be >= 1, got {leapfrog_steps}")
    if initial not in INITIALS:
        raise PPVAEError(f"unknown initial {initial!r}; use guide or prior")
    if not 0.0 < target_accept < 1.0:
        raise PPVAEError(f"target_accept must be in (0, 1), got {target_accept}")
    if step_size <= 0:
        raise PPVAEError(f"step_size must be > 0, got {step_size}")
    annealing_schedule(num_steps)  # validates num_steps


def default_warmup_steps(num_steps: int, num_warmup_steps: int | None = None) -> int:
    """Length of the step-size warm-up run: ``num_warmup_steps``, else ``max(10, T // 5)``."""
    return num_warmup_steps if num_warmup_steps is not None else max(10, num_steps // 5)


def _make_target(model, guide, x, y, data_plate) -> PosteriorTarget:
    target = PosteriorTarget(model, guide, x, y, data_plate=data_plate)
    if not target.real_support:
        raise ContractError(
            "AIS moves latents with HMC in R^D, but a latent site has constrained or discrete "
            "support; reparameterise it to an unconstrained real latent (e.g. sample log-scale "
            "from a Normal) or use log_marginal (importance sampling)"
        )
    return target


def _sampler_setup(path, target, step_size, precondition):
    num_data, dim = target.num_data, target.dim
    inv_mass = target.x.new_ones(1, num_data, dim)
    if precondition:
        with torch.no_grad():
            z, _ = target.sample_guide(PRECONDITION_DRAWS)
        inv_mass = z.var(dim=0, keepdim=True).clamp(min=1e-8)
    steps = target.x.new_full((num_data,), step_size)
    return inv_mass, steps


def ais_log_marginal(
    model: Callable,
    guide: Callable,
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    num_steps: int = 1000,
    num_chains: int = 16,
    schedule: str = "sigmoid",
    initial: str = "guide",
    step_size: float = 0.5,
    leapfrog_steps: int = 10,
    target_accept: float = 0.65,
    adapt_step_size: bool = True,
    num_warmup_steps: int | None = None,
    precondition: bool = True,
    seed: int | None = 0,
    data_plate: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> AISResult:
    """AIS estimate of log p(x_n) for every point of ``x`` at once (module docstring).

    Chains are vectorised as particles: latents are ``[num_chains, N, D]``. ``num_warmup_steps``
    (default ``max(10, num_steps // 5)``) sets the length of the separate step-size warm-up run;
    ``adapt_step_size=False`` uses ``step_size`` throughout. ``seed`` seeds a forked RNG, so the
    caller's random stream is left as it was; ``progress(t, T)`` is called after each step.
    """
    _check_arguments(num_steps, num_chains, leapfrog_steps, initial, target_accept, step_size)
    start = time.perf_counter()
    with forked_rng(ProgramData.of(x, y).device):
        if seed is not None:
            torch.manual_seed(seed)
        target = _make_target(model, guide, x, y, data_plate)
        path = _Path(target, initial)
        betas = annealing_schedule(num_steps, schedule)
        table = _step_sizes(
            path,
            target,
            schedule,
            num_steps,
            num_warmup_steps,
            num_chains,
            step_size,
            leapfrog_steps,
            target_accept,
            adapt_step_size,
            precondition,
        )
        inv_mass, step_of = table
        z = path.sample_start(num_chains)
        log_w, acceptance = _anneal(
            path, path.evaluate(z), betas, step_of, inv_mass, leapfrog_steps, progress=progress
        )
    result = _result(
        log_w,
        acceptance,
        step_of,
        num_steps,
        num_chains,
        leapfrog_steps,
        schedule,
        initial,
        time.perf_counter() - start,
    )
    if adapt_step_size:
        result.num_warmup_steps = default_warmup_steps(num_steps, num_warmup_steps)
    return result


def _step_sizes(
    path,
    target,
    schedule,
    num_steps,
    num_warmup_steps,
    num_chains,
    step_size,
    leapfrog_steps,
    target_accept,
    adapt_step_size,
    precondition,
):
    inv_mass, steps = _sampler_setup(path, target, step_size, precondition)
    if not adapt_step_size:
        fixed = _StepSizeTable(torch.tensor([1.0], dtype=torch.float64), steps)
        return inv_mass, fixed
    warmup = default_warmup_steps(num_steps, num_warmup_steps)
    warm_betas = annealing_schedule(warmup, schedule)
    table = _warm_up(
        path, target, warm_betas, steps, inv_mass, leapfrog_steps, num_chains, target_accept
    )
    return inv_mass, table


def _result(
    log_w, acceptance, table, num_steps, num_chains, leapfrog_steps, schedule, initial, seconds
) -> AISResult:
    return AISResult(
        log_marginal=log_mean_exp(log_w),
        stderr=log_marginal_stderr(log_w),
        log_weights=log_w,
        acceptance=acceptance,
        step_size=table.log_steps.exp().median(dim=0).values,
        num_steps=num_steps,
        num_chains=num_chains,
        leapfrog_steps=leapfrog_steps,
        schedule=schedule,
        initial=initial,
        seconds=seconds,
    )


@dataclass
class BDMCResult:
    """Sandwich of log p(x) on simulated data: ``lower <= log p(x) <= upper`` in expectation."""

    x: torch.Tensor  # [N, ...] the simulated data
    lower: torch.Tensor  # [N], forward AIS
    upper: torch.Tensor  # [N], reverse AIS from the exact posterior sample
    forward: AISResult
    reverse: AISResult

    @property
    def width(self) -> torch.Tensor:
        """upper − lower per point, ``[N]``: bounds the error of either estimate."""
        return self.upper - self.lower

    def to_dict(self) -> dict:
        return {
            "lower": self.lower.tolist(),
            "upper": self.upper.tolist(),
            "width": self.width.tolist(),
            "mean_lower": float(self.lower.mean()),
            "mean_upper": float(self.upper.mean()),
            "mean_width": float(self.width.mean()),
            "forward": self.forward.to_dict(),
            "reverse": self.reverse.to_dict(),
        }


def simulate(model: Callable, like: torch.Tensor, y=None, *, data_plate: str | None = None):
    """Draw ``(z*, x) ~ p(z) p(x | z)`` with ``x`` shaped like ``like``: returns ``(x, latents)``,
    ``latents`` the model's latent site values (an exact posterior sample for each point).

    Needs exactly one observed site whose value holds as many numbers as ``like``.
    """
    data = ProgramData.of(like, y)
    with torch.no_grad():
        trace = poutine.trace(poutine.uncondition(model)).get_trace(*data.args, **data.kwargs)
    sites = list(sample_sites(trace))
    observed = [(n, s) for n, s in sites if s["infer"].get("was_observed")]  # set by uncondition
    if len(observed) != 1 or observed[0][1]["value"].numel() != like.numel():
        raise ContractError(
            f"BDMC simulates x from the model's one observed site, but the model has "
            f"{len(observed)} observed sites ({', '.join(n for n, _ in observed)}) or one whose "
            f"size differs from x; use ais_log_marginal on real data instead"
        )
    x = observed[0][1]["value"].reshape(like.shape).to(like.dtype)
    latents = {n: s["value"] for n, s in sites if not s["infer"].get("was_observed")}
    return x, latents


def bdmc(
    model: Callable,
    guide: Callable,
    like: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    num_points: int,
    num_steps: int = 1000,
    num_chains: int = 16,
    schedule: str = "sigmoid",
    initial: str = "guide",
    step_size: float = 0.5,
    leapfrog_steps: int = 10,
    target_accept: float = 0.65,
    num_warmup_steps: int | None = None,
    precondition: bool = True,
    seed: int | None = 0,
    data_plate: str | None = None,
) -> BDMCResult:
    """Bidirectional Monte Carlo [2, 3] on ``num_points`` points simulated from the model.

    ``like`` gives the shape, dtype and device of one data point (its rows are cycled as
    placeholders; values are replaced by draws from p(x | z)); ``y`` (if given) is cycled the same
    way. Forward AIS gives ``lower``; reverse AIS started at the latents that generated each point
    (the same exact posterior sample for every chain: each chain's weight is still unbiased for
    1/p(x)) gives ``upper``. Both runs share one warm-up step-size table, adapted on separate
    forward chains.
    """
    _check_arguments(num_steps, num_chains, leapfrog_steps, initial, target_accept, step_size)
    if num_points < 1:
        raise PPVAEError(f"num_points must be >= 1, got {num_points}")
    start = time.perf_counter()
    with forked_rng(like):
        if seed is not None:
            torch.manual_seed(seed)
        rows = torch.arange(num_points, device=like.device) % like.shape[0]
        template, y_sim = like[rows], None if y is None else y[rows]
        x, latents = simulate(model, template, y_sim, data_plate=data_plate)
        target = _make_target(model, guide, x, y_sim, data_plate)
        path = _Path(target, initial)
        inv_mass, table = _step_sizes(
            path,
            target,
            schedule,
            num_steps,
            num_warmup_steps,
            num_chains,
            step_size,
            leapfrog_steps,
            target_accept,
            True,
            precondition,
        )
        betas = annealing_schedule(num_steps, schedule)
        z = path.sample_start(num_chains)
        log_w, acc = _anneal(path, path.evaluate(z), betas, table, inv_mass, leapfrog_steps)
        middle = time.perf_counter()
        forward = _result(
            log_w,
            acc,
            table,
            num_steps,
            num_chains,
            leapfrog_steps,
            schedule,
            initial,
            middle - start,
        )
        exact = target.pack(latents).expand(num_chains, -1, -1)
        log_w_rev, acc_rev = _anneal(
            path, path.evaluate(exact), betas.flip(0), table, inv_mass, leapfrog_steps
        )
        reverse = _result(
            log_w_rev,
            acc_rev,
            table,
            num_steps,
            num_chains,
            leapfrog_steps,
            schedule,
            initial,
            time.perf_counter() - middle,
        )
    upper = -log_mean_exp(log_w_rev)
    reverse.log_marginal = upper  # its weights estimate 1/p(x)
    warmup = default_warmup_steps(num_steps, num_warmup_steps)
    forward.num_warmup_steps = reverse.num_warmup_steps = warmup
    return BDMCResult(
        x=x, lower=forward.log_marginal, upper=upper, forward=forward, reverse=reverse
    )
