"""The minibatch training loop shared by the MLP head and the stacking MLP."""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn


def train_regressor(
    net: nn.Module,
    optimizer: torch.optim.Optimizer,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    *,
    max_epochs: int,
    batch_size: int,
    patience: int,
    seed: int,
    lr_patience: int | None = None,
) -> list[dict[str, float]]:
    """Minibatch MSE training with early stopping on validation loss; ``net`` ends with its best weights.

    Shuffling uses its own ``torch.Generator`` seeded with ``seed``; when ``lr_patience`` is given the learning
    rate is halved after that many epochs without improvement (ReduceLROnPlateau). Returns one dict per epoch
    (``epoch``, ``train_loss``, ``val_loss``, ``lr``). Internal helper shared by the MLP head and the stacker.
    """
    xt = torch.as_tensor(x_train, dtype=torch.float32)
    yt = torch.as_tensor(y_train, dtype=torch.float32)
    xv = torch.as_tensor(x_val, dtype=torch.float32)
    yv = torch.as_tensor(y_val, dtype=torch.float32)
    gen = torch.Generator().manual_seed(int(seed))
    scheduler = (
        torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=0.5, patience=lr_patience)
        if lr_patience is not None
        else None
    )
    loss_fn = nn.MSELoss()
    best_loss, best_state, stale = float("inf"), copy.deepcopy(net.state_dict()), 0
    history: list[dict[str, float]] = []
    n = len(xt)
    for epoch in range(max_epochs):
        net.train()
        order = torch.randperm(n, generator=gen)
        total = 0.0
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            if len(idx) < 2 and n >= 2:
                continue  # BatchNorm cannot normalise a batch of one; that row is seen again next epoch
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(net(xt[idx]), yt[idx])
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
        net.eval()
        with torch.no_grad():
            val_loss = float(loss_fn(net(xv), yv))
        if scheduler is not None:
            scheduler.step(val_loss)
        history.append(
            {"epoch": epoch, "train_loss": total / n, "val_loss": val_loss, "lr": optimizer.param_groups[0]["lr"]}
        )
        if val_loss < best_loss:
            best_loss, best_state, stale = val_loss, copy.deepcopy(net.state_dict()), 0
        else:
            stale += 1
            if stale >= patience:
                break
    net.load_state_dict(best_state)
    net.eval()
    return history
