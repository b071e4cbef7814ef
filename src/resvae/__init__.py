"""resvae: variational autoencoders with deep residual encoders and decoders."""

__version__ = "0.1.0"  # before the imports: train.py records it in every summary

from .checkpoints import load_pretrained, load_run  # noqa: E402
from .vae import VAE, build_vae  # noqa: E402

__all__ = ["VAE", "build_vae", "load_run", "load_pretrained"]
