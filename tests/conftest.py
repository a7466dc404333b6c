"""Shared fixtures: the real data under ../shared/data (skipped when absent) and small generated slides."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO / ".." / "shared" / "data").resolve()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path to ../shared/data; skips the test with a clear message when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (place the shared/ folder beside the repository)")
    return SHARED_DATA


@pytest.fixture(autouse=True, scope="session")
def _private_feature_cache(tmp_path_factory):
    """Tests (and the CLI processes they start) share encoder features in a temporary cache, never the user's."""
    import os

    old = os.environ.get("HEVISUM_CACHE")
    os.environ["HEVISUM_CACHE"] = str(tmp_path_factory.mktemp("hevisum-cache"))
    yield
    if old is None:
        os.environ.pop("HEVISUM_CACHE", None)
    else:
        os.environ["HEVISUM_CACHE"] = old
