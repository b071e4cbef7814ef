"""`resvae bench`: training throughput against this machine's own ceiling, in one run.

One process measures everything, so each ratio is taken side by side on the same machine load:
- the matmul ceilings (fp32 and bf16, 2048^3, all threads, median of several) before and after
  the model, so a throttled or shared machine shows itself;
- FLOPs per training image: forward + backward of the real step, counted by FlopCounterMode;
- images/s of the real training step (`step.training_step`, the optimizer of
  `step.make_optimizer`) fed by the real data path (uint8 batches of the in-memory arrays ->
  `data.to_input`), for the configured variant, any `--variants`, and a naive baseline (eager
  fp32 NCHW, images converted to float one by one), interleaved round by round;
- the data path alone, in batches/s;
- with `profile=True`, the operators that take the step's time (torch.profiler), and the
  model's convolutions timed alone beside the whole step (`convs_alone`).
Timings are never asserted anywhere: machines are shared and noisy.
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .config import RunConfig, to_dict
from .data import iterate_batches, load_splits, to_input
from .distributed import device_name, resolve_device
from .errors import ConfigError
from .step import Precision, applied, prepare_model, training_step

MATMUL_SIZE = 2048
ROUNDS = 5  # each variant is timed once per round; the median round is reported
WARMUP_STEPS = 3  # allocator, kernel choice, and compiling (a compiled step may retrace once)
SYNTHETIC_IMAGES = 50_000  # CIFAR-10's training set: (50000, 3, 32, 32) uint8
TOKENS = ("fp32", "bf16", "cl", "compiled", "autotune", "fused", "nosync", "devguard")


@dataclass(frozen=True)
class Variant:
    """How the step runs: bf16 autocast, channels_last, torch.compile (`autotune`: in mode
    max-autotune-no-cudagraphs, which implies compiled), fused Adam, `devguard`
    (--guard device: the skip guard decided on the device, with fused Adam) and `nosync`:
    without any skip guard (every update applied unchecked; what the guard's host sync costs,
    not a way to train). `naive` is the baseline: eager fp32 NCHW, default Adam, each image
    converted to float on its own."""

    bf16: bool = False
    channels_last: bool = False
    compiled: bool = False
    autotune: bool = False
    fused: bool = False
    nosync: bool = False
    devguard: bool = False
    naive: bool = False

    @property
    def name(self) -> str:
        if self.naive:
            return "baseline"
        flags = (("cl", self.channels_last), ("compiled", self.compiled and not self.autotune),
                 ("autotune", self.autotune), ("fused", self.fused),
                 ("nosync", self.nosync), ("devguard", self.devguard))
        return "+".join(["bf16" if self.bf16 else "fp32"] + [t for t, on in flags if on])


def parse_variant(text: str) -> Variant:
    """'bf16+cl+compiled' -> Variant; tokens: fp32 or bf16, cl, compiled, autotune (compiled in
    mode max-autotune-no-cudagraphs), fused, nosync, devguard."""
    tokens = [t.strip() for t in text.split("+")]
    bad = [t for t in tokens if t not in TOKENS]
    if bad or ("fp32" in tokens and "bf16" in tokens) or {"nosync", "devguard"} <= set(tokens):
        raise ConfigError(f"--variants: {text!r}: expected tokens joined by '+' from "
                         f"{', '.join(TOKENS)} (fp32 or bf16, not both; nosync or devguard, not "
                         "both), e.g. bf16+cl+compiled")
    devguard = "devguard" in tokens  # decides through fused Adam's found_inf: implies fused
    autotune = "autotune" in tokens
    return Variant("bf16" in tokens, "cl" in tokens, "compiled" in tokens or autotune, autotune,
                   "fused" in tokens or devguard, "nosync" in tokens, devguard)


def config_variant(cfg: RunConfig) -> Variant:
    """The variant `resvae train` with this config runs."""
    tc = cfg.train
    device_guard = tc.guard == "device"
    return Variant(tc.precision == "bf16", tc.channels_last, tc.compile,
                   tc.compile and tc.compile_mode == "max-autotune-no-cudagraphs",
                   fused=device_guard, devguard=device_guard)


def bench_images(cfg: RunConfig, synthetic: bool) -> np.ndarray:
    """uint8 (N, C, H, W) training images: the config's data set as training loads it, or
    random ones of CIFAR-10's shape (no data set needed, e.g. on a machine without network)."""
    if not synthetic:
        return load_splits(cfg, download=cfg.data.download).train.images
    size = cfg.data.image_size or 32
    rng = np.random.default_rng(cfg.train.seed)
    return rng.integers(0, 256, (SYNTHETIC_IMAGES, 3, size, size), dtype=np.uint8)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":  # kernels run asynchronously: wait for them before reading clocks
        torch.cuda.synchronize(device)


