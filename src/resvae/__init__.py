"""resvae: variational autoencoders with deep residual encoders and decoders."""

from .vae import VAE, build_vae

__all__ = ["VAE", "build_vae"]
__version__ = "0.1.0"
