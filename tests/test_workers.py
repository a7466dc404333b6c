"""Process pools: the work of many slides and tiles spread over processes, with the same results as one."""

from __future__ import annotations

import numpy as np
import pytest

from hevisum import workers
from hevisum.config import RunConfig
from hevisum.errors import HevisumError


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from hevisum.demo import DemoSpec, make_demo_slides
    from hevisum.preprocess.pipeline import preprocess

    slides = make_demo_slides(DemoSpec(seed=1, n_train=3, n_test=1, n_spots=70, n_targets=6))
    return preprocess(slides, RunConfig().preprocess_config(), tmp_path_factory.mktemp("w") / "prep",
                      progress=False, workers=2)


def test_encoder_features_from_a_pool_of_processes_equal_one_process(prepared, monkeypatch):
    """Two spawned processes encode the two halves of the tile cache (cut on batch boundaries); the rows come back
    in order and equal, bit for bit, the features of one process with as many threads as each worker had."""
    import torch

    from hevisum import features
    from hevisum.features import FeatureStore

    monkeypatch.setattr(features, "POOL_MIN_TILES", 64)  # the demo cache is small; the rule is what is tested
    cfg = RunConfig()
    tiles = prepared.tiles
    assert features.pool_size(2, len(tiles), "cpu", tiles) == 2
    assert features.pool_size(2, len(tiles), "cuda", tiles) == 1  # a GPU is one process's
    assert features.pool_size(2, len(tiles), "cpu", np.asarray(tiles)) == 1  # an array in memory has no path
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(max(1, workers.cpu_count() // 2))
        one = FeatureStore.for_prep(prepared, cfg, workers=1)._encode(tiles, "stages")
    finally:
        torch.set_num_threads(threads)
    two = FeatureStore.for_prep(prepared, cfg, workers=2)._encode(tiles, "stages")
    assert one.shape == two.shape == (len(tiles), 2848)
    np.testing.assert_array_equal(two, one)
    # the second half really is the second half (a swapped or repeated shard would fail here)
    half = (-(-len(tiles) // 32) // 2) * 32
    assert np.abs(two[half:] - one[:len(tiles) - half]).max() > 1e-2


def test_the_workers_setting(monkeypatch):
    monkeypatch.delenv("HEVISUM_WORKERS", raising=False)
    try:
        assert workers.explicit() is None  # features in a pool only when asked
        workers.set_workers(3)
        assert workers.workers() == 3 and workers.explicit() == 3
        workers.set_workers(0)
        assert 1 <= workers.workers() <= workers.AUTO_MAX
        workers.set_workers(None)
        monkeypatch.setenv("HEVISUM_WORKERS", "2")
        assert workers.workers() == 2
        monkeypatch.setenv("HEVISUM_WORKERS", "two")
        with pytest.raises(HevisumError, match="HEVISUM_WORKERS='two'"):
            workers.workers()
        with pytest.raises(HevisumError, match="whole number >= 0"):
            workers.set_workers(-1)
    finally:
        workers.set_workers(None)
