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
import functools
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
from .errors import ConfigError
from .files import atomic_write
from .likelihoods import LIKELIHOODS
from .nets import ARCHS

# Allowed values come from the registries that implement them, so a new arch, likelihood,
# block or data set is a choice the moment it is registered (and never one before).
CHOICES = {
    "arch": tuple(ARCHS), "likelihood": tuple(LIKELIHOODS), "block": tuple(BLOCKS),
    "shortcut": SHORTCUTS, "upsample": UPSAMPLE, "precision": ("fp32", "bf16"),
    "lr_schedule": ("constant", "cosine"), "guard": ("host", "device"),
    "compile_mode": ("default", "max-autotune-no-cudagraphs"),
    "dataset": DATASETS,
}


_NUM = r"(\d+(?:\.\d+)?|\.\d+)"
_DURATION = re.compile(f"(?:{_NUM}h)?(?:{_NUM}m)?(?:{_NUM}s)?")  # units in h, m, s order
_STEPS = re.compile(r"(\d+)\s*steps?")


def parse_duration(text: str) -> float | None:
    """Seconds of a duration: "" -> None (none); "90s", "10m", "2h", "1h30m", "1.5h", "600"
    (a bare number is seconds). Anything else, zero included, is a ConfigError."""
    t = text.strip().lower().replace(" ", "")
    if not t:
        return None
    m = _DURATION.fullmatch(t)
    try:
        secs = float(t) if m is None or not any(m.groups()) else sum(
            float(g) * mult for g, mult in zip(m.groups(), (3600, 60, 1)) if g)
    except ValueError:
        secs = math.nan
    if not (math.isfinite(secs) and secs > 0):
        raise ConfigError(f"expected a positive duration like '90s', '10m', '1h30m', got {text!r}")
    return secs


class Duration(str):
    """A duration setting (budget, ddp_timeout): the text as the user wrote it ("10m"), so
    config.json, --print-config and --help show it unchanged, parsed once (by ``validate``) into
    ``seconds``: None for "" (none)."""
    seconds: float | None

    def __new__(cls, text: str):
        self = super().__new__(cls, text)
        self.seconds = parse_duration(text)
        return self


class Every(str):
    """checkpoint_every: its text, parsed once into ``steps`` (a count of updates, "500steps")
    or ``seconds`` (a duration, "10m"); both None for "" or "0" (at epoch ends only)."""
    steps: int | None
    seconds: float | None

    def __new__(cls, text: str):
        self = super().__new__(cls, text)
        t = text.strip().lower().replace(" ", "")
        m = _STEPS.fullmatch(t)
        self.steps, self.seconds = (int(m.group(1)) if m else None), None
        try:
            if m is None and t != "0":
                self.seconds = parse_duration(t)
        except ConfigError:
            self.steps = 0  # neither a count nor a duration: the same error as "0steps"
        if self.steps == 0:
            raise ConfigError(f"checkpoint_every: expected a duration like '90s', '10m', a count "
                              f"of updates like '500steps', or '' / 0 for epoch ends only, got "
                              f"{text!r}")
        return self

    @property
    def interval(self) -> tuple[str, float] | None:
        """("steps", n), ("seconds", s), or None: how the training loop reads it."""
        if self.steps:
            return "steps", self.steps
        return ("seconds", self.seconds) if self.seconds else None


# Fields holding text that validate parses into these types (a wrong form is named there).
_PARSED = (Duration, Every)


@dataclass(frozen=True)
class Range:
    """A numeric field's allowed values: ``lo <= x < hi`` (``lo < x`` when ``lo_open``); every
    upper bound in use is open. NaN never passes. A list field passes when it has ``n`` elements,
    each in range. ``expected`` overrides the generated wording of the error."""
    lo: float
    hi: float = math.inf
    lo_open: bool = False
    n: int | None = None
    expected: str = ""

    def holds(self, value) -> bool:
        if isinstance(value, (list, tuple)):  # TOML/JSON give lists, Python callers tuples
            return len(value) == self.n and all(self._one(x) for x in value)
        return self._one(value)

    def _one(self, x) -> bool:
        # chained comparisons, so NaN (every comparison false) fails both forms
        return (self.lo < x < self.hi) if self.lo_open else (self.lo <= x < self.hi)

    def describe(self) -> str:
        if self.expected:
            return self.expected
        if self.hi == math.inf and self.lo == 0:
            return "a positive number" if self.lo_open else "a non-negative number"
        return f"a number in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g})"


