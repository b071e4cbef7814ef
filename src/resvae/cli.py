"""`resvae` command line: parses arguments, builds a RunConfig, calls the library. Nothing else."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import typing
from pathlib import Path

from . import __version__
from .config import ConfigError, fields_flat, preset_names, resolve

MODEL_KEYS = [k for k, (sec, _, _) in fields_flat().items() if sec == "model"]


def _add_config_flags(p: argparse.ArgumentParser, keys) -> None:
    """One flag per config key, `--latent-dim` (and `--latent_dim`); values stay strings and are
    parsed strictly by config.resolve, so a flag is typed exactly like its env var and TOML key."""
    for key in keys:
        section, typ, default = fields_flat()[key]
        names = [f"--{key.replace('_', '-')}"] + ([f"--{key}"] if "_" in key else [])
        kind = typing.get_origin(typ) and "list" or typ.__name__
        extra = dict(nargs="?", const="true") if typ is bool else {}
        p.add_argument(*names, dest=key, default=None, metavar=kind.upper(),
                       help=f"[{section}] {kind}, default {default!r}", **extra)


def _depths(text: str) -> list[int]:
    try:
        return [int(d) for d in text.split(",") if d.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected depths like 28 or 28,40,70,100, got {text!r}")


def cmd_info(args) -> int:
    from .vae import build_vae, model_info

    overrides = {k: getattr(args, k) for k in MODEL_KEYS if k != "depth"}
    cfg = resolve(preset=args.preset, environ=os.environ, overrides=overrides).model
    rows = []
    for depth in args.depth or [cfg.depth]:
        vae = build_vae(cfg, depth=depth, channels=args.channels, image_size=args.image_size)
        rows.append({"arch": cfg.arch, "depth": depth, **model_info(vae)})
    if args.json:
        print(json.dumps(rows if len(rows) > 1 else rows[0], indent=2))
        return 0
    print(f"arch {cfg.arch}, width {cfg.width}, latent {cfg.latent_dim}, likelihood "
          f"{cfg.likelihood}, input {args.channels}x{args.image_size}x{args.image_size}")
    print(f"{'depth':>5} {'layers':>6} {'encoder params':>15} {'decoder params':>15} "
          f"{'total params':>13} {'GFLOPs/image':>13}")
    for r in rows:
        print(f"{r['depth']:>5} {r['layers']:>6} {r['encoder_params']:>15,} "
              f"{r['decoder_params']:>15,} {r['params']:>13,} {r['flops'] / 1e9:>13.3f}")
    return 0


def cmd_train(args) -> int:
    from .runs import check_fresh, resume_config
    from .train import train

    overrides = {k: getattr(args, k) for k in fields_flat()}
    if args.resume:
        if args.preset or args.config:
            raise ConfigError("--resume takes its config from the run directory; "
                              "drop --preset/--config")
        cfg, out = resume_config(args.resume, os.environ, overrides), Path(args.resume)
    else:
        cfg = resolve(preset=args.preset, config_file=args.config, environ=os.environ,
                      overrides=overrides)
        out = Path(args.out or Path("runs") / f"{args.preset or 'run'}-{time.strftime('%Y%m%d-%H%M%S')}")
        check_fresh(out)
    summary = train(cfg, out, resume=bool(args.resume), argv=args.argv)
    return 3 if summary.get("stop_reason") == "non_finite" else 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="resvae", description="VAEs with deep residual encoders/decoders: train and measure.",
        epilog="Config precedence: defaults < --preset < --config FILE < RESVAE_<KEY> environment "
               "variables < flags. Presets: " + ", ".join(preset_names()))
    p.add_argument("--version", action="version", version=f"resvae {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="layers, parameters and FLOPs of a network",
                          description="Layers (by resvae's depth convention), encoder/decoder "
                          "parameters and forward FLOPs per image.")
    info.add_argument("--depth", type=_depths, help="one depth or a comma list, e.g. 28,40,70,100")
    info.add_argument("--preset", help="take the model settings from a preset")
    info.add_argument("--channels", type=int, default=3)
    info.add_argument("--image-size", type=int, default=32)
    info.add_argument("--json", action="store_true", help="machine-readable output")
    _add_config_flags(info, [k for k in MODEL_KEYS if k != "depth"])
    info.set_defaults(func=cmd_info)

    tr = sub.add_parser("train", help="train a VAE",
                        description="Train a VAE; writes config.json, metrics.jsonl, checkpoints, "
                        "sample/reconstruction grids and summary.json into the run directory. "
                        "Under torchrun it trains with DistributedDataParallel.")
    tr.add_argument("--preset", help=f"one of: {', '.join(preset_names())}")
    tr.add_argument("--config", help="a TOML (or a run's config.json) file of settings")
    tr.add_argument("--out", help="run directory (default runs/<preset>-<time>)")
    tr.add_argument("--resume", metavar="RUN_DIR", help="continue a run where it stopped")
    _add_config_flags(tr, fields_flat())
    tr.set_defaults(func=cmd_train)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = ["resvae", *(sys.argv[1:] if argv is None else argv)]
    try:
        return args.func(args)
    except ValueError as e:  # ConfigError, DataError and bad model options are ValueErrors
        # Bad input: one clear line naming the flag/file, not a traceback.
        print(f"resvae {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
