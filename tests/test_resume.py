"""Determinism and resume: the same seed gives byte-identical predictions, and a run killed with SIGKILL in the
middle of training, continued with --resume, gives the same predictions as a run that was never interrupted."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from hevisum.demo import DemoSpec, write_demo

CONFIG = """
profile = "reference"
seed = 4
[models]
methods = ["hevisum-cnn", "encoder-ridge"]
[train]
epochs = 3
batch_size = 16
max_spots_per_epoch = 32
num_workers = 0
"""


def _cmd(h5, out, cfg, *extra):
    return [sys.executable, "-m", "hevisum.cli", "run", str(h5), "--out", str(out), "--config", str(cfg),
            "--quiet", *extra]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    h5, _ = write_demo(tmp / "d.h5", DemoSpec(n_train=3, n_test=1, n_spots=40, n_targets=8, seed=8), progress=False)
    cfg = tmp / "ref.toml"
    cfg.write_text(CONFIG)
    return tmp, h5, cfg


def test_the_reference_profile_is_byte_identical_for_a_seed_and_a_killed_run_resumes_to_the_same(data):
    """Two processes, same seed: one uninterrupted, one killed and resumed; every prediction file identical."""
    tmp, h5, cfg = data
    whole = tmp / "whole"
    p = subprocess.run(_cmd(h5, whole, cfg), capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    outs = [whole]
    a = (whole / "predictions.csv").read_bytes()

    # Kill a second run of the same command with SIGKILL once the reference CNN has checkpointed an epoch of its
    # second fold, then resume it: byte-identical to the first run (which also shows that the seed determines
    # every byte: the two are separate processes).
    out = tmp / "killed"
    partial = tmp / "killed.partial"
    proc = subprocess.Popen(_cmd(h5, out, cfg), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    killed = False
    while time.time() < deadline and proc.poll() is None:
        folds_done = list((partial / "models" / "hevisum-cnn").glob("fold_*/model.json"))
        ckpts = list((partial / "models" / "hevisum-cnn").glob(".fold_*.ckpt"))
        if len(folds_done) >= 1 and ckpts:
            os.kill(proc.pid, signal.SIGKILL)
            killed = True
            break
        time.sleep(0.05)
    proc.wait()
    assert killed, "the run finished before it could be interrupted"
    assert not out.exists() and partial.is_dir()
    p = subprocess.run(_cmd(h5, out, cfg, "--resume"), capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    assert not partial.exists()
    assert (out / "predictions.csv").read_bytes() == a
    assert (out / "test_hevisum-cnn.csv").read_bytes() == (outs[0] / "test_hevisum-cnn.csv").read_bytes()
    assert (out / "test_encoder-ridge.csv").read_bytes() == (outs[0] / "test_encoder-ridge.csv").read_bytes()