def setting(default, help: str, *, unit: str = "", choices=None, choice_help=None,
            lo=None, hi=math.inf, lo_open=False, expected=""):
    """A config field whose documentation lives in its dataclass metadata, in one place: ``help``
    (what it does; what 0 / "" means), ``unit``, ``choices`` (a ``CHOICES`` entry) and
    ``choice_help`` (a line per choice). ``field_docs()`` reads it back; the CLI's --help shows
    it. ``lo``/``hi``/``lo_open``/``expected`` give its ``Range``, which ``validate`` checks
    (for a list, per element). List defaults are copied per instance."""
    meta = {"help": help, "unit": unit, "choices": tuple(choices) if choices else None,
            "choice_help": dict(choice_help or {})}
    if lo is not None:
        n = len(default) if isinstance(default, list) else None
        meta["range"] = Range(lo, hi, lo_open, n, expected)
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    arch: str = setting(
        "study", "network family", choices=CHOICES["arch"], choice_help={
            "study": "the 2018 study's layout (Keras ResNet-50 bottleneck stages); "
                     "depth 28, 40, 70 or 100 only",
            "resnet": "efficient family, any reachable depth (see --depth)",
            "hier": "hierarchical VAE (VDVAE/NVAE style): a bottom-up residual encoder and a "
                    "top-down decoder with --stochastic-layers latent groups at 1 to 16 pixels"})
    depth: int = setting(
        28, "weight layers on the longest path, encoder + decoder (see README: depth "
        "convention). study: 28, 40, 70, 100. resnet: 4 + 2 x (layers per block) x B with B >= 4 "
        "blocks per side, i.e. basic 20, 24, 28, ..., 1004, bottleneck 28, 34, 40, ..., 1000; "
        "any other depth is an error naming the nearest valid ones", unit="layers", lo=0,
        lo_open=True, hi=10_001, expected="a positive number up to 10,000")  # (10**6 would
    # build blocks for hours, and no model that deep trains)
    width: float = setting(1.0, "channel multiplier on every stage's channel count",
                           unit="x base channels", lo=0, lo_open=True)
    latent_dim: int = setting(256, "dimensions of the Gaussian latent z", unit="dims", lo=0,
                              lo_open=True)
    likelihood: str = setting(
        "bernoulli", "pixel likelihood p(x|z)", choices=CHOICES["likelihood"], choice_help={
            "bernoulli": "the study's 3072 x BCE on [0, 1] pixels; not a likelihood of 8-bit "
                         "data, so no bits/dim",
            "gaussian": "Gaussian on dequantized pixels, std fixed (--gaussian-std) or learned; "
                        "reports bits/dim",
            "dlogistic": "discretized logistic mixture over 256 levels, each channel on its own, "
                         "--n-mix components; reports bits/dim",
            "dmol": "PixelCNN++'s discretized logistic mixture over the whole colour (G's mean "
                    "depends on R, B's on R and G), --n-mix components; reports bits/dim"})
    block: str = setting(
        "bottleneck", "residual block", choices=CHOICES["block"], choice_help={
            "basic": "3x3, 3x3 convs (2 layers; arch resnet only)",
            "bottleneck": "1x1, 3x3, 1x1 convs (3 layers), 4x channel expansion"})
    shortcut: str = setting(
        "identity", "the blocks' skip connections", choices=CHOICES["shortcut"], choice_help={
            "identity": "identity, a projection only where the shape changes",
            "projection": "a projection (1x1 conv) on every block",
            "none": "no shortcut: a plain net of the same depth"})
    preact: bool = setting(False, "pre-activation blocks: BN-ReLU before each conv "
                           "(He et al. 2016)")
    upsample: str = setting(
        "transposed", "decoder up-sampling", choices=CHOICES["upsample"], choice_help={
            "transposed": "strided transposed convs",
            "nearest": "nearest-neighbour upsampling, then a conv"})
    zero_init_residual: bool = setting(
        False, "zero-init each residual branch's last norm, so every block starts as its "
        "shortcut")
    n_mix: int = setting(10, "mixture components of the dlogistic and dmol likelihoods",
                         unit="components", lo=0, lo_open=True)
    gaussian_std: float = setting(0.0, "std of the gaussian likelihood; 0 = learned per pixel",
                                  unit="pixel scale, 0 to 1", lo=0)
    latent_l2: list[float] = setting(
        [0.0, 0.0], "L2 penalty on the latent mean / log-variance layers' weights, added to the "
        "training loss (the study: 0.01, 0.1)", unit="coefficients (mean, log-variance)", lo=0,
        expected="two non-negative numbers [mean, log-variance]")
    stochastic_layers: int = setting(
        4, "arch hier only: latent groups (stochastic layers) in its top-down decoder, where "
        "--latent-dim is the channels of one group; study and resnet have one latent layer and "
        "keep the default", unit="groups", lo=1, expected="a positive integer")


