"""The model zoo: each model is a Pyro model/guide pair in its own file (DESIGN §3).

``MODELS`` is the one mapping from CLI name (``ppvae train --model NAME``) to class.
"""

from ppvae.models.ae import AE
from ppvae.models.cvae import CVAE
from ppvae.models.hvae import HVAE
from ppvae.models.linear_gaussian import LinearGaussian
from ppvae.models.vae import VAE
from ppvae.models.vqvae import VQVAE

MODELS = {
    "ae": AE,
    "vae": VAE,
    "cvae": CVAE,
    "vqvae": VQVAE,
    "hvae": HVAE,
    "linear-gaussian": LinearGaussian,
}

__all__ = ["MODELS", "AE", "CVAE", "HVAE", "VAE", "VQVAE", "LinearGaussian"]
