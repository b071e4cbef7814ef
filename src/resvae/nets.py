"""Encoder and decoder networks: the study's `study` layout and the efficient `resnet` family.

Depth convention (used everywhere in resvae): the number of weight layers on the longest
input-to-output path of encoder plus decoder = every conv on the blocks' main path (projection
shortcuts not counted) + the encoder's dense layer + the latent layer (mean and log-variance in
parallel count once) + the decoder's dense layer + the output conv.  `count_layers` measures it
from the modules themselves; it is never looked up.
"""

from __future__ import annotations

from functools import partial

from torch import Tensor, nn

from .blocks import BLOCKS, Bottleneck, init_weights, make_stage, residual_scale_
from .errors import ConfigError
from .hier import hier_nets

# The study (Keras ResNet50 conv_block/identity_block filters) and its identity blocks per stage.
STUDY_FILTERS = ((64, 64, 256), (128, 128, 512), (256, 256, 1024), (512, 512, 2048))
STUDY_IDENTITY_BLOCKS = {28: (0, 0, 0, 0), 40: (0, 1, 1, 0), 70: (1, 2, 3, 1), 100: (2, 3, 5, 2)}
STUDY_DENSE = 1024
STRIDES = (1, 2, 2, 2)  # encoder 32 -> 32 -> 16 -> 8 -> 4; the decoder runs it backwards
RESNET_BASE = 64        # resnet family: stage planes (1, 2, 4, 8) x RESNET_BASE x width
N_FIXED = 4             # encoder dense + latent + decoder dense + output conv


class Encoder(nn.Module):
    """x (B,C,H,W) -> body -> head (dense) -> latent: (mean, logvar), each (B, latent_dim)."""

    def __init__(self, body: nn.Module, head: nn.Module, feat_dim: int, latent_dim: int,
                 latent_l2: tuple[float, float] = (0.0, 0.0)):
        super().__init__()
        self.body, self.head = body, head
        # One linear for mean and log-variance: they run in parallel, so they are one layer deep.
        self.latent = nn.Linear(feat_dim, 2 * latent_dim)
        self.latent_dim = latent_dim
        self.latent_l2 = tuple(latent_l2)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.head(self.body(x))  # (B, feat_dim)
        mean, logvar = self.latent(h).chunk(2, dim=1)
        return mean, logvar

    def penalty(self) -> Tensor:
        """Keras-style L2 (kernel and bias regularizers) on the mean and log-variance layers."""
        w, b, n = self.latent.weight, self.latent.bias, self.latent_dim
        l2_mean, l2_logvar = self.latent_l2
        return (l2_mean * (w[:n].square().sum() + b[:n].square().sum())
                + l2_logvar * (w[n:].square().sum() + b[n:].square().sum()))


class Decoder(nn.Module):
    """z (B, latent_dim) -> dense -> reshape -> body -> output conv -> likelihood params (B,P,H,W)."""

    def __init__(self, fc: nn.Module, shape: tuple[int, int, int], body: nn.Module, out: nn.Module,
                 image_size: int):
        super().__init__()
        self.fc, self.shape, self.body, self.out = fc, tuple(shape), body, out
        self.image_size = image_size

    def forward(self, z: Tensor) -> Tensor:
        h = self.fc(z).view(z.shape[0], *self.shape)  # e.g. (B, 64, 4, 4) in the study
        p = self.out(self.body(h))
        # 28x28 inputs (MNIST) reach 4x4 by ceil-halving; coming back up gives 32x32: crop the
        # centre. An odd size (7 -> 1 -> 8) leaves one extra row and column, cropped just the same.
        off, s = (p.shape[-1] - self.image_size) // 2, self.image_size
        return p[..., off:off + s, off:off + s] if p.shape[-1] != s else p


def bottom_size(image_size: int) -> int:
    """Spatial size after the encoder's strides (32 -> 4, 28 -> 4, 64 -> 8)."""
    s = image_size
    for stride in STRIDES:
        s = (s - 1) // stride + 1
    return s