@dataclass
class DataConfig:
    dataset: str = setting(
        "cifar10", "training data", choices=CHOICES["dataset"], choice_help={
            "cifar10": "CIFAR-10 from --data-dir (pickles, tar.gz or image folder), the cache, "
                       "or --download",
            "folder": "any image folder train/<class>/*, test/<class>/* (--data-dir)",
            "mnist": "MNIST IDX files in --data-dir, padded to 32x32",
            "fashion-mnist": "Fashion-MNIST IDX files in --data-dir, padded to 32x32",
            "shapes": "procedural offline images, for smoke tests"})
    data_dir: str = setting("", "where the data set lives; \"\" = $RESVAE_DATA_DIR, else look in "
                            "the cache dir ($RESVAE_CACHE, default ~/.cache/resvae)", unit="path")
    image_size: int = setting(0, "resize and centre-crop images to this size; 0 = native size",
                              unit="pixels", lo=0)
    subset: int = setting(0, "train on this many class-balanced images; 0 = all",
                          unit="images", lo=0)
    val_fraction: float = setting(
        0.0, "fraction of train held out for validation; 0 = validate on the test split (as "
        "the study did)", unit="fraction of the training images, in [0, 1)", lo=0, hi=1)
    download: bool = setting(False, "download CIFAR-10 into the cache when no local copy is "
                             "found")
    pad_to_32: bool = setting(True, "pad MNIST / Fashion-MNIST's 28x28 images to 32x32")


