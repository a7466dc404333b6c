"""Training one fold of a tile model: a loop you can read top to bottom.

AdamW with cosine decay, the configured loss, early stopping on validation per-spot Spearman,
the best weights kept, a per-epoch log. Deterministic for a seed on CPU: shuffling and augmentation
draw from explicit generators, in the main process, whatever the number of loader workers.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from hevisum.config import TrainConfig
from hevisum.metrics import mean_spot_spearman


def lr_at(step: int, total_steps: int, lr: float, min_lr: float) -> float:
    """Cosine decay from ``lr`` at step 0 to ``min_lr`` at ``total_steps``."""
    if total_steps <= 1:
        return lr
    t = min(max(step / (total_steps - 1), 0.0), 1.0)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * t))


def resolve_device(device: str = "auto") -> str:
    """'auto' -> 'cuda' when available, else 'cpu'."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        from hevisum.errors import HevisumError

        raise HevisumError(f"device {device!r} asked for but torch sees no CUDA GPU; use --device cpu or auto")
    return device


def autocast_dtype(precision: str, device: str):
    """The autocast dtype for a precision setting, or None for float32.

    auto: bfloat16 on CPU (about 1.9x faster for the reference CNN on a 2-core CPU), bfloat16 on GPUs
    that support it, else float16.
    """
    import torch

    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16


