"""The model zoo: each model is a Pyro model/guide pair in its own file (DESIGN §3).

``MODELS`` is the one mapping from CLI name to class.
"""

from ppvae.models.linear_gaussian import LinearGaussian
from ppvae.models.vae import VAE

MODELS = {
    "vae": VAE,
    "linear-gaussian": LinearGaussian,
}

__all__ = ["MODELS", "VAE", "LinearGaussian"]