@dataclass
class TrainConfig:
    batch_size: int = setting(64, "images per update and process (under torchrun the global "
                              "batch is this x processes)", unit="images", lo=0, lo_open=True)
    eval_batch_size: int = setting(500, "images per forward pass in validation and test",
                                   unit="images", lo=0, lo_open=True)
    bn_recalibrate: int = setting(
        20, "before each evaluation, recompute BatchNorm's statistics from this many training "
        "batches with the current weights (precise BN), instead of the running averages, which "
        "lag behind fast-changing weights (in deep plain nets, by orders of magnitude); 0 = off",
        unit="batches", lo=0)
    lr: float = setting(1e-3, "Adam learning rate (after warm-up)", lo=0, lo_open=True)
    betas: list[float] = setting([0.9, 0.999], "Adam's beta1, beta2, each in [0, 1)", lo=0, hi=1,
                                 expected="two numbers in [0, 1)")
    weight_decay: float = setting(0.0, "Adam's (L2) weight decay", lo=0)
    warmup_steps: int = setting(0, "linear learning-rate warm-up over this many updates; "
                                "0 = off", unit="updates", lo=0)
    kl_anneal_steps: int = setting(0, "KL weight beta 0 -> 1 linearly over this many updates; "
                                   "0 = off", unit="updates", lo=0)
    free_bits: float = setting(0.0, "free bits (Kingma et al. 2016): no KL pressure below this; "
                               "0 = off", unit="nats per latent dim", lo=0)
    grad_clip: float = setting(0.0, "clip the gradient's global norm to this; 0 = off",
                               unit="L2 norm", lo=0)
    skip_threshold: float = setting(
        0.0, "skip updates whose gradient norm exceeds this (non-finite ones are always "
        "skipped); 0 = off", unit="L2 norm", lo=0)
    max_skips: int = setting(20, "more than this many skipped updates in a row stop the run",
                             unit="updates", lo=0, lo_open=True)
    guard: str = setting(
        "host", "where the skip guard (non-finite or above --skip-threshold) decides whether to "
        "apply an update", choices=CHOICES["guard"], choice_help={
            "host": "read back after every update (one host sync per update: nothing on a CPU, "
                    "a stall of the GPU's queue on a GPU); any optimizer",
            "device": "decided on the device: fused Adam skips through its found_inf, the "
                      "skips are read back every 50 updates (and --max-skips checked then); "
                      "no host sync per update"})
    max_epochs: int = setting(1000, "stop after this many epochs", unit="epochs", lo=0,
                              lo_open=True)
    budget: Duration = setting(
        Duration(""), "wall-clock budget of one invocation (a resumed run gets a fresh one); "
        "\"\" = none", unit="duration: 90s, 10m, 2h, 1h30m or 1.5h; a bare number is seconds")
    checkpoint_every: Every = setting(
        Every("10m"), "also write checkpoints/last.pt inside an epoch this often, so a killed "
        "run loses at most this much (a resume continues mid-epoch exactly); \"\" or 0 = at "
        "epoch ends only", unit="duration (90s, 10m, 1h) or a count of updates (500steps)")
    ddp_timeout: Duration = setting(
        Duration("30m"), "under torchrun: how long a process waits for the others in one "
        "collective before it gives up with an error (a hung or dead peer), data decoding on "
        "rank 0 included", unit="duration: 90s, 10m, 1h")
    patience: int = setting(0, "early stopping: stop after this many epochs without a "
                            "validation gain above --min-delta; 0 = off", unit="epochs", lo=0)
    min_delta: float = setting(0.0, "the validation gain early stopping counts as one",
                               unit="nats per image", lo=0)
    plateau_patience: int = setting(0, "ReduceLROnPlateau: cut the lr after this many epochs "
                                    "without validation gain; 0 = off", unit="epochs", lo=0)
    plateau_factor: float = setting(0.5, "ReduceLROnPlateau: multiply the lr by this",
                                    unit="factor in (0, 1)", lo=0, hi=1, lo_open=True)
    min_lr: float = setting(0.0, "ReduceLROnPlateau: the lr never goes below this", lo=0)
    lr_schedule: str = setting(
        "constant", "learning rate after warm-up", choices=CHOICES["lr_schedule"], choice_help={
            "constant": "--lr throughout (ReduceLROnPlateau may still cut it)",
            "cosine": "cosine decay from --lr to 0 over the --budget by wall time when the "
                      "budget sets the run's length (--max-epochs at its default: a 10-minute "
                      "run ends annealed, whatever the machine's speed, but is not reproducible "
                      "bit for bit), else over --max-epochs' updates (exact on resume)"})
    ema: float = setting(
        0.0, "keep an exponential moving average of the weights with this decay and use it for "
        "validation, test, samples and the saved weights (VDVAE: 0.9999); 0 = off",
        unit="decay in [0, 1)", lo=0, hi=1)
    seed: int = setting(0, "seed of the initialisation, data order and held-out split", lo=0)
    device: str = setting("auto", "auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps")
    precision: str = setting(
        "fp32", "arithmetic precision", choices=CHOICES["precision"], choice_help={
            "fp32": "full precision", "bf16": "bfloat16 autocast (CPU and GPU)"})
    channels_last: bool = setting(False, "channels_last memory format")
    sync_bn: bool = setting(False, "SyncBatchNorm across processes under torchrun")
    sample_every: int = setting(10, "write sample/reconstruction grids every this many epochs, "
                                "and always at the end; 0 = at the end only", unit="epochs", lo=0)
    log_every: int = setting(
        50, "read the training loss, rate, distortion and gradient norm back from the device "
        "every this many updates, as means over them, for --tensorboard and callbacks; 0 = "
        "only the epoch means", unit="updates", lo=0)
    tensorboard: bool = setting(False, "write TensorBoard event files into RUN_DIR/tensorboard/ "
                                "(needs pip install 'resvae[tensorboard]')")
    compile: bool = setting(False, "torch.compile the model's forward for training and "
                            "evaluation (on CPU it needs a C compiler); checkpoints load into an "
                            "uncompiled model")
    compile_mode: str = setting(
        "default", "torch.compile's mode with --compile", choices=CHOICES["compile_mode"],
        choice_help={
            "default": "fuses the elementwise ops around the convolutions; compiles in seconds",
            "max-autotune-no-cudagraphs": "also times candidate kernels for each matmul and "
                                          "convolution and keeps the fastest: a slower compile"})


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}
# read by the data code, not config: the cache dir (RESVAE_DATA: its deprecated old name)
RESERVED_ENV = frozenset({"RESVAE_DATA", "RESVAE_CACHE"})
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


