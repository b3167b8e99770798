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
2. Dense targets (SASRec+ of Klenitskiy & Vasilev, `TrainConfig.targets = "dense"`): every slot of
   a window predicts the click after it, under the full softmax, from one pass
   (`forward_prefixes`). With `targets = "last"` it trains one target per sliding window, as SINE
   did: the same (prefix, target) pairs, at about a twentieth of the throughput.
3. Full softmax (Eq. 9 of SINE, `ItemSoftmax`) instead of one sampled negative with a binary
   loss: the loss SINE trains with, and the stronger of the two for SASRec.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..configs import SASRecConfig
from .attention import Block, causal_bias
from .sine import ItemSoftmax


class SASRec(ItemSoftmax, nn.Module):
    """The single-vector SASRec encoder, with SINE's inputs and outputs (K = 1)."""

    def __init__(self, config: SASRecConfig):
        super().__init__()
        self.config = c = config
        self.H = nn.Embedding(c.n_items + 1, c.D, padding_idx=0)       # items (input and output)
        self.P = nn.Parameter(torch.empty(c.n, c.D))                   # positions (recency)
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(Block(c.D, c.heads, c.dropout, c.ln_eps) for _ in range(c.blocks))
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
        mask = item_ids > 0                                            # [B, n]
        x = self.drop(self.H(item_ids) + self.P) * mask.unsqueeze(-1)  # [B, n, D], pads 0
        bias = causal_bias(mask, x.dtype)                              # [B, 1, n, n], every block's
        for block in self.blocks:
            x = block(x, bias) * mask.unsqueeze(-1)                    # [B, n, D]
        return x

    def forward(self, item_ids: torch.Tensor):
        """item_ids [B, n] int64 -> (interests [B, 1, D], user_vector [B, D], weights [B, 1])."""
        v = self.ln_f(self.hidden(item_ids)[:, 0])                     # [B, D]: the latest click
        return v.unsqueeze(1), v, torch.ones_like(v[:, :1])            # [B, 1, D], [B, D], [B, 1]

    def forward_prefixes(self, item_ids: torch.Tensor):
        """The outputs of every prefix of the window at once (dense targets): slot i's state
        sees the clicks up to slot i's only, so [:, i] is the user after the i-th most recent
        click -> (interests [B, n, 1, D], user_vector [B, n, D], weights [B, n, 1])."""
        v = self.ln_f(self.hidden(item_ids))                           # [B, n, D]
        return v.unsqueeze(2), v, torch.ones_like(v[..., :1])          # [B, n, 1, D], [B, n, D], [B, n, 1]

    def covariance_loss(self) -> torch.Tensor:
        """No prototypes: Eq. 10 is zero, so lambda has no effect."""
        return self.H.weight.new_zeros(())
