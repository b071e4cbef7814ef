"""One training update and what it is made of: Adam (`make_optimizer`), the lr warm-up and
cosine factors, the KL weight, the EMA of the weights, `Precision` (autocast and memory layout),
`prepare_model` (the one recipe that readies a model for training) and `training_step` with its
skip guard. `train.py` runs these in its loop; `resvae bench` times the same step.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, replace

import torch
from torch.optim.swa_utils import AveragedModel

from . import distributed as D
from .vae import build_from_config
from .vae_base import BaseVAE


def warmup_factor(step: int, warmup_steps: int) -> float:
    return min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


def schedule_follows_clock(tc) -> bool:
    """Whether the cosine lr follows the wall clock: only when the clock sets the run's length
    (a --budget, with --max-epochs left at its default). The schedule then ends annealed however
    fast the machine is, but depends on its speed: such a run, resumed or repeated, is not the
    same bit for bit. With --max-epochs set, it follows the updates, and resumes exactly."""
    return (tc.lr_schedule == "cosine" and bool(tc.budget)
            and tc.max_epochs == type(tc).__dataclass_fields__["max_epochs"].default)


def cosine_factor(progress: float) -> float:
    """The cosine schedule's lr multiplier at `progress` in [0, 1] of the run (1 -> 0)."""
    return 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))


class EMA(AveragedModel):
    """--ema's average of the weights (and buffers), with TensorFlow's warm-up
    (ExponentialMovingAverage's num_updates): the decay after n updates is
    min(decay, (1 + n) / (10 + n)). Without it a 10-minute run's average (decay 0.999, ~2,000
    updates) still gives the first, untrained weights about a tenth of its weight: in a trial run
    of the cpu preset without warm-up the average scored 8.26 bits/dim after one epoch, where
    the same recipe's raw weights scored 5.21.

    `update_parameters` is AveragedModel's (the first update copies, then a lerp per dtype
    group) without its host reads: the counter lives on the model's device, and `ok` (a 0-d
    bool tensor from --guard device) turns a skipped update into no update without a sync."""

    def __init__(self, vae: torch.nn.Module, decay: float):
        super().__init__(vae, device=next(vae.parameters()).device, use_buffers=True)
        self.decay = decay

    @torch.no_grad()
    def update_parameters(self, model: torch.nn.Module, ok: bool | torch.Tensor = True) -> None:
        if ok is False:
            return
        n = self.n_averaged
        d = ((1 + n) / (10 + n)).clamp(max=self.decay)
        w = torch.where(n == 0, 1.0, 1 - d)  # lerp by 1 is an exact copy: AveragedModel's start
        if ok is not True:
            w = torch.where(ok, w, 0.0)  # lerp by 0 leaves the average exactly as it was
        groups = _by_dtype([*self.module.parameters(), *self.module.buffers()],
                           [c.detach() for c in (*model.parameters(), *model.buffers())])
        for dtype, (avg, cur) in groups.items():
            if dtype.is_floating_point:
                torch._foreach_lerp_(avg, cur, w.to(dtype))
            else:  # BatchNorm's num_batches_tracked: a count, copied (lerp has no int kernel)
                for a, c in zip(avg, cur):
                    a.copy_(c if ok is True else torch.where(ok, c, a))
        self.n_averaged += 1 if ok is True else ok.to(n.dtype)


def kl_beta(step: int, anneal_steps: int) -> float:
    """KL weight, 0 -> 1 linearly over `anneal_steps` (Bowman et al. 2016); 1 when off."""
    return min(1.0, step / anneal_steps) if anneal_steps > 0 else 1.0


def make_optimizer(vae: torch.nn.Module, cfg, *, fused: bool | None = None) -> torch.optim.Adam:
    """The Adam of training (and of `resvae bench`, which times the same step). `fused=True`
    asks for torch's one-kernel Adam; None keeps torch's default implementation, except under
    --guard device, which needs the fused one (its `found_inf` skips an update on the device)."""
    if cfg.guard == "device":
        fused = True
    return torch.optim.Adam(vae.parameters(), lr=cfg.lr, betas=tuple(cfg.betas),
                            weight_decay=cfg.weight_decay, fused=fused)


def make_ema(vae: torch.nn.Module, cfg) -> EMA | None:
    """--ema's average of `vae` (training's and `resvae bench`'s), None when off. Made before
    `vae` is compiled: the average is only evaluated (once an epoch), eagerly."""
    return EMA(vae, cfg.ema) if cfg.ema > 0 else None


