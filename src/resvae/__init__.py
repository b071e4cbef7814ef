"""resvae: variational autoencoders with deep residual encoders and decoders.

    import resvae
    cfg = resvae.resolve(preset="tiny")                       # a typed config (presets, overrides)
    splits = resvae.data.from_arrays(x_train, x_test)         # or load_dataset / from_dataset
    summary = resvae.train(cfg, "runs/mine", data=splits)     # the training loop
    vae = resvae.load_pretrained("runs/mine")                 # a run or an exported folder

`resvae.train` is the function; the training module's other names come with
`from resvae.train import ...`. docs/architecture.md says where everything lives.
"""

__version__ = "0.1.0"  # before the imports: train.py records it in every summary

from . import data  # noqa: E402
from .checkpoints import load_pretrained, load_run  # noqa: E402
from .config import resolve  # noqa: E402
from .train import train  # noqa: E402  (binds resvae.train to the function, not the module)
from .vae import VAE, build_vae  # noqa: E402
from .vae_base import BaseVAE  # noqa: E402

__all__ = ["VAE", "BaseVAE", "build_vae", "data", "load_pretrained", "load_run", "resolve",
           "train"]
