"""Checkpoints, weights and exported folders: what a run's model is saved as, and the loaders.

    RUN_DIR/checkpoints/{last,best}.pt   torch checkpoints (`save_checkpoint`, `load_checkpoint`)
    RUN_DIR/checkpoints/best.safetensors the best weights alone, config in the metadata

and an exported folder (`resvae export --format hub`), the weights alone with their config:

    DIR/config.json              {"format", "resvae_version", "image_shape", "config"}
    DIR/model.safetensors        the state dict (its metadata repeats config and image shape)

One loader shared by training, evaluation and sampling (nanoGPT's single checkpoint dict);
where a run's files are is `runs.py`'s business.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from . import __version__
from .config import RunConfig, from_dict, to_dict
from .errors import RunError, RunNotFound
from .files import atomic_write
from .runs import RunDir, read_json, write_json
from .vae import build_from_config
from .vae_base import BaseVAE

EXPORTED_CONFIG, EXPORTED_WEIGHTS = "config.json", "model.safetensors"


# --- checkpoints ------------------------------------------------------------------------------
def save_checkpoint(state: Mapping, path: Path) -> None:
    def write(tmp: Path) -> None:
        # a Python file object, not a path: torch's own writer reports a full disk as
        # "enforce fail at inline_container.cc", a file object mostly as the OSError it is
        with open(tmp, "wb") as f:
            try:
                torch.save(dict(state), f)
            except RuntimeError as e:
                # ...but not always: on a real full file system (a 3 MB tmpfs) the zip writer's
                # end-of-file check fails first ("unexpected pos"). Full it is, if no room is left
                if _no_room_left(tmp):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)) from e
                raise
    atomic_write(Path(path), write)


def _no_room_left(path: Path) -> bool:
    with contextlib.suppress(OSError):
        return shutil.disk_usage(path.parent).free < 1 << 20  # under 1 MiB
    return False


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    """The one checkpoint loader: weights_only=True (no arbitrary pickles); strips torch.compile's
    `_orig_mod.` and DDP's `module.` prefixes. A broken file is a ValueError naming it (and, for
    a broken last.pt beside a good best.pt, how to resume from that)."""
    path = Path(path)
    if not path.is_file():
        raise RunNotFound(f"{path}: no such checkpoint")
    if path.stat().st_size == 0:
        raise RunError(f"{path}: empty file (0 bytes), not a checkpoint: its write was cut off "
                         f"before it began{_other_checkpoint(path)}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch.load raises almost anything on a damaged or foreign file
        text = str(e).strip()
        # weights-only refusals carry the unpickler's reason after this tag, not in line one
        reason = (text.partition("WeightsUnpickler error: ")[2] or text).strip()
        first = (reason.splitlines() or [type(e).__name__])[0]
        if "Weights only load failed" in text and "global" in reason.lower():
            # a pickle asking for a function or class; torch's advice (weights_only=False) would
            # run it, so it is not passed on
            raise RunError(f"{path}: refused: it holds Python objects other than tensors and "
                             "plain containers, which could run code when loaded; resvae loads "
                             "checkpoints with weights_only=True and nothing in it was run (a "
                             f"crafted file, or not a resvae checkpoint){_other_checkpoint(path)}"
                             ) from None
        unrun = "; nothing in it was run" if "Weights only load failed" in text else ""
        raise RunError(f"{path}: truncated or corrupt, not a loadable checkpoint ({first[:160]})"
                         f"{unrun}{_other_checkpoint(path)}") from None
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise RunError(f"{path}: not a resvae checkpoint (no 'model' state dict in it)"
                         f"{_other_checkpoint(path)}")
    state["model"] = {_strip_wrappers(k): v for k, v in state["model"].items()}
    return state


def eval_weights(ckpt: Mapping) -> dict:
    """The weights a checkpoint's run evaluated and saved: the --ema average when it kept one."""
    return ckpt.get("ema", ckpt["model"])


