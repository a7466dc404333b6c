"""The encoder presets: what each published image encoder is, how it is fed and where its weights come from.

Every preset names an architecture defined in this package (``vit``, ``resnet50``, ``effnet-lite0``) with the
constructor arguments that reproduce the published network parameter for parameter, so that the publisher's
weight file loads with ``strict=True``. Nothing here is ever downloaded: users fetch the weight file themselves
(most of these licences require accepting terms on the publisher's page first) and pass its path.

This module imports no torch, so ``hevisum encoders`` and ``hevisum --help`` stay fast.

Facts per preset (architecture, normalisation, input size, resolution, pooling, licence) come from the
publishers' model cards and configs; ``docs/encoders.md`` lists the source of each one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hevisum.errors import HevisumError

#: Architectures this package defines (``hevisum.encoders.build_architecture`` builds them).
ARCHITECTURES: tuple[str, ...] = ("vit", "resnet50", "effnet-lite0")
#: Pooling of the final features: class token, class token + mean of the patch tokens (registers excluded),
#: global average pool of a CNN's last feature map.
POOLINGS: tuple[str, ...] = ("cls", "cls+mean", "avg")
#: Weight-file layouts: timm parameter names, or Hugging Face transformers (ViTModel / Dinov2Model) names.
LAYOUTS: tuple[str, ...] = ("timm", "hf")

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
HALF: tuple[float, float, float] = (0.5, 0.5, 0.5)
HOPTIMUS_MEAN: tuple[float, float, float] = (0.707223, 0.578729, 0.703617)
HOPTIMUS_STD: tuple[float, float, float] = (0.211883, 0.230117, 0.177517)
LUNIT_MEAN: tuple[float, float, float] = (0.70322989, 0.53606487, 0.66096631)
LUNIT_STD: tuple[float, float, float] = (0.21716536, 0.26081574, 0.20723464)

DEFAULT_ENCODER = "effnet-lite0"


@dataclass(frozen=True)
class EncoderPreset:
    """One published encoder: architecture, preprocessing, pooling and provenance.

    ``arch_kwargs`` is a tuple of ``(name, value)`` pairs (kept hashable); :attr:`kwargs` gives it as a dict.
    ``n_params`` counts learnable parameters (BatchNorm running statistics excluded). ``um_per_px`` is the
    resolution the encoder was trained at (None for ImageNet models, which have no physical scale).
    ``feature_dim`` is the length of one embedding with ``pooling``. ``weight_file`` is the file name users
    download from ``source`` themselves (``source`` is text, never fetched); ``layout`` says which parameter
    names that file uses. ``builtin`` is True only where the weights ship with an installed package.
    """

    name: str
    title: str
    architecture: str
    arch_kwargs: tuple[tuple[str, Any], ...]
    timm_name: str
    n_params: int
    input_px: int
    um_per_px: float | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    pooling: str
    feature_dim: int
    licence: str
    weight_file: str
    source: str
    layout: str = "timm"
    builtin: bool = False
    notes: str = ""
    aliases: tuple[str, ...] = field(default=())

    @property
    def kwargs(self) -> dict[str, Any]:
        """The architecture's constructor arguments as a fresh dict."""
        return dict(self.arch_kwargs)

    @property
    def patch_size(self) -> int | None:
        """ViT patch size in pixels (None for CNNs)."""
        return self.kwargs.get("patch_size") if self.architecture == "vit" else None

    def check(self) -> None:
        """Raise HevisumError when a field is out of its allowed values (called by :func:`register_encoder`)."""
        if not self.name or self.name != self.name.strip().lower():
            raise HevisumError(f"encoder preset names are lower-case without spaces, got {self.name!r}")
        if self.architecture not in ARCHITECTURES:
            raise HevisumError(f"preset {self.name}: architecture must be one of {', '.join(ARCHITECTURES)}, "
                               f"got {self.architecture!r}")
        if self.pooling not in POOLINGS:
            raise HevisumError(f"preset {self.name}: pooling must be one of {', '.join(POOLINGS)}, "
                               f"got {self.pooling!r}")
        if self.layout not in LAYOUTS:
            raise HevisumError(f"preset {self.name}: layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise HevisumError(f"preset {self.name}: mean and std need 3 values each, std > 0")
        if self.input_px < 16 or self.feature_dim < 1 or self.n_params < 1:
            raise HevisumError(f"preset {self.name}: input_px, feature_dim and n_params must be positive")
        patch = self.patch_size
        if patch and self.input_px % patch:
            raise HevisumError(f"preset {self.name}: input_px {self.input_px} is not a multiple of the patch "
                               f"size {patch}")

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready description (what ``hevisum encoders --json`` prints)."""
        return {
            "name": self.name,
            "title": self.title,
            "architecture": self.architecture,
            "arch_kwargs": self.kwargs,
            "timm_name": self.timm_name,
            "n_params": self.n_params,
            "input_px": self.input_px,
            "um_per_px": self.um_per_px,
            "mean": list(self.mean),
            "std": list(self.std),
            "pooling": self.pooling,
            "feature_dim": self.feature_dim,
            "licence": self.licence,
            "weight_file": self.weight_file,
            "source": self.source,
            "layout": self.layout,
            "builtin": self.builtin,
            "notes": self.notes,
        }


_REGISTRY: dict[str, EncoderPreset] = {}


def register_encoder(preset: EncoderPreset, *, replace: bool = False) -> EncoderPreset:
    """Add a preset to the registry (checked first); an existing name needs ``replace=True``."""
    if not isinstance(preset, EncoderPreset):
        raise HevisumError(f"register_encoder takes an EncoderPreset, got {type(preset).__name__}")
    preset.check()
    if preset.name in _REGISTRY and not replace:
        raise HevisumError(f"an encoder preset named {preset.name!r} is already registered")
    _REGISTRY[preset.name] = preset
    return preset


def list_presets() -> list[EncoderPreset]:
    """Every registered preset, in registration order (the default first)."""
    return list(_REGISTRY.values())


def preset_names() -> list[str]:
    """Names of the registered presets."""
    return list(_REGISTRY)


def get_preset(name: str) -> EncoderPreset:
    """The preset called ``name`` (case-insensitive; ``_`` accepted for ``-``); unknown names list the valid ones."""
    key = str(name).strip().lower().replace("_", "-")
    if key in _REGISTRY:
        return _REGISTRY[key]
    for preset in _REGISTRY.values():
        if key in preset.aliases:
            return preset
    raise HevisumError(f"unknown encoder {name!r}; valid encoders: {', '.join(_REGISTRY)}")


def _fmt_stats(values: tuple[float, ...]) -> str:
    return ",".join(f"{v:.3f}" for v in values)


def _norm_label(preset: EncoderPreset) -> str:
    if preset.mean == IMAGENET_MEAN and preset.std == IMAGENET_STD:
        return "ImageNet"
    if preset.mean == HALF and preset.std == HALF:
        return "0.5/0.5"
    return f"{_fmt_stats(preset.mean)} / {_fmt_stats(preset.std)}"


def format_presets_table(presets: list[EncoderPreset] | None = None) -> str:
    """The presets as an aligned text table (what ``hevisum encoders`` prints)."""
    rows = [("name", "architecture", "params (M)", "input px", "um/px", "mean/std", "pooling/dim", "licence",
             "weight file")]
    for p in presets if presets is not None else list_presets():
        arch = p.timm_name + (" [hf]" if p.layout == "hf" else "")
        weight = "built in" if p.builtin else p.weight_file
        rows.append((
            p.name, arch, f"{p.n_params / 1e6:.1f}", str(p.input_px),
            "-" if p.um_per_px is None else f"{p.um_per_px:g}", _norm_label(p), f"{p.pooling}/{p.feature_dim}",
            p.licence, weight,
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("")
    lines.append("Weights are never downloaded: get the weight file from each preset's source (hevisum encoders "
                 "--json) and pass it with --encoder-weights PATH. [hf] = transformers layout, mapped on load.")
    return "\n".join(lines)


def _kw(**kwargs: Any) -> tuple[tuple[str, Any], ...]:
    return tuple(kwargs.items())