def _timed(fn, seconds: float, device: torch.device, min_calls: int = 1) -> tuple[int, float]:
    """Call fn until `seconds` have passed (at least `min_calls` times): (calls, seconds)."""
    _sync(device)
    t0, calls = time.perf_counter(), 0
    while calls < min_calls or time.perf_counter() - t0 < seconds:
        fn()
        calls += 1
    _sync(device)
    return calls, time.perf_counter() - t0


def matmul_gflops(dtype: torch.dtype, device: torch.device, n: int = MATMUL_SIZE,
                  samples: int = 5) -> float:
    """The median GFLOP/s of n x n x n matmuls on all threads (or the GPU): the ceiling a
    model's convolutions and matmuls are measured against."""
    a, b, c = (torch.randn(n, n, device=device).to(dtype) for _ in range(3))

    def mm():
        torch.mm(a, b, out=c)

    _timed(mm, 0.0, device)  # first call: kernel choice, thread pool start
    calls, t = _timed(mm, 0.05, device)
    # a sample is at least ~50 ms: a GPU does a 2048^3 matmul in tens of microseconds
    per_sample = max(1, round(calls * 0.05 / t))
    rates = []
    for _ in range(samples):
        calls, t = _timed(mm, 0.0, device, min_calls=per_sample)
        rates.append(2 * n**3 * calls / t / 1e9)
    return statistics.median(rates)


def ceilings(device: torch.device, n: int = MATMUL_SIZE) -> dict[str, float]:
    return {"fp32": matmul_gflops(torch.float32, device, n),
            "bf16": matmul_gflops(torch.bfloat16, device, n)}


