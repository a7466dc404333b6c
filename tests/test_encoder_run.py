"""`hevisum run` with a pathology encoder preset from a local weight file (random weights of lunit-vits8)."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from hevisum.demo import DemoSpec
from helpers import cli, demo_inputs

CONFIG = """
seed = 1
[models]
methods = ["encoder-ridge"]
[encoder]
name = "lunit-vits8"
weights = "{weights}"
input_px = 32
[stacking]
enabled = false
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import torch
    from safetensors.torch import save_file

    from hevisum.encoders import build_encoder

    tmp = tmp_path_factory.mktemp("enc")
    torch.manual_seed(0)
    enc = build_encoder("lunit-vits8")
    weights = tmp / "lunit_random.safetensors"
    save_file({k: v.contiguous() for k, v in enc.backbone.state_dict().items()}, str(weights))
    h5, truth, cfg = demo_inputs(tmp, DemoSpec(n_train=3, n_test=1, n_spots=60, n_targets=8, seed=2),
                                 CONFIG.format(weights=weights), h5_name="demo.h5", cfg_name="lunit.toml")
    return {"tmp": tmp, "weights": weights, "h5": h5, "truth": truth, "cfg": cfg}


def test_a_run_with_a_local_lunit_weight_file_is_deterministic_and_describes_its_encoder(setup):
    tmp = setup["tmp"]
    outs = []
    for k in range(2):
        out = tmp / f"run{k}"
        p = cli("run", str(setup["h5"]), "--out", str(out), "--config", str(setup["cfg"]), "--truth",
                str(setup["truth"]), "--quiet", check=False)
        assert p.returncode == 0, p.stderr[-2000:]
        outs.append(out)
    m = json.loads((outs[0] / "metrics.json").read_text())
    assert m["encoder"] == "lunit-vits8" and "encoder-ridge" in m["methods"]
    # the fold model describes the encoder and the weight file it was fitted on, without the run folder
    meta = json.loads(next((outs[0] / "models" / "encoder-ridge").glob("fold_*/model.json")).read_text())
    assert meta["config"]["encoder"]["name"] == "lunit-vits8"
    assert meta["config"]["encoder"]["weights"] == str(setup["weights"])
    # same seed, same weights: byte-identical predictions
    a, b = ((o / "predictions.csv").read_bytes() for o in outs)
    assert a == b
    # the second run read the encoder features from the shared cache instead of computing them
    assert "lunit-vits8 features" not in cli("run", str(setup["h5"]), "--out", str(tmp / "run2"), "--config",
                                             str(setup["cfg"]), check=False).stderr


@pytest.mark.parametrize("case", ["missing", "other-architecture", "pickle"])
def test_a_bad_weight_file_is_one_line_naming_the_file_and_exit_2(setup, case, tmp_path):
    import torch

    if case == "missing":
        bad = tmp_path / "nowhere.safetensors"
    elif case == "other-architecture":
        from safetensors.torch import save_file

        bad = tmp_path / "resnet.safetensors"
        save_file({"conv1.weight": torch.zeros(64, 3, 7, 7)}, str(bad))
    else:
        bad = tmp_path / "code.pt"
        torch.save({"model": pd.DataFrame({"a": [1]})}, bad)  # a pickle that needs code to load
    out = tmp_path / "out"
    p = cli("run", str(setup["h5"]), "--out", str(out), "--methods", "encoder-ridge", "--encoder", "lunit-vits8",
            "--encoder-weights", str(bad), check=False)
    assert p.returncode == 2, p.stderr[-2000:]
    lines = p.stderr.strip().splitlines()
    assert lines[-1].startswith("error:") and bad.name in lines[-1] and "Traceback" not in p.stderr
    assert not out.exists()


def test_a_preset_without_weights_says_which_file_to_download(setup, tmp_path):
    p = cli("run", str(setup["h5"]), "--out", str(tmp_path / "o"), "--methods", "encoder-ridge", "--encoder", "uni", check=False)
    assert p.returncode == 2
    assert "--encoder-weights" in p.stderr and "Traceback" not in p.stderr
