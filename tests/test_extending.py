"""docs/extending.md works as printed: its method and its encoder register, run and round-trip."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "extending.md"


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def _run_file(code: str, name: str) -> dict:
    ns: dict = {"__name__": name}
    exec(compile(code, f"docs/extending.md:{name}", "exec"), ns)
    return ns


@pytest.fixture()
def knn_method():
    from hevisum.methods import base

    code = next(b for b in _blocks() if "register_method" in b)
    ns = _run_file(code, "hevisum.methods.knn")
    yield ns["EncoderKNN"]
    base._REGISTRY.pop("encoder-knn", None)


@pytest.fixture()
def vitb16_preset():
    from hevisum.encoders import registry

    code = next(b for b in _blocks() if "register_encoder(EncoderPreset" in b)
    _run_file(code, "hevisum.encoders.my_vitb16")
    yield registry.get_preset("my-vitb16")
    registry._REGISTRY.pop("my-vitb16", None)


def test_the_documented_method_registers_cross_validates_and_reloads(knn_method, tmp_path, capsys):
    import pandas as pd

    from hevisum.cli import main
    from hevisum.config import RunConfig
    from hevisum.cv import cross_validate_method, make_folds
    from hevisum.methods import FitContext, get_method, load_model

    assert get_method("encoder-knn") is knn_method
    assert main(["methods"]) == 0 and "encoder-knn" in capsys.readouterr().out
    rng = np.random.default_rng(0)
    spots = pd.DataFrame({"slide": np.repeat(["A", "B", "C"], 40), "split": "train", "x": 0.0, "y": 0.0})
    latent = rng.normal(size=(120, 4))
    X = np.concatenate([latent, rng.normal(size=(120, 8))], axis=1).astype(np.float32)
    Y = (latent @ rng.normal(size=(4, 6))).astype(np.float32)
    cfg = RunConfig()
    folds = make_folds(spots)
    res = cross_validate_method("encoder-knn", folds, Y, cfg, FitContext(cfg=cfg, Y_fit=Y, Y_raw=Y), features=X,
                                fold_dir=lambda h: tmp_path / h, target_names=list("abcdef"))
    from hevisum.metrics import mean_spot_spearman

    assert mean_spot_spearman(res.oof, Y[folds.train_rows]) > 0.5  # it learns the latent signal
    saved = load_model(tmp_path / "A")
    assert saved.meta["method"] == "encoder-knn" and saved.train_slides == ["B", "C"]
    rows = folds.train_rows[folds.slides == "A"]
    np.testing.assert_allclose(saved.method.predict(X[rows], rows=rows, ctx=None), res.oof[folds.slides == "A"],
                               rtol=1e-6)


def test_the_documented_encoder_registers_and_loads_a_weight_file_strictly(vitb16_preset, tmp_path, capsys):
    import torch
    from safetensors.torch import save_file

    from hevisum.cli import main
    from hevisum.encoders import build_encoder, encode_tiles, load_encoder

    assert main(["encoders"]) == 0 and "my-vitb16" in capsys.readouterr().out
    torch.manual_seed(0)
    enc = build_encoder("my-vitb16")
    n = sum(p.numel() for p in enc.backbone.parameters())
    assert n == vitb16_preset.n_params
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in enc.backbone.state_dict().items()}, str(path))
    loaded = load_encoder("my-vitb16", weights=path)
    tiles = np.random.default_rng(0).integers(0, 255, (2, 32, 32, 3), dtype=np.uint8)
    a = encode_tiles(loaded, tiles, input_px=32)
    b = encode_tiles(enc, tiles, input_px=32)
    assert a.shape == (2, 768)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
