"""Names shared by models and estimators: the model contract of DESIGN §1.

- Every site lives in ``pyro.plate(DATA_PLATE, len(x))``.
- Training-only loss terms that are not part of the density p(x, z) (VQ-VAE's codebook and
  commitment losses, regularisers) are added with :func:`auxiliary_loss`: ``Trace_ELBO`` and SVI
  see them, the likelihood bounds (ELBO, IWAE, log p(x)) leave them out. A plain ``pyro.factor``
  is treated as part of the density and stays in every bound.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch

DATA_PLATE = "data"
AUXILIARY_LOSS = "auxiliary_loss"


def auxiliary_loss(name: str, log_factor: torch.Tensor) -> None:
    """Add ``log_factor`` to the training objective only (as ``pyro.factor`` does), marked so the
    per-point likelihood estimators exclude it."""
    unit = dist.Unit(log_factor=log_factor, has_rsample=True)
    pyro.sample(name, unit, obs=unit.sample(), infer={"is_auxiliary": True, AUXILIARY_LOSS: True})
