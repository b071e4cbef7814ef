"""Run configuration for resvae: typed dataclasses, strict layered overrides, TOML presets.

Precedence, lowest first: defaults < preset < config file < RESVAE_<KEY> environment
variables < overrides (CLI flags). Field names are unique across sections, so every key
works flat (``depth``), dotted (``model.depth``) or nested (``{"model": {"depth": 40}}``).
Runtime state (rank, device objects, output paths) is deliberately not config.
"""

import contextlib
import copy
import dataclasses
import difflib
import json
import math
import os
import re
import sys
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

from .blocks import BLOCKS, SHORTCUTS, UPSAMPLE
from .data import DATASETS
from .files import atomic_write
from .likelihoods import LIKELIHOODS
from .nets import ARCHS


class ConfigError(ValueError):
    """A bad config value or key; the message names the key, its source and what was expected."""


@dataclass
class ModelConfig:
    arch: str = "study"  # "study" (the 2018 study's layout) | "resnet" (efficient family)
    depth: int = 28  # weight layers on the longest path, encoder + decoder
    width: float = 1.0  # channel multiplier
    latent_dim: int = 256
    likelihood: str = "bernoulli"  # "bernoulli" | "gaussian" | "dlogistic"
    block: str = "bottleneck"  # "basic" | "bottleneck"
    # "identity" (projection only where the shape changes) | "projection" (all) | "none" (plain)
    shortcut: str = "identity"
    preact: bool = False  # pre-activation blocks (He et al. 2016)
    upsample: str = "transposed"  # decoder up-sampling: "transposed" | "nearest"
    zero_init_residual: bool = False
    n_mix: int = 10  # dlogistic mixture components
    gaussian_std: float = 0.0  # >0 fixed std; 0 learned per pixel
    # L2 penalty on the latent mean / log-variance layers (the study: 0.01, 0.1)
    latent_l2: list[float] = field(default_factory=lambda: [0.0, 0.0])
    # arch "hier" only: latent groups (stochastic layers) in its top-down decoder; there latent_dim
    # is the channels of one group. study/resnet have one latent layer and keep the default.
    stochastic_layers: int = 4


@dataclass
class DataConfig:
    dataset: str = "cifar10"  # cifar10 | folder | mnist | fashion-mnist | shapes
    data_dir: str = ""  # "" = look in the cache dir / download when asked
    image_size: int = 0  # 0 = native size
    subset: int = 0  # 0 = all training images
    val_fraction: float = 0.0  # 0 = validate on the test split (as the study did)
    download: bool = False
    pad_to_32: bool = True


@dataclass
class TrainConfig:
    batch_size: int = 64
    eval_batch_size: int = 500
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    warmup_steps: int = 0
    kl_anneal_steps: int = 0  # beta 0 -> 1 linearly over this many steps; 0 = off
    free_bits: float = 0.0  # nats per latent dim; 0 = off
    grad_clip: float = 0.0  # max grad norm; 0 = off
    skip_threshold: float = 0.0  # skip updates whose grad norm exceeds this; 0 = off
    max_skips: int = 20  # more than this many skipped updates in a row stop the run
    max_epochs: int = 1000
    budget: str = ""  # wall-clock budget, e.g. "90s", "10m", "2h", "1h30m"; "" = none
    patience: int = 0  # early stopping on val loss; 0 = off
    min_delta: float = 0.0
    plateau_patience: int = 0  # ReduceLROnPlateau; 0 = off
    plateau_factor: float = 0.5
    min_lr: float = 0.0
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    precision: str = "fp32"  # fp32 | bf16
    channels_last: bool = False
    sync_bn: bool = False
    sample_every: int = 10  # epochs between sample/recon grids (and always at the end)


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}
RESERVED_ENV = frozenset({"RESVAE_DATA", "RESVAE_CACHE"})  # read by the data code, not config
_ENV_PREFIX = "RESVAE_"


def _build_fields() -> dict:
    out = {}
    for sec, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            # flat keys and env names only work while names are unique across sections
            if f.name in out or f.name in SECTIONS:
                raise RuntimeError(f"config key {f.name!r} is not unique")
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            out[f.name] = (sec, hints[f.name], default)
    return out