def inner_validation(n: int, seed: int, frac: float = 0.15) -> np.ndarray:
    """Boolean mask of the rows held back for early stopping inside a fold (never the held-out slide)."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(n, dtype=bool)
    mask[rng.choice(n, size=max(1, int(round(frac * n))), replace=False)] = True
    return mask


def scale_rank_targets(ranks: np.ndarray) -> np.ndarray:
    """Per-spot ranks 1..T -> 0..1, so losses are comparable whatever the number of targets."""
    t = ranks.shape[1]
    return ((ranks - 1.0) / max(t - 1, 1)).astype(np.float32)


class TileDataset:
    """Tiles (a memory-mapped uint8 array) and training targets, indexed by row of the tile cache."""

    def __init__(self, tiles: np.ndarray, rows: np.ndarray, targets: np.ndarray | None = None):
        self.tiles, self.rows, self.targets = tiles, np.asarray(rows), targets

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        import torch

        r = int(self.rows[i])
        tile = self.tiles[r]
        # A memory-mapped cache is read-only; torch wants a writeable buffer, so copy the (small) tile.
        item = [torch.from_numpy(np.array(tile, copy=True))]
        item.append(torch.from_numpy(self.targets[r]) if self.targets is not None else torch.zeros(0))
        return tuple(item)


def augment_batch(x, gen):
    """Random flips and 90-degree rotations of an NHWC uint8 batch (the dihedral group of the square)."""
    import torch

    k = int(torch.randint(0, 4, (1,), generator=gen))
    flip = bool(torch.randint(0, 2, (1,), generator=gen))
    if flip:
        x = torch.flip(x, dims=[2])
    return torch.rot90(x, k, dims=[1, 2])


def dihedral_views(x):
    """The 8 flips/rotations of an NHWC batch, for test-time augmentation."""
    import torch

    views = []
    for flip in (False, True):
        y = torch.flip(x, dims=[2]) if flip else x
        for k in range(4):
            views.append(torch.rot90(y, k, dims=[1, 2]))
    return views


def _forward(model, xb, normalise, dtype=None):
    import torch

    # channels-last is the fast layout for convolutions on CPUs (oneDNN) and on tensor-core GPUs.
    x = normalise(xb).contiguous(memory_format=torch.channels_last)
    if dtype is not None:
        x = x.to(dtype)
    return model(x)


def inference_copy(model, dtype=None):
    """An eval-mode copy of ``model`` for prediction only: every BatchNorm2d that directly follows a Conv2d in a
    ``nn.Sequential`` is folded into the convolution (one pass over the activations less, same outputs up to
    rounding), then the weights are cast to ``dtype`` when given. The model itself is left untouched."""
    from torch import nn
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    m = copy.deepcopy(model).eval()
    for seq in [mod for mod in m.modules() if isinstance(mod, nn.Sequential)]:
        for i in range(len(seq) - 1):
            if isinstance(seq[i], nn.Conv2d) and isinstance(seq[i + 1], nn.BatchNorm2d):
                seq[i], seq[i + 1] = fuse_conv_bn_eval(seq[i], seq[i + 1]), nn.Identity()
    return m.to(dtype) if dtype is not None else m


def predict_tiles(model, tiles: np.ndarray, rows: np.ndarray, *, batch_size: int = 64, device: str = "cpu",
                  precision: str = "auto", tta: bool = False,
                  num_workers: int = 0, progress: bool = False, desc: str = "predict") -> np.ndarray:
    """Predictions (n_rows, n_outputs) float32 of a tile model, in the order of ``rows``."""
    import torch
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from hevisum.models import normalise_uint8

    dtype = autocast_dtype(precision, device)
    model = model.to(device).eval().to(memory_format=torch.channels_last)
    weight_dtype = None
    if dtype is not None and device == "cpu":
        # On a CPU, a bfloat16 copy of the weights is much faster than autocasting every call
        # (autocast re-casts the float32 weights on each forward).
        model, weight_dtype = inference_copy(model, dtype), dtype
    loader = DataLoader(TileDataset(tiles, rows, None), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers)
    out = []
    with torch.inference_mode():
        for xb, _ in tqdm(loader, desc=desc, disable=not progress, leave=False):
            xb = xb.to(device)
            views = dihedral_views(xb) if tta else [xb]
            acc = None
            for v in views:
                with torch.autocast(device_type=device.split(":")[0], dtype=dtype,
                                    enabled=dtype is not None and weight_dtype is None):
                    p = _forward(model, v, normalise_uint8, weight_dtype).float()
                acc = p if acc is None else acc + p
            out.append((acc / len(views)).cpu().numpy())
    n_out = getattr(model, "n_outputs", None)
    return np.concatenate(out, axis=0) if out else np.zeros((0, n_out or 0), np.float32)


@dataclass
class FoldResult:
    """What training one fold produced: the best weights, when, and the per-epoch log."""

    state_dict: dict
    best_epoch: int
    best_score: float
    log: pd.DataFrame
    seconds: float


def train_tile_model(model, tiles: np.ndarray, train_rows: np.ndarray, val_rows: np.ndarray,
                     fit_targets: np.ndarray, val_truth: np.ndarray, cfg: TrainConfig, *, seed: int = 0,
                     device: str = "cpu", progress: bool = False,
                     desc: str = "train", checkpoint: Path | None = None) -> FoldResult:
    """Train ``model`` on ``tiles[train_rows]`` against ``fit_targets[train_rows]``.

    ``val_truth`` (n_val, T) are the raw validation targets: early stopping watches the competition
    metric (mean per-spot Spearman) on them, and the weights of the best epoch are returned.

    ``checkpoint``: after every epoch the whole training state (weights, optimizer, best weights so far, the
    random generators, the log) is written there; when the file exists at the start, training continues from it,
    and the result is the same as an uninterrupted run's. The caller removes it once the fold model is saved.
    """
    import torch
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from hevisum.losses import make_loss
    from hevisum.models import normalise_uint8

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = model.to(device).to(memory_format=torch.channels_last)
    from hevisum import distributed

    net = model  # what the batches go through: under torchrun, the model wrapped for gradient averaging
    if distributed.active():
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[torch.device(device).index] if device.startswith("cuda")
                                      else None)
    loss_fn = make_loss(cfg.loss)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    dtype = autocast_dtype(cfg.precision, device)
    scaler = torch.amp.GradScaler("cuda") if (dtype == torch.float16 and device.startswith("cuda")) else None
    n_per_epoch = len(train_rows) if cfg.max_spots_per_epoch <= 0 else min(cfg.max_spots_per_epoch, len(train_rows))
    steps_per_epoch = max(1, math.ceil(n_per_epoch / cfg.batch_size))
    total = steps_per_epoch * cfg.epochs
    best = (-np.inf, -1, None)
    log_rows = []
    t0 = time.perf_counter()
    step = 0
    bad_epochs = 0
    start_epoch = 0
    if checkpoint is not None and Path(checkpoint).is_file():
        ck = torch.load(checkpoint, map_location="cpu", weights_only=True)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        torch.set_rng_state(ck["torch_rng"])
        gen.set_state(ck["gen"])
        rng.bit_generator.state = json.loads(ck["numpy_rng"])
        best = (ck["best_score"], ck["best_epoch"], ck["best_state"] or None)
        log_rows, step, bad_epochs, start_epoch = json.loads(ck["log"]), ck["step"], ck["bad_epochs"], ck["epoch"]
        if scaler is not None and ck.get("scaler"):
            scaler.load_state_dict(ck["scaler"])
    stopped = bad_epochs >= cfg.patience
    bar = tqdm(range(start_epoch, cfg.epochs if not stopped else start_epoch), desc=desc, disable=not progress,
               leave=False)
    for epoch in bar:
        model.train()
        # Shuffle (and subsample) in the main process with our own generator: order is independent of workers.
        rows = rng.permutation(train_rows)[:n_per_epoch]
        if net is not model:
            # every rank has the same global order; rank r takes rows r, r + world, ... of every global batch, so
            # the averaged gradient is the one-process gradient of that batch (up to summation order)
            distributed.sync_failures()
            loader = DataLoader(TileDataset(tiles, rows, fit_targets), num_workers=cfg.num_workers,
                                batch_sampler=_rank_batches(len(rows), cfg.batch_size, len(rows) > cfg.batch_size,
                                                            distributed.rank(), distributed.world()))
        else:
            loader = DataLoader(TileDataset(tiles, rows, fit_targets), batch_size=cfg.batch_size,
                                shuffle=False, num_workers=cfg.num_workers, drop_last=len(rows) > cfg.batch_size,
                                persistent_workers=False)
        losses = []
        for xb, yb in loader:
            for g in opt.param_groups:
                g["lr"] = lr_at(step, total, cfg.lr, cfg.min_lr)
            xb, yb = xb.to(device), yb.to(device)
            if cfg.augment:
                xb = augment_batch(xb, gen)
            with torch.autocast(device_type=device.split(":")[0], dtype=dtype, enabled=dtype is not None):
                pred = _forward(net, xb, normalise_uint8)
            loss = loss_fn(pred.float(), yb.float(), epoch)
            opt.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
            losses.append(float(loss.detach()))
            step += 1
        val_pred = predict_tiles(model, tiles, val_rows, batch_size=max(64, cfg.batch_size), device=device,
                                 precision=cfg.precision, num_workers=0)
        with torch.no_grad():
            val_loss = float(loss_fn(torch.from_numpy(val_pred), torch.from_numpy(fit_targets[val_rows]), epoch))
        score = mean_spot_spearman(val_pred, val_truth)
        log_rows.append({"epoch": epoch + 1, "train_loss": float(np.mean(losses)) if losses else float("nan"),
                         "val_loss": val_loss, "val_spearman": score, "lr": opt.param_groups[0]["lr"],
                         "seconds": time.perf_counter() - t0})
        bar.set_postfix(loss=f"{log_rows[-1]['train_loss']:.4f}", val_spearman=f"{score:.4f}")
        if np.isfinite(score) and score > best[0]:
            best = (score, epoch + 1, copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()}))
            bad_epochs = 0
        else:
            bad_epochs += 1
        if checkpoint is not None:
            _save_checkpoint(Path(checkpoint), {
                "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                "optimizer": opt.state_dict(), "torch_rng": torch.get_rng_state(), "gen": gen.get_state(),
                "numpy_rng": json.dumps(rng.bit_generator.state), "best_score": float(best[0]),
                "best_epoch": int(best[1]), "best_state": best[2] or {}, "log": json.dumps(log_rows),
                "step": step, "bad_epochs": bad_epochs, "epoch": epoch + 1,
                "scaler": scaler.state_dict() if scaler is not None else {}})
        if bad_epochs >= cfg.patience:
            break
    state = best[2] if best[2] is not None else {k: v.detach().cpu() for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    return FoldResult(state_dict=state, best_epoch=best[1], best_score=float(best[0]), log=pd.DataFrame(log_rows),
                      seconds=time.perf_counter() - t0)


def _rank_batches(n: int, batch_size: int, drop_last: bool, rank: int, world: int) -> list[list[int]]:
    """This rank's share of every batch of ``n`` rows: rows ``rank::world`` of each global batch. A final batch of
    fewer rows than ranks is dropped (every rank must take the same number of steps)."""
    n_batches = n // batch_size if drop_last else math.ceil(n / batch_size)
    out = []
    for b in range(n_batches):
        idx = np.arange(b * batch_size, min((b + 1) * batch_size, n))
        if len(idx) >= world:
            out.append([int(i) for i in idx[rank::world]])
    return out


def _save_checkpoint(path: Path, state: dict) -> None:
    import torch

    from hevisum.io.atomic import atomic_path

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
