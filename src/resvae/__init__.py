"""resvae: variational autoencoders with deep residual encoders and decoders."""

__version__ = "0.1.0"