_FIELDS = _build_fields()
_ENV_NAMES = {_ENV_PREFIX + k.upper(): k for k in _FIELDS}


def fields_flat() -> dict[str, tuple[str, type, object]]:
    """Flat key -> (section, type, default) for every field; the CLI builds its flags from it."""
    return {k: (s, t, copy.copy(d)) for k, (s, t, d) in _FIELDS.items()}


def _tname(typ) -> str:
    return str(typ) if typing.get_origin(typ) else typ.__name__


def _unknown(key: str, source: str) -> ConfigError:
    name = key.rpartition(".")[2]
    close = difflib.get_close_matches(name, list(_FIELDS) + list(SECTIONS), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return ConfigError(f"{source}: unknown config key {key!r}{hint}")


def _resolve_key(key: str, source: str) -> str:
    """Map a flat or dotted key to its flat field name, checking a dotted section matches."""
    section, _, name = key.partition(".") if "." in key else (None, "", key)
    if name not in _FIELDS or (section is not None and section not in SECTIONS):
        raise _unknown(key, source)
    home = _FIELDS[name][0]
    if section is not None and section != home:
        raise ConfigError(f"{source}: {key}: '{name}' belongs in [{home}], not [{section}]")
    return name


def _check(key: str, typ, value, source: str):
    """Strict type check; returns the value (ints widened to float for float fields)."""
    if typing.get_origin(typ) is list:
        if isinstance(value, (list, tuple)):
            with contextlib.suppress(ConfigError):
                return [_check(key, typing.get_args(typ)[0], v, source) for v in value]
    elif isinstance(value, bool):  # bool is an int subclass; never let True mean 1
        if typ is bool:
            return value
    elif typ is float and isinstance(value, (int, float)):
        return float(value)
    elif isinstance(value, typ):
        return value
    raise ConfigError(f"{source}: {key}: expected {_tname(typ)}, got {value!r}")


_TRUE, _FALSE = {"true", "1", "yes"}, {"false", "0", "no"}


def parse_value(field_type, text: str, key: str, source: str):
    """Parse a string from the environment / command line into a value of ``field_type``."""
    t = text.strip()
    try:
        if field_type is bool and t.lower() in _TRUE | _FALSE:
            return t.lower() in _TRUE
        if field_type in (int, float):
            return field_type(t)
        if field_type is str:
            return text
        if typing.get_origin(field_type) is list:
            inner = t[1:-1] if t.startswith("[") and t.endswith("]") else t
            elem = typing.get_args(field_type)[0]
            parts = inner.split(",") if inner.strip() else []
            return [parse_value(elem, p, key, source) for p in parts]
    except ValueError:  # includes a ConfigError from one list element: report the whole text
        pass
    raise ConfigError(f"{source}: {key}: expected {_tname(field_type)}, got {text!r}")


def _normalize(d: Mapping, source: str) -> dict:
    """Nested/flat/dotted dict -> {flat key: checked value}."""
    items = []
    for k, v in d.items():
        if k in SECTIONS:
            if not isinstance(v, Mapping):
                raise ConfigError(f"{source}: [{k}] must be a table of settings, got {v!r}")
            items += [(f"{k}.{kk}", vv) for kk, vv in v.items()]
        else:
            items.append((str(k), v))
    out = {}
    for key, value in items:
        name = _resolve_key(key, source)
        if name in out:
            raise ConfigError(f"{source}: {name} is set twice")
        out[name] = _check(key, _FIELDS[name][1], value, source)
    return out


def apply_dict(cfg: RunConfig, d: Mapping, source: str = "dict") -> RunConfig:
    """Copy of ``cfg`` with the typed values of ``d`` applied; strict about keys and types."""
    cfg = copy.deepcopy(cfg)
    for name, value in _normalize(d, source).items():
        setattr(getattr(cfg, _FIELDS[name][0]), name, value)
    return cfg


_NUM = r"(\d+(?:\.\d+)?|\.\d+)"
_BUDGET = re.compile(f"(?:{_NUM}h)?(?:{_NUM}m)?(?:{_NUM}s)?")  # units in h, m, s order


def parse_budget(s: str) -> float | None:
    """Wall-clock budget in seconds: "" -> None; "90s", "10m", "2h", "1h30m", "1.5h", "600"."""
    t = s.strip().lower().replace(" ", "")
    if not t:
        return None
    m = _BUDGET.fullmatch(t)
    try:
        secs = float(t) if m is None or not any(m.groups()) else sum(
            float(g) * mult for g, mult in zip(m.groups(), (3600, 60, 1)) if g)
    except ValueError:
        secs = math.nan
    if not (math.isfinite(secs) and secs > 0):
        raise ConfigError(f"budget: expected a positive duration like '90s', '10m', '1h30m', "
                          f"got {s!r}")
    return secs


def _budget_ok(s: str) -> bool:
    try:
        parse_budget(s)
        return True
    except ConfigError:
        return False


# Allowed values come from the registries that implement them, so a new arch, likelihood,
# block or data set is a choice the moment it is registered (and never one before).
CHOICES = {
    "arch": tuple(ARCHS), "likelihood": tuple(LIKELIHOODS), "block": tuple(BLOCKS),
    "shortcut": SHORTCUTS, "upsample": UPSAMPLE, "precision": ("fp32", "bf16"),
    "dataset": DATASETS,
}
# Names users may still type after a rename: each gets an error that names its successor.
RENAMED = {"arch": {"seed": "study"}}
RENAMED_PRESETS = {f"seed-{d}": f"study-{d}" for d in (28, 40, 70, 100)}
_POSITIVE = ("depth", "width", "latent_dim", "n_mix", "batch_size", "eval_batch_size", "lr",
             "max_skips", "max_epochs")
_NONNEG = ("gaussian_std", "image_size", "subset", "weight_decay", "warmup_steps",
           "kl_anneal_steps", "free_bits", "grad_clip", "skip_threshold", "patience", "min_delta",
           "plateau_patience", "min_lr", "seed", "sample_every")


def validate(cfg: RunConfig, sources: Mapping[str, str] | None = None) -> None:
    """Check types and value ranges; ``sources`` (key -> where it was set) enriches messages."""
    def where(key):
        return f" (from {sources[key]})" if sources and key in sources else ""

    v = {k: getattr(getattr(cfg, sec), k) for k, (sec, _, _) in _FIELDS.items()}
    for key, (sec, typ, _) in _FIELDS.items():
        _check(f"{sec}.{key}", typ, v[key], "config" + where(key))
    # (key, ok, expected); the `not` / chained comparisons below also reject NaN and inf
    for key, old_new in RENAMED.items():
        if v[key] in old_new:
            raise ConfigError(f"{_FIELDS[key][0]}.{key}{where(key)}: {v[key]!r} was renamed to "
                              f"{old_new[v[key]]!r}")
    checks = [(k, v[k] in c, "one of " + ", ".join(c)) for k, c in CHOICES.items()]
    checks += [(k, 0 < v[k] < math.inf, "a positive number") for k in _POSITIVE]
    checks += [(k, 0 <= v[k] < math.inf, "a non-negative number") for k in _NONNEG]
    checks += [
        ("latent_l2", len(v["latent_l2"]) == 2 and all(0 <= x < math.inf for x in v["latent_l2"]),
         "two non-negative numbers [mean, log-variance]"),
        ("betas", len(v["betas"]) == 2 and all(0 <= b < 1 for b in v["betas"]),
         "two numbers in [0, 1)"),
        ("val_fraction", 0 <= v["val_fraction"] < 1, "a number in [0, 1)"),
        ("plateau_factor", 0 < v["plateau_factor"] < 1, "a number in (0, 1)"),
        ("device", re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", v["device"]) is not None,
         "auto, cpu, cuda, cuda:N or mps"),
        ("budget", _budget_ok(v["budget"]), "'' or a positive duration like '90s', '10m', '1h30m'"),
        ("stochastic_layers", v["stochastic_layers"] >= 1, "a positive integer"),
        ("stochastic_layers", v["arch"] == "hier" or v["stochastic_layers"] == _FIELDS[
            "stochastic_layers"][2], f"its default {_FIELDS['stochastic_layers'][2]} with arch "
         f"{v['arch']!r} (only arch 'hier' has several stochastic layers)"),
    ]
    for key, ok, expected in checks:
        if not ok:
            raise ConfigError(f"{_FIELDS[key][0]}.{key}{where(key)}: expected {expected}, "
                              f"got {v[key]!r}")


def preset_names() -> list[str]:
    """Names of the bundled presets (``resvae/configs/*.toml``)."""
    root = resources.files("resvae") / "configs"
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".toml"))


