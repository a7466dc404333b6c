"""Encoders: architectures against timm's parameter names and outputs, weight loading, embedding, CLI listing.

The large presets are built on the meta device (no memory), so every architecture's keys, shapes and parameter
count are checked against the timm 1.0.31 reference in ../shared/data/encoders without real weights.
"""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from hevisum.encoders import (
    EncoderPreset,
    build_encoder,
    encode_tiles,
    get_preset,
    hf_to_timm,
    list_presets,
    load_encoder,
    weights_digest,
)
from hevisum.encoders.lite0 import lite0_to_timm
from hevisum.encoders.vit import VisionTransformer
from hevisum.errors import HevisumError

EXPECTED_PRESETS = {
    "effnet-lite0", "uni", "uni2-h", "h-optimus-0", "h-optimus-1", "h0-mini", "phikon", "phikon-v2", "virchow2",
    "midnight-12k", "lunit-vits8", "kaiko-vits8", "resnet50-imagenet",
}
REF_DIR = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "encoders"


@pytest.fixture(scope="module")
def encoder_refs(shared_data: Path) -> Path:
    d = shared_data / "encoders"
    if not (d / "timm_state_dicts.json").is_file():
        pytest.skip(f"encoder references not found in {d}")
    return d


def _timm_reference() -> dict[str, dict]:
    """Preset name → reference entry of timm_state_dicts.json (entries named 'a / b' serve both presets)."""
    path = REF_DIR / "timm_state_dicts.json"
    if not path.is_file():
        return {}
    out = {}
    for key, entry in json.loads(path.read_text())["architectures"].items():
        for name in key.replace(" (reference)", "").split(" / "):
            out[name.strip()] = entry
    return out


TIMM_REF = _timm_reference()


# --- registry ------------------------------------------------------------------------------------------------


def test_registry_and_cli_import_without_torch():
    code = "import sys, hevisum.cli, hevisum.encoders.registry, hevisum.encoders; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_all_presets_registered_with_consistent_fields():
    presets = list_presets()
    assert {p.name for p in presets} == EXPECTED_PRESETS
    assert presets[0].name == "effnet-lite0"
    assert [p.name for p in presets if p.builtin] == ["effnet-lite0"]
    for p in presets:
        assert p.layout == ("hf" if p.name in {"phikon", "phikon-v2", "midnight-12k"} else "timm")
        assert (p.um_per_px is None) == (p.name in {"effnet-lite0", "resnet50-imagenet"})
        assert p.source.startswith("https://") and p.weight_file and p.licence
        hash(p)  # frozen and hashable


def test_get_preset_unknown_name_lists_valid_ones():
    assert get_preset("UNI2_H").name == "uni2-h"
    assert get_preset("midnight").name == "midnight-12k"
    with pytest.raises(HevisumError, match="valid encoders: effnet-lite0, uni,"):
        get_preset("uni3")


# --- architectures vs timm (meta device: nothing allocated) ---------------------------------------------------


@pytest.mark.shared
@pytest.mark.parametrize("name", sorted(EXPECTED_PRESETS - {"phikon", "phikon-v2", "midnight-12k"}))
def test_architecture_keys_shapes_params_match_timm(encoder_refs, name):
    ref = TIMM_REF[name]
    preset = get_preset(name)
    assert preset.timm_name == ref["timm_name"]
    with torch.device("meta"):
        enc = build_encoder(name)
    state = enc.backbone.state_dict()
    if preset.architecture == "effnet-lite0":
        state = lite0_to_timm(state)
    shapes = {k: list(v.shape) for k, v in state.items()}
    want = dict(ref["state_dict"])
    assert list(shapes) == list(want)  # same keys, same order
    if name == "h0-mini":
        # The H0-mini card builds the model with mlp_layer=SwiGLUPacked (the reference was made without it):
        # fc1 packs gate and value (2 x 2048), fc2 reads 2048. Every other tensor matches the reference.
        for i in range(12):
            assert want.pop(f"blocks.{i}.mlp.fc1.weight") == [3072, 768]
            assert shapes.pop(f"blocks.{i}.mlp.fc1.weight") == [4096, 768]
            assert shapes.pop(f"blocks.{i}.mlp.fc1.bias") == [4096]
            assert shapes.pop(f"blocks.{i}.mlp.fc2.weight") == [768, 2048]
            for k in (f"blocks.{i}.mlp.fc1.bias", f"blocks.{i}.mlp.fc2.weight"):
                want.pop(k)
        assert shapes == want
        assert sum(math.prod(v.shape) for v in state.values()) == ref["n_params"] + 12 * 1024
    else:
        assert shapes == want
        # the reference counts every state-dict element (BatchNorm statistics included for the CNNs)
        assert sum(math.prod(v.shape) for v in state.values()) == ref["n_params"]
    assert sum(p.numel() for p in enc.backbone.parameters()) == preset.n_params


