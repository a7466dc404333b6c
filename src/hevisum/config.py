"""Configuration: one frozen dataclass per stage, loaded from TOML, validated, dumped next to outputs.

Precedence: defaults < config file < command-line flags. Unknown keys are an error that names the
key and lists the valid ones.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, get_type_hints

from hevisum.errors import HevisumError


@dataclass(frozen=True)
class StainConfig:
    method: str = "macenko"  # macenko | reinhard | none
    reference_slide: str = ""  # "" = fit on tissue patches of all training slides
    n_patches: int = 8  # tissue patches sampled per training slide for the fit
    patch_size: int = 256
    min_tissue: float = 0.5  # a patch is used when at least this fraction is tissue
    seed: int = 0

    def check(self) -> None:
        _choice("stain.method", self.method, ("macenko", "reinhard", "none"))
        _in_range("stain.n_patches", self.n_patches, 1, 10_000)
        _in_range("stain.patch_size", self.patch_size, 8, 4096, unit=" px")
        _fraction("stain.min_tissue", self.min_tissue)
        _seed("stain.seed", self.seed)


@dataclass(frozen=True)
class TissueConfig:
    background: str = "auto"  # auto | white | black: the colour of what is not tissue (auto: from the border)
    blur_sigma: float = 7.0  # Gaussian blur (px at the working scale) before thresholding
    max_side: int = 2048  # the mask is computed on the image shrunk to at most this side, then upsampled
    mask_background: bool = True  # set pixels outside the tissue mask to the fill colour
    fill: str = "white"  # white | black: one colour for every slide's background, so tiles look alike

    def check(self) -> None:
        _choice("tissue.background", self.background, ("auto", "white", "black"))
        _choice("tissue.fill", self.fill, ("white", "black"))
        _in_range("tissue.blur_sigma", self.blur_sigma, 0, 500, unit=" px")
        _in_range("tissue.max_side", self.max_side, 64, 65_536, unit=" px")


@dataclass(frozen=True)
class RealignConfig:
    enabled: bool = True
    max_shift_pitches: float = 1.5  # search window, in spot pitches
    min_gain: float = 0.01  # keep (0, 0) unless the best shift satisfies this fraction more of the constraints
    blur_pitches: float = 0.05  # blur of the tissue mask used for realignment, in pitches (sharp edges)
    # apply the best shift only when it raises the on-tissue evidence by at least this margin (per edge constraint)
    min_margin: float = 0.15
    manual: dict = field(default_factory=dict)  # {slide_id: [dx, dy]} overrides the estimate

    def check(self) -> None:
        _in_range("realign.max_shift_pitches", self.max_shift_pitches, 0, 10, unit=" pitches")
        _fraction("realign.min_gain", self.min_gain)
        _in_range("realign.blur_pitches", self.blur_pitches, 0, 5, unit=" pitches")
        _in_range("realign.min_margin", self.min_margin, 0, 2)
        for k, v in self.manual.items():
            ok = isinstance(v, (list, tuple)) and len(v) == 2 and all(
                isinstance(a, (int, float)) and not isinstance(a, bool) and math.isfinite(a) and abs(a) <= 1e6
                for a in v)
            if not ok:
                raise HevisumError(f"realign.manual[{str(k)!r}] must be [dx, dy], two finite numbers of pixels, "
                                   f"got {v!r}")


@dataclass(frozen=True)
class SpotsConfig:
    drop_invalid: bool = True  # drop training spots with no tissue under them (test spots are always kept)
    window_pitches: float = 1.04  # side of the tissue window around a spot, in pitches (reference: 26 px at pitch 25)
    min_tissue: float = 0.0  # a spot is invalid when its window's tissue fraction is <= this

    def check(self) -> None:
        _in_range("spots.window_pitches", self.window_pitches, 0, 20, lo_open=True, unit=" pitches")
        _fraction("spots.min_tissue", self.min_tissue, allow_zero=True)


@dataclass(frozen=True)
class TargetsConfig:
    # ranks.npy (per-spot ranks 1..T) is always written beside the raw targets
    # values within this of each other (relative to the spot's max |value|) count as tied; 0 = plain ranks, as the
    # metric sees them (measured: collapsing HER2ST's ~1e-10 values loses signal, see docs/benchmarks.md)
    tie_tol: float = 0.0

    def check(self) -> None:
        _in_range("targets.tie_tol", self.tie_tol, 0, 1)


@dataclass(frozen=True)
class TilesConfig:
    scale: float = 3.0  # tile side = scale x spot pitch
    size: int = 78  # model input side in pixels (78 = the reference CNN; 224 for ImageNet encoders)
    pitch_px: float = 0.0  # 0 = measure per slide

    def check(self) -> None:
        _in_range("tiles.scale", self.scale, 0, 50, lo_open=True, unit=" pitches")
        if not 9 <= self.size <= 1023 or self.size % 3:
            raise HevisumError(f"tiles.size must be a multiple of 3 in 9..1023 px (3x3 subtiles), got {self.size}")
        _in_range("tiles.pitch_px", self.pitch_px, 0, 100_000, unit=" px (0 = measure)")


@dataclass(frozen=True)
class PreprocessConfig:
    stain: StainConfig = field(default_factory=StainConfig)
    tissue: TissueConfig = field(default_factory=TissueConfig)
    realign: RealignConfig = field(default_factory=RealignConfig)
    spots: SpotsConfig = field(default_factory=SpotsConfig)
    targets: TargetsConfig = field(default_factory=TargetsConfig)
    tiles: TilesConfig = field(default_factory=TilesConfig)


# ---------------------------------------------------------------- generic loading


def _choice(key: str, value: Any, valid: tuple) -> None:
    if value not in valid:
        raise HevisumError(f"{key} = {value!r} is not valid; choose one of {list(valid)}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _positive(key: str, value: float) -> None:
    if not (_is_number(value) and value > 0):
        raise HevisumError(f"{key} must be a finite number > 0, got {value!r}")


def _fraction(key: str, value: float, allow_zero: bool = True) -> None:
    lo_ok = _is_number(value) and (value >= 0 if allow_zero else value > 0)
    if not (lo_ok and value <= 1):
        raise HevisumError(f"{key} must be in {'[' if allow_zero else '('}0, 1], got {value!r}")


def _in_range(key: str, value: float, lo: float, hi: float, lo_open: bool = False, unit: str = "") -> None:
    """``lo <= value <= hi`` (``lo < value`` with ``lo_open``), a finite number (NaN and infinities fail)."""
    ok = _is_number(value) and (value > lo if lo_open else value >= lo) and value <= hi
    if not ok:
        if isinstance(lo, int) and isinstance(hi, int) and isinstance(value, int) and not lo_open:
            raise HevisumError(f"{key} must be an integer in {lo}..{hi}{unit}, got {value!r}")
        raise HevisumError(f"{key} must be a number in {'(' if lo_open else '['}{lo:g}, {hi:g}]{unit}, got {value!r}")


def _seed(key: str, value: int) -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63):
        raise HevisumError(f"{key} must be an integer in 0..2**63-1, got {value!r}")


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict, rejecting unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise HevisumError(f"[{prefix.rstrip('.') or 'config'}] must be a table, got {data!r}")
    hints = get_type_hints(cls)
    valid = {f.name: f for f in fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in valid:
            raise HevisumError(f"unknown config key {full!r}; valid keys here are {sorted(valid)}")
        typ = hints[key]
        if is_dataclass(typ):
            kwargs[key] = from_dict(typ, value, prefix=f"{full}.")
            continue
        kwargs[key] = _coerce(full, value, typ)
    obj = cls(**kwargs)
    for f in fields(obj):
        sub = getattr(obj, f.name)
        if is_dataclass(sub) and hasattr(sub, "check"):
            sub.check()
    if hasattr(obj, "check"):
        obj.check()
    return obj


def _coerce(key: str, value: Any, typ: Any) -> Any:
    if typ is bool:
        if not isinstance(value, bool):
            raise HevisumError(f"{key} must be true or false, got {value!r}")
        return value
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise HevisumError(f"{key} must be an integer, got {value!r}")
        return value
    if typ is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise HevisumError(f"{key} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise HevisumError(f"{key} must be a finite number, got {value!r} (NaN and infinities are never valid)")
        return float(value)
    if typ is str:
        if not isinstance(value, str):
            raise HevisumError(f"{key} must be a string, got {value!r}")
        return value
    if typ is dict:
        if not isinstance(value, dict):
            raise HevisumError(f"{key} must be a table, got {value!r}")
        return dict(value)
    if typ is list or getattr(typ, "__origin__", None) is list:
        if not isinstance(value, list):
            raise HevisumError(f"{key} must be a list, got {value!r}")
        return list(value)
    return value


def to_dict(obj: Any) -> dict:
    return dataclasses.asdict(obj)


def load_toml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise HevisumError(f"config file {str(p)!r} not found")
    try:
        with p.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as e:
        raise HevisumError(f"config file {str(p)!r} is not valid TOML: {e}") from None
    except RecursionError:
        raise HevisumError(f"config file {str(p)!r} nests arrays or tables too deeply to be a config") from None
    except OSError as e:
        raise HevisumError(f"config file {str(p)!r} cannot be read ({e.strerror or e})") from None


def load_config(cls: type, path: str | Path | None = None, overrides: dict | None = None) -> Any:
    """Defaults < file < overrides (a nested dict, e.g. from CLI flags)."""
    data: dict = load_toml(path) if path else {}
    if overrides:
        data = merge(data, overrides)
    return from_dict(cls, data)


def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def dumps_toml(obj: Any) -> str:
    """Write a config dataclass as TOML: nested dataclasses become [tables], dicts inline tables."""
    lines: list[str] = []

    def scalar(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(scalar(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{_key(str(k))} = {scalar(x)}" for k, x in v.items()) + "}"
        raise TypeError(f"cannot write {v!r} as TOML")

    def table(d: Any, name: str) -> None:
        subs = [f for f in fields(d) if is_dataclass(getattr(d, f.name))]
        plain = [f for f in fields(d) if not is_dataclass(getattr(d, f.name))]
        if name:
            lines.append(f"[{name}]")
        for f in plain:
            lines.append(f"{f.name} = {scalar(getattr(d, f.name))}")
        if name or plain:
            lines.append("")
        for f in subs:
            table(getattr(d, f.name), f"{name}.{f.name}" if name else f.name)

    table(obj, "")
    return "\n".join(lines).strip() + "\n"


def _key(k: str) -> str:
    return k if k.replace("_", "").replace("-", "").isalnum() else '"' + k.replace('"', '\\"') + '"'


def dump_config(obj: Any, path: str | Path) -> None:
    """Write a resolved config (dataclass) as TOML, atomically."""
    from hevisum.io.atomic import atomic_write_text

    atomic_write_text(Path(path), dumps_toml(obj))


# ---------------------------------------------------------------- training and the main job

@dataclass(frozen=True)
class TrainConfig:
    """Training of the tile models (hevisum-cnn, effnet-finetune) and of the feature heads."""

    epochs: int = 30
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-3
    min_lr: float = 1e-6  # cosine decay ends here
    patience: int = 10  # early stopping on validation per-spot Spearman
    loss: str = "hybrid"  # hybrid | mse | spearman | mse+spearman
    target: str = "rank"  # rank (per-spot ranks scaled to 0..1) | raw
    augment: bool = False  # random flips and 90-degree rotations of training tiles
    tta: bool = False  # average predictions over the 8 flips/rotations
    coords: bool = False  # spot (x, y), scaled per slide, as an extra input to the heads
    # auto: bfloat16 on CPUs and on GPUs that support it, else float16 | bf16 | fp16 | fp32. Frozen-encoder
    # features use bfloat16 only when this resolves to bf16; fp16 and fp32 compute them in float32 on a CPU
    precision: str = "auto"
    num_workers: int = 2
    max_spots_per_epoch: int = 0  # 0 = all; else a random subset per epoch (quick runs)

    def check(self) -> None:
        _positive("train.epochs", self.epochs)
        _positive("train.batch_size", self.batch_size)
        _in_range("train.lr", self.lr, 0, 10, lo_open=True)
        _in_range("train.weight_decay", self.weight_decay, 0, 10)
        _in_range("train.min_lr", self.min_lr, 0, 10)
        _choice("train.loss", self.loss, ("hybrid", "mse", "spearman", "mse+spearman"))
        _choice("train.target", self.target, ("rank", "raw"))
        _choice("train.precision", self.precision, ("auto", "bf16", "fp16", "fp32"))
        if self.num_workers < 0:
            raise HevisumError(f"train.num_workers must be >= 0, got {self.num_workers}")


@dataclass(frozen=True)
class ModelsConfig:
    """Which methods run in cross-validation (names from ``hevisum methods``); baselines are always added."""

    methods: list = field(default_factory=list)  # [] = the profile's methods ('hevisum methods' shows them)
    ridge_alpha: float = 0.0  # 0 = choose by internal cross-validation
    # slide: standardise features within each slide (label-free; removes slide-wide colour and stain offsets);
    # global: leave them as they are (every head standardises with its training rows' statistics only)
    feature_norm: str = "slide"

    def check(self) -> None:
        if not all(isinstance(m, str) and m for m in self.methods):
            raise HevisumError(f"models.methods must be a list of method names, got {self.methods!r}")
        _choice("models.feature_norm", self.feature_norm, ("slide", "global"))
        if self.ridge_alpha < 0 or self.ridge_alpha != self.ridge_alpha or self.ridge_alpha == float("inf"):
            raise HevisumError(f"models.ridge_alpha must be a finite number >= 0, got {self.ridge_alpha}")


@dataclass(frozen=True)
class EncoderConfig:
    """The frozen encoder behind the encoder-* methods (``hevisum encoders`` lists the presets)."""

    name: str = "effnet-lite0"  # a preset name; effnet-lite0's ImageNet weights ship with the package
    weights: str = ""  # a local .safetensors or torch state-dict file (required for every other preset)
    input_px: int = 112  # side the encoder sees (tiles are resized to it); 0 = the preset's own input size

    def check(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise HevisumError("encoder.name must be a preset name; 'hevisum encoders' lists them")
        if self.input_px != 0 and self.input_px < 32:
            raise HevisumError(f"encoder.input_px must be 0 (the preset's size) or >= 32 px, got {self.input_px}")


@dataclass(frozen=True)
class FeaturesConfig:
    """What the encoder sees and which spatial context the heads get."""

    # spot: the tile cache (tiles.scale x pitch around the spot); tissue: the encoder's own field of view at its
    # own microns per pixel, cut from the full-resolution image (needs a known um/px; else falls back to spot)
    tiles: str = "spot"
    tissue_fov_um: float = 0.0  # field of view for tiles = "tissue"; 0 = the preset's (input px x um/px) or 112
    # context blocks added to the encoder methods: ring1 / ring2 (mean over the neighbours within 1 / 2 lattice
    # rings), slide (the slide's mean), wide (encoder features of wide_scale x pitch around the spot)
    context: list = field(default_factory=list)
    wide_scale: float = 6.0

    def check(self) -> None:
        _choice("features.tiles", self.tiles, ("spot", "tissue"))
        for c in self.context:
            _choice("features.context[]", c, ("ring1", "ring2", "slide", "wide"))
        if not (self.tissue_fov_um >= 0 and self.tissue_fov_um < 1e5):
            raise HevisumError(f"features.tissue_fov_um must be a finite number >= 0, got {self.tissue_fov_um}")
        if not (0 < self.wide_scale < 100):
            raise HevisumError(f"features.wide_scale must be in (0, 100) pitches, got {self.wide_scale}")


@dataclass(frozen=True)
class StackingConfig:
    enabled: bool = True
    model: str = "ridge"  # ridge | mlp (the reference StackingMLP)

    def check(self) -> None:
        _choice("stacking.model", self.model, ("ridge", "mlp"))


@dataclass(frozen=True)
class SmoothingConfig:
    enabled: bool = True  # Gaussian smoothing of predictions over neighbouring spots of a slide
    sigma_pitches: float = 1.0

    def check(self) -> None:
        _in_range("smoothing.sigma_pitches", self.sigma_pitches, 0, 100, lo_open=True, unit=" pitches")


@dataclass(frozen=True)
class RunConfig:
    """Everything `hevisum run` needs; the same file also configures `hevisum preprocess`."""

    seed: int = 0
    profile: str = "fast"  # fast | reference
    stain: StainConfig = field(default_factory=StainConfig)
    tissue: TissueConfig = field(default_factory=TissueConfig)
    realign: RealignConfig = field(default_factory=RealignConfig)
    spots: SpotsConfig = field(default_factory=SpotsConfig)
    targets: TargetsConfig = field(default_factory=TargetsConfig)
    tiles: TilesConfig = field(default_factory=TilesConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    stacking: StackingConfig = field(default_factory=StackingConfig)
    smoothing: SmoothingConfig = field(default_factory=SmoothingConfig)

    def check(self) -> None:
        _choice("profile", self.profile, ("fast", "reference"))
        _seed("seed", self.seed)

    def preprocess_config(self) -> PreprocessConfig:
        # The preprocessing sections are the same dataclasses, under the same names.
        return PreprocessConfig(**{f.name: getattr(self, f.name) for f in fields(PreprocessConfig)})


# What each profile changes from the defaults (a config file and flags still override these).
PROFILES: dict[str, dict] = {
    "fast": {"tiles": {"size": 78}},
    "reference": {"tiles": {"size": 78},
                  "train": {"loss": "hybrid", "target": "rank", "epochs": 30}},
}


def load_run_config(path: str | Path | None = None, profile: str | None = None, seed: int | None = None,
                    overrides: dict | None = None) -> RunConfig:
    """defaults < profile < config file < flags (``overrides``: a nested dict, e.g. {"encoder": {"name": ...}})."""
    file_data = load_toml(path) if path else {}
    if overrides:
        file_data = merge(file_data, overrides)
    prof = profile or file_data.get("profile") or "fast"
    if prof not in PROFILES:
        raise HevisumError(f"profile {prof!r} is not valid; choose one of {sorted(PROFILES)}")
    data = merge(PROFILES[prof], file_data)
    data["profile"] = prof
    if seed is not None:
        data["seed"] = seed
    return from_dict(RunConfig, data)
