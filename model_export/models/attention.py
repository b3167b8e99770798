"""Causal self-attention, shared by SASRec and SINE's optional backbone (`SINEConfig.blocks`).

Windows are most recent click first: slot i (the i-th most recent click) attends to itself and
to older clicks, slots j >= i, never to padding. So the output at slot i depends only on the
clicks up to slot i's, and one pass gives the state of every prefix of the window.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

NEG = -1e9  # finite: a fully masked row must give a uniform softmax, not NaN


def causal_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """mask [B, n] (True = a real click) -> additive attention bias [B, 1, n, n]: 0 where query
    slot i may attend key slot j (j >= i and j real), NEG elsewhere. Finite, so a pad query's
    row (no allowed key) stays a uniform softmax instead of the NaN a boolean mask gives."""
    n = mask.shape[1]
    slots = torch.arange(n, device=mask.device)
    older = slots.unsqueeze(0) >= slots.unsqueeze(1)                   # [n, n]: key j >= query i
    allowed = older.unsqueeze(0) & mask.unsqueeze(1)                   # [B, n, n]
    return torch.zeros(allowed.shape, dtype=dtype, device=mask.device).masked_fill(
        ~allowed, NEG).unsqueeze(1)                                    # [B, 1, n, n]


class Block(nn.Module):
    """One pre-LN causal self-attention block with its feed-forward layer."""

    def __init__(self, D: int, heads: int, dropout: float, ln_eps: float = 1e-5):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(D, eps=ln_eps)
        self.qkv = nn.Linear(D, 3 * D)
        self.proj = nn.Linear(D, D)
        self.ln2 = nn.LayerNorm(D, eps=ln_eps)
        self.ff = nn.Sequential(nn.Linear(D, D), nn.ReLU(), nn.Dropout(dropout), nn.Linear(D, D))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """x [B, n, D]; bias [B, 1, n, n] from `causal_bias`."""
        B, n, D = x.shape
        h, d = self.heads, D // self.heads
        q, k, v = self.qkv(self.ln1(x)).split(D, dim=-1)               # 3 x [B, n, D]
        q, k, v = (t.reshape(B, n, h, d).transpose(1, 2) for t in (q, k, v))   # [B, h, n, d]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                           dropout_p=self.drop.p if self.training else 0.0)   # [B, h, n, d]
        y = y.transpose(1, 2).reshape(B, n, D)                         # [B, n, D]
        x = x + self.drop(self.proj(y))
        return x + self.drop(self.ff(self.ln2(x)))                     # [B, n, D]


class CausalEncoder(nn.Module):
    """Learned positions and `blocks` causal blocks over embedded clicks: X [B, n, D] -> the
    state of every slot [B, n, D], pads 0."""

    def __init__(self, n: int, D: int, blocks: int, heads: int, dropout: float, ln_eps: float = 1e-5):
        super().__init__()
        self.P = nn.Parameter(torch.empty(n, D))                       # positions (recency)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(D, heads, dropout, ln_eps) for _ in range(blocks))
        nn.init.normal_(self.P, std=D ** -0.5)

    def forward(self, X: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        keep = mask.unsqueeze(-1)                                      # [B, n, 1]
        x = self.drop(X + self.P) * keep                               # [B, n, D], pads 0
        bias = causal_bias(mask, x.dtype)                              # [B, 1, n, n]
        for block in self.blocks:
            x = block(x, bias) * keep                                  # [B, n, D]
        return x