def to_channels_last(vae: torch.nn.Module) -> torch.nn.Module:
    """--channels-last: the convolutions' weights in NHWC (the inputs come so from `to_input`).
    Only theirs: another 4-D parameter of 1x1 spatial size (hier's top-level bias) is NCHW- and
    NHWC-contiguous at once, and with NHWC strides it disagrees with the NCHW strides of the
    gradient autograd gives it, which DDP reports as a grad / bucket-view stride mismatch."""
    for m in vae.modules():
        if isinstance(m, torch.nn.modules.conv._ConvNd):
            m.to(memory_format=torch.channels_last)
    return vae


@dataclass(frozen=True)
class Precision:
    """How the model computes and lays out its tensors, as one value: `dtype` "bf16" (autocast
    of the forward) or "fp32", and `channels_last` (NHWC weights and inputs)."""

    dtype: str = "fp32"
    channels_last: bool = False
    device_type: str = "cpu"  # autocast's device type

    @classmethod
    def of(cls, tc, device: torch.device) -> Precision:
        """--precision and --channels-last of TrainConfig `tc`, on `device`."""
        return cls(tc.precision, tc.channels_last, device.type)

    def autocast(self):
        """The forward's autocast context: bf16 autocast, or none for fp32."""
        if self.dtype == "bf16":
            return torch.autocast(self.device_type, dtype=torch.bfloat16)
        return contextlib.nullcontext()


FP32 = Precision()  # eager float32, NCHW


@dataclass
class Prepared:
    """A model made ready to train by `prepare_model`."""

    model: torch.nn.Module  # what the step calls: DDP-wrapped under torchrun, else `vae`
    vae: BaseVAE  # the module itself (inside DDP), compiled in place with --compile
    ema: EMA | None
    opt: torch.optim.Adam
    precision: Precision


def prepare_model(cfg, image_shape: tuple, device: torch.device, precision: Precision, *,
                  rt: D.Runtime | None = None, compiled: bool | None = None,
                  compile_mode: str | None = None, fused: bool | None = None,
                  guard: str | None = None) -> Prepared:
    """The one recipe `train` and `resvae bench` ready a model by: built from `cfg` after
    seeding (the same init on every rank, and in every bench variant), in `precision`'s layout,
    DDP-wrapped when given a runtime `rt`, its --ema average, compiled in place (`compiled` and
    `compile_mode`, default --compile and --compile-mode), and its Adam (`fused` and `guard` as
    `make_optimizer` and `training_step` take them; default --guard)."""
    tc = cfg.train
    torch.manual_seed(tc.seed)
    vae = build_from_config(cfg, tuple(image_shape)).to(device)
    if precision.channels_last:
        to_channels_last(vae)
    model = vae
    if rt is not None:
        model = D.wrap(vae, rt, tc.sync_bn)
        vae = D.unwrap(model)  # the module inside DDP (SyncBN conversion may have replaced BNs)
    ema = make_ema(vae, tc)  # before vae.compile() below
    if tc.compile if compiled is None else compiled:
        # In place: the forward (training and evaluation, through DDP too) is compiled, while
        # `vae` stays the plain module whose state_dict keys carry no `_orig_mod.` prefix.
        vae.compile(mode=compile_mode or tc.compile_mode)
    opt = make_optimizer(vae, tc if guard is None else replace(tc, guard=guard), fused=fused)
    return Prepared(model, vae, ema, opt, precision)


def _by_dtype(dst: list[torch.Tensor], src: list[torch.Tensor]
              ) -> dict[torch.dtype, tuple[list, list]]:
    """Pairs (dst[i], src[i]) grouped by dtype, for multi-tensor (_foreach) ops, which take one
    dtype per call."""
    groups: dict[torch.dtype, tuple[list, list]] = {}
    for d, s in zip(dst, src, strict=True):
        pair = groups.setdefault(d.dtype, ([], []))
        pair[0].append(d)
        pair[1].append(s)
    return groups


