"""Vision Transformer with timm's parameter names, so timm-format weight files load with ``strict=True``.

Parameter names and shapes follow ``timm.models.vision_transformer.VisionTransformer`` (``cls_token``,
``reg_token``, ``pos_embed``, ``patch_embed.proj``, ``blocks.N.{norm1,attn.qkv,attn.proj,ls1.gamma,norm2,
mlp.fc1,mlp.fc2,ls2.gamma}``, ``norm``) for the options published pathology encoders use:

* token order: class token, register tokens, patch tokens;
* ``no_embed_class=False``: the position embedding covers the prefix tokens (concatenate, then add);
  ``no_embed_class=True``: it covers only the patches (add to the patches, then concatenate);
* LayerScale (``init_values``), a plain GELU MLP or a packed SwiGLU MLP (``fc1`` holds gate and value:
  ``silu(a) * b`` for ``a, b = fc1(x).chunk(2)``), LayerNorm eps 1e-6 unless told otherwise;
* ``dynamic_img_size``: inputs of another size than ``img_size`` get the patch part of the position embedding
  resampled bicubically (antialiased, as timm does; ``pos_embed_antialias=False`` reproduces transformers'
  Dinov2, which does not antialias).

``forward_features`` returns every token after the final norm, like timm's.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from hevisum.errors import HevisumError

MLP_LAYERS = ("mlp", "swiglu_packed")


class PatchEmbed(nn.Module):
    """Non-overlapping patches → embeddings with a strided convolution (``proj``); returns (B, H', W', D)."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) → (B, H/p, W/p, D)."""
        return self.proj(x).permute(0, 2, 3, 1)


class Attention(nn.Module):
    """Multi-head self-attention with one packed ``qkv`` projection (rows: all q, then all k, then all v)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise HevisumError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, D) → (B, N, D)."""
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, d))


