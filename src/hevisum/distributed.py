"""Running one `hevisum run` over several processes (and machines) with ``torch.distributed``.

Started by ``torchrun`` (``torchrun --nproc-per-node N -m hevisum run ...``) or by ``hevisum run --nproc N``, which
starts torchrun itself. Every process (rank) runs the same pipeline; what is shared:

- feature extraction: rank r encodes a contiguous shard of the tiles and the features are gathered, so every rank
  holds the same full array (:meth:`hevisum.features.FeatureStore._encode`);
- cross-validation folds (:func:`spread_folds`): with at least as many folds as ranks (``fold_mode()`` "auto", the
  default) the folds are spread over the ranks; each rank fits its folds alone, as one process would (no DDP,
  inside :func:`local`), and the out-of-fold and test predictions and the fitted fold models are gathered, so
  every fold is the one-process fold and rank 0 writes every fold model (:func:`hevisum.cv.cross_validate_method`);
- with fewer folds than ranks (or ``fold_mode()`` "ddp") every rank takes part in every fold: tile models train
  with DistributedDataParallel, each rank taking a disjoint share of every batch of the same seeded global order
  and the gradients averaged (:func:`hevisum.training.train_tile_model`); the cheap ridge/MLP folds are computed
  by every rank identically.

Only rank 0 writes the run folder (:func:`run_folder`); the other ranks work in a scratch folder that is removed
at the end. A failure on one rank is agreed on at every collective call (:func:`sync_failures`): every rank stops,
rank 0 prints one ``error:`` line, and every rank exits with the failing rank's code (2 for a
:class:`~hevisum.errors.HevisumError`, else 1). Without ``torchrun`` (WORLD_SIZE unset or 1) every function here is
a no-op returning the single-process answer.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Iterator

import numpy as np

from hevisum.errors import HevisumError


class PeerFailed(HevisumError):
    """Another rank failed: this rank stops too, silently (rank 0 prints the failing rank's message)."""

    def __init__(self, message: str, exit_code: int, failed_rank: int):
        super().__init__(message)
        self.exit_code = exit_code
        self.failed_rank = failed_rank


def env_world() -> int:
    """WORLD_SIZE as set by torchrun (1 when not started by it)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def _dist():
    import torch.distributed as dist

    return dist


_LOCAL = [0]  # > 0 inside local(): this rank works alone


def active() -> bool:
    """True inside a process group of more than one rank (and not within :func:`local`)."""
    if env_world() <= 1 or _LOCAL[0]:
        return False
    dist = _dist()
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@contextlib.contextmanager
def local() -> Iterator[None]:
    """Within: this rank computes alone, as one process would (no collective calls), e.g. rank 0's report;
    rank() is 0 and world() is 1 within."""
    _LOCAL[0] += 1
    try:
        yield
    finally:
        _LOCAL[0] -= 1


def rank() -> int:
    return _dist().get_rank() if active() else 0


def world() -> int:
    return _dist().get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def init_from_env(device: str = "cpu") -> bool:
    """Join the process group described by torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
    MASTER_PORT): gloo on CPU, nccl on CUDA (the rank's GPU is LOCAL_RANK). False (and nothing done) when the
    process was not started with more than one rank. ``HEVISUM_DIST_TIMEOUT_S`` bounds how long a collective
    waits for a rank that is stuck (default 1800 s)."""
    if env_world() <= 1:
        return False
    dist = _dist()
    if dist.is_initialized():
        return True
    import torch

    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = str(device).startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:
        if not torch.cuda.is_available():
            raise HevisumError(f"device {device!r} asked for but torch sees no CUDA GPU; use --device cpu or auto")
        torch.cuda.set_device(local % max(1, torch.cuda.device_count()))
    timeout = datetime.timedelta(seconds=float(os.environ.get("HEVISUM_DIST_TIMEOUT_S", "1800")))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
    return True


def rank_device(device: str) -> str:
    """The device of this rank: ``cuda`` becomes ``cuda:LOCAL_RANK`` when distributed."""
    if active() and device == "cuda":
        import torch

        return f"cuda:{torch.cuda.current_device()}"
    return device


def shutdown() -> None:
    if env_world() > 1:
        dist = _dist()
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def _tensor_device():
    import torch

    return torch.device("cuda", torch.cuda.current_device()) if _dist().get_backend() == "nccl" else "cpu"


def _exchange_failure(exc: BaseException | None) -> PeerFailed | None:
    """All ranks: say whether this rank failed; None when none did, else the lowest failing rank's error."""
    import torch

    dist = _dist()
    flag = torch.tensor([1 if exc is not None else 0], dtype=torch.int64, device=_tensor_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if not int(flag.item()):
        return None
    mine = None
    if exc is not None:
        if isinstance(exc, PeerFailed):
            mine = (str(exc), exc.exit_code, exc.failed_rank)
        elif isinstance(exc, HevisumError):
            mine = (str(exc), int(getattr(exc, "exit_code", 2)), rank())
        else:
            mine = (f"rank {rank()}: {type(exc).__name__}: {exc}", 1, rank())
    got: list = [None] * world()
    dist.all_gather_object(got, mine)
    msg, code, who = min((g for g in got if g is not None), key=lambda g: g[2])
    return PeerFailed(msg, code, who)


def sync_failures() -> None:
    """A stage boundary: raise :class:`PeerFailed` on every rank when any rank has failed. Called by every
    collective of this module, so a rank that fails and calls :func:`guard`'s handler meets the others here."""
    if active():
        failed = _exchange_failure(None)
        if failed is not None:
            raise failed


def barrier() -> None:
    if active():
        sync_failures()
        _dist().barrier()


def broadcast_object(obj, src: int = 0):
    """``obj`` of rank ``src`` on every rank."""
    if not active():
        return obj
    sync_failures()
    box = [obj]
    _dist().broadcast_object_list(box, src=src)
    return box[0]


#: how cross-validation folds use the ranks: auto (spread when there are at least as many folds as ranks), spread
#: (always spread, some ranks idle when there are fewer folds), ddp (every rank in every fold, as before)
FOLD_MODES = ("auto", "spread", "ddp")
_FOLD_MODE: list[str | None] = [None]  # set by ``hevisum run --dist-folds``; else HEVISUM_DIST_FOLDS; else auto


def set_fold_mode(mode: str | None) -> None:
    """Choose how folds use the ranks (one of :data:`FOLD_MODES`; None: back to ``HEVISUM_DIST_FOLDS`` or auto)."""
    if mode is not None and mode not in FOLD_MODES:
        raise HevisumError(f"fold mode must be one of {', '.join(FOLD_MODES)}, got {mode!r}")
    _FOLD_MODE[0] = mode


def fold_mode() -> str:
    """The fold mode: :func:`set_fold_mode`'s, else the environment's ``HEVISUM_DIST_FOLDS``, else ``auto``."""
    if _FOLD_MODE[0] is not None:
        return _FOLD_MODE[0]
    mode = os.environ.get("HEVISUM_DIST_FOLDS", "").strip().lower() or "auto"
    if mode not in FOLD_MODES:
        raise HevisumError(f"HEVISUM_DIST_FOLDS must be one of {', '.join(FOLD_MODES)}, got "
                           f"{os.environ['HEVISUM_DIST_FOLDS']!r}")
    return mode


def spread_folds(n_folds: int) -> bool:
    """True when ``n_folds`` cross-validation folds are spread over the ranks (each fold fitted by one rank alone):
    distributed, and ``fold_mode()`` is spread, or auto with at least as many folds as ranks. Every rank gives the
    same answer (same world size, folds and mode)."""
    if not active() or n_folds < 1:
        return False
    mode = fold_mode()
    return mode == "spread" or (mode == "auto" and n_folds >= world())


def assign_folds(weights: list[float], n_ranks: int) -> list[int]:
    """The rank that fits each fold: the heaviest fold first, each to the least loaded rank so far (the lowest rank
    on ties). Deterministic; with equal weights it is round-robin over the fold index."""
    load = [0.0] * max(1, int(n_ranks))
    owner = [0] * len(weights)
    for k in sorted(range(len(weights)), key=lambda i: (-float(weights[i]), i)):
        r = min(range(len(load)), key=lambda j: (load[j], j))
        owner[k] = r
        load[r] += float(weights[k])
    return owner


def shard(n: int, align: int = 1) -> tuple[int, int]:
    """This rank's contiguous share [lo, hi) of ``n`` rows; boundaries on multiples of ``align`` (so batches of
    that size are the same as in one process)."""
    w, r = world(), rank()
    blocks = -(-n // max(1, align))
    b_lo, b_hi = (blocks * r) // w, (blocks * (r + 1)) // w
    return min(n, b_lo * align), min(n, b_hi * align)


def all_gather_rows(array: np.ndarray, rows_per_rank: list[int] | None = None) -> np.ndarray:
    """Concatenate, in rank order, every rank's ``array`` (rows along axis 0; the other dimensions and the dtype
    the same on every rank). ``rows_per_rank``: the row count of each rank, when known (else exchanged)."""
    if not active():
        return array
    import torch

    sync_failures()
    dist = _dist()
    array = np.ascontiguousarray(array)
    if rows_per_rank is None:
        rows_per_rank = [int(n) for n in all_gather_object(int(array.shape[0]))]
    rows_per_rank = [int(n) for n in rows_per_rank]
    if len(rows_per_rank) != world() or rows_per_rank[rank()] != array.shape[0]:
        raise ValueError(f"rows_per_rank {rows_per_rank} does not match this rank's {array.shape[0]} rows")
    top = max(rows_per_rank) if rows_per_rank else 0
    dev = _tensor_device()
    pad = np.zeros((top, *array.shape[1:]), dtype=array.dtype)
    pad[:array.shape[0]] = array
    mine = torch.from_numpy(pad).to(dev)
    parts = [torch.empty_like(mine) for _ in range(world())]
    dist.all_gather(parts, mine)
    return np.concatenate([p[:n].cpu().numpy() for p, n in zip(parts, rows_per_rank)], axis=0)


def all_gather_object(obj) -> list:
    if not active():
        return [obj]
    sync_failures()
    got: list = [None] * world()
    _dist().all_gather_object(got, obj)
    return got


@contextlib.contextmanager
def run_folder(path, **kwargs) -> Iterator[Path]:
    """:func:`hevisum.io.atomic.atomic_dir` on rank 0 (checks, lock, ``OUT.partial``, install), a scratch folder
    removed at the end on the other ranks. The ranks agree before the work starts (rank 0 has the lock) and
    before rank 0 installs the folder (no rank failed)."""
    from hevisum.io.atomic import atomic_dir

    if not active():
        with atomic_dir(path, **kwargs) as tmp:
            yield tmp
        return
    if kwargs.get("resume"):
        raise HevisumError("--resume is not supported with several processes; resume with one process, or start "
                           "afresh without --resume")
    if is_main():
        with atomic_dir(path, **kwargs) as tmp:
            barrier()
            yield tmp
            sync_failures()  # a failure on another rank: no finished folder is installed
    else:
        barrier()
        with tempfile.TemporaryDirectory(prefix=f"hevisum-rank{rank()}-") as scratch:
            yield Path(scratch)
            sync_failures()


def guard(func) -> int:
    """Run ``func`` on this rank; its exit code. Every rank agrees on failure: rank 0 prints one ``error:`` line
    (the lowest failing rank's message) and every rank returns that rank's code. A non-HevisumError also prints
    its traceback on the rank where it happened. The process group is closed at the end."""
    try:
        try:
            code = int(func() or 0)
            failed = _exchange_failure(None) if active() else None
        except PeerFailed as e:
            failed = e
        except Exception as e:  # noqa: BLE001 - every rank must learn of it, then it is reported once
            if not active():
                raise
            if not isinstance(e, HevisumError):
                traceback.print_exc(file=sys.stderr)
            failed = _exchange_failure(e)
        if failed is None:
            return code
        if is_main():
            print(f"error: {failed}", file=sys.stderr, flush=True)
        return failed.exit_code
    finally:
        shutdown()


def fault_point(where: str) -> None:
    """Test hook: raise on rank ``HEVISUM_FAIL_RANK`` at ``HEVISUM_FAIL_AT`` (a place name), to check that one
    rank's failure stops every rank. Inert unless both variables are set."""
    if os.environ.get("HEVISUM_FAIL_AT") == where and os.environ.get("HEVISUM_FAIL_RANK") == str(rank()):
        raise HevisumError(f"injected failure on rank {rank()} at {where} (HEVISUM_FAIL_AT)")


def launch(nproc: int, argv: list[str]) -> int:
    """``hevisum run --nproc N ...``: start torchrun with ``N`` processes on this machine running
    ``python -m hevisum ARGV`` (``argv`` without ``--nproc``); its exit code."""
    import subprocess

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(int(nproc)), "--standalone",
           "-m", "hevisum", *argv]
    return subprocess.run(cmd).returncode


def strip_nproc(argv: list[str]) -> list[str]:
    """``argv`` without ``--nproc N`` / ``--nproc=N``."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out