def _copy_all(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    """dst[i].copy_(src[i]) for every i, as one multi-tensor copy per dtype: a copy per buffer
    is hundreds of tiny kernel launches per step on a GPU for a deep net's BatchNorms."""
    for d, s in _by_dtype(dst, src).values():
        torch._foreach_copy_(d, s)


def applied(skipped: bool | torch.Tensor) -> bool | torch.Tensor:
    """Whether `training_step`'s update was applied: a bool under --guard host, a 0-d bool
    tensor on the device under --guard device (negated there, without a host read)."""
    return not skipped if isinstance(skipped, bool) else ~skipped


def training_step(model: torch.nn.Module, vae: BaseVAE, x: torch.Tensor,
                  opt: torch.optim.Optimizer, cfg, *, beta: float = 1.0,
                  precision: Precision = FP32, rt: D.Runtime | None = None,
                  guard: str | None = None) -> dict:
    """One update. A non-finite loss or gradient norm (or one above `skip_threshold`) skips the
    update instead of poisoning the weights (VDVAE's guard); the caller counts skips. `guard`
    (default `cfg.guard`) says where that is decided:
    - "host": read back here, the step's one host sync; any optimizer. `skipped` is a bool.
    - "device": never read back. Fused Adam skips its own update through `found_inf` (as it
      does under GradScaler), the BatchNorm buffers are put back with torch.where, and
      `skipped` is a 0-d bool tensor on the device that the caller reads only now and then: on
      a GPU the host queues the next steps meanwhile.
    - "off" (only `resvae bench`'s `nosync` variant): every update applied unchecked, to measure
      what the guard costs.

    Returns the batch means of `loss`, `rate`, `distortion` and the `grad_norm` as 0-d tensors
    on the device (the caller sums them there and reads them back only now and then), and
    `skipped`."""
    guard = guard or cfg.guard
    if guard == "device" and not all(g.get("fused") for g in opt.param_groups):
        raise ValueError("guard 'device' needs fused Adam: make_optimizer(..., fused=True)")
    opt.zero_grad(set_to_none=True)
    buffers = list(vae.buffers())  # BN running stats, restored on a skip
    saved = [torch.empty_like(b) for b in buffers]
    _copy_all(saved, buffers)
    out, norm, ok = _backward(model, vae, x, cfg, beta, precision)
    if guard == "device":
        skipped = _step_on_device(opt, ok, buffers, saved, rt)
    else:
        skipped = _step_on_host(opt, ok, buffers, saved, rt, guard)
    stats = {k: out[k].detach().mean() for k in ("loss", "rate", "distortion")}
    return {**stats, "grad_norm": norm.detach(), "skipped": skipped}


def _backward(model, vae: BaseVAE, x: torch.Tensor, cfg, beta: float, precision: Precision):
    """Forward, the objective's gradients, clipping: (the forward's output, the gradient norm,
    whether the update may be applied as a 0-d bool tensor on the device)."""
    with precision.autocast():
        out = model(x)
    rate = out["kl"].mean(0)  # (L,) nats per latent dim, batch mean
    if cfg.free_bits > 0:  # free bits (Kingma et al. 2016): no pressure below lambda per dim
        rate = rate.clamp(min=cfg.free_bits)
    objective = out["distortion"].mean() + beta * rate.sum() + vae.penalty()
    objective.backward()
    norm = torch.nn.utils.clip_grad_norm_(
        vae.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
    ok = torch.isfinite(objective) & torch.isfinite(norm)
    if cfg.skip_threshold > 0:  # compared in float64, as a Python float would be
        ok &= norm.double() < cfg.skip_threshold
    return out, norm, ok


def _step_on_device(opt, ok: torch.Tensor, buffers: list, saved: list,
                    rt: D.Runtime | None) -> torch.Tensor:
    """--guard device: fused Adam's found_inf skips the update, the BN buffers are put back
    with torch.where; no host read. Returns `skipped`, a 0-d bool tensor."""
    if rt is not None:
        ok = D.all_ranks(ok, rt)  # every rank skips together, still on the device
    opt.found_inf = (~ok).float()
    try:
        opt.step()
    finally:
        opt.found_inf = None
    with torch.no_grad():  # the forward pass already moved the BN running statistics
        for b, old in zip(buffers, saved):
            b.copy_(torch.where(ok, b, old))
    return ~ok


def _step_on_host(opt, ok: torch.Tensor, buffers: list, saved: list, rt: D.Runtime | None,
                  guard: str) -> bool:
    """--guard host (one host sync: whether to update) or "off" (always update). Returns
    `skipped`, a bool."""
    ok = bool(ok) if guard == "host" else True
    if rt is not None:
        ok = not D.any_rank(not ok, rt)  # every rank skips together
    if ok:
        opt.step()
    else:
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            _copy_all(buffers, saved)
    return not ok
