"""`hevisum run` over two processes (torchrun, gloo on CPU) gives the one-process results; a failure stops all.

One module-wide set of runs on a 3-slide demo (3 folds): one process; two processes with the default fold mode
(auto: 3 folds >= 2 ranks, so the folds are spread and every fold is fitted alone on one rank); two processes with
``--dist-folds ddp`` and only the CNN (every rank in every fold, DistributedDataParallel)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from hevisum import distributed
from hevisum.demo import DemoSpec
from helpers import demo_inputs
from hevisum.errors import HevisumError
from hevisum.training import _rank_batches

BIN = Path(sys.executable).parent

CONFIG = """
seed = 3
[models]
methods = ["encoder-ridge", "hevisum-cnn"]
[encoder]
input_px = 48
[train]
epochs = 2
batch_size = 16
max_spots_per_epoch = 32
num_workers = 0
[stacking]
enabled = false
"""

# DDP averages the gradients of the ranks' halves of each batch: the same maths as one process up to summation
# order, except BatchNorm, whose batch statistics are per rank (8 rows instead of 16; SyncBatchNorm needs a GPU).
# Measured on this case: max |difference| of the CNN's out-of-fold predictions 0.0075 (values up to 0.134),
# the same in fp32 and bf16, so it is BatchNorm, not rounding.
CNN_ATOL = 0.03
# Spread folds: each fold is the one-process fold, fitted alone on one rank with the same seed. What is left is the
# CPU thread count, which changes float summation order: torchrun gives each rank OMP_NUM_THREADS=1, so the
# one-process run here has one thread too, and the CNN's predictions are then identical (measured: 0.0). Against a
# one-process run with 2 threads they differ by at most 0.00078 on this case (bf16 autocast on CPU).
SPREAD_ATOL = 1e-6


def _env(tmp: Path, name: str, **extra: str) -> dict:
    env = dict(os.environ)
    env.pop("WORLD_SIZE", None)
    env["HEVISUM_CACHE"] = str(tmp / f"cache-{name}")  # each run computes its features (no shared cache hit)
    env.update(extra)
    return env


def _run(cmd: list[str], env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("dist")
    h5, _, cfg = demo_inputs(tmp, DemoSpec(n_train=3, n_test=1, n_spots=40, n_targets=6, seed=1), CONFIG,
                             h5_name="demo.h5")
    args = [str(h5), "--config", str(cfg), "--quiet"]
    one = _run([sys.executable, "-m", "hevisum", "run", *args, "--out", str(tmp / "out1")],
               _env(tmp, "1", OMP_NUM_THREADS="1"))  # the thread count torchrun gives each rank
    assert one.returncode == 0, one.stderr[-3000:]
    two = _run([str(BIN / "torchrun"), "--nproc-per-node", "2", "--standalone", "-m", "hevisum", "run", *args,
                "--out", str(tmp / "out2")], _env(tmp, "2"))
    if two.returncode != 0 and "SIGABRT" in two.stderr:
        # Seen once in many runs, on a machine loaded far beyond its 2 cores: a rank aborted in native code
        # ("terminate called without an active exception"). Not understood yet; one more try, then fail.
        import shutil

        shutil.rmtree(tmp / "out2.partial", ignore_errors=True)
        two = _run([str(BIN / "torchrun"), "--nproc-per-node", "2", "--standalone", "-m", "hevisum", "run", *args,
                    "--out", str(tmp / "out2")], _env(tmp, "2"))
    assert two.returncode == 0, two.stderr[-3000:]
    ddp = _run([str(BIN / "torchrun"), "--nproc-per-node", "2", "--standalone", "-m", "hevisum", "run", *args,
                "--methods", "hevisum-cnn", "--dist-folds", "ddp", "--out", str(tmp / "ddp")], _env(tmp, "ddp"))
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    return {"tmp": tmp, "h5": h5, "cfg": cfg, "out1": tmp / "out1", "out2": tmp / "out2", "ddp": tmp / "ddp",
            "stderr2": two.stderr}


def _oof(out: Path, name: str) -> tuple[pd.DataFrame, np.ndarray]:
    a = pd.read_csv(out / f"oof_{name}.csv")
    return a[["slide", "ID"]], a[[c for c in a.columns if c.startswith("C")]].to_numpy()


def test_feature_methods_give_identical_predictions_on_two_processes(runs):
    o1, o2 = runs["out1"], runs["out2"]
    for f in ("oof_encoder-ridge.csv", "test_encoder-ridge.csv"):
        assert (o1 / f).read_bytes() == (o2 / f).read_bytes(), f
    sel1 = json.loads((o1 / "metrics.json").read_text())["selected"]
    sel2 = json.loads((o2 / "metrics.json").read_text())["selected"]
    assert sel1 == sel2
    if sel1 != "hevisum-cnn":
        assert (o1 / "predictions.csv").read_bytes() == (o2 / "predictions.csv").read_bytes()
    # the feature caches: rank 0 wrote them, from the two ranks' gathered shards, equal to one process's
    c1, c2 = (sorted((runs["tmp"] / f"cache-{n}" / "features").glob("encoder-*.npy")) for n in "12")
    assert c1 and [p.name for p in c1] == [p.name for p in c2]
    for p, q in zip(c1, c2):
        assert np.array_equal(np.load(p), np.load(q)), p.name


def test_a_tile_model_trained_with_ddp_matches_one_process_within_tolerance(runs):
    (ka, a), (kb, b) = _oof(runs["out1"], "hevisum-cnn"), _oof(runs["ddp"], "hevisum-cnn")
    assert ka.equals(kb)
    diff = np.abs(a - b)
    assert diff.max() <= CNN_ATOL, diff.max()
    assert diff.max() > SPREAD_ATOL  # it did train with DDP (per-rank BatchNorm), not fold by fold


def test_spread_folds_give_the_one_process_tile_model(runs):
    """With the folds spread, each CNN fold is fitted alone with the one-process seed: the same predictions (a
    fold's predictions put in another fold's rows, or a fold trained with DDP, would be far outside this)."""
    for f in ("oof", "test"):
        (ka, a), (kb, b) = (_oof(o, "hevisum-cnn") if f == "oof" else _test(o) for o in (runs["out1"], runs["out2"]))
        assert ka.equals(kb) and np.isfinite(b).all()
        assert np.abs(a - b).max() <= SPREAD_ATOL, (f, np.abs(a - b).max())
    m1 = json.loads((runs["out1"] / "metrics.json").read_text())["methods"]["hevisum-cnn"]
    m2 = json.loads((runs["out2"] / "metrics.json").read_text())["methods"]["hevisum-cnn"]
    assert m1["cv_fold_spot_spearman"] == pytest.approx(m2["cv_fold_spot_spearman"], abs=1e-6)


def _test(out: Path) -> tuple[pd.DataFrame, np.ndarray]:
    a = pd.read_csv(out / "test_hevisum-cnn.csv")
    return a[["slide", "ID"]], a[[c for c in a.columns if c.startswith("C")]].to_numpy()


def test_rank_0_writes_every_fold_model_as_one_process_does(runs):
    """The folds fitted on rank 1 reach rank 0's run folder: the same files, the same models, fitted on the same
    slides, as one process's (only the training time in the CNN's model.json and the logs' seconds differ)."""
    from hevisum.pipeline import fold_models

    o1, o2 = runs["out1"] / "models", runs["out2"] / "models"
    files = sorted(str(p.relative_to(o1)) for p in o1.rglob("*") if p.is_file())
    assert files == sorted(str(p.relative_to(o2)) for p in o2.rglob("*") if p.is_file())
    assert sum(f.endswith("loss_curve.png") for f in files) == 3  # the CNN's three folds, each with its curves
    for name in ("mean", "colour-ridge", "encoder-ridge"):  # feature heads: byte-identical fold models
        for f in (o1 / name).rglob("*"):
            if f.is_file():
                assert f.read_bytes() == (o2 / name / f.relative_to(o1 / name)).read_bytes(), f
    a, b = fold_models(runs["out1"], "hevisum-cnn"), fold_models(runs["out2"], "hevisum-cnn")
    for x, y in zip(a, b):
        assert x.train_slides == y.train_slides and x.meta["digest"] == y.meta["digest"]
        assert x.method.params["best_epoch"] == y.method.params["best_epoch"]
        assert x.method.tensors.keys() == y.method.tensors.keys()
        for k, v in x.method.tensors.items():
            assert np.allclose(v, y.method.tensors[k], rtol=0, atol=SPREAD_ATOL), k


