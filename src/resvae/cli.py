"""`resvae` command line: parses arguments, builds a RunConfig, calls the library. Nothing else."""

from __future__ import annotations

import argparse
import contextlib
import difflib
import errno
import json
import os
import sys
import textwrap
import time
import typing
import warnings
from pathlib import Path

from . import __version__
from .config import (
    ConfigError,
    field_doc,
    field_info,
    fields_flat,
    load_preset,
    presets_help,
    resolve,
    to_toml,
)
from .errors import DiskFullError, ResvaeError
from .evaluate import EVAL_N
from .files import EXIT_DISK_FULL

MODEL_KEYS = [k for k, (sec, _, _) in fields_flat().items() if sec == "model"]
PRECEDENCE = "defaults < --preset < --config FILE < RESVAE_<KEY> environment variables < flags"
CONFIG_EPILOG = (f"Config precedence: {PRECEDENCE}. With --preset NAME the defaults shown "
                 "are that preset's.")


class _Formatter(argparse.HelpFormatter):
    """Help that keeps the line breaks of a flag's help (one line per choice), wrapping each."""

    def __init__(self, prog, **kw):
        kw.setdefault("max_help_position", 34)
        super().__init__(prog, **kw)

    def _split_lines(self, text, width):
        lines = []
        for para in text.splitlines():
            indent = " " * (len(para) - len(para.lstrip()))
            lines += textwrap.wrap(para.strip(), width, initial_indent=indent,
                                   subsequent_indent=indent + "  ", break_on_hyphens=False) or [""]
        return lines


class _Parser(argparse.ArgumentParser):
    """Every resvae parser (subcommands included: add_subparsers builds them from this class):
    no abbreviated flags (`--dep 40` is an error, not `--depth 40`) and line-keeping help."""

    def __init__(self, *args, **kw):
        kw.setdefault("allow_abbrev", False)
        kw.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kw)


def _preset_in(argv: list[str]) -> str | None:
    """The value of --preset on a command line, read before the parser exists (its help shows
    that preset's values as the defaults)."""
    for i, arg in enumerate(argv):
        if arg == "--":
            break
        if arg == "--preset" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--preset="):
            return arg.partition("=")[2]
    return None


def _preset_values(name: str | None) -> dict:
    """Flat key -> typed value for the keys preset `name` sets; {} for none or a bad name (the
    command itself reports that)."""
    if not name:
        return {}
    try:
        keys = {k for table in load_preset(name).values() for k in table}
        cfg = resolve(preset=name, environ={})
    except ConfigError:
        return {}
    flat = fields_flat()
    return {k: getattr(getattr(cfg, flat[k][0]), k) for k in keys if k in flat}