def field_info(key: str) -> tuple[str, type, object]:
    """One key's (section, type, default): fields_flat()[key] without copying every field (the
    CLI asks for each of its ~100 flags)."""
    section, typ, default = _FIELDS[key]
    return section, typ, copy.copy(default)


@functools.cache
def _docs_table() -> dict[str, dict]:
    out = {}
    for cls in SECTIONS.values():
        for f in dataclasses.fields(cls):
            m = f.metadata
            out[f.name] = {"help": m.get("help", ""), "unit": m.get("unit", ""),
                           "choices": m.get("choices"),
                           "choice_help": dict(m.get("choice_help", {}))}
    return out


def field_doc(key: str) -> dict:
    """One key's {"help", "unit", "choices", "choice_help"} from its field's metadata (see
    ``setting``). A field declared without ``setting`` has help "" here, which the CLI shows
    as it is and the tests reject by name."""
    doc = _docs_table()[key]
    return {**doc, "choice_help": dict(doc["choice_help"])}


def field_docs() -> dict[str, dict]:
    """Flat key -> field_doc(key), for every field."""
    return {k: field_doc(k) for k in _docs_table()}


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
    if typ in _PARSED:  # text here; validate parses it (and names the form it expects)
        typ = str
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
        if field_type is str or field_type in _PARSED:
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


# Names users may still type after a rename: each gets an error that names its successor.
RENAMED = {"arch": {"seed": "study"}}
RENAMED_PRESETS = {f"seed-{d}": f"study-{d}" for d in (28, 40, 70, 100)}
RENAMED_PRESETS["hier-cpu"] = "cpu"  # the hierarchical model became the main job
_RANGES = {f.name: f.metadata["range"] for cls in SECTIONS.values()
           for f in dataclasses.fields(cls) if "range" in f.metadata}


def _parse_or_none(typ, text: str):
    """``text`` parsed as ``typ`` (Duration, Every), or None when it is not one: validate names
    the expected form."""
    try:
        return typ(text)
    except ConfigError:
        return None


def validate(cfg: RunConfig, sources: Mapping[str, str] | None = None) -> None:
    """Check types and value ranges; ``sources`` (key -> where it was set) enriches messages.
    The duration texts are parsed here, once, into Duration / Every values set on ``cfg`` (the
    text unchanged), so the code that uses them reads seconds and steps."""
    def where(key):
        return f" (from {sources[key]})" if sources and key in sources else ""

    v = {k: getattr(getattr(cfg, sec), k) for k, (sec, _, _) in _FIELDS.items()}
    for key, (sec, typ, _) in _FIELDS.items():
        _check(f"{sec}.{key}", typ, v[key], "config" + where(key))
    for key, old_new in RENAMED.items():
        if v[key] in old_new:
            raise ConfigError(f"{_FIELDS[key][0]}.{key}{where(key)}: {v[key]!r} was renamed to "
                              f"{old_new[v[key]]!r}")
    parsed = {k: _parse_or_none(typ, v[k]) for k, (_, typ, _) in _FIELDS.items() if typ in _PARSED}
    # (key, ok, expected); a Range also rejects NaN and inf
    checks = [(k, v[k] in c, "one of " + ", ".join(c)) for k, c in CHOICES.items()]
    checks += [(k, r.holds(v[k]), r.describe()) for k, r in _RANGES.items()]
    checks += [
        ("lr_schedule", v["lr_schedule"] == "constant" or v["plateau_patience"] == 0,
         "'constant' with --plateau-patience (two schedules would fight over the lr)"),
        ("device", re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", v["device"]) is not None,
         "auto, cpu, cuda, cuda:N or mps"),
        ("budget", parsed["budget"] is not None,
         "'' or a positive duration like '90s', '10m', '1h30m'"),
        ("checkpoint_every", parsed["checkpoint_every"] is not None,
         "'' / 0, a duration like '90s', '10m', or a count of updates like '500steps'"),
        ("ddp_timeout", parsed["ddp_timeout"] is not None and parsed["ddp_timeout"].seconds,
         "a positive duration like '90s', '10m', '1h'"),
        ("stochastic_layers", v["arch"] == "hier" or v["stochastic_layers"] == _FIELDS[
            "stochastic_layers"][2], f"its default {_FIELDS['stochastic_layers'][2]} with arch "
         f"{v['arch']!r} (only arch 'hier' has several stochastic layers)"),
        ("compile_mode", v["compile"] or v["compile_mode"] == "default",
         "'default' without --compile (a mode of a compile that does not happen)"),
    ]
    for key, ok, expected in checks:
        if not ok:
            raise ConfigError(f"{_FIELDS[key][0]}.{key}{where(key)}: expected {expected}, "
                              f"got {v[key]!r}")
    for key, value in parsed.items():
        setattr(getattr(cfg, _FIELDS[key][0]), key, value)


