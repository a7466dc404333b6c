"""Hugging Face transformers layout (``ViTModel``, ``Dinov2Model``, ``Dinov2WithRegistersModel``) → timm names.

Checkpoints published for transformers name the same tensors differently and keep q, k, v apart:

=====================================================  ===============================
transformers (file on the Hub)                          timm / :class:`VisionTransformer`
=====================================================  ===============================
``embeddings.cls_token``                                ``cls_token``
``embeddings.register_tokens``                          ``reg_token``
``embeddings.position_embeddings``                      ``pos_embed``
``embeddings.patch_embeddings.projection.*``            ``patch_embed.proj.*``
``encoder.layer.N.attention.attention.{query,key,value}.*``  ``blocks.N.attn.qkv.*`` (stacked q, k, v)
``encoder.layer.N.attention.output.dense.*``            ``blocks.N.attn.proj.*``
``encoder.layer.N.{layernorm_before,norm1}.*``          ``blocks.N.norm1.*``
``encoder.layer.N.{layernorm_after,norm2}.*``           ``blocks.N.norm2.*``
``encoder.layer.N.layer_scale{1,2}.lambda1``            ``blocks.N.ls{1,2}.gamma``
``encoder.layer.N.intermediate.dense.*`` / ``mlp.fc1``  ``blocks.N.mlp.fc1.*``
``encoder.layer.N.output.dense.*`` / ``mlp.fc2``        ``blocks.N.mlp.fc2.*``
``encoder.layer.N.mlp.weights_in`` / ``weights_out``    ``blocks.N.mlp.fc1`` / ``fc2`` (packed SwiGLU)
``layernorm.*``                                         ``norm.*``
``embeddings.mask_token``, ``pooler.*``                 (not used for features: dropped)
=====================================================  ===============================

The module names of transformers 5 in memory (``attention.q_proj`` …, ``mlp.gate_proj``/``up_proj``/
``down_proj``, ``layers.N`` for ViT) are accepted too. With registers, transformers adds the position
embedding to the class and patch tokens only; the class position is then folded into ``cls_token`` and the
model is used with ``no_embed_class=True`` (the same function, timm's layout for DINOv2 with registers).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import torch

HF_MARKER = "embeddings.patch_embeddings.projection.weight"

_DROP = re.compile(r"^(embeddings\.mask_token|pooler\..*)$")
_LAYER = re.compile(r"^(?:encoder\.layer|layers)\.(\d+)\.(.+)$")
# per-layer renames (suffix after the layer prefix), tried in order
_LAYER_RENAMES: tuple[tuple[str, str], ...] = (
    ("attention.output.dense.", "attn.proj."),
    ("attention.o_proj.", "attn.proj."),
    ("layernorm_before.", "norm1."),
    ("layernorm_after.", "norm2."),
    ("norm1.", "norm1."),
    ("norm2.", "norm2."),
    ("layer_scale1.lambda1", "ls1.gamma"),
    ("layer_scale2.lambda1", "ls2.gamma"),
    ("intermediate.dense.", "mlp.fc1."),
    ("output.dense.", "mlp.fc2."),
    ("mlp.fc1.", "mlp.fc1."),
    ("mlp.fc2.", "mlp.fc2."),
    ("mlp.weights_in.", "mlp.fc1."),
    ("mlp.weights_out.", "mlp.fc2."),
    ("mlp.down_proj.", "mlp.fc2."),
)
_QKV = {
    "attention.attention.query.": 0, "attention.attention.key.": 1, "attention.attention.value.": 2,
    "attention.q_proj.": 0, "attention.k_proj.": 1, "attention.v_proj.": 2,
}
_GLU = {"mlp.gate_proj.": 0, "mlp.up_proj.": 1}


def hf_prefix(keys: Iterable[str]) -> str | None:
    """The prefix in front of the transformers embedding keys ('' for a bare ViTModel/Dinov2Model), or None
    when the keys are not in the transformers layout."""
    for key in keys:
        if key.endswith(HF_MARKER):
            return key[: -len(HF_MARKER)]
    return None


def is_hf_layout(keys: Iterable[str]) -> bool:
    """True when the keys come from a transformers ViT/Dinov2 model."""
    return hf_prefix(keys) is not None


def hf_to_timm(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Map a transformers ViT/Dinov2 state dict to timm names.

    Returns ``(mapped, unmapped)``: ``unmapped`` lists the source keys no rule covers (kept out of
    ``mapped`` so a strict load reports the missing ones; the caller reports these by name).
    Keys outside the base model's prefix (e.g. ``classifier.*`` of a classification checkpoint) are unmapped.
    """
    prefix = hf_prefix(state) or ""
    out: dict[str, torch.Tensor] = {}
    unmapped: list[str] = []
    qkv: dict[tuple[int, str], dict[int, torch.Tensor]] = {}
    glu: dict[tuple[int, str], dict[int, torch.Tensor]] = {}
    for full_key, value in state.items():
        if not full_key.startswith(prefix):
            unmapped.append(full_key)
            continue
        key = full_key[len(prefix):]
        if _DROP.match(key):
            continue
        if key == "embeddings.cls_token":
            out["cls_token"] = value
        elif key == "embeddings.register_tokens":
            out["reg_token"] = value
        elif key == "embeddings.position_embeddings":
            out["pos_embed"] = value
        elif key.startswith("embeddings.patch_embeddings.projection."):
            out["patch_embed.proj." + key.rsplit(".", 1)[1]] = value
        elif key.startswith("layernorm."):
            out["norm." + key.rsplit(".", 1)[1]] = value
        elif m := _LAYER.match(key):
            i, rest = int(m.group(1)), m.group(2)
            if _collect(rest, i, value, _QKV, qkv) or _collect(rest, i, value, _GLU, glu):
                continue
            for src, dst in _LAYER_RENAMES:
                if rest.startswith(src):
                    out[f"blocks.{i}.{dst}{rest[len(src):]}"] = value
                    break
            else:
                unmapped.append(full_key)
        else:
            unmapped.append(full_key)
    for (i, leaf), parts in qkv.items():
        if sorted(parts) == [0, 1, 2]:
            out[f"blocks.{i}.attn.qkv.{leaf}"] = torch.cat([parts[0], parts[1], parts[2]], dim=0)
        else:
            unmapped.append(f"layer {i} attention {leaf} (q, k or v missing)")
    for (i, leaf), parts in glu.items():
        if sorted(parts) == [0, 1]:
            out[f"blocks.{i}.mlp.fc1.{leaf}"] = torch.cat([parts[0], parts[1]], dim=0)
        else:
            unmapped.append(f"layer {i} mlp {leaf} (gate or up projection missing)")
    if "reg_token" in out and "cls_token" in out and "pos_embed" in out:
        # registers carry no position: fold the class position into the class token, keep the patch grid
        pos = out["pos_embed"]
        out["cls_token"] = out["cls_token"] + pos[:, :1].to(out["cls_token"].dtype)
        out["pos_embed"] = pos[:, 1:]
    return out, unmapped


def _collect(rest: str, i: int, value: torch.Tensor, table: dict[str, int],
             store: dict[tuple[int, str], dict[int, torch.Tensor]]) -> bool:
    for src, slot in table.items():
        if rest.startswith(src):
            store.setdefault((i, rest[len(src):]), {})[slot] = value
            return True
    return False


def hf_pos_grid(state: Mapping[str, torch.Tensor]) -> int | None:
    """Side of the patch grid the file's position embedding was trained for (None when absent)."""
    prefix = hf_prefix(state) or ""
    pos = state.get(prefix + "embeddings.position_embeddings")
    if pos is None or pos.ndim != 3:
        return None
    from hevisum.encoders.vit import grid_side

    return grid_side(int(pos.shape[1]) - 1)


def hf_has_registers(state: Mapping[str, torch.Tensor]) -> bool:
    """True when the file holds register tokens (Dinov2WithRegistersModel)."""
    prefix = hf_prefix(state) or ""
    return (prefix + "embeddings.register_tokens") in state