def _other_checkpoint(path: Path) -> str:
    """For a broken last.pt: the readable best.pt beside it, and how to resume from it."""
    best = path.with_name("best.pt")
    if path.name != "last.pt" or not best.is_file():
        return ""
    try:
        epoch = torch.load(best, map_location="cpu", weights_only=True)["epoch"]
    except Exception:
        return f"; {best.name} beside it is broken too"
    return (f"; {best} (epoch {epoch}) is readable: to resume from it, run --resume "
            f"{path.parent.parent} --resume-from best; the epochs after {epoch} are lost")


def _strip_wrappers(key: str) -> str:
    # DDP and torch.compile can wrap each other in either order.
    while key.startswith(("module.", "_orig_mod.")):
        key = key.split(".", 1)[1]
    return key


def save_weights(vae: BaseVAE, cfg: RunConfig, path: Path) -> None:
    """Weights alone as safetensors, with the config and image shape in the metadata: safe to
    share, and enough to rebuild the model with no pickle involved."""
    tensors = {k: v.detach().contiguous() for k, v in vae.state_dict().items()}
    meta = {"config": json.dumps(to_dict(cfg)), "image_shape": json.dumps(list(vae.image_shape)),
            "format": "resvae"}
    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp), metadata=meta)
        # safetensors creates its file 0600; weights are meant to be shared: the umask's mode,
        # as any other file resvae writes
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
    atomic_write(path, write)


# What a shared weights file may ask to build, checked before anything is allocated: a folder
# from someone else must not hang the machine (depth 10**9 builds blocks forever) or exhaust
# its memory (width 1e6, latent 1e9, 1e5 x 1e5 images). Far above any model resvae trains.
BOUNDS = {"depth": 10_000, "width": 64.0, "latent_dim": 65_536, "stochastic_layers": 1_024,
          "image_size": 4_096}


def _check_bounds(cfg: RunConfig, image_shape, where: str) -> tuple[int, int, int]:
    m = cfg.model
    for key in ("depth", "width", "latent_dim", "stochastic_layers"):
        if getattr(m, key) > BOUNDS[key]:
            raise RunError(f"{where}: refused: {key} {getattr(m, key)} is over resvae's bound "
                           f"{BOUNDS[key]} for a model it loads")
    if (not isinstance(image_shape, (list, tuple)) or len(image_shape) != 3
            or not all(isinstance(v, int) for v in image_shape) or image_shape[0] not in (1, 3)
            or not all(8 <= v <= BOUNDS["image_size"] for v in image_shape[1:])):
        raise RunError(f"{where}: refused: image_shape {image_shape!r} is not [1 or 3, H, W] "
                       f"with 8 <= H, W <= {BOUNDS['image_size']}")
    return tuple(image_shape)


def _build_checked(cfg: RunConfig, image_shape, weights: Path, where: str,
                   device) -> BaseVAE:
    """The model `cfg` describes, with the weights of the safetensors file `weights` (its
    tensors' names and shapes read from the file's header first: nothing loaded yet)."""
    try:
        with safe_open(str(weights), "pt") as f:
            have = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise RunError(f"{weights}: not a readable safetensors file ({e})") from None
    return _verified_model(cfg, image_shape, have, lambda: load_file(str(weights),
                                                                      device=str(device)),
                           str(weights), device)


