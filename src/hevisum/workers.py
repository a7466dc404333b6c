"""How many processes this machine's CPU work is spread over: per-slide preprocessing and encoder features.

One setting for the whole process: :func:`set_workers` (``hevisum ... --workers N``), else the environment variable
``HEVISUM_WORKERS``, else automatic (one per CPU this process may use, at most 4). Under ``torchrun`` every rank is
already a process of its own, so it counts as 1 there.

- Preprocessing runs its per-slide steps in forked processes (automatic by default). Each slide's work depends on
  that slide alone, so the work folder is the same bytes whatever the number.
- Encoder features use a pool of spawned processes only when a number was asked for (:func:`explicit`), each
  process with its share of the CPU's threads. A tile's features depend on that tile alone; with bfloat16 they
  depend on the number of threads too (rounding), so they equal one process running with as many threads as
  each worker had.
"""

from __future__ import annotations

import os

from hevisum.errors import HevisumError

__all__ = ["cpu_count", "explicit", "resolve", "set_workers", "workers"]

AUTO_MAX = 4
_SET: list[int | None] = [None]


def cpu_count() -> int:
    """CPUs this process may run on (its affinity mask where the system has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def set_workers(n: int | None) -> None:
    """Use ``n`` processes (0 = automatic; None = back to ``HEVISUM_WORKERS`` or automatic)."""
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 0):
        raise HevisumError(f"workers must be a whole number >= 0 (0 = one per CPU, at most {AUTO_MAX}), got {n!r}")
    _SET[0] = n


def workers() -> int:
    """The number of worker processes to use now (at least 1)."""
    from hevisum import distributed

    return 1 if distributed.active() else resolve(_asked())


def explicit() -> int | None:
    """The number of processes the user asked for (``--workers`` or ``HEVISUM_WORKERS``, resolved), else None.

    Encoder features use a pool only when asked: its processes are spawned, and a spawned process imports the
    caller's main script again, which a script without an ``if __name__ == "__main__":`` guard does not survive.
    """
    from hevisum import distributed

    n = _asked()
    return None if n is None or distributed.active() else resolve(n)


def _asked() -> int | None:
    n = _SET[0]
    if n is None:
        env = os.environ.get("HEVISUM_WORKERS", "").strip()
        if env:
            try:
                n = int(env)
            except ValueError:
                raise HevisumError(f"HEVISUM_WORKERS={env!r} is not a whole number; unset it or give e.g. 2") from None
            if n < 0:
                raise HevisumError(f"HEVISUM_WORKERS={env!r} must be >= 0 (0 = one per CPU, at most {AUTO_MAX})")
    return n


def resolve(n: int | None) -> int:
    """``n`` processes, or automatic for 0/None: one per CPU, at most :data:`AUTO_MAX`."""
    return int(n) if n else max(1, min(AUTO_MAX, cpu_count()))