@pytest.mark.parametrize("name", ["phikon", "phikon-v2", "midnight-12k"])
def test_hf_presets_match_transformers_models(name):
    transformers = pytest.importorskip("transformers")
    configs = {
        "phikon": (transformers.ViTModel, transformers.ViTConfig(
            hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, image_size=224,
            patch_size=16, layer_norm_eps=1e-12)),
        "phikon-v2": (transformers.Dinov2Model, transformers.Dinov2Config(
            hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, image_size=224, patch_size=16)),
        "midnight-12k": (transformers.Dinov2Model, transformers.Dinov2Config(
            hidden_size=1536, num_hidden_layers=40, num_attention_heads=24, image_size=224, patch_size=14,
            use_swiglu_ffn=True)),
    }
    cls, config = configs[name]
    with torch.device("meta"):
        hf = cls(config)
        ours = build_encoder(name).backbone
    mapped, unmapped = hf_to_timm(hf.state_dict())
    assert unmapped == []
    assert {k: tuple(v.shape) for k, v in mapped.items()} == {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert sum(p.numel() for p in ours.parameters()) == get_preset(name).n_params


# --- numerical equivalence -------------------------------------------------------------------------------------


@pytest.mark.shared
@pytest.mark.parametrize("name", ["tiny_vit_cls", "tiny_dinov2_reg4_ls", "tiny_swiglu_reg4_ls"])
def test_tiny_vits_reproduce_timm_outputs(encoder_refs, name):
    spec = json.loads((encoder_refs / "tiny_vit_reference.json").read_text())["models"][name]
    tensors = load_file(str(encoder_refs / "tiny_vit_reference.safetensors"))
    kwargs = {k: v for k, v in spec["kwargs"].items() if k not in ("num_classes", "act_layer", "mlp_layer")}
    if "mlp_layer" in spec["kwargs"]:
        kwargs["mlp_layer"] = "swiglu_packed"
    model = VisionTransformer(**kwargs).eval()
    prefix = f"{name}.weights."
    model.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, strict=True)
    with torch.no_grad():
        tokens = model.forward_features(tensors[f"{name}.input"])
        pooled = model(tensors[f"{name}.input"])
    assert tokens.shape == tuple(spec["tokens_shape"])
    torch.testing.assert_close(tokens, tensors[f"{name}.tokens"], atol=1e-5, rtol=0)
    torch.testing.assert_close(pooled, tensors[f"{name}.pooled"], atol=1e-5, rtol=0)


def _randomise(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return module.eval()


def _tiny_hf_models():
    transformers = pytest.importorskip("transformers")
    common = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=3, patch_size=14)
    ours = dict(patch_size=14, embed_dim=48, depth=2, num_heads=3, dynamic_img_size=True)
    return {
        "vit": (transformers.ViTModel(transformers.ViTConfig(**common, intermediate_size=192, image_size=56)),
                dict(ours, img_size=56, norm_eps=1e-12)),
        "dinov2": (transformers.Dinov2Model(transformers.Dinov2Config(**common, image_size=56)),
                   dict(ours, img_size=56, init_values=1.0, pos_embed_antialias=False)),
        "dinov2-swiglu": (transformers.Dinov2Model(transformers.Dinov2Config(**common, image_size=56,
                                                                             use_swiglu_ffn=True)),
                          dict(ours, img_size=56, init_values=1.0, mlp_layer="swiglu_packed", mlp_ratio=256 / 48,
                               pos_embed_antialias=False)),
        "dinov2-registers": (transformers.Dinov2WithRegistersModel(transformers.Dinov2WithRegistersConfig(
            **common, image_size=56, num_register_tokens=4)),
            dict(ours, img_size=56, init_values=1.0, reg_tokens=4, no_embed_class=True)),
    }


@pytest.mark.parametrize("kind", ["vit", "dinov2", "dinov2-swiglu", "dinov2-registers"])
def test_hf_layout_mapping_reproduces_transformers(tmp_path, kind):
    hf, kwargs = _tiny_hf_models()[kind]
    _randomise(hf, seed=1)
    hf.save_pretrained(tmp_path)  # writes the Hub layout (encoder.layer.N.attention.attention.query ...)
    on_disk = load_file(str(tmp_path / "model.safetensors"))
    assert any(".attention.attention.query." in k for k in on_disk)
    sizes = [56] if kind == "vit" else [56, 84]  # ViTModel takes its own size only; Dinov2 interpolates
    for label, state in (("file", on_disk), ("in-memory", hf.state_dict())):
        mapped, unmapped = hf_to_timm(state)
        assert unmapped == [], label
        ours = VisionTransformer(**kwargs).eval()
        ours.load_state_dict(mapped, strict=True)
        for px in sizes:
            x = torch.randn(2, 3, px, px, generator=torch.Generator().manual_seed(px))
            with torch.no_grad():
                want = hf(pixel_values=x).last_hidden_state
                got = ours.forward_features(x)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0, msg=f"{kind} {label} {px}px")