def _batches(images: np.ndarray, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Training's batches (shuffled, drop_last), epoch after epoch."""
    for epoch in itertools.count():
        yield from iterate_batches(images, batch_size, shuffle=True, seed=seed, epoch=epoch,
                                   drop_last=True)


def _naive_batches(images: np.ndarray, batch_size: int, seed: int,
                   device: torch.device) -> Iterator[torch.Tensor]:
    """What a map-style Dataset with ToTensor() and the default collate do: every image
    converted to float on its own, then stacked."""
    for epoch in itertools.count():
        order = np.random.default_rng([seed, epoch]).permutation(len(images))
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield torch.stack([torch.from_numpy(images[i]).float().div(255)
                               for i in order[start:start + batch_size]]).to(device)


class Runner:
    """One variant's model, optimizer and batches; `step()` is one real training update (with
    the --ema average's update, as train_epoch does it)."""

    def __init__(self, variant: Variant, cfg: RunConfig, images: np.ndarray,
                 device: torch.device):
        tc = self.tc = cfg.train
        self.variant = variant
        self.guard = "off" if variant.nosync else "device" if variant.devguard else "host"
        precision = Precision("bf16" if variant.bf16 else "fp32", variant.channels_last,
                              device.type)
        # training's recipe (every variant starts from the same weights), with the variant's
        # precision, layout, compilation, Adam and guard
        mode = "max-autotune-no-cudagraphs" if variant.autotune else "default"
        m = prepare_model(cfg, images.shape[1:], device, precision, compiled=variant.compiled,
                          compile_mode=mode, fused=True if variant.fused else None,
                          guard=self.guard)
        self.vae, self.ema, self.opt, self.precision = m.vae, m.ema, m.opt, m.precision
        if variant.naive:
            self.inputs = _naive_batches(images, tc.batch_size, tc.seed, device)
        else:
            self.inputs = (to_input(b, device, precision.channels_last)
                           for b in _batches(images, tc.batch_size, tc.seed))
        self.skipped = 0

    def step(self) -> None:
        out = training_step(self.vae, self.vae, next(self.inputs), self.opt, self.tc,
                            precision=self.precision, guard=self.guard)
        skipped = out["skipped"]  # a bool, or a 0-d bool tensor on the device (devguard)
        self.skipped += skipped  # (a tensor then: read once, at the end)
        if self.ema is not None:
            self.ema.update_parameters(self.vae, applied(skipped))


def flops_per_image(vae: torch.nn.Module, x: torch.Tensor, opt: torch.optim.Optimizer,
                    cfg) -> float:
    """FLOPs of one training update (`training_step` of `vae` on the batch `x`, `cfg` its
    TrainConfig) per image: forward and backward as FlopCounterMode counts them (convolutions
    and matmuls), on an eager model. Adam and the elementwise work are not counted, as in every
    FLOP/s figure of the field."""
    with FlopCounterMode(display=False) as counter:
        training_step(vae, vae, x, opt, cfg)
    return counter.get_total_flops() / x.shape[0]


def data_batches_per_s(inputs: Iterator[torch.Tensor], device: torch.device,
                       seconds: float) -> float:
    calls, t = _timed(lambda: next(inputs), seconds, device)
    return calls / t


def top_ops(runner: Runner, device: torch.device, steps: int = 5, n: int = 15) -> list[dict]:
    """The operators with the most self time over `steps` updates (device time on a GPU)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            runner.step()
        _sync(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = list(prof.key_averages())
    if device.type == "cuda":
        # A kernel's time is listed twice, under the kernel and under the op that launched it
        # (a gpu.sh run on an H100 showed each fused kernel twice): count the kernels alone.
        events = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        if not events:
            raise RuntimeError("--profile: the profiler recorded no GPU kernels (CUPTI unavailable?)")
    events.sort(key=lambda e: getattr(e, key), reverse=True)
    total = sum(getattr(e, key) for e in events) or 1.0
    return [{"op": e.key, "ms_per_step": getattr(e, key) / 1e3 / steps,
             "share": getattr(e, key) / total, "calls_per_step": e.count / steps}
            for e in events[:n]]


def convs_alone(runner: Runner, device: torch.device, rounds: int = 5) -> dict:
    """The model's convolutions timed alone: each conv (and transposed conv) module, forward and
    backward (weight gradients, and input gradients where the step needs them), on inputs of the
    shapes a training step gives it, in the variant's precision and memory layout; the median of
    `rounds` passes over all of them. Set beside the whole step, this says how much of the
    step's time the convolutions take and how fast they run on their own: whatever the rest of
    the step costs (normalisation, activations, the likelihood, the optimizer) is the gap."""
    seen = []

    def keep(module, args, _):
        x = args[0]
        seen.append((module, x.detach().clone(), x.requires_grad))

    convs = [m for m in runner.vae.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    hooks = [m.register_forward_hook(keep) for m in convs]
    try:  # .forward: the eager module, also when the variant compiled it; with grad enabled,
        # as in the step, so each input's requires_grad says whether its gradient is needed
        with torch.enable_grad(), runner.precision.autocast():
            runner.vae.forward(next(runner.inputs))
    finally:
        for h in hooks:
            h.remove()
    with torch.enable_grad(), runner.precision.autocast():
        cases = []
        for m, x, needs in seen:
            x.requires_grad_(needs)
            grad = torch.randn_like(m(x))
            cases.append((m, x, grad))

    def one_pass():
        with runner.precision.autocast():
            for m, x, grad in cases:
                torch.autograd.backward(m(x), grad)

    with FlopCounterMode(display=False) as counter:
        one_pass()
    one_pass()  # warm-up
    times = [_timed(one_pass, 0.0, device)[1] for _ in range(rounds)]
    for m in convs:
        m.zero_grad(set_to_none=True)
    t = statistics.median(times)
    return {"convs": len(cases), "ms_per_step": t * 1e3, "flops_per_step": counter.get_total_flops(),
            "gflops": counter.get_total_flops() / t / 1e9}


def bench(cfg: RunConfig, images: np.ndarray, *, seconds: float = 30.0,
          variants: tuple[Variant, ...] = (), profile: bool = False,
          matmul_size: int = MATMUL_SIZE, rounds: int = ROUNDS) -> dict:
    """Measure `cfg`'s training step on `images` (uint8, N x C x H x W) for about `seconds`
    (shared by the variants: the configured one, `variants`, the baseline); return one flat
    record, the configured variant's numbers at its top level."""
    tc = cfg.train
    if tc.batch_size > len(images):
        raise ConfigError(f"--batch-size {tc.batch_size} is larger than the {len(images)} "
                         "training images")
    device = resolve_device(tc.device)
    main = config_variant(cfg)
    wanted = list(dict.fromkeys([main, *variants, Variant(naive=True)]))
    runners = {v.name: Runner(v, cfg, images, device) for v in wanted}  # (a bad model fails now)
    before = ceilings(device, matmul_size)
    base = runners["baseline"]  # eager fp32: FLOPs are the same network's in every variant
    flops = flops_per_image(base.vae, next(base.inputs), base.opt, tc)
    warmup, rates = _time_steps(runners, device, seconds, rounds, tc.batch_size)
    data_seconds = max(0.05, 0.05 * seconds)
    data_rate = data_batches_per_s(runners[main.name].inputs, device, data_seconds)
    naive_data_rate = data_batches_per_s(runners["baseline"].inputs, device, data_seconds)
    after = ceilings(device, matmul_size)
    # the machine's ceiling is the better of the two measurements; a lower one was load or heat
    peak32, peak16 = max(before["fp32"], after["fp32"]), max(before["bf16"], after["bf16"])
    ips = {name: statistics.median(r) for name, r in rates.items()}
    per_variant = {name: {
        "images_per_s": ips[name], "achieved_gflops": ips[name] * flops / 1e9,
        "ratio_to_peak": ips[name] * flops / 1e9 / peak32,
        "speedup_vs_baseline": ips[name] / ips["baseline"], "warmup_seconds": warmup[name],
        "round_images_per_s": rates[name], "skipped_updates": int(runners[name].skipped)}
        for name in runners}
    m = per_variant[main.name]
    steps_per_s = m["images_per_s"] / tc.batch_size
    record = {
        "images_per_s": m["images_per_s"], "flops_per_image": flops,
        "achieved_gflops": m["achieved_gflops"], "peak_fp32_gflops": peak32,
        "peak_bf16_gflops": peak16, "ratio_to_peak": m["ratio_to_peak"],
        "ratio_to_bf16_peak": m["achieved_gflops"] / peak16,
        "baseline_images_per_s": ips["baseline"],
        "speedup_vs_baseline": m["speedup_vs_baseline"],
        "data_batches_per_s": data_rate, "data_to_step_ratio": data_rate / steps_per_s,
        "baseline_data_batches_per_s": naive_data_rate,
        "peak_fp32_gflops_before": before["fp32"], "peak_fp32_gflops_after": after["fp32"],
        "peak_bf16_gflops_before": before["bf16"], "peak_bf16_gflops_after": after["bf16"],
        "matmul_size": matmul_size, "variant": main.name, "variants": per_variant,
        "batch_size": tc.batch_size, "seconds": seconds, "rounds": rounds,
        "device": str(device), "device_name": device_name(device),
        "torch_version": torch.__version__, "threads": torch.get_num_threads(),
        "config": to_dict(cfg)}
    if profile:
        _add_profile(record, runners[main.name], device)
    return record


def _time_steps(runners: dict[str, Runner], device: torch.device, seconds: float, rounds: int,
                batch_size: int) -> tuple[dict, dict]:
    """Each runner's warm-up seconds, and its images/s in each of `rounds` interleaved rounds
    (load from elsewhere hits every variant alike), `seconds` shared by all."""
    warmup = {name: _timed(r.step, 0.0, device, WARMUP_STEPS)[1] for name, r in runners.items()}
    rates = {name: [] for name in runners}
    slot = seconds / (rounds * len(runners))
    for _ in range(rounds):
        for name, r in runners.items():
            steps, t = _timed(r.step, slot, device)
            rates[name].append(steps * batch_size / t)
    return warmup, rates


def _add_profile(record: dict, runner: Runner, device: torch.device) -> None:
    """--profile: the top operators, and the convolutions timed alone beside the whole step."""
    record["profile"] = top_ops(runner, device)
    c = convs_alone(runner, device)
    step_ms = 1e3 * record["batch_size"] / record["images_per_s"]
    record["convs_alone"] = {**c, "step_ms": step_ms, "share_of_step": c["ms_per_step"] / step_ms,
                             "ratio_to_peak": c["gflops"] / record["peak_fp32_gflops"],
                             "ratio_to_bf16_peak": c["gflops"] / record["peak_bf16_gflops"]}


def format_report(r: dict) -> str:
    """`resvae bench`'s human-readable output of a `bench()` record."""
    mc = r["config"]["model"]
    lines = [
        f"resvae bench: {mc['arch']}, {mc['depth']} layers, width {mc['width']:g}, batch "
        f"{r['batch_size']}, on {r['device_name']} (torch {r['torch_version']}, "
        f"{r['threads']} threads)",
        f"FLOPs per training image (forward + backward, counted): "
        f"{r['flops_per_image'] / 1e9:.3f} GFLOP",
        f"matmul ceiling ({r['matmul_size']}^3), before -> after the model: fp32 "
        f"{r['peak_fp32_gflops_before']:.0f} -> {r['peak_fp32_gflops_after']:.0f} GFLOP/s, "
        f"bf16 {r['peak_bf16_gflops_before']:.0f} -> {r['peak_bf16_gflops_after']:.0f} GFLOP/s",
        f"median of {r['rounds']} interleaved rounds, {r['seconds']:g} s in all:",
        f"  {'variant':<24} {'images/s':>9} {'GFLOP/s':>8} {'of fp32 ceiling':>15} "
        f"{'vs baseline':>11} {'warm-up':>8}"]
    for name, v in r["variants"].items():
        label = name + (" (configured)" if name == r["variant"] else "")
        lines.append(f"  {label:<24} {v['images_per_s']:9.1f} {v['achieved_gflops']:8.1f} "
                     f"{v['ratio_to_peak']:15.0%} {v['speedup_vs_baseline']:10.2f}x "
                     f"{v['warmup_seconds']:7.1f}s")
    lines.append(f"data path alone: {r['data_batches_per_s']:.0f} batches/s, "
                 f"{r['data_to_step_ratio']:.0f}x the training step rate (per-image conversion: "
                 f"{r['baseline_data_batches_per_s']:.0f} batches/s)")
    if "profile" in r:
        lines.append("top operators (self time per step):")
        lines += [f"  {p['op']:<40} {p['ms_per_step']:9.2f} ms {p['share']:6.1%}  "
                  f"{p['calls_per_step']:g} calls" for p in r["profile"]]
    if "convs_alone" in r:
        c = r["convs_alone"]
        lines.append(
            f"the {c['convs']} convolutions alone (forward + backward, same shapes, precision and "
            f"layout): {c['ms_per_step']:.1f} ms of the step's {c['step_ms']:.1f} ms "
            f"({c['share_of_step']:.0%}), at {c['gflops']:.1f} GFLOP/s = {c['ratio_to_peak']:.0%} "
            f"of the fp32 ceiling ({c['ratio_to_bf16_peak']:.0%} of bf16's)")
    return "\n".join(lines)


__all__ = ["bench", "bench_images", "format_report", "parse_variant", "Variant", "Runner",
           "flops_per_image", "matmul_gflops", "ceilings", "convs_alone"]