def _show(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return value if value else '""'
    return str(value)


def _flag_help(key: str, preset: str | None, preset_vals: dict, lead: str = "") -> str:
    """A config flag's help from its field metadata: what it does, each choice on its own line,
    its unit, and its default (the preset's value when --preset is on the command line)."""
    _, _, default = field_info(key)
    doc = field_doc(key)
    lines = [lead + (doc["help"] or "(no help text yet)")]
    if doc["choices"]:
        lines[0] += "; one of:"
        lines += [f"  {c}: {doc['choice_help'][c]}" if doc["choice_help"].get(c) else f"  {c}"
                  for c in doc["choices"]]
    shown = f"default: {_show(default)}"
    if key in preset_vals:
        shown = f"default: {_show(preset_vals[key])} (preset {preset}; built-in: {_show(default)})"
    lines.append((f"unit: {doc['unit']}; " if doc["unit"] else "") + shown)
    return "\n".join(lines).replace("%", "%%")


def _metavar(key: str) -> str:
    _, typ, _ = field_info(key)
    if choices := field_doc(key)["choices"]:
        return "{" + ",".join(choices) + "}"
    if typing.get_origin(typ) is list:
        return typing.get_args(typ)[0].__name__.upper() + ",..."
    return {"budget": "DURATION", "ddp_timeout": "DURATION", "checkpoint_every": "EVERY",
            "data_dir": "PATH", "device": "DEVICE"}.get(
        key, typ.__name__.upper())


def _group(p: argparse.ArgumentParser, groups: dict, section: str):
    """The argument group of a config section ("model settings"), made on first use."""
    if section not in groups:
        groups[section] = p.add_argument_group(
            f"{section} settings",
            f"The [{section}] table of a --config file; each --x-y flag is also the environment "
            "variable RESVAE_X_Y. A bare boolean flag means true.")
    return groups[section]


def _add_config_flags(p: argparse.ArgumentParser, keys, preset: str | None = None,
                      groups: dict | None = None) -> None:
    """One flag per config key, `--latent-dim`, in an argument group per section; values stay
    strings and are parsed strictly by config.resolve, so a flag is typed exactly like its env
    var and TOML key. The old `--latent_dim` spellings still work but are not listed."""
    preset_vals = _preset_values(preset)
    groups = {} if groups is None else groups
    for key in keys:
        section, typ, _ = field_info(key)
        group = _group(p, groups, section)
        extra = dict(nargs="?", const="true") if typ is bool else {}
        group.add_argument(f"--{key.replace('_', '-')}", dest=key, default=None,
                           metavar=_metavar(key), help=_flag_help(key, preset, preset_vals),
                           **extra)
        if "_" in key:  # the old spelling: hidden, still working
            group.add_argument(f"--{key}", dest=key, default=None, help=argparse.SUPPRESS,
                               **extra)


def _depths(text: str) -> list[int]:
    try:
        depths = [int(d) for d in text.split(",") if d.strip()]
    except ValueError:
        depths = []
    if not depths:  # '' too: an empty flag is a mistake, not "the default"
        raise argparse.ArgumentTypeError(f"expected depths like 28 or 28,40,70,100, got {text!r}")
    return depths


def cmd_info(args) -> int:
    from .vae import build_vae, model_info

    overrides = {k: getattr(args, k) for k in MODEL_KEYS if k != "depth"}
    cfg = resolve(preset=args.preset, environ=os.environ, overrides=overrides).model
    rows = []
    for depth in args.depth or [cfg.depth]:
        vae = build_vae(cfg, depth=depth, channels=args.channels, image_size=args.image_size)
        rows.append({"arch": cfg.arch, "depth": depth, **model_info(vae)})
    if args.json:  # always a list, one object per depth
        print(json.dumps(rows, indent=2))
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
    from . import distributed as D
    from .runs import RunDir, RunLock, check_fresh, resume_config
    from .stops import exit_status
    from .train import train

    overrides = {k: getattr(args, k) for k in fields_flat()}
    if args.resume_from and not args.resume:
        raise ConfigError("--resume-from picks the checkpoint of a --resume RUN_DIR; give "
                          "--resume too")
    resume_from = args.resume_from or "last"
    if args.resume:
        if args.preset or args.config:
            raise ConfigError("--resume takes its config from the run directory; "
                              "drop --preset/--config")
        if args.overwrite or args.out:
            raise ConfigError("--resume continues the run in RUN_DIR; drop --overwrite/--out")
        cfg = resume_config(args.resume, os.environ, overrides, resume_from=resume_from)
        out = Path(args.resume)
    else:
        cfg = resolve(preset=args.preset, config_file=args.config, environ=os.environ,
                      overrides=overrides)
        out = Path(args.out or Path("runs") / f"{args.preset or 'run'}-{time.strftime('%Y%m%d-%H%M%S')}")
    if args.print_config:
        print(to_toml(cfg, f"resvae train --print-config: the resolved config, layered\n"
                           f"{PRECEDENCE}.\nTrain with it: resvae train --config FILE"), end="")
        return 0
    if not args.resume:
        check_fresh(out, overwrite=args.overwrite)
    # one process per run directory (under torchrun, rank 0 speaks for all): a second run, or a
    # --resume of a run still going, is refused instead of interleaving their records
    lock = RunLock(out, "--resume" if args.resume else "--out") if D.launched_as_main() \
        else contextlib.nullcontext()
    with lock:  # --overwrite: the old run is cleared once the data and model are ready
        summary = train(cfg, out, resume=bool(args.resume), resume_from=resume_from,
                        argv=args.argv, replace=args.overwrite)
    if (status := exit_status(summary.get("stop_reason"))) is not None:
        return status  # 143 after SIGTERM, 130 after SIGINT: what schedulers and shells expect
    if summary.get("stop_reason") == "non_finite":
        return 3
    if summary.get("best_val_loss") is None:  # it ended, but never had a usable model
        print(f"resvae train: error: no epoch had a finite validation loss (see "
              f"{RunDir(out).metrics}): the run failed; try a lower --lr", file=sys.stderr)
        return 3
    return 0


def _flag_overrides(args, keys) -> dict:
    return {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}


def cmd_sweep(args) -> int:
    from .sweep import SweepSpec, load_sweep_file, sweep

    if args.status:
        return _sweep_status(Path(args.status))

    fixed = _flag_overrides(args, [k for k in fields_flat() if k not in ("depth", "shortcut")])
    if args.seeds and fixed.get("seed") is not None:
        raise ConfigError("resvae sweep: give --seeds (a grid axis) or --seed (one for every run), "
                          "not both")
    if args.file:
        spec = load_sweep_file(args.file)
        spec.fixed.update(fixed)  # flags win over the file's [set]
        default_out = Path(spec.out or Path("runs") / f"sweep-{Path(args.file).stem}")
        if args.preset or args.config:
            raise ConfigError(f"{args.file} names its own preset/config; drop --preset/--config")
    else:
        if not args.depths:
            raise ConfigError("resvae sweep: give --depths (e.g. 20,52,100,204) or a sweep file")
        spec = SweepSpec(grid={"depth": args.depths}, preset=args.preset, config=args.config,
                         fixed=fixed)
        default_out = Path("runs") / f"sweep-{args.preset or 'default'}"
    if args.depths and args.file:
        spec.set_axis("depth", args.depths)
    if args.shortcut:
        spec.set_axis("shortcut", args.shortcut)
    if args.seeds:  # last: run names end in -seed<N>, and the report pools them per grid point
        spec.set_axis("seed", args.seeds)
    for key in ("budget_per_run", "iwae_k", "iwae_n"):
        if getattr(args, key) is not None:
            setattr(spec, key, getattr(args, key))
    out = Path(args.out or default_out)
    if args.print_commands:
        from .sweep import print_commands

        print("\n".join(print_commands(spec, out, environ=os.environ)))
        return 0
    launcher = args.launcher or spec.launcher.get("name", "local")
    if launcher == "slurm":
        from .slurm import SlurmSettings
        from .sweep import submit_slurm

        table = {**spec.launcher, **{k: getattr(args, k) for k in SLURM_FLAGS
                                     if getattr(args, k) is not None}}
        settings = SlurmSettings.from_table(table, args.file or "resvae sweep")
        entries = submit_slurm(spec, out, settings, environ=os.environ, wait=args.wait)
        return 0 if not args.wait or all(e["status"] == "done" for e in entries) else 1
    if launcher != "local":
        raise ConfigError(f"sweep launcher {launcher!r}: expected local or slurm")
    try:
        entries = sweep(spec, out, environ=os.environ)
    except KeyboardInterrupt as e:  # a signal: 143 after SIGTERM, 130 after SIGINT
        from .stops import exit_status
        return exit_status(e.args[0] if e.args else None) or 130
    return 0 if all(e["status"] == "done" for e in entries) else 1


SLURM_FLAGS = ("partition", "time", "gpus_per_run", "cpus_per_run", "tasks_per_run", "mem",
               "account", "qos", "constraint", "max_parallel", "max_timeouts")


def _sweep_status(sweep_dir: Path) -> int:
    """`resvae sweep --status SWEEP_DIR`: one line per run (name, job id, state, progress)."""
    from .slurm import status_lines
    from .sweep import read_sweep

    if not sweep_dir.is_dir():
        raise ConfigError(f"--status {sweep_dir}: no such sweep directory")
    status = read_sweep(sweep_dir)
    if not status:
        raise ConfigError(f"--status {sweep_dir}: not a sweep directory (no sweep.json)")
    evaluates = status.get("iwae_k", 100) != 0
    print("\n".join(status_lines(sweep_dir, status.get("runs", []), evaluates)))
    return 0


# The settings a training step depends on; the rest of [train] (schedules, budget, logging)
# never runs in a benchmark.
BENCH_TRAIN_KEYS = ("batch_size", "lr", "betas", "weight_decay", "grad_clip", "skip_threshold",
                    "free_bits", "seed", "device", "precision", "channels_last", "compile",
                    "compile_mode", "ema")


def _bench_keys() -> list[str]:
    return [k for k, (sec, _, _) in fields_flat().items()
            if sec in ("model", "data") or k in BENCH_TRAIN_KEYS]


def cmd_bench(args) -> int:
    from .bench import bench, bench_images, format_report

    if args.synthetic and args.data_dir is not None:
        raise ConfigError("--synthetic makes random images: drop --data-dir (or --synthetic)")
    if args.matmul_size == 0:
        raise ConfigError("--matmul-size: expected a positive integer, got 0")
    cfg = resolve(preset=args.preset, config_file=args.config, environ=os.environ,
                  overrides=_flag_overrides(args, _bench_keys()))
    record = bench(cfg, bench_images(cfg, args.synthetic), seconds=args.seconds,
                   variants=tuple(args.variants), profile=args.profile,
                   matmul_size=args.matmul_size)
    print(json.dumps(record, indent=2) if args.json else format_report(record))
    return 0


def cmd_report(args) -> int:
    from .report import report

    if args.screenshot and not args.o:
        raise ConfigError("--screenshot renders the HTML page: give -o report.html too")
    if args.screenshot:  # before the report is written, not after
        from .files import check_output
        check_output(args.screenshot, "--screenshot")
    paths = report(args.sweep_dir, html_out=args.o)
    if args.screenshot:
        from .report import screenshot
        paths["screenshot"] = screenshot(args.o, args.screenshot, args.chromium)
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


def cmd_compare(args) -> int:
    from .report import compare

    print(compare(args.run_dirs))
    return 0


def cmd_eval(args) -> int:
    from .evaluate import eval_run

    r = eval_run(args.run_dir, k=args.k, split=args.split, n=args.n, which=args.which,
                 device=_device(args), seed=args.seed, batch_size=args.batch_size,
                 data_dir=args.data_dir, progress=None)
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    unit = "bits/dim" if r["elbo_bpd"] is not None else "nats/image"
    for name in ("elbo", "iwae"):
        label = "negative ELBO" if name == "elbo" else f"IWAE (k={r['k']})"
        line = f"{label:>15}: {r[name + '_nats']:.2f} +- {r[name + '_nats_se']:.2f} nats/image"
        if r["elbo_bpd"] is not None:
            line += f" = {r[name + '_bpd']:.4f} +- {r[name + '_bpd_se']:.4f} bits/dim"
        print(line)
    print(f"{'active units':>15}: {r['active_units']} of {r['latent_dim']} (posterior mean "
          f"varies over the data)")
    if r.get("active_units_per_group"):
        print(f"{'per group':>15}: {', '.join(map(str, r['active_units_per_group']))} (top "
              "group first)")
    print(f"({r['split']} split, {r['n_images']} images; losses: lower is better, {unit} "
          "per image / dimension)")
    return 0


def cmd_sample(args) -> int:
    from .generate import sample_run

    print(sample_run(args.run_dir, args.o, n=args.n, temperature=args.temperature,
                     seed=args.seed, device=_device(args)))
    return 0


def cmd_reconstruct(args) -> int:
    from .generate import reconstruct_run

    print(reconstruct_run(args.run_dir, args.o, n=args.n, split=args.split, device=_device(args),
                          data_dir=args.data_dir))
    return 0


def cmd_interpolate(args) -> int:
    from .generate import interpolate_run

    print(interpolate_run(args.run_dir, args.o, pairs=args.pairs, steps=args.steps,
                          split=args.split, device=_device(args), data_dir=args.data_dir))
    return 0


def cmd_export(args) -> int:
    from .export import export_run

    print(export_run(args.run_dir, args.o, fmt=args.format, which=args.which,
                     overwrite=args.overwrite))
    return 0


def _list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _between(lo: float, hi: float, kind=int):
    """An argparse type: a `kind` number in [lo, hi] (NaN is not one)."""
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            v = None
        if v is None or not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"expected a number in [{lo:g}, {hi:g}], got {text!r}")
        return v
    return parse


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 0 or (n == 0 and text.strip() != "0"):
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return n


