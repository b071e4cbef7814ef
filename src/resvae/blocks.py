"""Residual building blocks, in the torchvision idiom, for encoders (down) and decoders (up).

A block never decides its own shortcut: `make_stage` calls `make_shortcut` once per stage
(torchvision passes `downsample` the same way), so identity / projection / none is chosen in
one place.  Blocks expose `n_layers` (main-path weight layers) so nets can count depth.
"""

from __future__ import annotations

import math
from typing import Callable

from torch import Tensor, nn

Norm = Callable[[int], nn.Module]
Act = Callable[[], nn.Module]

SHORTCUTS = ("identity", "projection", "none")
UPSAMPLE = ("transposed", "nearest")


def resample_conv(in_ch: int, out_ch: int, kernel: int, stride: int = 1, *, up: bool = False,
                  bias: bool = False, upsample: str = "transposed") -> nn.Module:
    """A k x k conv that keeps size (stride 1), halves it (down, stride 2) or doubles it (up)."""
    pad = kernel // 2
    if stride == 1:
        return nn.Conv2d(in_ch, out_ch, kernel, padding=pad, bias=bias)
    if stride != 2:
        raise ValueError(f"stride must be 1 or 2, got {stride}")
    if not up:
        return nn.Conv2d(in_ch, out_ch, kernel, stride=2, padding=pad, bias=bias)
    if upsample == "transposed":
        # output_padding=1 makes n -> 2n exactly (for k=1 as for k=3), as Keras' Conv2DTranspose
        # with strides=2 does in the study's decoder.
        return nn.ConvTranspose2d(in_ch, out_ch, kernel, stride=2, padding=pad,
                                  output_padding=1, bias=bias)
    if upsample == "nearest":
        # Nearest-neighbour resize then conv: no checkerboard artefacts (Odena et al. 2016).
        return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                             nn.Conv2d(in_ch, out_ch, kernel, padding=pad, bias=bias))
    raise ValueError(f"upsample must be one of {UPSAMPLE}, got {upsample!r}")


def last_conv(seq: nn.Module) -> nn.Module:
    """The conv inside a resample_conv (which may be Upsample + Conv2d)."""
    return seq[-1] if isinstance(seq, nn.Sequential) else seq


