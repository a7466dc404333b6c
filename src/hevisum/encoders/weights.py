"""Reading a user's weight file: safetensors or a plain torch state dict, never code; plus its sha256 digest.

Nothing is downloaded. Torch files are read with ``torch.load(..., weights_only=True)``, which refuses pickles
that need to run code; such a file gets a one-line error asking for a plain state dict or a safetensors file.
Common checkpoint containers (``{"state_dict": ...}``, ``{"model": ...}``, ``{"teacher": ...}``) are unwrapped.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from hevisum.errors import HevisumError

#: Keys under which training checkpoints commonly keep the network's state dict, in the order they are tried.
CONTAINER_KEYS: tuple[str, ...] = ("state_dict", "model", "teacher", "model_state_dict", "module", "network")
#: Whole-checkpoint prefixes stripped when every key carries them (DataParallel, backbone wrappers).
STRIP_PREFIXES: tuple[str, ...] = ("module.", "backbone.", "_orig_mod.")

_DIGESTS: dict[tuple[str, int, int], str] = {}


def weights_digest(path: str | Path) -> str:
    """sha256 (hex) of a weight file, computed once per process per (path, size, mtime) and then remembered.

    Meant as a feature-cache key: features computed with other weights never match.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise HevisumError(f"encoder weights file not found: {p}")
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with open(p, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


def _is_safetensors(path: Path) -> bool:
    if path.suffix.lower() == ".safetensors":
        return True
    # 8-byte little-endian header length, then a JSON header starting with '{'
    with open(path, "rb") as fh:
        head = fh.read(9)
    if len(head) < 9 or head[8:9] != b"{":
        return False
    n = int.from_bytes(head[:8], "little")
    return 0 < n < os.path.getsize(path)


def read_weight_file(path: str | Path) -> Any:
    """The object stored in ``path`` (a dict of tensors for safetensors), loaded on the CPU without running code."""
    p = Path(path).expanduser()
    if not p.exists():
        raise HevisumError(f"encoder weights file not found: {p}")
    if not p.is_file():
        raise HevisumError(f"encoder weights must be a file (.safetensors or a torch state dict), got a folder: {p}")
    if _is_safetensors(p):
        from safetensors.torch import load_file

        try:
            return load_file(str(p), device="cpu")
        except Exception as exc:  # noqa: BLE001 - any parse error is the same user error
            raise HevisumError(f"{p} is not a readable safetensors file ({_first_line(exc)})") from None
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
        what = f" (it references {found.group(1)})" if found else ""
        raise HevisumError(
            f"{p} is a pickle that needs code to load{what}, which torch.load(weights_only=True) refuses; it must "
            f"be a plain state dict (torch.save(model.state_dict(), path)) or a .safetensors file"
        ) from None
    except Exception as exc:  # noqa: BLE001 - truncated zip, not a torch file, ...
        raise HevisumError(
            f"{p} is neither a safetensors file nor a readable torch state dict ({_first_line(exc)[:160]})"
        ) from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def unwrap_state_dict(obj: Any, path: str | Path) -> dict[str, torch.Tensor]:
    """Find the tensor state dict inside a loaded checkpoint (searching the common container keys)."""
    seen = 0
    while not _is_state_dict(obj):
        if not isinstance(obj, Mapping) or seen > 4:
            raise HevisumError(f"{path} does not hold a state dict of tensors (found {type(obj).__name__})")
        inner = next((obj[k] for k in CONTAINER_KEYS if k in obj and isinstance(obj[k], Mapping)), None)
        if inner is None:
            # a state dict with a few non-tensor entries (e.g. a version number): keep only the tensors
            tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
            if len(tensors) >= max(1, len(obj) // 2):
                obj = tensors
                break
            keys = ", ".join(str(k) for k in list(obj)[:8])
            raise HevisumError(
                f"{path} holds no state dict of tensors (top-level keys: {keys}; expected tensors, or one of "
                f"{', '.join(CONTAINER_KEYS)})"
            )
        obj = inner
        seen += 1
    return dict(obj)


def strip_common_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove ``module.`` / ``backbone.`` / ``_orig_mod.`` when every key carries it (repeatedly)."""
    changed = True
    while changed and state:
        changed = False
        for prefix in STRIP_PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                changed = True
    return state


def select_prefixed(state: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor] | None:
    """When the file wraps the network under ``module.``/``backbone.`` next to other parts (a DINO head, a
    classifier), take the prefixed part, if and only if it is exactly the set of keys the network expects."""
    for prefix in STRIP_PREFIXES:
        sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if sub and set(sub) == expected:
            return sub
    return None