def _verified_model(cfg: RunConfig, image_shape, have: dict, load_weights, where: str,
                    device) -> BaseVAE:
    """Every loader's one gate (exported folders, .safetensors files, run checkpoints): the
    config within BOUNDS, the weights' tensors exactly the model's (names and shapes, against a
    model built on the meta device: nothing allocated yet), every weight finite; then the model
    is built and loaded. `have`: the weights' {name: shape}; `load_weights()` gives them."""
    shape = _check_bounds(cfg, image_shape, where)
    with torch.device("meta"):
        want = {k: tuple(v.shape) for k, v in build_from_config(cfg, shape).state_dict().items()}
    if have != want:
        missing = sorted(set(want) - set(have))
        extra = sorted(set(have) - set(want))
        wrong = sorted(k for k in set(have) & set(want) if have[k] != want[k])
        raise RunError(f"{where}: refused: its tensors do not match the model its config "
                       f"describes ({len(missing)} missing, e.g. {missing[:2]}; {len(extra)} "
                       f"extra, e.g. {extra[:2]}; {len(wrong)} of another shape, e.g. "
                       f"{[(k, have[k], want[k]) for k in wrong[:2]]})")
    state = load_weights()
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise RunError(f"{where}: refused: non-finite weights (NaN or inf) in {len(bad)} "
                       f"tensor(s), e.g. {bad[0]}")
    vae = build_from_config(cfg, shape).to(device)
    vae.load_state_dict(state)
    return vae.eval()


def _load_safetensors(path: Path, device) -> tuple[BaseVAE, RunConfig]:
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise RunError(f"{path}: not a readable safetensors file ({e})") from None
    if "config" not in meta or "image_shape" not in meta:
        raise RunError(f"{path}: no resvae config/image_shape in its metadata (not written by "
                         "resvae)")
    try:
        cfg = from_dict(json.loads(meta["config"]), source=f"{path} metadata")
        image_shape = json.loads(meta["image_shape"])
    except json.JSONDecodeError as e:
        raise RunError(f"{path}: its metadata is not valid JSON ({e})") from None
    return _build_checked(cfg, image_shape, path, str(path), device), cfg


# --- exported folders -----------------------------------------------------------------------
def is_exported(path: str | os.PathLike) -> bool:
    """A folder written by `save_pretrained`: config.json and model.safetensors, no checkpoints/."""
    p = Path(path)
    return ((p / EXPORTED_WEIGHTS).is_file() and (p / EXPORTED_CONFIG).is_file()
            and not (p / "checkpoints").exists())


def save_pretrained(vae: BaseVAE, cfg: RunConfig, out_dir: str | os.PathLike) -> Path:
    """Write the folder `load_pretrained` reads: config.json (the run's config, the image shape,
    the resvae version) and model.safetensors. JSON and safetensors only: no pickle to trust."""
    out = Path(out_dir)
    if (out / "checkpoints").exists():
        raise RunError(f"{out}: holds a run (checkpoints/); export into another folder")
    save_weights(vae, cfg, out / EXPORTED_WEIGHTS)
    write_json(out / EXPORTED_CONFIG, {"format": "resvae", "resvae_version": __version__,
                                       "image_shape": list(vae.image_shape),
                                       "config": to_dict(cfg)})
    return out


def _load_exported(path: Path, device) -> tuple[BaseVAE, RunConfig]:
    meta = read_json(path / EXPORTED_CONFIG)
    if meta.get("format") != "resvae" or "config" not in meta:
        raise RunError(f"{path / EXPORTED_CONFIG}: not an exported resvae config (no "
                         "\"format\": \"resvae\" and \"config\")")
    cfg = from_dict(meta["config"], source=str(path / EXPORTED_CONFIG))
    return _build_checked(cfg, meta.get("image_shape"), path / EXPORTED_WEIGHTS,
                          str(path / EXPORTED_CONFIG), device), cfg


def load_pretrained(path: str | os.PathLike, device="cpu") -> BaseVAE:
    """The VAE (eval mode) of a folder written by `resvae export --format hub`
    (`load_run(path)` gives it with its config)."""
    path = Path(path)
    if not is_exported(path):
        raise RunNotFound(f"{path}: not an exported folder (config.json and "
                                "model.safetensors; `resvae export RUN_DIR -o DIR` writes one; "
                                "load_run reads run directories)")
    return _load_exported(path, device)[0]


