"""A tiny Vision Transformer: torchvision's VisionTransformer with its attention made of nn.Linear
layers (torch + torchvision only).

torchvision's encoder blocks use nn.MultiheadAttention, whose q/k/v projections are one packed
parameter (`in_proj_weight`) and whose `out_proj` is called through F.linear on its weight, never
through its forward: no plan could wrap any of them. `SelfAttention` is a drop-in for it (same
call, same math, same parameters split into q_proj / k_proj / v_proj / out_proj, the names
Hugging Face models use) running F.scaled_dot_product_attention, so every linear layer of a block
is a candidate layer of a plan.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SelfAttention", "vit_tiny"]


class SelfAttention(nn.Module):
    """Multi-head self-attention with batch-first inputs (B, L, D), called like
    nn.MultiheadAttention(batch_first=True) in torchvision's EncoderBlock: ``attn(x, x, x,
    need_weights=False) -> (out, None)``."""

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.dropout = float(dropout)
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.v_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)

    @classmethod
    def from_multihead(cls, mha: nn.MultiheadAttention) -> SelfAttention:
        """The same attention as `mha` (batch_first, packed in_proj), its weights copied."""
        if not mha.batch_first or mha.in_proj_weight is None:
            raise ValueError("expected a batch_first nn.MultiheadAttention with a packed in_proj_weight")
        new = cls(mha.embed_dim, mha.num_heads, mha.dropout, bias=mha.in_proj_bias is not None)
        with torch.no_grad():
            for i, proj in enumerate((new.q_proj, new.k_proj, new.v_proj)):
                d = mha.embed_dim
                proj.weight.copy_(mha.in_proj_weight[i * d:(i + 1) * d])
                if proj.bias is not None:
                    proj.bias.copy_(mha.in_proj_bias[i * d:(i + 1) * d])
            new.out_proj.weight.copy_(mha.out_proj.weight)
            if new.out_proj.bias is not None:
                new.out_proj.bias.copy_(mha.out_proj.bias)
        return new

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        b, l, d = t.shape
        return t.view(b, l, self.num_heads, d // self.num_heads).transpose(1, 2)

    def forward(self, query, key=None, value=None, need_weights: bool = False, **_ignored):
        if (key is not None and key is not query) or (value is not None and value is not query):
            raise ValueError("SelfAttention attends a sequence to itself: pass the same tensor three times")
        if need_weights:
            raise ValueError("SelfAttention runs scaled_dot_product_attention: no attention weights")
        b, l, d = query.shape
        q, k, v = (self._heads(p(query)) for p in (self.q_proj, self.k_proj, self.v_proj))
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(o.transpose(1, 2).reshape(b, l, d)), None


def vit_tiny(num_classes: int = 10, in_channels: int = 3, image_size: int = 32, patch_size: int = 8,
             num_layers: int = 4, num_heads: int = 4, hidden_dim: int = 128, mlp_dim: int = 256,
             dropout: float = 0.0) -> nn.Module:
    """torchvision VisionTransformer (no weights downloaded), tiny by default: 32 px images in
    8 px patches (16 tokens + the class token), 4 blocks of 4 heads, width 128, MLP 256; every
    block's attention is a SelfAttention. Candidate layers, in forward order: conv_proj, per
    block encoder.layers.encoder_layer_N.self_attention.{q,k,v,out}_proj and .mlp.{0,3}, then
    heads.head."""
    from torchvision.models import VisionTransformer

    vit = VisionTransformer(image_size=image_size, patch_size=patch_size, num_layers=num_layers,
                            num_heads=num_heads, hidden_dim=hidden_dim, mlp_dim=mlp_dim, dropout=dropout,
                            num_classes=num_classes)
    if in_channels != 3:
        vit.conv_proj = nn.Conv2d(in_channels, hidden_dim, patch_size, patch_size)
    for block in vit.encoder.layers:
        block.self_attention = SelfAttention.from_multihead(block.self_attention)
    return vit
