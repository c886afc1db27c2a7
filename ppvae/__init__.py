"""ppvae: latent-variable models as Pyro programs, trained with SVI and evaluated honestly."""

from ppvae.errors import ContractError, DivergenceError, PPVAEError

__version__ = "0.1.0"

__all__ = ["ContractError", "DivergenceError", "PPVAEError", "__version__"]