def test_load_encoder_maps_hf_file_and_reads_its_grid(tmp_path):
    transformers = pytest.importorskip("transformers")
    # file trained at 84 px (6x6 grid) used at 56 px: the model is built on the file's grid and interpolated
    hf = transformers.Dinov2Model(transformers.Dinov2Config(hidden_size=48, num_hidden_layers=2,
                                                            num_attention_heads=3, patch_size=14, image_size=84))
    _randomise(hf, seed=2)
    hf.save_pretrained(tmp_path)
    preset = EncoderPreset(
        name="tiny-hf", title="test", architecture="vit",
        arch_kwargs=(("img_size", 56), ("patch_size", 14), ("embed_dim", 48), ("depth", 2), ("num_heads", 3),
                     ("init_values", 1.0), ("dynamic_img_size", True), ("pos_embed_antialias", False)),
        timm_name="-", n_params=1, input_px=56, um_per_px=0.5, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
        pooling="cls+mean", feature_dim=96, licence="-", weight_file="model.safetensors", source="https://x",
        layout="hf",
    )
    enc = load_encoder(preset, tmp_path / "model.safetensors")
    assert enc.feature_dim == 96 and enc.backbone.patch_embed.grid_size == (6, 6)
    x = torch.rand(2, 3, 56, 56)
    with torch.no_grad():
        tokens = hf(pixel_values=(x - 0.5) / 0.5).last_hidden_state
        got = enc.embed(x)
    torch.testing.assert_close(got, torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], dim=-1), atol=1e-5, rtol=0)


# --- loading ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lunit_file(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    state = build_encoder("lunit-vits8").backbone.state_dict()
    path = tmp_path_factory.mktemp("weights") / "lunit.safetensors"
    save_file(state, str(path))
    return path, state


def test_lunit_safetensors_round_trip_and_encode_tiles(lunit_file, tmp_path):
    path, state = lunit_file
    enc = load_encoder("lunit-vits8", weights=path)
    assert not enc.training and enc.feature_dim == 384 and enc.preset.name == "lunit-vits8"
    assert all(torch.equal(v, state[k]) for k, v in enc.backbone.state_dict().items())
    assert enc.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest() == weights_digest(path)
    # ViT-S/8 costs ~20 GFLOP per 224 px tile: two 32 px tiles (16 patches each) keep this fast
    tiles = np.random.default_rng(0).integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8)
    mm = np.lib.format.open_memmap(tmp_path / "tiles.npy", mode="w+", dtype=np.uint8, shape=tiles.shape)
    mm[:] = tiles
    mm.flush()
    read_only = np.load(tmp_path / "tiles.npy", mmap_mode="r")
    a = encode_tiles(enc, read_only, batch_size=1, input_px=32)
    b = encode_tiles(enc, tiles, batch_size=1, input_px=32)
    assert a.shape == (2, 384) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)  # deterministic, memmap or not
    c = encode_tiles(enc, tiles, batch_size=2, input_px=32)
    np.testing.assert_allclose(a, c, atol=1e-5)
    x = torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        want = enc.backbone.forward_features((x - enc.mean) / enc.std)[:, 0]
    np.testing.assert_allclose(c, want.numpy(), atol=1e-5)
    assert encode_tiles(enc, tiles[:0], input_px=32).shape == (0, 384)


def test_torch_state_dict_in_container_loads(lunit_file, tmp_path):
    path, state = lunit_file
    wrapped = tmp_path / "ckpt.pth"
    # a DINO-style teacher checkpoint: the backbone under "backbone.", a projection head beside it
    teacher = {f"backbone.{k}": v for k, v in state.items()} | {"head.last_layer.weight": torch.zeros(4, 4)}
    torch.save({"teacher": teacher, "epoch": 100}, wrapped)
    enc = load_encoder("kaiko-vits8", weights=wrapped)  # same architecture as lunit
    assert all(torch.equal(v, state[k]) for k, v in enc.backbone.state_dict().items())
    plain = tmp_path / "plain.bin"
    torch.save({f"module.{k}": v for k, v in state.items()}, plain)
    assert load_encoder("lunit-vits8", weights=plain).feature_dim == 384


