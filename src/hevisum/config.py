"""Configuration: one frozen dataclass per stage, loaded from TOML, validated, dumped next to outputs.

Precedence: defaults < config file < command-line flags. Unknown keys are an error that names the
key and lists the valid ones.
"""

from __future__ import annotations

import dataclasses
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
        _positive("stain.n_patches", self.n_patches)
        _positive("stain.patch_size", self.patch_size)
        _fraction("stain.min_tissue", self.min_tissue)


@dataclass(frozen=True)
class TissueConfig:
    background: str = "auto"  # auto | white | black: the colour of what is not tissue
    blur_sigma: float = 7.0  # Gaussian blur (px at the working scale) before thresholding
    mask_background: bool = True  # set pixels outside the tissue mask to the background colour

    def check(self) -> None:
        _choice("tissue.background", self.background, ("auto", "white", "black"))
        if self.blur_sigma < 0:
            raise HevisumError(f"tissue.blur_sigma must be >= 0, got {self.blur_sigma}")


@dataclass(frozen=True)
class RealignConfig:
    enabled: bool = True
    max_shift_pitches: float = 1.5  # search window, in spot pitches
    manual: dict = field(default_factory=dict)  # {slide_id: [dx, dy]} overrides the estimate

    def check(self) -> None:
        if self.max_shift_pitches < 0:
            raise HevisumError(f"realign.max_shift_pitches must be >= 0, got {self.max_shift_pitches}")
        for k, v in self.manual.items():
            if not (isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(a, (int, float)) for a in v)):
                raise HevisumError(f"realign.manual.{k} must be [dx, dy] in pixels, got {v!r}")


@dataclass(frozen=True)
class SpotsConfig:
    drop_invalid: bool = True  # drop training spots with no tissue under them (test spots are always kept)
    window_pitches: float = 0.42  # side of the tissue window around a spot, in pitches (reference: 26 px at pitch 62)
    min_tissue: float = 0.0  # a spot is invalid when its window's tissue fraction is <= this

    def check(self) -> None:
        _positive("spots.window_pitches", self.window_pitches)
        _fraction("spots.min_tissue", self.min_tissue, allow_zero=True)


@dataclass(frozen=True)
class TargetsConfig:
    rank: bool = True  # keep a per-spot ordinal rank transform beside the raw targets
    tie_tol: float = 1e-6  # values within this of each other (relative to the spot's max) count as tied

    def check(self) -> None:
        if self.tie_tol < 0:
            raise HevisumError(f"targets.tie_tol must be >= 0, got {self.tie_tol}")


@dataclass(frozen=True)
class TilesConfig:
    scale: float = 3.0  # tile side = scale x spot pitch
    size: int = 78  # model input side in pixels (78 = the reference CNN; 224 for ImageNet encoders)
    pitch_px: float = 0.0  # 0 = measure per slide

    def check(self) -> None:
        _positive("tiles.scale", self.scale)
        if self.size < 9 or self.size % 3:
            raise HevisumError(f"tiles.size must be a multiple of 3 and >= 9 (3x3 subtiles), got {self.size}")
        if self.pitch_px < 0:
            raise HevisumError(f"tiles.pitch_px must be >= 0 (0 = measure), got {self.pitch_px}")


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


def _positive(key: str, value: float) -> None:
    if not value > 0:
        raise HevisumError(f"{key} must be > 0, got {value}")


def _fraction(key: str, value: float, allow_zero: bool = True) -> None:
    lo_ok = value >= 0 if allow_zero else value > 0
    if not (lo_ok and value <= 1):
        raise HevisumError(f"{key} must be in [0, 1], got {value}")


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