def load_run(run_dir: str | os.PathLike, which: str = "best", device="cpu") -> tuple[BaseVAE, RunConfig]:
    """Rebuild a trained VAE in eval mode: from RUN_DIR/checkpoints/<which>.pt, from a
    `.safetensors` file (RUN_DIR/checkpoints/best.safetensors alone is enough), or from an
    exported folder (`resvae export --format hub`)."""
    path = Path(run_dir)
    if path.suffix == ".safetensors":
        return _load_safetensors(path, device)
    if not path.is_dir():
        raise RunNotFound(f"{path}: not a run directory, an exported folder or a "
                                ".safetensors file")
    if is_exported(path):
        if which != "best":
            raise RunError(f"{path}: an exported folder holds one set of weights (those of "
                             f"the checkpoint it was exported from), not {which!r}")
        return _load_exported(path, device)
    run = RunDir(path)
    ckpt = run.checkpoint(which)
    if not ckpt.exists() and which == "best" and run.safetensors.exists():
        return _load_safetensors(run.safetensors, device)
    if not ckpt.exists():
        raise RunNotFound(f"{ckpt}: no such checkpoint (has {path} finished an epoch?)")
    state = load_checkpoint(ckpt, map_location=device)
    cfg = from_dict(state["config"], source=str(ckpt))
    weights = eval_weights(state)
    shapes = {k: tuple(v.shape) for k, v in weights.items()}
    image_shape = state.get("image_shape")
    image_shape = list(image_shape) if isinstance(image_shape, (list, tuple)) else image_shape
    return _verified_model(cfg, image_shape, shapes, lambda: weights, str(ckpt), device), cfg


# --- resuming -----------------------------------------------------------------------------------
def load_resume_checkpoint(path: Path, image_shape, map_location="cpu") -> dict:
    """The checkpoint a run resumes from, checked against the images it will train on (data
    moved with --data-dir can differ in shape from what the weights were trained on)."""
    ckpt = load_checkpoint(path, map_location=map_location)
    if "image_shape" in ckpt and tuple(ckpt["image_shape"]) != tuple(image_shape):
        raise RunError(f"--resume {path}: its checkpoint was trained on images of shape "
                         f"{tuple(ckpt['image_shape'])}, the data found now are "
                         f"{tuple(image_shape)}; point --data-dir at the run's data")
    return ckpt


def load_best_weights(run: RunDir, resumed: dict, log=None) -> dict | None:
    """The best weights so far of a run resumed from the checkpoint `resumed`, from
    checkpoints/best.pt; None before any, and None when best.pt is not the resumed state's own
    best epoch (a budget-cut epoch's, or one newer than a --resume-from checkpoint). A broken
    best.pt does not block the resume: when the resumed state's last epoch was its best, it
    holds the same weights and best.pt is rewritten from it; otherwise the best weights are
    lost, and the message says so."""
    log = log or (lambda text, err=True: print(text, file=sys.stderr))
    path = run.checkpoint("best")
    if not path.exists():
        return None
    try:
        best = load_checkpoint(path)
    except ValueError as e:
        if (resumed.get("best_epoch") and resumed.get("best_epoch") == resumed.get("epoch")
                and resumed.get("progress") is None):
            # both were saved from the same state at the end of that epoch
            save_checkpoint(resumed, path)
            log(f"resvae: warning: {e}; its epoch {resumed['epoch']} is also the resumed "
                "checkpoint's, so it was rewritten from the resumed checkpoint", err=True)
            return {k: v.detach().to("cpu", copy=True) for k, v in eval_weights(resumed).items()}
        log(f"resvae: warning: {e}; the best weights so far (epoch {resumed.get('best_epoch')}) "
            "are lost: the next improving epoch writes a new best.pt, and the test figures of "
            "this run come from the weights it ends with until then", err=True)
        return None
    if best.get("progress") is None and best.get("epoch") == resumed.get("best_epoch"):
        return eval_weights(best)
    return None



__all__ = ["load_run", "load_pretrained", "save_pretrained", "is_exported", "load_checkpoint",
           "save_checkpoint", "save_weights", "eval_weights", "load_resume_checkpoint",
           "load_best_weights"]
