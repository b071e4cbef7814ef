"""Training: one readable loop, `train(cfg, out_dir)`, plus its checkpoint, image and log helpers.

A run directory holds config.json, metrics.jsonl (one record per epoch), checkpoints/{last,best}.pt
(+ best.safetensors), samples/ and recon/ grids, and summary.json.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from . import distributed as D
from .config import RunConfig, from_dict, parse_budget, save_json, to_dict
from .data import iterate_batches, load_dataset, num_batches
from .files import atomic_write
from .vae import VAE, build_vae, eval_mode


@dataclass
class EarlyStopping:
    """Keras' EarlyStopping: stop after `patience` epochs without a gain larger than `min_delta`."""

    patience: int = 0
    min_delta: float = 0.0
    best: float = math.inf
    wait: int = 0

    def step(self, value: float) -> bool:
        """Record an epoch's validation loss; return True when it is an improvement."""
        if value < self.best - self.min_delta:
            self.best, self.wait = value, 0
            return True
        self.wait += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.wait >= self.patience


def warmup_factor(step: int, warmup_steps: int) -> float:
    return min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


def kl_beta(step: int, anneal_steps: int) -> float:
    """KL weight, 0 -> 1 linearly over `anneal_steps` (Bowman et al. 2016); 1 when off."""
    return min(1.0, step / anneal_steps) if anneal_steps > 0 else 1.0


