"""One stochastic variational inference step with a single fused optimizer.

``pyro.infer.SVI.step`` computes ``loss.loss_and_grads(model, guide, *args)`` then steps one torch
optimizer *per parameter* (``pyro.optim.PyroOptim``) and converts the loss to a Python float. On a
784-200-200-50 VAE at batch 20 those per-parameter optimizers are about a third of the step and the
float conversion is a host sync per step on a GPU. :class:`SVIStep` does the same update with
``loss.differentiable_loss`` (ppvae's objectives and Pyro's ``Trace_ELBO`` /
``TraceMeanField_ELBO`` / ``TraceEnum_ELBO`` have it; others fall back to ``loss_and_grads``),
one torch optimizer over all parameters (fused Adam where torch has it) built from the same
``PyroOptim`` description, and a loss kept on the device.

Parameters are the module's and the program's own ``pyro.param`` sites outside any module
(found on a probe of the first batch, optimised, and saved in checkpoints by ``fit`` through
:meth:`SVIStep.param_state`). Every trainable parameter of the module is optimised, also one the
program never exposes as a ``pyro.param`` site (a module without ``pyro.module``; a
``PyroParam`` read outside the module's context), which plain ``SVI`` would leave untouched;
DReG, which finds the guide's parameters through those sites, refuses such a module.

``loss`` is one ELBO for ``module.model`` / ``module.guide``, or several objectives summed in one
step: a list whose entries are ELBOs (for the module's pair) or ``(elbo, model, guide)`` triples
(e.g. a semi-supervised VAE's ELBO plus its classifier's loss on another model/guide pair).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pyro
import pyro.optim
import pyro.poutine as poutine
import torch
from torch import nn

from ppvae.contract import ModuleParameters
from ppvae.errors import ContractError, PPVAEError
from ppvae.inference import distributed
from ppvae.inference.program import (
    ProgramData,
    check_training_contract,
    forked_rng,
    preserved_buffers,
)

_FUSED_CAPABLE = (torch.optim.Adam, torch.optim.AdamW)


def _param_sites(objectives, batch: ProgramData) -> list[tuple[str, torch.Tensor, bool]]:
    """(name, unconstrained tensor, whether the constraint is the identity) of every
    ``pyro.param`` the models and guides touch on one batch (the model/guide contract is checked
    on the way, before the first step)."""
    owners = {
        getattr(fn, "__self__", None) for _, model, guide in objectives for fn in (model, guide)
    }
    with (
        torch.no_grad(),
        forked_rng(batch.device),
        preserved_buffers(*owners),
        poutine.trace(param_only=True) as capture,
    ):
        for _, model, guide in objectives:
            check_training_contract(model, guide, batch)
    sites, seen = [], set()
    for name, site in capture.trace.nodes.items():
        if site["type"] == "param" and name not in seen:
            seen.add(name)
            value = site["value"]
            unconstrained = value.unconstrained() if hasattr(value, "unconstrained") else value
            sites.append((name, unconstrained, value is unconstrained))
    return sites


def objective_list(module, loss) -> list[tuple]:
    """``[(elbo, model, guide), ...]`` from ``fit``'s ``loss`` (one ELBO or a list)."""
    entries = loss if isinstance(loss, (list, tuple)) else [loss]
    objectives = []
    for entry in entries:
        if isinstance(entry, (list, tuple)):
            if len(entry) != 3:
                raise PPVAEError(
                    "each entry of loss=[...] is an ELBO or an (elbo, model, guide) triple"
                )
            objectives.append(tuple(entry))
        else:
            objectives.append((entry, module.model, module.guide))
    if not objectives:
        raise PPVAEError("loss=[] holds no objective; pass an ELBO such as Trace_ELBO()")
    return objectives


@contextlib.contextmanager
def _validation_off() -> Iterator[None]:
    """Pyro's (and torch's) distribution checks off, both flags restored afterwards."""
    torch_flag = torch.distributions.Distribution._validate_args  # noqa: SLF001
    try:
        with pyro.validation_enabled(False):
            yield
    finally:
        torch.distributions.Distribution.set_default_validate_args(torch_flag)


