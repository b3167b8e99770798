"""SASRec (Kang & McAuley, ICDM 2018) as a second user encoder in SINE's harness.

The single-vector baseline a ranking team compares a multi-interest model with: item embeddings
plus learned positions, `blocks` causal self-attention blocks, the output at the most recent
position as the user vector. It takes the same input as `SINE` (`item_ids` [B, n], most recent
click first, 0 = padding at the end) and returns the same three outputs, with K = 1: interests
[B, 1, D] (the user vector itself), user_vector [B, D] and weights [B, 1] (all ones). So the
trainer, the evaluation, the ONNX export and the service take it as they take a K = 1 SINE.

Causal in time: slot i (the i-th most recent click) attends to itself and to older clicks,
slots j >= i, never to padding. Items are scored by v . H_j with the input embedding table H, as
in the original. Differences from the original code, each for the harness's sake:

1. Pre-LayerNorm blocks (LN before attention and feed-forward, a final LN): the original
   normalises the attention query only; pre-LN is the common form and trains without warm-up.
2. One target per window (the trainer's sliding windows), not a loss at every position: the
   same training pairs, since every prefix of a history is a window.
3. Full softmax (Eq. 9 of SINE, `ItemSoftmax`) instead of one sampled negative with a binary
   loss: the loss SINE trains with, and the stronger of the two for SASRec.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..configs import SASRecConfig
from .sine import NEG, ItemSoftmax


class Block(nn.Module):
    """One pre-LN causal self-attention block with its feed-forward layer."""
    def __init__(self, c: SASRecConfig):
        super().__init__()
        self.heads = c.heads
        self.ln1 = nn.LayerNorm(c.D, eps=c.ln_eps)
        self.qkv = nn.Linear(c.D, 3 * c.D)
        self.proj = nn.Linear(c.D, c.D)
        self.ln2 = nn.LayerNorm(c.D, eps=c.ln_eps)
        self.ff = nn.Sequential(nn.Linear(c.D, c.D), nn.ReLU(), nn.Dropout(c.dropout),
                                nn.Linear(c.D, c.D))
        self.drop = nn.Dropout(c.dropout)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """x [B, n, D]; bias [B, 1, n, n]: 0 where query slot i may attend key slot j, NEG
        where not (`SASRec.hidden`)."""
        B, n, D = x.shape
        h, d = self.heads, D // self.heads
        q, k, v = self.qkv(self.ln1(x)).split(D, dim=-1)               # 3 x [B, n, D]
        q, k, v = (t.reshape(B, n, h, d).transpose(1, 2) for t in (q, k, v))   # [B, h, n, d]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                           dropout_p=self.drop.p if self.training else 0.0)   # [B, h, n, d]
        y = y.transpose(1, 2).reshape(B, n, D)                         # [B, n, D]
        x = x + self.drop(self.proj(y))
        return x + self.drop(self.ff(self.ln2(x)))                     # [B, n, D]


class SASRec(ItemSoftmax, nn.Module):
    """The single-vector SASRec encoder, with SINE's inputs and outputs (K = 1)."""

    def __init__(self, config: SASRecConfig):
        super().__init__()
        self.config = c = config
        self.H = nn.Embedding(c.n_items + 1, c.D, padding_idx=0)       # items (input and output)
        self.P = nn.Parameter(torch.empty(c.n, c.D))                   # positions (recency)
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.blocks))
        self.ln_f = nn.LayerNorm(c.D, eps=c.ln_eps)
        self.reset_parameters()

    def reset_parameters(self):
        std = self.config.D ** -0.5
        nn.init.normal_(self.H.weight, std=std)
        nn.init.normal_(self.P, std=std)
        with torch.no_grad():
            self.H.weight[0].zero_()

    def hidden(self, item_ids: torch.Tensor) -> torch.Tensor:
        """item_ids [B, n] -> the last block's output at every slot [B, n, D] (pads 0)."""
        n = self.config.n
        mask = item_ids > 0                                            # [B, n]
        x = self.drop(self.H(item_ids) + self.P) * mask.unsqueeze(-1)  # [B, n, D], pads 0
        slots = torch.arange(n, device=item_ids.device)
        older = slots.unsqueeze(0) >= slots.unsqueeze(1)               # [n, n]: key j >= query i
        allowed = older.unsqueeze(0) & mask.unsqueeze(1)               # [B, n, n]
        # additive, with a finite NEG: a pad query's row (no allowed key) stays a uniform
        # softmax instead of the NaN a boolean mask gives; one for every block
        bias = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device).masked_fill(
            ~allowed, NEG).unsqueeze(1)                                 # [B, 1, n, n]
        for block in self.blocks:
            x = block(x, bias) * mask.unsqueeze(-1)                    # [B, n, D]
        return x

    def forward(self, item_ids: torch.Tensor):
        """item_ids [B, n] int64 -> (interests [B, 1, D], user_vector [B, D], weights [B, 1])."""
        v = self.ln_f(self.hidden(item_ids)[:, 0])                     # [B, D]: the latest click
        return v.unsqueeze(1), v, torch.ones_like(v[:, :1])            # [B, 1, D], [B, D], [B, 1]

    def covariance_loss(self) -> torch.Tensor:
        """No prototypes: Eq. 10 is zero, so lambda has no effect."""
        return self.H.weight.new_zeros(())