def test_resnet50_file_with_classifier_loads(tmp_path):
    torch.manual_seed(0)
    enc = build_encoder("resnet50-imagenet")
    state = dict(enc.backbone.state_dict()) | {"fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000)}
    path = tmp_path / "resnet50.pth"
    torch.save(state, path)
    loaded = load_encoder("resnet50-imagenet", path)
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        got = loaded.embed(x)
        torch.testing.assert_close(got, enc.embed(x))
    assert got.shape == (1, 2048)


@pytest.mark.shared
def test_timm_layout_lite0_matches_packaged_model(encoder_refs, tmp_path):
    packaged = load_encoder("effnet-lite0")
    assert packaged.weights_path and packaged.weights_sha256 and packaged.stages_feature_dim == 2848
    timm_state = lite0_to_timm(packaged.backbone.state_dict())
    ref = json.loads((encoder_refs / "timm_state_dicts.json").read_text())["architectures"]
    assert {k: list(v.shape) for k, v in timm_state.items()} == ref["effnet-lite0 (reference)"]["state_dict"]
    path = tmp_path / "tf_efficientnet_lite0.safetensors"
    save_file({k: v.contiguous() for k, v in timm_state.items()}, str(path))
    from_timm = load_encoder("effnet-lite0", weights=path)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(from_timm.embed(x), packaged.embed(x), atol=0, rtol=0)
        stages = from_timm.embed(x, stages=True)
        torch.testing.assert_close(stages, packaged.embed(x, stages=True), atol=0, rtol=0)
    assert stages.shape == (2, 2848)
    # tiles larger than input_px are resized (bilinear, antialiased), smaller ones too
    tiles = np.random.default_rng(1).integers(0, 256, size=(2, 80, 80, 3), dtype=np.uint8)
    feats = encode_tiles(packaged, tiles, input_px=64)
    resized = torch.nn.functional.interpolate(torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255,
                                              size=(64, 64), mode="bilinear", antialias=True)
    with torch.no_grad():
        np.testing.assert_allclose(feats, packaged.embed(resized).numpy(), atol=1e-5)
    assert encode_tiles(packaged, tiles[:, :40, :40], input_px=64, stages=True).shape == (2, 2848)
    bf = encode_tiles(packaged, tiles, input_px=64, bf16=True)
    assert bf.dtype == np.float32 and np.corrcoef(bf.ravel(), feats.ravel())[0, 1] > 0.99


# --- errors: one line, naming the file ---------------------------------------------------------------------------


def _error(*args, **kwargs) -> str:
    with pytest.raises(HevisumError) as info:
        load_encoder(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.safetensors"
    assert str(missing) in _error("uni", weights=missing)


def test_wrong_architecture(lunit_file):
    path, _ = lunit_file
    message = _error("resnet50-imagenet", weights=path)
    assert str(path) in message and "318 missing keys (conv1.weight" in message and "150 unexpected keys" in message


def test_shape_mismatch(lunit_file, tmp_path):
    _, state = lunit_file
    bad = dict(state) | {"pos_embed": torch.zeros(1, 197, 384)}
    path = tmp_path / "bad.pt"
    torch.save(bad, path)
    message = _error("lunit-vits8", weights=path)
    assert str(path) in message and "'pos_embed' has shape (1, 197, 384)" in message and "(1, 785, 384)" in message


class _NotATensor:
    pass


def test_pickle_needing_code_is_refused(tmp_path):
    path = tmp_path / "model.ckpt"
    torch.save({"model": _NotATensor()}, path)
    message = _error("uni", weights=path)
    assert str(path) in message and "plain state dict" in message and "safetensors" in message


def test_non_builtin_preset_without_weights():
    message = _error("virchow2")
    preset = get_preset("virchow2")
    assert preset.weight_file in message and preset.source in message and "--encoder-weights PATH" in message


def test_vit_has_no_stage_features():
    enc = build_encoder("kaiko-vits8")
    with pytest.raises(HevisumError, match="effnet-lite0"):
        enc.embed(torch.rand(1, 3, 32, 32), stages=True)
    with pytest.raises(HevisumError, match="multiple of the patch size"):
        encode_tiles(enc, np.zeros((1, 30, 30, 3), np.uint8), input_px=30)


# --- CLI -------------------------------------------------------------------------------------------------------------


def test_cli_lists_presets(capsys):
    from hevisum.cli import main

    assert main(["encoders"]) == 0
    out = capsys.readouterr().out
    names = {line.split()[0] for line in out.splitlines()[2:] if line.strip() and not line.startswith("Weights")}
    assert names == EXPECTED_PRESETS
    assert "cls+mean/2560" in out and "CC-BY-NC-ND-4.0" in out
    assert main(["encoders", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {d["name"] for d in data} == EXPECTED_PRESETS
    assert next(d for d in data if d["name"] == "midnight-12k")["mean"] == [0.5, 0.5, 0.5]
