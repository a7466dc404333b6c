"""`hevisum run` over two processes (torchrun, gloo on CPU) gives the one-process results; a failure stops all."""

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
from hevisum.demo import DemoSpec, write_demo
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
    h5, _ = write_demo(tmp / "demo.h5", DemoSpec(n_train=3, n_test=1, n_spots=40, n_targets=6, seed=1),
                       progress=False)
    cfg = tmp / "tiny.toml"
    cfg.write_text(CONFIG)
    args = [str(h5), "--config", str(cfg), "--quiet"]
    one = _run([sys.executable, "-m", "hevisum", "run", *args, "--out", str(tmp / "out1")], _env(tmp, "1"))
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
    return {"tmp": tmp, "h5": h5, "cfg": cfg, "out1": tmp / "out1", "out2": tmp / "out2", "stderr2": two.stderr}


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
    a = pd.read_csv(runs["out1"] / "oof_hevisum-cnn.csv")
    b = pd.read_csv(runs["out2"] / "oof_hevisum-cnn.csv")
    cols = [c for c in a.columns if c.startswith("C")]
    assert a[["slide", "ID"]].equals(b[["slide", "ID"]])
    diff = np.abs(a[cols].to_numpy() - b[cols].to_numpy())
    assert diff.max() <= CNN_ATOL, diff.max()


def test_only_rank_0_writes_the_run_folder_and_one_progress_stream(runs):
    out2 = runs["out2"]
    assert (out2 / "report.html").is_file() and (out2 / ".hevisum-run.json").is_file()
    assert not out2.with_name("out2.partial").exists() and not out2.with_name("out2.lock").exists()
    assert sorted(p.name for p in runs["out1"].iterdir()) == sorted(p.name for p in out2.iterdir())


def test_a_failure_on_one_rank_stops_both_with_one_error_line(runs, tmp_path):
    out = tmp_path / "fail"
    env = _env(tmp_path, "fail", HEVISUM_FAIL_AT="encode", HEVISUM_FAIL_RANK="1")
    proc = _run([sys.executable, "-m", "hevisum", "run", str(runs["h5"]), "--config", str(runs["cfg"]), "--quiet",
                 "--out", str(out), "--nproc", "2"], env, timeout=180)  # --nproc starts torchrun
    assert proc.returncode != 0
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "injected failure on rank 1 at encode" in errors[0], proc.stderr[-3000:]
    assert "exitcode: 2" in proc.stderr  # torchrun's summary: the ranks exited 2 (HevisumError)
    assert not out.exists() and not out.with_name("fail.partial").exists()


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