def _seconds(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        x = float("nan")
    if not 0 < x < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return x


def _variants(text: str) -> list:
    from .bench import parse_variant

    try:
        return [parse_variant(t) for t in _list(text)]
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--variants: "))


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if any(x < 0 for x in seeds) or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"expected distinct seeds >= 0, got {text!r}")
    return seeds


def _run_arg(p: argparse.ArgumentParser, data: bool = False) -> None:
    """RUN_DIR and --device for the commands on a saved run; `data`: the command reads the
    run's images, and --data-dir says where they are now."""
    p.add_argument("run_dir", metavar="RUN_DIR",
                   help="a run directory, a folder written by `resvae export`, or a "
                        ".safetensors file written by resvae")
    p.add_argument("--device", default="auto",
                   help="auto (a GPU if there is one, else cpu), cpu, cuda, cuda:N or mps "
                        "(default auto)")
    if data:
        p.add_argument("--data-dir", dest="data_dir", metavar="PATH",
                       help="where the run's data set is now (default: $RESVAE_DATA_DIR, else "
                            "the folder in its config.json); never downloaded")


def _device(args):
    from .distributed import resolve_device

    return resolve_device(args.device)


def build_parser(preset: str | None = None) -> argparse.ArgumentParser:
    """The `resvae` parser; `preset` (the --preset of the command line being parsed) makes the
    config flags' help show that preset's values as their defaults."""
    presets = presets_help()
    p = _Parser(
        prog="resvae", description="VAEs with deep residual encoders/decoders: train and measure.",
        epilog=f"Config precedence: {PRECEDENCE}. Presets: {presets}")
    p.add_argument("--version", action="version", version=f"resvae {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    p.subcommands = sub.choices
    # the order here is the order `resvae --help` lists the commands in
    for add in (_add_info_parser, _add_train_parser, _add_sweep_parser, _add_bench_parser):
        add(sub, preset, presets)
    for add in (_add_report_parser, _add_compare_parser, _add_eval_parser, _add_sample_parser,
                _add_reconstruct_parser, _add_interpolate_parser, _add_export_parser):
        add(sub)
    return p


def _add_info_parser(sub, preset: str | None, presets: str) -> None:
    """`resvae info`: the model flags, --depth as a list."""
    info = sub.add_parser("info", help="layers, parameters and FLOPs of a network",
                          usage="%(prog)s [--preset NAME] [--depth D[,D...]] [--json] "
                                "[--MODEL-KEY VALUE ...]",
                          description="Layers (by resvae's depth convention), encoder/decoder "
                          "parameters and forward FLOPs per image.", epilog=CONFIG_EPILOG)
    info.add_argument("--preset", metavar="NAME", help=f"take the model settings from a preset: {presets}")
    info.add_argument("--channels", type=int, default=3, choices=[1, 3],
                      help="input channels (default 3)")
    info.add_argument("--image-size", type=_between(8, 4096), default=32,
                      help="input size (default 32)")
    info.add_argument("--json", action="store_true",
                      help="machine-readable output: a JSON list, one object per depth")
    groups = {}
    _group(info, groups, "model").add_argument(
        "--depth", type=_depths, metavar="D[,D...]",
        help=_flag_help("depth", preset, _preset_values(preset),
                        lead="one depth or a comma list, e.g. 28,40,70,100: "))
    _add_config_flags(info, [k for k in MODEL_KEYS if k != "depth"], preset, groups)
    info.set_defaults(func=cmd_info)


def _add_train_parser(sub, preset: str | None, presets: str) -> None:
    """`resvae train`: config sources, run-directory flags and every config flag."""
    tr = sub.add_parser("train", help="train a VAE",
                        usage="%(prog)s [--preset NAME] [--config FILE] [--out DIR [--overwrite] "
                              "| --resume\n" + " " * 20 + "RUN_DIR] [--print-config] "
                              "[--KEY VALUE ...]",
                        description="Train a VAE; writes config.json, metrics.jsonl, checkpoints, "
                        "sample/reconstruction grids and summary.json into the run directory. "
                        "Under torchrun it trains with DistributedDataParallel.",
                        epilog=CONFIG_EPILOG)
    _add_config_sources(tr, presets)
    tr.add_argument("--out", metavar="DIR", help="run directory (default runs/<preset>-<time>)")
    tr.add_argument("--resume", metavar="RUN_DIR",
                    help="continue a run where it stopped (inside an epoch too: exactly as if "
                         "it had not stopped); SIGTERM / SIGINT stop a run with a checkpoint "
                         "to resume from (exit status 143 / 130)")
    tr.add_argument("--resume-from", metavar="CHECKPOINT",
                    help="with --resume: which checkpoint to continue from; one of:\n"
                         "  last: where the run stopped (default)\n"
                         "  best: its best epoch (e.g. after a divergence that last.pt, "
                         "written inside an epoch, did not see)\n"
                         "  PATH: any checkpoint file of this run (a copy kept aside)\n"
                         "metrics.jsonl loses the epochs after it; history.jsonl records it")
    tr.add_argument("--overwrite", action="store_true",
                    help="replace the run --out holds (its files are removed once the new "
                         "config is valid); without it a new run never lands on an old one")
    tr.add_argument("--print-config", action="store_true",
                    help="print the resolved config as TOML (usable as --config FILE) and exit "
                         "without training")
    _add_config_flags(tr, fields_flat(), preset)
    tr.set_defaults(func=cmd_train)


def _add_sweep_parser(sub, preset: str | None, presets: str) -> None:
    """`resvae sweep`: a sweep file or --depths, plus the config flags but depth/shortcut."""
    sw = sub.add_parser("sweep", help="train one run per depth (x shortcut), then report",
                        usage="%(prog)s [SWEEP_FILE] [--depths D,D,...] [--shortcut S,...]\n"
                              + " " * 20 + "[--preset NAME] [--config FILE] [--out DIR] "
                              "[--KEY VALUE ...]",
                        description="Train the same VAE at several depths (and shortcuts), "
                        "everything else equal (seed, data order, images per run), into "
                        "SWEEP_DIR/<name>/; rerunning skips finished runs and resumes "
                        "interrupted ones; writes results.csv/.md and figures.",
                        epilog=CONFIG_EPILOG)
    sw.add_argument("file", nargs="?", metavar="SWEEP_FILE",
                    help="a TOML sweep: preset, [grid] of lists, [set] of fixed settings")
    sw.add_argument("--depths", type=_depths, help="comma list, e.g. 20,52,100,204")
    sw.add_argument("--shortcut", type=_list, help="comma list of identity, projection, none")
    sw.add_argument("--launcher", choices=["local", "slurm"],
                    help="local: run here (default); slurm: one Slurm job array through "
                         "submitit (pip install 'resvae[slurm]'); also a sweep file's "
                         "[launcher] name")
    sw.add_argument("--status", metavar="SWEEP_DIR",
                    help="print each run's Slurm job id, state and progress, and exit")
    sw.add_argument("--wait", action="store_true",
                    help="with --launcher slurm: wait for the jobs, print state changes, then "
                         "write the report (default: return once submitted)")
    for flag, kind, text in (
            ("partition", str, "Slurm partition"), ("time", str, "time limit per task, e.g. "
             "4h (the run checkpoints and is requeued at it; default 4h)"),
            ("gpus-per-run", int, "GPUs per run (default 0)"),
            ("cpus-per-run", int, "CPUs per task (default 1)"),
            ("tasks-per-run", int, "processes per run, one DDP rank each, started by srun on "
             "one node (default 1)"), ("mem", str, "memory per run, "
             "e.g. 16G"), ("account", str, "Slurm account"), ("qos", str, "Slurm QOS"),
            ("constraint", str, "Slurm constraint"),
            ("max-parallel", int, "at most this many runs at once (the array's %% limit)"),
            ("max-timeouts", int, "how often a run may reach --time and be requeued "
             "(default 100; preemptions do not count)")):
        sw.add_argument(f"--{flag}", dest=flag.replace("-", "_"), type=kind,
                        help=f"--launcher slurm: {text}")
    sw.add_argument("--print-commands", dest="print_commands", action="store_true",
                    help="print one `resvae train` (and `resvae eval`) command per run, then "
                         "`resvae report`, for another scheduler (an sbatch array, GNU "
                         "parallel); writes each run's config into the sweep directory, trains "
                         "nothing")
    sw.add_argument("--seeds", type=_seeds, metavar="S,S,...",
                    help="a grid axis of seeds, e.g. 0,1,2: the report gives means with 95%% "
                         "confidence intervals over them and residual-minus-plain differences "
                         "on the same seeds (aggregate.csv, paired.csv)")
    sw.add_argument("--budget-per-run", dest="budget_per_run",
                    help="wall-clock guard per run, e.g. 15m (the comparison is images, not time)")
    sw.add_argument("--iwae-k", dest="iwae_k", type=_positive,
                    help="IWAE samples per test image after each run (default 100; 0 = none)")
    sw.add_argument("--iwae-n", dest="iwae_n", type=_positive,
                    help="test images for the IWAE estimate (default 1000; 0 = all)")
    sw.add_argument("--out", help="sweep directory (default runs/sweep-<preset or file name>)")
    sw.add_argument("--preset", metavar="NAME", help=f"one of: {presets}")
    sw.add_argument("--config", help="a TOML file of settings shared by every run")
    _add_config_flags(sw, [k for k in fields_flat() if k not in ("depth", "shortcut")], preset)
    sw.set_defaults(func=cmd_sweep)


def _add_bench_parser(sub, preset: str | None, presets: str) -> None:
    """`resvae bench`: timing options and the config flags a training step depends on."""
    be = sub.add_parser("bench", help="training throughput against this machine's ceiling",
                        usage="%(prog)s [--preset NAME] [--config FILE] [--seconds S] "
                              "[--synthetic] [--variants V,...]\n" + " " * 20 +
                              "[--profile] [--json] [--KEY VALUE ...]",
                        description="Times the real training step (data path included) of the "
                        "model the config describes, resolved as `resvae train` resolves it, "
                        "in one process: images/s after warm-up, FLOPs per training image "
                        "(forward + backward, counted) and GFLOP/s, the fp32 and bf16 matmul "
                        "ceilings before and after the model, a naive baseline (eager fp32 "
                        "NCHW, per-image float conversion) and the data path alone. Variants "
                        "are interleaved round by round; the configured one is reported first.",
                        epilog=CONFIG_EPILOG)
    _add_config_sources(be, presets)
    be.add_argument("--seconds", type=_seconds, default=30.0, metavar="S",
                    help="measuring time in all, shared by the variants and the baseline "
                         "(warm-up and ceilings come on top; default 30)")
    be.add_argument("--synthetic", action="store_true",
                    help="random uint8 images of CIFAR-10's shape instead of the data set "
                         "(no data needed)")
    be.add_argument("--variants", type=_variants, default=[], metavar="V,...",
                    help="also time these variants, interleaved with the configured one: "
                         "tokens joined by '+' from fp32 or bf16, cl (channels_last), compiled, "
                         "fused (fused Adam), devguard (--guard device, with fused Adam), nosync "
                         "(no skip guard: what its host sync per step costs), e.g. "
                         "fp32,bf16,bf16+cl,bf16+compiled,bf16+devguard")
    be.add_argument("--profile", action="store_true",
                    help="also list the top operators of the configured variant "
                         "(torch.profiler)")
    be.add_argument("--matmul-size", dest="matmul_size", type=_positive, default=2048, metavar="N",
                    help="N of the N x N x N matmuls that measure the ceilings (default 2048)")
    be.add_argument("--json", action="store_true", help="print one JSON object")
    _add_config_flags(be, _bench_keys(), preset)
    be.set_defaults(func=cmd_bench)


def _add_report_parser(sub) -> None:
    """`resvae report SWEEP_DIR`."""
    rp = sub.add_parser("report", help="results table, figures and an HTML page of a sweep")
    rp.add_argument("sweep_dir", metavar="SWEEP_DIR")
    rp.add_argument("-o", metavar="HTML", help="also write one self-contained HTML page")
    rp.add_argument("--screenshot", metavar="PNG",
                    help="also render the page in headless Chromium to a PNG (extra: report)")
    rp.add_argument("--chromium", help="Chromium executable (default $RESVAE_CHROMIUM or PATH)")
    rp.set_defaults(func=cmd_report)


def _add_compare_parser(sub) -> None:
    """`resvae compare RUN_DIR...`."""
    cp = sub.add_parser("compare", help="the results table for any run directories")
    cp.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    cp.set_defaults(func=cmd_compare)


def _add_eval_parser(sub) -> None:
    """`resvae eval RUN_DIR`: ELBO and IWAE options."""
    ev = sub.add_parser("eval", help="negative ELBO and IWAE bound of a saved run",
                        description="Negative ELBO and the importance-weighted bound (Burda et "
                        "al. 2016), each with its standard error over images, in nats and "
                        "bits/dim, plus active latent units; written to RUN_DIR/eval.json.")
    _run_arg(ev, data=True)
    ev.add_argument("--k", type=int, default=1000, help="importance samples (default 1000)")
    ev.add_argument("--split", default="test", choices=["train", "val", "test"])
    ev.add_argument("--n", type=_positive, default=EVAL_N,
                    help=f"evenly spaced images of the split (default {EVAL_N}; 0 = all of "
                         "them: with k=1000, hours on a CPU)")
    ev.add_argument("--which", default="best", choices=["best", "last"], help="checkpoint")
    ev.add_argument("--batch-size", dest="batch_size", type=_between(1, 1 << 20), default=8,
                    help="images per IWAE batch (k samples each, decoded in chunks)")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--json", action="store_true", help="print eval.json's object")
    ev.set_defaults(func=cmd_eval)


def _add_sample_parser(sub) -> None:
    """`resvae sample RUN_DIR -o PNG`."""
    sa = sub.add_parser("sample", help="a grid of images from a saved run's prior")
    _run_arg(sa)
    sa.add_argument("-n", type=_between(1, 10_000), default=100,
                    help="images (default 100, 10 per row; at most 10,000)")
    sa.add_argument("-o", required=True, metavar="PNG")
    sa.add_argument("--temperature", type=_between(0.0, 100.0, float), default=1.0,
                    help="z ~ N(0, t^2), default 1")
    sa.add_argument("--seed", type=int, default=1234)
    sa.set_defaults(func=cmd_sample)


def _add_reconstruct_parser(sub) -> None:
    """`resvae reconstruct RUN_DIR -o PNG`."""
    rc = sub.add_parser("reconstruct", help="test images above their reconstructions")
    _run_arg(rc, data=True)
    rc.add_argument("-n", type=int, default=50, help="images (default 50)")
    rc.add_argument("-o", required=True, metavar="PNG")
    rc.add_argument("--split", default="test", choices=["train", "val", "test"])
    rc.set_defaults(func=cmd_reconstruct)


def _add_interpolate_parser(sub) -> None:
    """`resvae interpolate RUN_DIR -o PNG`."""
    ip = sub.add_parser("interpolate", help="walks in latent space between test images")
    _run_arg(ip, data=True)
    ip.add_argument("--pairs", type=int, default=8, help="rows (default 8)")
    ip.add_argument("--steps", type=int, default=10, help="images per row (default 10)")
    ip.add_argument("-o", required=True, metavar="PNG")
    ip.add_argument("--split", default="test", choices=["train", "val", "test"])
    ip.set_defaults(func=cmd_interpolate)


def _add_export_parser(sub) -> None:
    """`resvae export RUN_DIR -o OUT`."""
    from .export import FORMATS  # (the export formats: where they are implemented)

    ex = sub.add_parser("export", help="a saved run as a folder to share, or its decoder as ONNX",
                        description="--format hub: a folder with config.json and "
                        "model.safetensors that resvae.load_pretrained, load_run and every "
                        "RUN_DIR command read, no pickle involved. --format onnx: the decoder "
                        "(z -> likelihood parameters) with a dynamic batch dimension (extra: "
                        "onnx).")
    ex.add_argument("run_dir", metavar="RUN_DIR",
                    help="a run directory, an exported folder, or a .safetensors file")
    ex.add_argument("--format", default="hub", choices=FORMATS,
                    help="hub: a folder (default); onnx: the decoder as one .onnx file")
    ex.add_argument("-o", required=True, metavar="OUT", help="the folder (hub) or file (onnx)")
    ex.add_argument("--which", default="best", choices=["best", "last"], help="checkpoint")
    ex.add_argument("--overwrite", action="store_true",
                    help="replace what OUT holds (without it, an existing OUT is an error)")
    ex.set_defaults(func=cmd_export)


def _options(parser: argparse.ArgumentParser) -> list[str]:
    """The flags a parser lists in its help (hidden aliases left out)."""
    return [o for a in parser._actions if a.help != argparse.SUPPRESS
            for o in a.option_strings]


def _add_config_sources(parser: argparse.ArgumentParser, presets: str) -> None:
    """--preset and --config of the commands that resolve a whole run config (train, bench)."""
    parser.add_argument("--preset", metavar="NAME", help=f"one of: {presets}")
    parser.add_argument("--config", metavar="FILE",
                        help="a TOML (or a run's config.json) file of settings")


def _unrecognized(parser: argparse.ArgumentParser, extra: list[str]) -> typing.NoReturn:
    """Exit 2 with one line naming the unknown flags and, for a near miss, the flag meant."""
    options = _options(parser)
    bad = [a for a in extra if a.startswith("-")] or extra
    parts = []
    for arg in bad:
        name = arg.partition("=")[0]
        close = difflib.get_close_matches(name.replace("_", "-"), options, n=1, cutoff=0.6)
        starts = [o for o in options if o.startswith(name)] if name.startswith("--") else []
        # a unique prefix (--batch, --max-e) names its flag more surely than a close spelling
        close = starts[:1] if len(starts) == 1 else close
        parts.append((name, close[0] if close else None))
    if len(parts) == 1:
        (name, close), = parts
        what = f"argument {name}" + (f"; did you mean {close}?" if close else "")
    else:
        what = "arguments " + ", ".join(n + (f" (did you mean {c}?)" if c else "")
                                        for n, c in parts)
    parser.exit(2, f"{parser.prog}: error: unrecognized {what} "
                   f"({parser.prog} --help lists the flags)\n")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(_preset_in(argv))
    args, extra = parser.parse_known_args(argv)
    if extra:
        _unrecognized(parser.subcommands.get(getattr(args, "command", None), parser), extra)
    args.argv = ["resvae", *argv]
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warning
            return args.func(args)
    except DiskFullError as e:  # not bad input: the run is resumable once space is freed
        run = getattr(args, "resume", None) or getattr(args, "out", None)
        print(f"resvae {args.command}: error: {e}"
              + (f"; free space, then continue with resvae train --resume {run}"
                 if args.command == "train" and run else ""), file=sys.stderr)
        return EXIT_DISK_FULL
    except ResvaeError as e:  # bad input (resvae.errors): one line naming the flag or file
        # Only these: any other exception is a bug, and its traceback is what a report needs.
        print(f"resvae {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        # a path the user gave that the system refuses (too long, a link loop, no permission, a
        # read-only file system) wherever it is first touched: one line naming it
        if e.errno not in USER_PATH_ERRNOS or not e.filename:
            raise
        print(f"resvae {args.command}: error: {e.filename}: {e.strerror}", file=sys.stderr)
        return 2


USER_PATH_ERRNOS = {errno.ENAMETOOLONG, errno.ELOOP, errno.ENOTDIR, errno.EISDIR, errno.EACCES,
                    errno.EPERM, errno.EROFS}


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    # a note to the user, not to a developer: no source file and line
    print(f"resvae: warning: {message}", file=file or sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