def test_only_rank_0_writes_the_run_folder_and_one_progress_stream(runs):
    out2 = runs["out2"]
    assert (out2 / "report.html").is_file() and (out2 / ".hevisum-run.json").is_file()
    assert not out2.with_name("out2.partial").exists() and not out2.with_name("out2.lock").exists()
    assert sorted(p.name for p in runs["out1"].iterdir()) == sorted(p.name for p in out2.iterdir())


@pytest.mark.parametrize("where", ["encode", "fold"])  # sharded encoding; a fold rank 1 fits alone (spread)
def test_a_failure_on_one_rank_stops_both_with_one_error_line(runs, tmp_path, where):
    out = tmp_path / "fail"
    env = _env(tmp_path, "fail", HEVISUM_FAIL_AT=where, HEVISUM_FAIL_RANK="1")
    proc = _run([sys.executable, "-m", "hevisum", "run", str(runs["h5"]), "--config", str(runs["cfg"]), "--quiet",
                 "--out", str(out), "--nproc", "2"], env, timeout=180)  # --nproc starts torchrun
    assert proc.returncode != 0
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and f"injected failure on rank 1 at {where}" in errors[0], proc.stderr[-3000:]
    assert "exitcode: 2" in proc.stderr  # torchrun's summary: the ranks exited 2 (HevisumError)
    assert not out.exists() and not out.with_name("fail.partial").exists()