class LayerScale(nn.Module):
    """Per-channel scale ``gamma`` of a residual branch."""

    def __init__(self, dim: int, init_values: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x * gamma."""
        return x * self.gamma


class Mlp(nn.Module):
    """fc1 → GELU → fc2."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(…, D) → (…, D)."""
        return self.fc2(self.act(self.fc1(x)))


class SwiGLUPacked(nn.Module):
    """SwiGLU with gate and value packed in ``fc1`` (gate first): fc2(silu(a) * b), a, b = fc1(x).chunk(2)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        if hidden % 2:
            raise HevisumError(f"a packed SwiGLU needs an even hidden width, got {hidden}")
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden // 2, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(…, D) → (…, D)."""
        gate, value = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(F.silu(gate) * value)


class Block(nn.Module):
    """Pre-norm transformer block: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x)))."""

    def __init__(
        self, dim: int, num_heads: int, mlp_hidden: int, mlp_layer: str, qkv_bias: bool,
        init_values: float | None, norm_eps: float,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.ls1: nn.Module = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp: nn.Module = SwiGLUPacked(dim, mlp_hidden) if mlp_layer == "swiglu_packed" else Mlp(dim, mlp_hidden)
        self.ls2: nn.Module = LayerScale(dim, init_values) if init_values else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, D) → (B, N, D)."""
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


def resample_pos_embed(
    pos_embed: torch.Tensor, new_grid: tuple[int, int], old_grid: tuple[int, int], num_prefix: int,
    antialias: bool = True,
) -> torch.Tensor:
    """Bicubic resampling of the patch part of a (1, prefix + H*W, D) position embedding to ``new_grid``.

    The first ``num_prefix`` entries (class/register positions, when the embedding has them) are kept as they
    are. Interpolation runs in float32 and the result is cast back, as in timm.
    """
    if tuple(new_grid) == tuple(old_grid):
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
    dim = grid.shape[-1]
    dtype = grid.dtype
    grid = grid.float().reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=tuple(new_grid), mode="bicubic", align_corners=False, antialias=antialias)
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, dim).to(dtype)
    return torch.cat([prefix, grid], dim=1) if num_prefix else grid


class VisionTransformer(nn.Module):
    """ViT feature extractor with timm's parameter names (no classifier head).

    ``mlp_ratio`` sets the MLP width as ``int(embed_dim * mlp_ratio)`` (for a packed SwiGLU, the width of
    ``fc1``, which holds gate and value), like timm. ``init_values`` None/0 means no LayerScale.
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        init_values: float | None = None,
        class_token: bool = True,
        reg_tokens: int = 0,
        no_embed_class: bool = False,
        mlp_layer: str = "mlp",
        norm_eps: float = 1e-6,
        dynamic_img_size: bool = False,
        pos_embed_antialias: bool = True,
    ) -> None:
        super().__init__()
        if mlp_layer not in MLP_LAYERS:
            raise HevisumError(f"mlp_layer must be one of {', '.join(MLP_LAYERS)}, got {mlp_layer!r}")
        if img_size % patch_size:
            raise HevisumError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.patch_size = patch_size
        self.embed_dim = self.num_features = embed_dim
        self.num_reg_tokens = int(reg_tokens)
        self.num_prefix_tokens = int(class_token) + self.num_reg_tokens
        self.no_embed_class = bool(no_embed_class)
        self.dynamic_img_size = bool(dynamic_img_size)
        self.pos_embed_antialias = bool(pos_embed_antialias)

        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, reg_tokens, embed_dim)) if reg_tokens else None
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        embed_len = self.patch_embed.num_patches + (0 if no_embed_class else self.num_prefix_tokens)
        self.pos_embed = nn.Parameter(torch.randn(1, embed_len, embed_dim) * 0.02)
        hidden = int(embed_dim * mlp_ratio)
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, hidden, mlp_layer, qkv_bias, init_values, norm_eps) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H', W', D) patches → (B, prefix + H'*W', D) tokens with position embeddings."""
        b, h, w, d = x.shape
        grid = self.patch_embed.grid_size
        if (h, w) != grid:
            if not self.dynamic_img_size:
                raise HevisumError(
                    f"this encoder takes {grid[0] * self.patch_size} px inputs, got {h * self.patch_size}x"
                    f"{w * self.patch_size} (it was built without dynamic_img_size)"
                )
            prefix = 0 if self.no_embed_class else self.num_prefix_tokens
            pos_embed = resample_pos_embed(self.pos_embed, (h, w), grid, prefix, self.pos_embed_antialias)
        else:
            pos_embed = self.pos_embed
        x = x.reshape(b, h * w, d)
        to_cat = []
        if self.cls_token is not None:
            to_cat.append(self.cls_token.expand(b, -1, -1))
        if self.reg_token is not None:
            to_cat.append(self.reg_token.expand(b, -1, -1))
        if self.no_embed_class:
            x = x + pos_embed
            return torch.cat([*to_cat, x], dim=1) if to_cat else x
        if to_cat:
            x = torch.cat([*to_cat, x], dim=1)
        return x + pos_embed

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) normalised images → (B, prefix + patches, D) tokens after the final norm."""
        h, w = x.shape[-2:]
        if h % self.patch_size or w % self.patch_size:
            raise HevisumError(f"input size {h}x{w} px is not a multiple of the patch size {self.patch_size}")
        x = self._pos_embed(self.patch_embed(x))
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def pool(self, tokens: torch.Tensor, pooling: str) -> torch.Tensor:
        """(B, N, D) tokens → (B, D) class token, or (B, 2D) class token + mean of the patch tokens."""
        if pooling == "cls":
            return tokens[:, 0]
        if pooling == "cls+mean":
            return torch.cat([tokens[:, 0], tokens[:, self.num_prefix_tokens:].mean(dim=1)], dim=-1)
        raise HevisumError(f"a ViT pools with 'cls' or 'cls+mean', got {pooling!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) → (B, D) class token (timm's ``global_pool='token'``)."""
        return self.forward_features(x)[:, 0]

    @staticmethod
    def pooled_dim(embed_dim: int, pooling: str) -> int:
        """Feature length for a pooling mode."""
        return embed_dim * 2 if pooling == "cls+mean" else embed_dim


def grid_side(n_tokens: int) -> int:
    """Side of a square grid of ``n_tokens`` positions (HevisumError when not square)."""
    side = math.isqrt(n_tokens)
    if side * side != n_tokens:
        raise HevisumError(f"{n_tokens} position embeddings do not form a square grid")
    return side