# Off the main path: a shortcut runs beside its block, and a latent group's prior head (arch
# "hier") beside its posterior head (z comes from one or the other), so neither adds depth.
OFF_PATH = ("shortcut", "prior")


def count_layers(module: nn.Module) -> int:
    """Weight layers on the main path: convs and linears that are not inside a shortcut (or a
    hierarchical VAE's prior head)."""
    return sum(1 for name, m in module.named_modules()
               if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear))
               and not set(OFF_PATH) & set(name.split(".")))


def _ch(c: int, width: float) -> int:
    return max(1, round(c * width))


# The builders take every option explicitly: the defaults live in config.ModelConfig alone, and
# vae.build_vae is the one caller that fills them in.
def study_nets(depth: int, *, width: float, latent_dim: int, channels: int, image_size: int,
               out_channels: int, shortcut: str, preact: bool, upsample: str,
               zero_init_residual: bool, latent_l2: tuple[float, float]) -> tuple[Encoder, Decoder]:
    """The study's layout: Keras ResNet50 bottleneck stages in the encoder and, with transposed
    convs, in the decoder (whose widest stage runs at full resolution, as the study's did)."""
    if depth not in STUDY_IDENTITY_BLOCKS:
        raise ConfigError(f"arch 'study' has depths {sorted(STUDY_IDENTITY_BLOCKS)} only "
                         f"(the study's four nets), got depth={depth}; use arch 'resnet' for others")
    # Keras defaults: BatchNormalization(momentum=0.99, epsilon=1e-3) = PyTorch momentum 0.01;
    # convs and dense layers carry biases.
    norm = partial(nn.BatchNorm2d, eps=1e-3, momentum=0.01)
    opts = dict(block=Bottleneck, shortcut=shortcut, preact=preact, norm=norm, bias=True,
                upsample=upsample, stride_in_1x1=True)
    n_blocks = [1 + k for k in STUDY_IDENTITY_BLOCKS[depth]]
    filters = [tuple(_ch(f, width) for f in fs) for fs in STUDY_FILTERS]
    s = bottom_size(image_size)

    stages, ch = [], channels
    for (f1, _, _), n, stride in zip(filters, n_blocks, STRIDES):
        stages.append(make_stage(ch, f1, n, stride, **opts))
        ch = f1 * Bottleneck.expansion  # = f3
    dense = _ch(STUDY_DENSE, width)
    # Keras Dense on a 4-D tensor acts per position: a 1x1 conv. Sigmoid as in the study.
    head = nn.Sequential(nn.Conv2d(ch, dense, 1), nn.BatchNorm2d(dense, eps=1e-3, momentum=0.01),
                         nn.Sigmoid(), nn.Flatten())
    encoder = Encoder(nn.Sequential(*stages, _final(preact, ch, norm)), head, dense * s * s,
                      latent_dim, latent_l2)

    # Decoder: dense 256 -> 1024, reshape to 4x4x64, then the same four stages upwards.
    c0 = max(1, dense // (s * s))
    fc = nn.Sequential(nn.Linear(latent_dim, c0 * s * s),
                       nn.BatchNorm1d(c0 * s * s, eps=1e-3, momentum=0.01), nn.Sigmoid())
    stages, ch = [], c0
    for (f1, _, _), n, stride in zip(filters, n_blocks, STRIDES):
        stages.append(make_stage(ch, f1, n, stride, up=True, **opts))
        ch = f1 * Bottleneck.expansion
    decoder = Decoder(fc, (c0, s, s), nn.Sequential(*stages, _final(preact, ch, norm)),
                      nn.Conv2d(ch, out_channels, 1), image_size)
    for net in (encoder, decoder):
        init_weights(net, "glorot")
        _finish_init(net, zero_init_residual)
    return encoder, decoder


def resnet_blocks(depth: int, block: str = "basic") -> list[int]:
    """Blocks per stage for the resnet family (same on both sides).

    depth = 4 + 2 * n_layers(block) * B, with B >= 4 blocks per side; the B blocks go to the four
    stages evenly, the remainder to the lowest-resolution stages first (they are the cheapest).
    So basic: 20, 24, 28, ..., 1004; bottleneck: 28, 34, 40, ..., 1000.
    """
    if block not in BLOCKS:
        raise ValueError(f"block must be one of {sorted(BLOCKS)}, got {block!r}")
    per = 2 * BLOCKS[block].n_layers
    smallest = N_FIXED + 4 * per
    if depth < smallest or (depth - N_FIXED) % per:
        below = max(smallest, N_FIXED + (depth - N_FIXED) // per * per)
        above = max(smallest, below + per if depth > below else below)
        near = sorted({below, above})
        raise ConfigError(f"depth {depth} is not reachable with arch 'resnet' and {block} blocks: "
                         f"depths are {N_FIXED} + {per}*B (B >= 4 blocks per side); nearest valid: "
                         + " or ".join(map(str, near)))
    b = (depth - N_FIXED) // per
    return [b // 4 + (1 if i >= 4 - b % 4 else 0) for i in range(4)]


def resnet_nets(depth: int, *, width: float, latent_dim: int, channels: int, image_size: int,
                out_channels: int, block: str, shortcut: str, preact: bool, upsample: str,
                zero_init_residual: bool, latent_l2: tuple[float, float]) -> tuple[Encoder, Decoder]:
    """Efficient family: widths grow as resolution shrinks in the encoder (torchvision's ResNet),
    and the decoder mirrors it (wide at 4x4, narrow at 32x32), any reachable depth."""
    n_blocks = resnet_blocks(depth, block)
    cls = BLOCKS[block]
    planes = [_ch(RESNET_BASE * m, width) for m in (1, 2, 4, 8)]
    opts = dict(block=cls, shortcut=shortcut, preact=preact, upsample=upsample)
    norm = nn.BatchNorm2d
    s = bottom_size(image_size)

    stages, ch = [], channels
    for p, n, stride in zip(planes, n_blocks, STRIDES):
        stages.append(make_stage(ch, p, n, stride, **opts))
        ch = p * cls.expansion
    head = nn.Sequential(nn.Conv2d(ch, ch, 1), norm(ch), nn.ReLU(), nn.Flatten())
    encoder = Encoder(nn.Sequential(*stages, _final(preact, ch, norm)), head, ch * s * s,
                      latent_dim, latent_l2)

    top = ch
    fc = nn.Sequential(nn.Linear(latent_dim, top * s * s), nn.BatchNorm1d(top * s * s), nn.ReLU())
    stages = []
    for p, n, stride in zip(reversed(planes), reversed(n_blocks), STRIDES):
        stages.append(make_stage(ch, p, n, stride, up=True, **opts))
        ch = p * cls.expansion
    decoder = Decoder(fc, (top, s, s), nn.Sequential(*stages, _final(preact, ch, norm)),
                      nn.Conv2d(ch, out_channels, 3, padding=1), image_size)
    for net in (encoder, decoder):
        init_weights(net, "kaiming")
        if preact:  # no BN closes a pre-activation branch: keep the residual sum at unit scale
            residual_scale_(net, sum(n_blocks))
        _finish_init(net, zero_init_residual)
    return encoder, decoder


def _final(preact: bool, ch: int, norm) -> nn.Module:
    # Pre-activation stacks end un-normalised: close them with BN-ReLU (He et al. 2016).
    return nn.Sequential(norm(ch), nn.ReLU()) if preact else nn.Identity()


def _finish_init(net: nn.Module, zero_init_residual: bool) -> None:
    if zero_init_residual:
        for m in net.modules():
            if hasattr(m, "zero_init_last") and getattr(m, "shortcut", None) is not None:
                m.zero_init_last()


ARCHS = {"study": study_nets, "resnet": resnet_nets, "hier": hier_nets}