class SVIStep:
    """``step(x, y)`` = one SVI update of ``module`` on a mini-batch; returns the detached loss."""

    def __init__(
        self,
        module,
        loss,
        optimizer: pyro.optim.PyroOptim,
        first_batch: ProgramData,
        *,
        validate_every_step: bool | None = None,
    ):
        self.module = module
        self.objectives = objective_list(module, loss)
        if not isinstance(first_batch, ProgramData):
            first_batch = ProgramData.of(first_batch)
        self.loss = self.objectives[0][0]
        if validate_every_step is None:  # the zoo checks its data itself (check_data)
            validate_every_step = not callable(getattr(module, "check_data", None))
        self.validate_every_step = validate_every_step
        self._validated = False
        module_params = dict(module.named_parameters()) if isinstance(module, nn.Module) else {}
        own = {id(p) for p in module_params.values()}
        sites = _param_sites(self.objectives, first_batch)
        # pyro.param sites of the program itself (outside any module): trained and checkpointed
        self.program_params = {name: p for name, p, _ in sites if id(p) not in own}
        seen = {id(p) for _, p, _ in sites}
        unseen = [n for n, p in module_params.items() if p.requires_grad and id(p) not in seen]
        if unseen and any(getattr(o[0], "needs_param_sites", False) for o in self.objectives):
            raise ContractError(
                f"{type(loss).__name__} finds the parameters it trains through pyro.param sites, "
                f"but module parameter(s) {unseen[:3]}{' ...' if len(unseen) > 3 else ''} are "
                "not registered; call pyro.module(name, self) in model and guide"
            )
        # identity-constrained module parameters: pyro.param returns the tensor itself
        self._module_params = ModuleParameters(
            {name: p for name, p, identity in sites if identity and p.requires_grad}
        )
        params = [p for p in module_params.values() if p.requires_grad]
        params += [p for p in self.program_params.values() if p.requires_grad]
        if not params:
            raise ContractError(
                "the model and guide have no trainable parameters (no nn.Module parameters and "
                "no pyro.param sites); there is nothing to fit"
            )
        self.params = params
        self.optimizer = self._build(optimizer, params)
        self.clip_args = optimizer.pt_clip_args if not callable(optimizer.pt_clip_args) else None
        self._differentiable = all(
            callable(getattr(o[0], "differentiable_loss", None)) for o in self.objectives
        )

    @staticmethod
    def _build(spec: pyro.optim.PyroOptim, params: list[torch.Tensor]) -> torch.optim.Optimizer:
        constructor = spec.pt_optim_constructor
        if callable(spec.pt_optim_args):
            # per-parameter arguments, looked up by param-store name as PyroOptim does
            groups = [{"params": [p], **spec._get_optim_args(p)} for p in params]  # noqa: SLF001
            return constructor(groups)
        kwargs = dict(spec.pt_optim_args)
        if (
            constructor in _FUSED_CAPABLE
            and "fused" not in kwargs
            and "foreach" not in kwargs
            and all(p.dtype in (torch.float32, torch.float64) for p in params)
            and len({p.device for p in params}) == 1
        ):
            kwargs["fused"] = True
        return constructor(params, **kwargs)

    def step(self, batch, y: torch.Tensor | None = None) -> torch.Tensor:
        """One update on ``batch`` (a :class:`ProgramData`, or the data as ``ProgramData.of``
        takes them). With ``validate_every_step=False`` Pyro's argument and support checks run
        on the first step only (they cost about a fifth of a small step); the default (None) does
        that for modules with a ``check_data`` method, whose data ``fit`` checks batch by batch,
        and keeps the checks on every step for other models. A NaN that appears later still
        surfaces as a non-finite loss."""
        if not isinstance(batch, ProgramData):
            batch = ProgramData.of(batch, y)
        if self._validated and not self.validate_every_step:
            with _validation_off():
                return self._step(batch)
        value = self._step(batch)
        self._validated = True
        return value

    def _step(self, batch: ProgramData) -> torch.Tensor:
        args, kwargs = batch.args, batch.kwargs
        if self._differentiable:
            with self._module_params:
                loss = sum(
                    elbo.differentiable_loss(model, guide, *args, **kwargs)
                    for elbo, model, guide in self.objectives
                )
            if torch.is_tensor(loss) and loss.requires_grad:
                loss.backward()
            value = torch.as_tensor(loss).detach()
        else:
            value = sum(
                torch.as_tensor(elbo.loss_and_grads(model, guide, *args, **kwargs))
                for elbo, model, guide in self.objectives
            )
        distributed.all_reduce_gradients(self.params)  # in a process group: summed over ranks
        if self.clip_args:
            if "clip_norm" in self.clip_args:
                nn.utils.clip_grad_norm_(self.params, self.clip_args["clip_norm"])
            if "clip_value" in self.clip_args:
                nn.utils.clip_grad_value_(self.params, self.clip_args["clip_value"])
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return value

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)

    def param_state(self) -> dict[str, torch.Tensor]:
        """The program's own ``pyro.param`` sites (unconstrained values), for checkpoints."""
        return {name: p.detach().cpu() for name, p in self.program_params.items()}

    def load_param_state(self, state: dict[str, torch.Tensor], source: str) -> None:
        missing = sorted(set(self.program_params) - set(state))
        if missing:
            raise PPVAEError(
                f"{source} holds no value for pyro.param site(s) {missing}; it was written by "
                "another program — start a new run (another --run-dir)"
            )
        with torch.no_grad():
            for name, p in self.program_params.items():
                p.copy_(state[name].to(p.device, p.dtype))