def _loads(text: str, label: str) -> dict:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{label}: invalid TOML: {e}") from None


def load_preset(name: str) -> dict:
    """Nested dict of a bundled preset's TOML."""
    if name in RENAMED_PRESETS:
        raise ConfigError(f"preset {name!r} was renamed to {RENAMED_PRESETS[name]!r}")
    if name not in (names := preset_names()):
        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(names)}")
    path = resources.files("resvae") / "configs" / f"{name}.toml"
    return _loads(path.read_text(encoding="utf-8"), f"preset {name!r}")


def load_toml(path) -> dict:
    """Nested dict of a config file: TOML, or JSON for a `.json` path (a run's config.json can be
    reused as `--config runs/x/config.json`)."""
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read config file: {e}") from None
    if str(path).endswith(".json"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: invalid JSON: {e}") from None
    return _loads(text, str(path))


def env_overrides(environ: Mapping[str, str]) -> dict[str, str]:
    """RESVAE_<KEY>=text -> {key: text}; RESERVED_ENV skipped, other unknown RESVAE_* rejected."""
    out = {}
    for var, text in environ.items():
        if not var.startswith(_ENV_PREFIX) or var in RESERVED_ENV:
            continue
        if var not in _ENV_NAMES:
            close = difflib.get_close_matches(var, list(_ENV_NAMES) + sorted(RESERVED_ENV), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"environment variable {var}: unknown config key{hint}")
        out[_ENV_NAMES[var]] = text
    return out


def resolve(preset: str | None = None, config_file: str | None = None,
            environ: Mapping[str, str] | None = None,
            overrides: Mapping[str, object] | None = None) -> RunConfig:
    """Build the run config from all layers, then validate. ``environ=None`` reads os.environ
    (the only place this module reads the environment); pass ``{}`` to ignore it."""
    cfg, origin = RunConfig(), {}

    def layer(d, source):
        nonlocal cfg
        norm = _normalize(d, source)
        cfg = apply_dict(cfg, norm, source)
        origin.update(dict.fromkeys(norm, source))

    if preset:
        layer(load_preset(preset), f"preset {preset!r}")
    if config_file:
        layer(load_toml(config_file), str(config_file))
    for name, text in env_overrides(os.environ if environ is None else environ).items():
        src = f"environment variable {_ENV_PREFIX}{name.upper()}"
        layer({name: parse_value(_FIELDS[name][1], text, name, src)}, src)
    for key, value in (overrides or {}).items():
        if value is None:  # argparse leaves flags that were not given as None
            continue
        src = "--" + key.replace("_", "-")
        if isinstance(value, str):
            value = parse_value(_FIELDS[_resolve_key(key, src)][1], value, key, src)
        layer({key: value}, src)
    validate(cfg, origin)
    return cfg


def to_dict(cfg: RunConfig) -> dict:
    """Nested, JSON-serialisable dict."""
    return dataclasses.asdict(cfg)


def from_dict(d: Mapping, source: str = "config dict") -> RunConfig:
    """Strictly rebuild a RunConfig (e.g. from a checkpoint's config.json); missing keys default."""
    norm = _normalize(d, source)
    cfg = apply_dict(RunConfig(), norm, source)
    validate(cfg, dict.fromkeys(norm, source))
    return cfg


def save_json(cfg: RunConfig, path) -> None:
    """Write ``to_dict(cfg)`` as JSON atomically, so readers never see a half-written file."""
    text = json.dumps(to_dict(cfg), indent=2) + "\n"  # serialise first: a bad value writes nothing
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