def test_folds_are_assigned_to_ranks_deterministically_and_balanced():
    assert distributed.assign_folds([5, 5, 5, 5], 2) == [0, 1, 0, 1]  # equal weights: round-robin
    assert distributed.assign_folds([9, 1, 1, 1], 2) == [0, 1, 1, 1]  # the heaviest alone, the rest together
    assert distributed.assign_folds([3, 3, 3], 4) == [0, 1, 2]
    assert distributed.assign_folds([], 3) == []


def test_fold_mode_knob(monkeypatch):
    monkeypatch.delenv("HEVISUM_DIST_FOLDS", raising=False)
    assert distributed.fold_mode() == "auto"
    monkeypatch.setenv("HEVISUM_DIST_FOLDS", "ddp")
    assert distributed.fold_mode() == "ddp"
    distributed.set_fold_mode("spread")
    try:
        assert distributed.fold_mode() == "spread"
        assert not distributed.spread_folds(8)  # one process: nothing to spread
    finally:
        distributed.set_fold_mode(None)
    monkeypatch.setenv("HEVISUM_DIST_FOLDS", "sideways")
    with pytest.raises(HevisumError, match="HEVISUM_DIST_FOLDS must be one of auto, spread, ddp"):
        distributed.fold_mode()
    with pytest.raises(HevisumError, match="fold mode must be one of"):
        distributed.set_fold_mode("both")


def test_helpers_are_inert_in_one_process():
    assert not distributed.active() and distributed.rank() == 0 and distributed.world() == 1
    assert distributed.is_main()
    x = np.arange(6.0).reshape(3, 2)
    assert distributed.all_gather_rows(x, [3]) is x
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}
    distributed.barrier()
    distributed.sync_failures()
    assert distributed.shard(100, align=32) == (0, 100)
    assert distributed.guard(lambda: 0) == 0


def test_rank_batches_split_every_global_batch_between_ranks():
    one = _rank_batches(35, 16, True, 0, 1)
    assert one == [list(range(16)), list(range(16, 32))]
    r0, r1 = _rank_batches(35, 16, True, 0, 2), _rank_batches(35, 16, True, 1, 2)
    assert len(r0) == len(r1) == 2
    for b, (x, y) in enumerate(zip(r0, r1)):
        assert sorted(x + y) == one[b] and not set(x) & set(y)
    # a final batch with fewer rows than ranks is dropped on every rank (same number of steps)
    assert len(_rank_batches(33, 16, False, 0, 2)) == len(_rank_batches(33, 16, False, 1, 2)) == 2


def test_strip_nproc():
    assert distributed.strip_nproc(["run", "x.h5", "--nproc", "2", "--out", "o"]) == ["run", "x.h5", "--out", "o"]
    assert distributed.strip_nproc(["run", "--nproc=4", "--quiet"]) == ["run", "--quiet"]