def preset_names() -> list[str]:
    """Names of the bundled presets (``resvae/configs/*.toml``); aliases (``PRESET_ALIASES``)
    are not among them."""
    root = resources.files("resvae") / "configs"
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".toml"))


# The study's four networks are one preset at four depths; their old preset names stay as
# aliases: alias -> (preset, the settings it adds).
STUDY_DEPTHS = (28, 40, 70, 100)
PRESET_ALIASES = {f"study-{d}": ("study", {"model": {"depth": d}}) for d in STUDY_DEPTHS}


def presets_help() -> str:
    """The presets as --help and errors list them: the files, then what the aliases mean."""
    return (", ".join(preset_names()) + " (" + ", ".join(PRESET_ALIASES)
            + ": study at that --depth)")


def _loads(text: str, label: str) -> dict:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{label}: invalid TOML: {e}") from None


def load_preset(name: str) -> dict:
    """Nested dict of a bundled preset's TOML; an alias's adds its settings (study-40: depth)."""
    if name in RENAMED_PRESETS:
        raise ConfigError(f"preset {name!r} was renamed to {RENAMED_PRESETS[name]!r}")
    if name in PRESET_ALIASES:
        base, extra = PRESET_ALIASES[name]
        raw = load_preset(base)
        for section, values in extra.items():
            raw.setdefault(section, {}).update(values)
        return raw
    if name not in preset_names():
        raise ConfigError(f"unknown preset {name!r}; available: {presets_help()}")
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
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: invalid JSON: {e}") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: expected a JSON object of config tables, got a "
                              f"{type(d).__name__}")
        return d
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
    if cfg.data.data_dir:  # stored absolute: a saved run finds its data from any folder
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(
            cfg.data, data_dir=os.path.abspath(os.path.expanduser(cfg.data.data_dir))))
    validate(cfg, origin)
    return cfg


def to_dict(cfg: RunConfig) -> dict:
    """Nested, JSON-serialisable dict; Duration / Every values become their plain text (a
    checkpoint's config loads under torch.load(weights_only=True))."""
    return {sec: {k: str(v) if isinstance(v, str) else v for k, v in values.items()}
            for sec, values in dataclasses.asdict(cfg).items()}


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)  # repr round-trips
    if isinstance(v, str):
        # JSON's escapes are a subset of a TOML basic string's; TOML also bars a raw DEL
        return json.dumps(v, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} ({type(v).__name__}) as TOML")


def to_toml(cfg: RunConfig, header: str = "") -> str:
    """The config as a TOML file of the three sections, every key written out; ``load_toml``
    (and so ``--config``) reads it back to an equal RunConfig. ``header``: comment lines."""
    lines = [f"# {h}".rstrip() for h in header.splitlines()]
    for sec, values in to_dict(cfg).items():
        lines += ([""] if lines else []) + [f"[{sec}]"]
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


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