def make_plateau(opt: torch.optim.Optimizer, cfg) -> torch.optim.lr_scheduler.ReduceLROnPlateau:
    # Keras reduces after `patience` bad epochs, PyTorch after patience + 1: shift by one so the
    # study presets' "patience 25" means what it meant in the study. Keras' min_delta 1e-4 is absolute.
    return torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt, mode="min", factor=cfg.plateau_factor, patience=max(cfg.plateau_patience - 1, 0),
        threshold=1e-4, threshold_mode="abs", min_lr=cfg.min_lr, eps=0.0)


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    # Reseeding every epoch from (seed, epoch, rank) makes the noise of epoch k independent of what
    # ran before it, so a resumed run replays exactly and each DDP rank draws its own noise.
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def to_input(batch: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    """uint8 (B,C,H,W) -> float in [0,1] on the device (each likelihood dequantizes on its own)."""
    x = batch.to(device, non_blocking=True).float().div_(255.0)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def training_step(model: torch.nn.Module, vae: VAE, x: torch.Tensor,
                  opt: torch.optim.Optimizer, cfg, *, beta: float = 1.0,
                  autocast=contextlib.nullcontext, rt: D.Runtime | None = None) -> dict:
    """One update. A non-finite loss or gradient norm (or one above `skip_threshold`) skips the
    update instead of poisoning the weights (VDVAE's guard); the caller counts skips."""
    opt.zero_grad(set_to_none=True)
    saved = [b.detach().clone() for b in vae.buffers()]  # BN running stats, restored on a skip
    with autocast():
        out = model(x)
    rate = out["kl"].mean(0)  # (L,) nats per latent dim, batch mean
    if cfg.free_bits > 0:  # free bits (Kingma et al. 2016): no pressure below lambda per dim
        rate = rate.clamp(min=cfg.free_bits)
    objective = out["distortion"].mean() + beta * rate.sum() + vae.penalty()
    objective.backward()
    norm = torch.nn.utils.clip_grad_norm_(
        vae.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
    ok = bool(torch.isfinite(objective)) and bool(torch.isfinite(norm))
    if cfg.skip_threshold > 0 and ok:
        ok = float(norm) < cfg.skip_threshold
    if rt is not None:
        ok = not D.any_rank(not ok, rt)  # every rank skips together
    if ok:
        opt.step()
    else:
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():  # the forward pass already moved the BN running statistics
            for b, s in zip(vae.buffers(), saved):
                b.copy_(s)
    stats = {k: out[k].detach().mean().item() for k in ("loss", "rate", "distortion")}
    return {**stats, "grad_norm": float(norm), "skipped": not ok}


@torch.no_grad()
def evaluate(vae: VAE, images: np.ndarray, batch_size: int, rt: D.Runtime,
             channels_last: bool = False, autocast=contextlib.nullcontext) -> dict:
    """Mean negative ELBO and its parts over `images`, exact across DDP ranks (rank r takes every
    world_size-th image; sums and counts are all-reduced, no padding is double counted)."""
    shard = images[rt.rank::rt.world_size]
    keys = ["loss", "rate", "distortion"] + (["bpd"] if vae.likelihood.discrete else [])
    sums = torch.zeros(len(keys) + 1, dtype=torch.float64, device=rt.device)
    with eval_mode(vae):
        for start in range(0, len(shard), batch_size):
            x = to_input(torch.from_numpy(shard[start:start + batch_size]), rt.device,
                         channels_last)
            with autocast():
                out = vae(x)
            sums[:-1] += torch.stack([out[k].double().sum() for k in keys])
            sums[-1] += x.shape[0]
    D.all_reduce_sum(sums, rt)
    return {k: (sums[i] / sums[-1]).item() for i, k in enumerate(keys)}


def save_checkpoint(state: dict, path: Path) -> None:
    atomic_write(Path(path), lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    """The one checkpoint loader: weights_only=True (no arbitrary pickles); strips torch.compile's
    `_orig_mod.` and DDP's `module.` prefixes."""
    state = torch.load(path, map_location=map_location, weights_only=True)
    state["model"] = {_strip_wrappers(k): v for k, v in state["model"].items()}
    return state


def _strip_wrappers(key: str) -> str:
    # DDP and torch.compile can wrap each other in either order.
    while key.startswith(("module.", "_orig_mod.")):
        key = key.split(".", 1)[1]
    return key


def build_from_config(cfg: RunConfig, image_shape: tuple[int, int, int]) -> VAE:
    c, h, w = image_shape
    if h != w:
        raise ValueError(f"images must be square, got {h}x{w} (use --image-size)")
    return build_vae(cfg.model, channels=c, image_size=h)


def load_model(run_dir: str | Path, which: str = "best", device="cpu") -> tuple[VAE, RunConfig]:
    """Rebuild a trained VAE from a run directory: config.json + checkpoints/<which>.pt."""
    run_dir = Path(run_dir)
    state = load_checkpoint(run_dir / "checkpoints" / f"{which}.pt", map_location=device)
    cfg = from_dict(state["config"], source=str(run_dir / "checkpoints" / f"{which}.pt"))
    vae = build_from_config(cfg, tuple(state["image_shape"])).to(device)
    vae.load_state_dict(state["model"])
    return vae.eval(), cfg


def save_grid(images: torch.Tensor, path: Path, nrow: int = 10) -> None:
    """(N,C,H,W) floats in [0,1] -> one PNG, nrow images per row, 1-pixel gutters."""
    x = (images.detach().float().clamp(0, 1).cpu().numpy() * 255 + 0.5).astype(np.uint8)
    n, c, h, w = x.shape
    rows = math.ceil(n / nrow)
    grid = np.full((rows * (h + 1) + 1, nrow * (w + 1) + 1, c), 255, np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + col * (w + 1):1 + col * (w + 1) + w] = \
            x[i].transpose(1, 2, 0)
    img = Image.fromarray(grid[..., 0] if c == 1 else grid)
    atomic_write(Path(path), lambda tmp: img.save(tmp, format="PNG"))


def save_images(vae: VAE, val_images: np.ndarray, out: Path, epoch: int, rt: D.Runtime) -> None:
    """A 10x10 grid from the prior (fixed z, so grids are comparable across epochs) and
    inputs above their reconstructions (5 pairs of rows)."""
    n = min(50, len(val_images) // 10 * 10) or len(val_images)  # whole rows of 10 when possible
    nrow = min(10, n)
    # Evenly spaced images: test splits are often sorted by class (all airplanes first).
    pick = np.linspace(0, len(val_images) - 1, n).round().astype(np.int64)
    x = to_input(torch.from_numpy(val_images[pick]), rt.device, False)
    gen = torch.Generator(device=rt.device).manual_seed(1234)
    with eval_mode(vae):
        samples, rec = vae.sample(100, generator=gen), vae.reconstruct(x)
    save_grid(samples, out / "samples" / f"epoch_{epoch:04d}.png")
    pairs = torch.stack([x.view(-1, nrow, *x.shape[1:]), rec.view(-1, nrow, *x.shape[1:])], 1)
    save_grid(pairs.flatten(0, 2), out / "recon" / f"epoch_{epoch:04d}.png", nrow=nrow)


def _want_bar() -> bool:
    # The study switched its notebook progress callback off by hand for batch runs; we detect it.
    if os.environ.get("CI"):
        return False
    return "ipykernel" in sys.modules or sys.stdout.isatty()


def _fmt(record: dict) -> str:
    keys = ("train_loss", "val_loss", "val_bpd", "rate", "distortion", "lr", "images_per_s")
    parts = [f"epoch {record['epoch']:4d}"]
    for k in keys:
        if record.get(k) is not None:
            v = record[k]
            parts.append(f"{k} {v:.3g}" if k == "lr" else f"{k} {v:.4f}" if abs(v) < 100 else
                         f"{k} {v:.1f}")
    return "  ".join(parts) + (f"  skipped {record['skipped']}" if record["skipped"] else "")


def train(cfg: RunConfig, out_dir: str | Path, *, resume: bool = False, argv: list | None = None,
          progress: bool | None = None) -> dict:
    """Train a VAE as `cfg` says, writing everything into `out_dir`; return the summary.

    With `resume=True`, continue from out_dir/checkpoints/last.pt exactly where it stopped.
    """
    rt = D.setup(cfg.train.device)
    try:
        return _train(cfg, Path(out_dir), rt, resume, argv, progress)
    finally:
        D.teardown(rt)


def _train(cfg: RunConfig, out: Path, rt: D.Runtime, resume: bool, argv, progress) -> dict:
    t_start = time.monotonic()
    tc, dc = cfg.train, cfg.data
    budget = parse_budget(tc.budget)
    bar_on = rt.is_main and (_want_bar() if progress is None else progress)

    # --- data: rank 0 decodes and fills the cache first, the others then read it ------------
    def load():
        return load_dataset(dc.dataset, dc.data_dir or None, image_size=dc.image_size,
                            subset=dc.subset, val_fraction=dc.val_fraction, download=dc.download,
                            pad_to_32=dc.pad_to_32, seed=tc.seed)
    data = load() if rt.is_main else None
    D.barrier(rt)
    data = data or load()
    image_shape = tuple(data.train.images.shape[1:])

    # --- model, optimizer, schedules ------------------------------------------------------
    torch.manual_seed(tc.seed)  # same init on every rank (DDP also broadcasts rank 0's)
    vae = build_from_config(cfg, image_shape).to(rt.device)
    if tc.channels_last:
        vae = vae.to(memory_format=torch.channels_last)
    model = D.wrap(vae, rt, tc.sync_bn)
    vae = D.unwrap(model)  # the module inside DDP (SyncBN conversion may have replaced BNs)
    opt = torch.optim.Adam(vae.parameters(), lr=tc.lr, betas=tuple(tc.betas),
                           weight_decay=tc.weight_decay)
    plateau = make_plateau(opt, tc)
    early = EarlyStopping(tc.patience, tc.min_delta)
    epoch, step, best_epoch, skipped_total, train_seconds = 0, 0, 0, 0, 0.0
    best_state = None

    ckpt_dir = out / "checkpoints"
    if resume:
        state = load_checkpoint(ckpt_dir / "last.pt", map_location=rt.device)
        vae.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        # The optimizer's state carries the old hyper-parameters: a changed --lr / --betas /
        # --weight-decay on resume is applied on purpose, not silently dropped.
        was = state["config"]["train"]
        for key, value in (("lr", tc.lr), ("betas", tuple(tc.betas)),
                           ("weight_decay", tc.weight_decay)):
            if (tuple(was[key]) if key == "betas" else was[key]) != value:
                for g in opt.param_groups:
                    g[key] = value
                if rt.is_main:
                    print(f"resvae: resume: {key} {was[key]} -> {value}", flush=True)
        plateau.load_state_dict(state["plateau"])
        early = EarlyStopping(**state["early"])
        epoch, step, best_epoch = state["epoch"], state["step"], state["best_epoch"]
        skipped_total, train_seconds = state["skipped_total"], state["train_seconds"]
        if (ckpt_dir / "best.pt").exists():
            best_state = load_checkpoint(ckpt_dir / "best.pt", map_location="cpu")["model"]
    if rt.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_json(cfg, out / "config.json")
        if argv is not None:
            atomic_write(out / "argv.json", lambda t: t.write_text(json.dumps(argv) + "\n"))
        _keep_metrics(out / "metrics.jsonl", epoch)
        print(f"resvae: {data.name} from {data.source}: train {len(data.train)}, val "
              f"{len(data.val)}, image {image_shape}; {rt.world_size} process(es) on {rt.device}; "
              f"run dir {out}" + (f"; resuming after epoch {epoch}" if resume else ""), flush=True)

    autocast = (lambda: torch.autocast(rt.device.type, dtype=torch.bfloat16)) \
        if tc.precision == "bf16" else contextlib.nullcontext
    # drop_last: a 1-image tail batch would break BatchNorm (and is a noisy step anyway); the
    # images left out differ every epoch because the order is reshuffled.
    per_rank = num_batches(len(data.train), tc.batch_size, world_size=rt.world_size, drop_last=True)
    if per_rank == 0:
        raise ValueError(f"--batch-size {tc.batch_size} x {rt.world_size} process(es) is larger "
                         f"than the {len(data.train)} training images (see --subset)")
    stop_reason, consecutive_skips = None, 0

    # --- the loop ---------------------------------------------------------------------------
    try:
        while stop_reason is None:
            if epoch >= tc.max_epochs or early.should_stop:  # (a resumed run may be done)
                stop_reason = "max_epochs" if epoch >= tc.max_epochs else "early_stopping"
                break
            torch.manual_seed(epoch_seed(tc.seed, epoch, rt.rank))
            model.train()
            t0, sums, n_seen, n_ok, skipped = time.monotonic(), np.zeros(3), 0, 0, 0
            peak_lr = opt.param_groups[0]["lr"]  # what the plateau schedule set; warm-up scales it
            batches = iterate_batches(data.train.images, tc.batch_size, shuffle=True,
                                      seed=tc.seed, epoch=epoch, rank=rt.rank,
                                      world_size=rt.world_size, drop_last=True)
            bar = None
            if bar_on:
                from tqdm.auto import tqdm
                bar = tqdm(total=per_rank, desc=f"epoch {epoch + 1}", leave=False)
            for batch in batches:
                for g in opt.param_groups:
                    g["lr"] = peak_lr * warmup_factor(step, tc.warmup_steps)
                x = to_input(batch, rt.device, tc.channels_last)
                s = training_step(model, vae, x, opt, tc, beta=kl_beta(step, tc.kl_anneal_steps),
                                  autocast=autocast, rt=rt)
                step += 1
                if s["skipped"]:
                    skipped, skipped_total, consecutive_skips = (skipped + 1, skipped_total + 1,
                                                                 consecutive_skips + 1)
                    if consecutive_skips > tc.max_skips:
                        stop_reason = "non_finite"
                        break
                else:
                    consecutive_skips, n_ok = 0, n_ok + 1
                    sums += [s["loss"], s["rate"], s["distortion"]]
                n_seen += x.shape[0] * rt.world_size
                if bar is not None:
                    rate = n_seen / max(time.monotonic() - t0, 1e-9)
                    bar.set_postfix(loss=f"{s['loss']:.1f}", rate=f"{s['rate']:.1f}",
                                    dist=f"{s['distortion']:.1f}", img_s=f"{rate:.0f}",
                                    refresh=False)
                    bar.update()
                if budget is not None and D.any_rank(time.monotonic() - t_start > budget, rt):
                    stop_reason = "budget"  # ends this (partial) epoch, then evaluates
                    break
            if bar is not None:
                bar.close()
            for g in opt.param_groups:
                g["lr"] = peak_lr
            epoch += 1
            seconds = time.monotonic() - t0
            train_seconds += seconds
            # Ranks skip together, so n_ok is the same everywhere; an all-skipped epoch has no mean.
            means = D.all_reduce_sum(torch.tensor(sums / max(n_ok, 1), device=rt.device), rt)
            means = (means / rt.world_size).tolist() if n_ok else [None] * 3
            D.broadcast_buffers(vae, rt)  # per-rank BN statistics -> rank 0's (what it saves)
            val = evaluate(vae, data.val.images, tc.eval_batch_size, rt, tc.channels_last, autocast)
            improved = early.step(val["loss"])
            if tc.plateau_patience > 0:
                plateau.step(val["loss"])
            if improved:
                best_epoch = epoch
                best_state = {k: v.detach().to("cpu", copy=True) for k, v in vae.state_dict().items()}
            if early.should_stop and stop_reason is None:
                stop_reason = "early_stopping"
            if stop_reason == "non_finite" and rt.is_main:
                print(f"resvae: stopping: more than {tc.max_skips} updates in a row had a "
                      "non-finite loss or gradient (lower --lr, set --grad-clip, or check the data)",
                      file=sys.stderr, flush=True)
            record = {"epoch": epoch, "step": step, "train_loss": means[0], "rate": means[1],
                      "distortion": means[2], "val_loss": val["loss"], "val_rate": val["rate"],
                      "val_distortion": val["distortion"], "val_bpd": val.get("bpd"),
                      "lr": peak_lr, "skipped": skipped, "epoch_seconds": seconds,
                      "images_per_s": n_seen / max(seconds, 1e-9),
                      "partial": stop_reason in ("budget", "non_finite")}
            if rt.is_main:
                with open(out / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
                print(_fmt(record), flush=True)
                state = {"model": vae.state_dict(), "optimizer": opt.state_dict(),
                         "plateau": plateau.state_dict(), "early": asdict(early), "epoch": epoch,
                         "step": step, "best_epoch": best_epoch, "skipped_total": skipped_total,
                         "train_seconds": train_seconds, "config": to_dict(cfg),
                         "image_shape": list(image_shape), "argv": list(argv or [])}
                save_checkpoint(state, ckpt_dir / "last.pt")
                if improved:
                    save_checkpoint(state, ckpt_dir / "best.pt")
                if tc.sample_every > 0 and epoch % tc.sample_every == 0:
                    save_images(vae, data.val.images, out, epoch, rt)
    except KeyboardInterrupt:
        stop_reason = "interrupted"

    # --- the end: final grids, test ELBO with the best weights, summary ---------------------
    summary = {"stop_reason": stop_reason, "epochs": epoch, "steps": step,
               "training_seconds": train_seconds, "wall_seconds": time.monotonic() - t_start,
               "best_epoch": best_epoch, "best_val_loss": early.best if best_epoch else None,
               "skipped_updates": skipped_total, "world_size": rt.world_size}
    if rt.is_main:
        last = _last_record(out / "metrics.jsonl")
        summary["final_train_loss"] = last.get("train_loss")
        save_images(vae, data.val.images, out, epoch, rt)
    if best_state is not None:
        vae.load_state_dict(best_state)
    test = evaluate(vae, data.test.images, tc.eval_batch_size, rt, tc.channels_last, autocast)
    if rt.is_main:
        summary.update(test_loss=test["loss"], test_bpd=test.get("bpd"),
                       test_note="negative ELBO of the best-val weights on the test split"
                       + ("" if vae.likelihood.discrete else "; bits/dim undefined for bernoulli"))
        if best_state is not None:  # weights alone, safe to share and load anywhere
            atomic_write(ckpt_dir / "best.safetensors", lambda t: save_file(
                {k: v.contiguous() for k, v in vae.state_dict().items()}, str(t),
                metadata={"config": json.dumps(to_dict(cfg))}))
        atomic_write(out / "summary.json",
                     lambda t: t.write_text(json.dumps(summary, indent=2) + "\n"))
        print(f"resvae: stopped ({stop_reason}) after {epoch} epochs, "
              f"{train_seconds:.0f}s training; best val loss {early.best:.2f} "
              f"at epoch {best_epoch}; test loss {test['loss']:.2f}"
              + (f", test bpd {test['bpd']:.4f}" if "bpd" in test else ""), flush=True)
    return summary


def _keep_metrics(path: Path, epochs_done: int) -> None:
    """On resume, drop records of epochs after the checkpoint (written before a crash)."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines()
            if ln.strip() and json.loads(ln)["epoch"] <= epochs_done]
    atomic_write(path, lambda t: t.write_text("".join(ln + "\n" for ln in keep)))


def _last_record(path: Path) -> dict:
    lines = path.read_text().splitlines() if path.exists() else []
    return json.loads(lines[-1]) if lines else {}


__all__ = ["train", "training_step", "evaluate", "EarlyStopping", "make_plateau",
           "save_checkpoint", "load_checkpoint", "load_model", "save_grid"]
