"""Exports of a trained run (`resvae export`): a folder to share and load without pickle
(`--format hub`), and the generator alone as ONNX (`--format onnx`)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from . import __version__
from .checkpoints import load_run, save_pretrained
from .config import RunConfig, to_dict
from .errors import ConfigError, MissingDependency, RunError
from .files import atomic_write, check_output
from .runs import read_json
from .vae import eval_mode
from .vae_base import BaseVAE

FORMATS = ("hub", "onnx")


def export_run(run_dir, out, fmt: str = "hub", which: str = "best",
               overwrite: bool = False) -> Path:
    """`resvae export`: the weights of a run (`which` checkpoint; anything `load_run` reads) as
    an exported folder (`hub`) or the decoder as an ONNX file (`onnx`). An existing export (or
    any non-empty folder, or file) at `out` is replaced only with `overwrite`."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    _check_out(Path(out), fmt, overwrite)
    vae, cfg = load_run(run_dir, which=which)
    return save_pretrained(vae, cfg, out) if fmt == "hub" else export_onnx(vae, cfg, out)


def _check_out(out: Path, fmt: str, overwrite: bool) -> None:
    """Nothing of the user's is replaced without --overwrite; a run directory never is."""
    # under a folder one can write in (and for hub, itself a folder or not there yet)
    check_output(out, folder=fmt == "hub" or out.is_dir())
    if (out / "checkpoints").exists():
        raise RunError(f"{out}: holds a run (checkpoints/); export into another folder")
    taken = (out.is_dir() and any(out.iterdir())) if fmt == "hub" else out.exists()
    if taken and not overwrite:
        what = "a non-empty folder" if out.is_dir() else "a file"
        raise ConfigError(f"-o {out}: {what} is there already; choose another path, or pass "
                          "--overwrite to replace "
                          + ("its config.json and model.safetensors" if fmt == "hub" else "it"))
    if fmt == "hub" and out.is_dir():
        _check_own_files(out)
    if fmt == "onnx" and out.is_dir():
        raise ConfigError(f"-o {out}: a folder; --format onnx writes one file (e.g. "
                          f"{out / 'decoder.onnx'})")


def _check_own_files(out: Path) -> None:
    """--overwrite replaces an earlier export's config.json and model.safetensors, and nothing
    else: a config.json that is not a resvae export's (or weights beside none) is the user's."""
    try:
        mine = read_json(out / "config.json").get("format") == "resvae"
    except (ValueError, OSError):  # missing, unreadable, not JSON, not an object
        mine = False
    for name in ("config.json", "model.safetensors"):
        if (out / name).exists() and not mine:
            raise ConfigError(f"-o {out}: its {name} is not from a resvae export; not replaced, "
                              "even with --overwrite: choose another folder")


def export_onnx(vae: BaseVAE, cfg: RunConfig, path) -> Path:
    """The decoder, z (B, latent_dim) -> likelihood parameters (B, P, H, W) as `vae.decode`
    gives them, as one ONNX file with a dynamic batch dimension. The metadata names the
    likelihood and holds the config, so a consumer knows how to read the parameters."""
    try:  # torch's exporter (torch.export-based, the default since 2.9) is built on these
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        raise MissingDependency("--format onnx needs the onnx and onnxscript packages: "
                         "pip install 'resvae[onnx]'") from None
    z = torch.zeros(2, vae.latent_dim, device=vae.device)
    with eval_mode(vae.decoder):  # BatchNorm with its running statistics
        program = torch.onnx.export(
            vae.decoder, (z,), dynamo=True, input_names=["z"], output_names=["params"],
            dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)
    program.model.metadata_props.update({
        "resvae_version": __version__, "likelihood": cfg.model.likelihood,
        "image_shape": json.dumps(list(vae.image_shape)), "config": json.dumps(to_dict(cfg))})
    path = Path(path)
    atomic_write(path, lambda tmp: program.save(str(tmp), external_data=False))
    return path


__all__ = ["FORMATS", "export_run", "export_onnx"]