class BasicBlock(nn.Module):
    """3x3 -> 3x3 (He et al. 2015, Fig. 2 left)."""

    expansion = 1
    n_layers = 2

    def __init__(self, in_ch: int, planes: int, stride: int = 1, *, up: bool = False,
                 shortcut: nn.Module | None = None, preact: bool = False, norm: Norm = nn.BatchNorm2d,
                 act: Act = nn.ReLU, bias: bool = False, upsample: str = "transposed",
                 stride_in_1x1: bool = False):
        super().__init__()
        del stride_in_1x1  # only meaningful for the bottleneck
        out_ch = planes * self.expansion
        self.preact = preact
        self.conv1 = resample_conv(in_ch, planes, 3, stride, up=up, bias=bias, upsample=upsample)
        self.conv2 = nn.Conv2d(planes, out_ch, 3, padding=1, bias=bias)
        # Pre-activation normalises the block's input; post-activation each conv's output.
        self.norm1 = norm(in_ch if preact else planes)
        self.norm2 = norm(planes if preact else out_ch)
        self.act = act()
        self.shortcut = shortcut

    def forward(self, x: Tensor) -> Tensor:
        if self.preact:  # He et al. 2016, "Identity Mappings": BN-ReLU-conv, nothing after the add
            pre = self.act(self.norm1(x))
            out = self.conv2(self.act(self.norm2(self.conv1(pre))))
            return out if self.shortcut is None else out + _preact_identity(self.shortcut, x, pre)
        out = self.act(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        if self.shortcut is not None:
            out = out + self.shortcut(x)
        return self.act(out)

    def zero_init_last(self) -> None:
        _zero_last(self.norm2 if not self.preact else self.conv2)


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 -> 1x1 expand (He et al. 2015, Fig. 2 right; Keras ResNet50's blocks).

    `stride_in_1x1=True` puts the stride on the first 1x1 as Keras (and the study) did;
    False puts it on the 3x3 (torchvision's "ResNet V1.5", slightly more accurate).
    """

    expansion = 4
    n_layers = 3

    def __init__(self, in_ch: int, planes: int, stride: int = 1, *, up: bool = False,
                 shortcut: nn.Module | None = None, preact: bool = False, norm: Norm = nn.BatchNorm2d,
                 act: Act = nn.ReLU, bias: bool = False, upsample: str = "transposed",
                 stride_in_1x1: bool = False):
        super().__init__()
        out_ch = planes * self.expansion
        s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.preact = preact
        self.conv1 = resample_conv(in_ch, planes, 1, s1, up=up, bias=bias, upsample=upsample)
        self.conv2 = resample_conv(planes, planes, 3, s3, up=up, bias=bias, upsample=upsample)
        self.conv3 = nn.Conv2d(planes, out_ch, 1, bias=bias)
        self.norm1 = norm(in_ch if preact else planes)
        self.norm2 = norm(planes)
        self.norm3 = norm(planes if preact else out_ch)
        self.act = act()
        self.shortcut = shortcut

    def forward(self, x: Tensor) -> Tensor:
        if self.preact:
            pre = self.act(self.norm1(x))
            out = self.conv2(self.act(self.norm2(self.conv1(pre))))
            out = self.conv3(self.act(self.norm3(out)))
            return out if self.shortcut is None else out + _preact_identity(self.shortcut, x, pre)
        out = self.act(self.norm1(self.conv1(x)))
        out = self.act(self.norm2(self.conv2(out)))
        out = self.norm3(self.conv3(out))
        if self.shortcut is not None:
            out = out + self.shortcut(x)
        return self.act(out)

    def zero_init_last(self) -> None:
        _zero_last(self.norm3 if not self.preact else self.conv3)


BLOCKS: dict[str, type[nn.Module]] = {"basic": BasicBlock, "bottleneck": Bottleneck}


def _preact_identity(shortcut: nn.Module, x: Tensor, pre: Tensor) -> Tensor:
    # A projection sees the pre-activated input, as in He et al. 2016 (fb.resnet.torch preresnet);
    # an identity carries the raw input so the signal path stays clean.
    return x if isinstance(shortcut, nn.Identity) else shortcut(pre)


def _zero_last(m: nn.Module) -> None:
    # Zero the last BN (or conv, pre-activation) of the branch so each block starts as an identity
    # (Goyal et al. 2017; torchvision's zero_init_residual).
    nn.init.zeros_(m.weight)


def make_shortcut(in_ch: int, out_ch: int, stride: int, *, up: bool, mode: str, norm: Norm,
                  preact: bool = False, bias: bool = False,
                  upsample: str = "transposed") -> nn.Module | None:
    """The one place a shortcut is chosen.

    identity:   nn.Identity when shape is unchanged, else a projection W_s x (He et al. 2015, option B)
    projection: a projection on every block (option C)
    none:       no shortcut at all, a plain network (to show the degradation problem)
    """
    if mode not in SHORTCUTS:
        raise ValueError(f"shortcut must be one of {SHORTCUTS}, got {mode!r}")
    if mode == "none":
        return None
    if mode == "identity" and stride == 1 and in_ch == out_ch:
        return nn.Identity()
    conv = resample_conv(in_ch, out_ch, 1, stride, up=up, bias=bias, upsample=upsample)
    # Pre-activation blocks add unnormalised signals; a BN on the projection would break that.
    return conv if preact else nn.Sequential(conv, norm(out_ch))


def make_stage(in_ch: int, planes: int, n_blocks: int, stride: int, *, block: type[nn.Module],
               up: bool = False, shortcut: str = "identity", preact: bool = False,
               norm: Norm = nn.BatchNorm2d, act: Act = nn.ReLU, bias: bool = False,
               upsample: str = "transposed", stride_in_1x1: bool = False) -> nn.Sequential:
    """n_blocks blocks; the first changes resolution (stride) and channels, the rest keep them."""
    out_ch = planes * block.expansion
    opts = dict(preact=preact, norm=norm, act=act, bias=bias, upsample=upsample,
                stride_in_1x1=stride_in_1x1)
    layers, ch, s = [], in_ch, stride
    for _ in range(n_blocks):
        sc = make_shortcut(ch, out_ch, s, up=up, mode=shortcut, norm=norm, preact=preact,
                           bias=bias, upsample=upsample)
        layers.append(block(ch, planes, s, up=up, shortcut=sc, **opts))
        ch, s = out_ch, 1
    return nn.Sequential(*layers)


def init_weights(module: nn.Module, scheme: str = "kaiming") -> None:
    """Initialise convs/linears once: 'kaiming' (He et al. 2015, torchvision) or 'glorot'
    (Keras' default glorot_uniform with zero biases, used by the study family for fidelity)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            if scheme == "kaiming" and isinstance(m, nn.Linear):
                # He init (fan_out) on the wide flatten->latent layer starts log-variances in
                # the tens and the KL in the millions; Glorot keeps q(z|x) near the prior.
                nn.init.xavier_uniform_(m.weight)
            elif scheme == "kaiming":
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif scheme == "glorot":
                nn.init.xavier_uniform_(m.weight)
            else:
                raise ValueError(f"unknown init scheme {scheme!r}")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def residual_scale_(module: nn.Module, n_blocks: int) -> None:
    """Scale the last weight of each residual branch by sqrt(1/n_blocks) (VDVAE, Child 2021) so the
    summed residual signal keeps unit scale at any depth."""
    scale = math.sqrt(1.0 / max(n_blocks, 1))
    for m in module.modules():
        if isinstance(m, (BasicBlock, Bottleneck)):
            last = m.conv2 if isinstance(m, BasicBlock) else m.conv3
            last.weight.data.mul_(scale)
