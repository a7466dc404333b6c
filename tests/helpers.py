"""Small helpers shared by the tests that run the command line on generated demo data."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from hevisum.demo import DemoSpec, write_demo


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """``python -m hevisum.cli ARGS`` in a fresh process; with ``check``, a non-zero exit fails the test with the
    end of its stderr."""
    proc = subprocess.run([sys.executable, "-m", "hevisum.cli", *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"hevisum {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def demo_inputs(tmp: Path, spec: DemoSpec, config: str, h5_name: str = "tiny.h5",
                cfg_name: str = "tiny.toml") -> tuple[Path, Path, Path]:
    """A demo dataset and a config file in ``tmp``: ``(h5, truth CSV, config)``."""
    h5, truth = write_demo(tmp / h5_name, spec, progress=False)
    cfg = tmp / cfg_name
    cfg.write_text(config)
    return h5, truth, cfg
