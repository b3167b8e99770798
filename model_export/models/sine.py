"""SINE: Sparse-Interest Network for sequential recommendation (Tan et al., WSDM 2021).

The user encoder of §3.2-3.3 (Eq. 1-8) and the training losses of §3.4 (Eq. 9-11), written so
that `torch.onnx.export` traces `SINE.forward` into a static graph: pure tensor code, a constant K
in `torch.topk`, no data-dependent Python branching, every softmax over the sequence masked.

Input: `item_ids` [B, n] int64, most recent click first, 0 = padding at the end (see
`model_export.data`). Output: the K interest embeddings phi [B, K, D], the aggregated user vector
v [B, D] (Eq. 8) and the aggregation weights e [B, K] (Eq. 7). Items are scored by v . H_j, with H
the item embedding table (shared with the input embeddings, as in the authors' code).

Deviations from the paper, each with its reason (the ablation table in
`benchmarks/results/accuracy-*.md` measures the ones that matter):

1. Eq. 3 and Eq. 7 compare LayerNorm-ed vectors by cosine / temperature instead of the raw dot
   product. A LayerNorm output has norm ~sqrt(D), so LN(a).LN(b) ranges over [-D, D]; at D = 128
   (and /tau = 0.1 in Eq. 7: +-1280) the softmax saturates to one-hot from the first step and Eq. 6
   gets no gradient. The paper itself calls Eq. 3 a cosine similarity. Temperatures:
   `tau_assign` (Eq. 3, default 0.1) and `tau` (Eq. 7, the paper's 0.1). `literal=True` restores
   the raw dot products.
2. Eq. 6 reuses the symbol W3 of Eq. 3. We give Eq. 6 its own matrix (`W3_apt`), since the two
   project different inputs (items vs. intention sequences); `share_w3=True` ties them.
3. Positional embeddings are added to the attention input of Eq. 4 only (as the paper says), never
   to the pooled values. Slot 0 is the most recent click, so a position encodes recency.
4. Padding: embeddings of pad slots are zeroed and every softmax over the sequence is masked, so
   outputs do not depend on pad contents or batch neighbours (RecBole masks nothing). An
   all-padding row gives finite outputs; the service never sends one (cold start is served by
   popularity outside the model).
5. Eq. 1-2 are as written (W1 D x D, W2 D, no bias); the authors' code uses a 512-wide MLP with
   biases and adds positions to Eq. 1 and 6. That variant is not provided.
6. `activation="votes"` (off by default) picks the K prototypes by the clicks' votes instead of
   Eq. 2's top-K of <z_u, C>: each click's Eq. 3 assignment taken over all L prototypes,
   softmax(cos(LN1(x_t W3), LN2(C)) / tau_assign), is summed over the clicks and the K
   prototypes with the most votes are activated; the gate stays Eq. 2's sigmoid(<z_u, C_k>).
   Eq. 2 ranks prototypes by their likeness to one attention-pooled history, so the K it picks
   all lie near the user's mean, and Eq. 3 then has K near-equal prototypes to assign clicks
   to; votes pick the prototypes the clicks themselves would be assigned to. With the
   prototypes at the centres of the item clusters (`TrainConfig.prototype_refresh`) that is
   one prototype for each cluster the user clicked in.
7. Dense targets (`TrainConfig.targets = "dense"`): every prefix of a training window predicts
   the click after it, as SASRec+ trains (`forward_prefixes`), instead of the paper's one target
   per sliding window. Each equation runs over a prefix axis, sharing the item-side products,
   and Eq. 4's positions count from each prefix's own latest click, so a prefix's outputs are
   exactly those of the window that holds it alone: training sees what serving computes.
8. `blocks` > 0 (off by default) puts causal self-attention blocks (SASRec's, learned positions)
   under Eq. 1-6: the clicks are contextualised before concept activation, assignment and
   pooling. The items are still scored against H. There are no item-side tables to fold then.
9. `aggregation="latest"` (off by default) takes Eq. 7's intention C_apt from the most recent
   click's state, LN4(x_latest), in place of Eq. 6's prototype sequence: the interest nearest
   what the user just did weighs most, the signal SASRec predicts from. With a backbone that
   state is contextualised by the whole prefix.
10. `residual=True` (off by default) adds LN5(x_latest), the most recent click's state, to every
   interest of Eq. 5: phi_k = LN3(sum_t w_kt x_t) + LN5(x_latest). With a backbone that state is
   SASRec's user vector, so the aggregate holds the single-vector readout and the K interests
   become offsets around it; per-interest retrieval keeps one query per interest. Eq. 7 still
   compares the interests with the intention.

Computed as the equations say, in cheaper but equal orders (float rounding aside): Eq. 4's K
attention heads as one [D, K D] product and one block-diagonal [K D, K] product, and Eq. 6's
X_hat W3' as P_kt (C_u W3'), a [K, D] x [D, D] product instead of [n, D] x [D, D]. Vector
products and norms are written so that the ONNX graph stays small and fast (`matvec`, `unit`).
`FoldedSINE` (the serving export) goes further and gathers the item-side products from
precomputed tables.

Losses: Eq. 9 as a full softmax over all M items, or a sampled softmax with a log-uniform proposal
over popularity-ranked ids, logQ correction and accidental hits removed (TF's
`sampled_softmax_loss` semantics, as the authors trained). Eq. 10 is the covariance of the
prototype rows, each centred over its D coordinates (DeCov, the paper's ref. [5]).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..configs import SINEConfig
from .attention import NEG, CausalEncoder


def masked_softmax(logits: torch.Tensor, mask: torch.Tensor, dim: int) -> torch.Tensor:
    """softmax over `dim` of the entries `mask` keeps; logits and mask broadcast together."""
    return torch.softmax(torch.where(mask, logits, NEG), dim=dim)


def unit(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """x / ||x|| over the last axis (F.normalize without its Expand node in ONNX)."""
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(eps)


def matvec(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [..., D] @ w [D] as a product with a [D, 1] matrix: ONNX Runtime runs a MatMul with a
    1-D operand as a slow loop (a third of the encoder's time at B = 32), a GEMM fast."""
    return (x @ w.unsqueeze(-1)).squeeze(-1)                          # [...]


class ItemSoftmax:
    """Eq. 9 for any encoder whose item table `H` (row 0 = padding) also scores items by v . H_j:
    SINE, and SASRec (`model_export.models.sasrec`) trained by the same trainer."""

    H: nn.Embedding

    def item_table(self) -> torch.Tensor:
        """H without the padding row: row j is item j + 1."""
        return self.H.weight[1:]                                       # [M, D]

    def full_softmax_loss(self, v: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Eq. 9 exactly: softmax over all M items. `v` [B, D], or interests [B, K, D] scoring
        item j by logsumexp_k phi_k . H_j (a soft form of the service's best-interest merge)."""
        logits = v @ self.item_table().t()                             # [B, M] or [B, K, M]
        if logits.dim() == 3:
            logits = torch.logsumexp(logits, dim=1)                    # [B, M]
        return F.cross_entropy(logits, target - 1)

    def sampled_softmax_loss(self, v: torch.Tensor, target: torch.Tensor, sampler: LogUniformSampler,
                             generator: torch.Generator | None = None) -> torch.Tensor:
        """Eq. 9 with shared sampled negatives, logQ-corrected, accidental hits removed; `v` as
        in `full_softmax_loss`."""
        neg, log_q_neg = sampler.sample(generator)                     # [S], [S]
        neg, log_q_neg = neg.to(v.device), log_q_neg.to(v.device)
        H_pos = self.H(target)                                         # [B, D]
        H_neg = self.H(neg)                                            # [S, D]
        if v.dim() == 3:
            pos_k = (v * H_pos.unsqueeze(1)).sum(-1)                   # [B, K]
            pos = torch.logsumexp(pos_k, dim=1, keepdim=True)          # [B, 1]
            negs = torch.logsumexp(v @ H_neg.t(), dim=1)               # [B, K, S] -> [B, S]
        else:
            pos = (v * H_pos).sum(-1, keepdim=True)                    # [B, 1]
            negs = v @ H_neg.t()                                       # [B, S]
        pos = pos - sampler.log_q(target.cpu()).to(v.device).unsqueeze(-1)
        negs = negs - log_q_neg.unsqueeze(0)
        negs = negs.masked_fill(neg.unsqueeze(0) == target.unsqueeze(1), NEG)
        logits = torch.cat([pos, negs], dim=1)                         # [B, 1 + S]
        return F.cross_entropy(logits, torch.zeros_like(target))


class SINE(ItemSoftmax, nn.Module):
    """The SINE encoder (§3.2-3.3): K interest vectors and their aggregate from a click window."""

    def __init__(self, config: SINEConfig):
        super().__init__()
        self.config = c = config
        D, K, L, n = c.D, c.K, c.L, c.n
        self.H = nn.Embedding(c.n_items + 1, D, padding_idx=0)   # items (input and output)
        self.P = nn.Parameter(torch.empty(n, D))                 # positions, Eq. 4
        self.C = nn.Parameter(torch.empty(L, D))                 # conceptual prototypes
        self.W1 = nn.Parameter(torch.empty(D, D))                # Eq. 1
        self.W2 = nn.Parameter(torch.empty(D))
        self.W3 = nn.Parameter(torch.empty(D, D))                # Eq. 3
        self.Wk1 = nn.Parameter(torch.empty(K, D, D))            # Eq. 4, W_{k,1}
        self.Wk2 = nn.Parameter(torch.empty(K, D))               # Eq. 4, W_{k,2}
        self.W3_apt = None if c.share_w3 else nn.Parameter(torch.empty(D, D))  # Eq. 6
        self.W4 = nn.Parameter(torch.empty(D))                   # Eq. 6
        self.ln1 = nn.LayerNorm(D, eps=c.ln_eps)
        self.ln2 = nn.LayerNorm(D, eps=c.ln_eps)
        self.ln3 = nn.LayerNorm(D, eps=c.ln_eps)
        self.ln4 = nn.LayerNorm(D, eps=c.ln_eps)
        self.ln5 = nn.LayerNorm(D, eps=c.ln_eps) if c.residual else None   # deviation 10
        # deviation 8: causal self-attention under Eq. 1-6, off at blocks = 0
        self.backbone = (CausalEncoder(n, D, c.blocks, c.heads, c.dropout, c.ln_eps)
                         if c.blocks else None)
        self.reset_parameters()

    def reset_parameters(self):
        D = self.config.D
        std = D ** -0.5
        nn.init.normal_(self.H.weight, std=std)
        with torch.no_grad():
            self.H.weight[0].zero_()
        for p in (self.P, self.C):
            nn.init.normal_(p, std=std)
        for w in (self.W1, self.W3, self.W3_apt):
            if w is not None:
                nn.init.xavier_uniform_(w)
        for k in range(self.config.K):
            nn.init.xavier_uniform_(self.Wk1.data[k])
        bound = math.sqrt(3.0 / D)
        for p in (self.W2, self.Wk2, self.W4):
            nn.init.uniform_(p, -bound, bound)

    def embed(self, item_ids: torch.Tensor):
        """The clicks as Eq. 1-5 take them, X [B, n] -> [B, n, D] (pads exactly 0), and the
        mask [B, n]: item embeddings, or with `blocks` their causal contextualisation."""
        mask = item_ids > 0                                            # [B, n]
        X = self.H(item_ids) * mask.unsqueeze(-1)                      # [B, n, D], pads exactly 0
        if self.backbone is not None:
            X = self.backbone(X, mask)                                 # [B, n, D]
        return X, mask

    # The linear maps applied to item embeddings before any nonlinearity (Eq. 1, 3, 4) and to the
    # activated prototypes (Eq. 6). Plain products here; `FoldedSINE` gathers them from tables.
    def item_maps(self, X: torch.Tensor, item_ids: torch.Tensor):
        """X W1 (Eq. 1), X W3 (Eq. 3) and X W_{k,1} for every k (Eq. 4, positions apart)."""
        D, K = self.config.D, self.config.K
        Wk1 = self.Wk1.permute(1, 0, 2).reshape(D, K * D)              # [D, K*D]: one GEMM for all k
        return X @ self.W1, X @ self.W3, X @ Wk1                       # [B, n, D], [B, n, D], [B, n, K*D]

    def position_map(self) -> torch.Tensor:
        """P W_{k,1} for every k: Eq. 4's positions, [n, K*D]."""
        D, K = self.config.D, self.config.K
        return self.P @ self.Wk1.permute(1, 0, 2).reshape(D, K * D)    # [n, K*D]

    def prototype_map(self, idx: torch.Tensor) -> torch.Tensor:
        """C W3' for the activated prototypes: Eq. 6's X_hat W3' = P_kt (C_u W3')."""
        W3_apt = self.W3 if self.W3_apt is None else self.W3_apt
        return self.C[idx] @ W3_apt                                    # [..., K, D]

    # Every equation below runs over a prefix axis Q: the window itself (Q = 1, `forward`), or
    # each of its n prefixes at once (Q = n, `forward_prefixes`: prefix i holds the slots j >= i,
    # the clicks up to the i-th most recent). `M` [B, Q, n] says which slots each one holds.
    @staticmethod
    def prefix_mask(mask: torch.Tensor, prefixes: bool) -> torch.Tensor:
        """mask [B, n] -> M [B, 1, n], or [B, n, n] with M[b, i, j] = mask[b, j] and j >= i."""
        if not prefixes:
            return mask.unsqueeze(1)                                   # [B, 1, n]
        slots = torch.arange(mask.shape[1], device=mask.device)
        return mask.unsqueeze(1) & (slots.unsqueeze(0) >= slots.unsqueeze(1))   # [B, n, n]

    # §3.2.1 concept activation (Eq. 1-2): top-K prototypes for the attention-pooled history
    def concept_scores(self, X: torch.Tensor, mask: torch.Tensor, XW1: torch.Tensor | None = None,
                       q: torch.Tensor | None = None):
        """Eq. 1-2's <z_u, C_k> for all L prototypes, and the key whose top-K activates (and
        orders) the interests: the scores themselves, or deviation 6's votes under
        `activation="votes"` (`q`: Eq. 3's LN1(X W3), where the caller has it); [B, L] each,
        or [B, Q, L] for a prefix mask [B, Q, n]."""
        M = mask if mask.dim() == 3 else mask.unsqueeze(1)             # [B, Q, n]
        XW1 = X @ self.W1 if XW1 is None else XW1                      # [B, n, D]
        a = masked_softmax(matvec(torch.tanh(XW1), self.W2).unsqueeze(1), M, dim=-1)   # [B, Q, n]
        z = a @ X                                                      # [B, Q, D]
        s = z @ self.C.t()                                             # [B, Q, L]
        if self.config.activation == "attention":
            key = s
        else:   # deviation 6: the prototypes Eq. 3 would assign the most clicks to, out of all L
            q = self.ln1(X @ self.W3) if q is None else q              # [B, n, D]
            votes = torch.softmax(unit(q) @ unit(self.ln2(self.C)).t() / self.config.tau_assign,
                                  dim=-1)                              # [B, n, L]
            key = M.to(votes.dtype) @ votes                            # [B, Q, L]: votes of the held slots
        if mask.dim() == 2:
            return s.squeeze(1), key.squeeze(1)                        # [B, L], [B, L]
        return s, key

    def activate(self, X: torch.Tensor, mask: torch.Tensor, XW1: torch.Tensor | None = None,
                 q: torch.Tensor | None = None):
        """The K activated prototypes' scores <z_u, C_k> and indices, [B, K] each ([B, Q, K]
        for a prefix mask)."""
        s, key = self.concept_scores(X, mask, XW1, q)                  # [B, (Q,) L] each
        if self.config.activation == "attention":                      # key is s
            return torch.topk(s, self.config.K, dim=-1)                # values, indices: [B, (Q,) K]
        idx = torch.topk(key, self.config.K, dim=-1).indices           # [B, (Q,) K]
        return s.gather(-1, idx), idx

    @torch.no_grad()
    def activation_keys(self, item_ids: torch.Tensor) -> torch.Tensor:
        """[B, L]: the key whose descending order picks and orders the K interests of each row."""
        X, mask = self.embed(item_ids)                                 # [B, n, D], [B, n]
        return self.concept_scores(X, mask)[1]                         # [B, L]

    def _assign(self, item_ids: torch.Tensor, prefixes: bool):
        """§3.2.1-3.2.2 over the prefix axis: the embeddings X [B, n, D], M [B, Q, n], X W_{k,1}
        [B, n, K*D], the activated prototypes idx [B, Q, K], their gates [B, Q, K, 1] and gated
        embeddings C_u [B, Q, K, D], each click's assignment P_kt [B, Q, n, K] (0 off the prefix)."""
        c = self.config
        X, mask = self.embed(item_ids)                                 # [B, n, D], [B, n]
        M = self.prefix_mask(mask, prefixes)                           # [B, Q, n]
        XW1, XW3, XWk1 = self.item_maps(X, item_ids)                   # [B, n, D], [B, n, D], [B, n, K*D]
        q = self.ln1(XW3)                                              # [B, n, D], Eq. 3's (and votes')
        s_top, idx = self.activate(X, M, XW1, q)                       # [B, Q, K], [B, Q, K]
        gate = torch.sigmoid(s_top).unsqueeze(-1)                      # [B, Q, K, 1]
        C_u = self.C[idx] * gate                                       # [B, Q, K, D]

        # §3.2.2 intention assignment (Eq. 3)
        p = self.ln2(C_u)                                              # [B, Q, K, D]
        if c.literal:
            logits = q.unsqueeze(1) @ p.transpose(-1, -2)              # [B, Q, n, K]
        else:
            logits = unit(q).unsqueeze(1) @ unit(p).transpose(-1, -2) / c.tau_assign
        P_kt = torch.softmax(logits, dim=-1) * M.unsqueeze(-1)         # [B, Q, n, K], off-prefix 0
        return X, M, XWk1, idx, gate, C_u, P_kt

    def assign(self, item_ids: torch.Tensor):
        """§3.2.1-3.2.2 for `item_ids` [B, n]: the activated prototypes idx [B, K], their gated
        embeddings C_u [B, K, D] and each click's assignment P_kt [B, n, K] (pads 0), with the
        embeddings X, mask and X W_{k,1} + P W_{k,1} [B, n, K*D]."""
        X, M, XWk1, idx, gate, C_u, P_kt = self._assign(item_ids, prefixes=False)
        return (X, M.squeeze(1), XWk1 + self.position_map(), idx.squeeze(1), gate.squeeze(1),
                C_u.squeeze(1), P_kt.squeeze(1))

    def _encode(self, item_ids: torch.Tensor, prefixes: bool):
        """Eq. 1-8 over the prefix axis -> phi [B, Q, K, D], v [B, Q, D], e [B, Q, K]."""
        c = self.config
        X, M, XWk1, idx, gate, C_u, P_kt = self._assign(item_ids, prefixes)

        # §3.2.3 attention weighting (Eq. 4). Without a backbone, positions count from each
        # prefix's latest click (deviation 7), so prefix i scores its slot j as the window does
        # slot j - i. With one, the states already carry the backbone's window positions, and
        # Eq. 4 takes the window's too, as SASRec's every slot does: one score per slot.
        Wk2 = (self.Wk2.unsqueeze(-1) * torch.eye(c.K, device=X.device).unsqueeze(1)).reshape(
            c.K * c.D, c.K)                                            # block-diagonal [K*D, K]
        PWk1 = self.position_map()                                     # [n, K*D]
        if prefixes and self.backbone is None:
            slots = torch.arange(c.n, device=X.device)
            age = (slots.unsqueeze(0) - slots.unsqueeze(1)).clamp_min(0)   # [n, n]: j - i
            e_tk = torch.tanh(XWk1.unsqueeze(1) + PWk1[age]) @ Wk2     # [B, n, n, K]
        else:
            e_tk = (torch.tanh(XWk1 + PWk1) @ Wk2).unsqueeze(1)        # [B, 1, n, K]: one GEMM for all k
        P_tk = masked_softmax(e_tk, M.unsqueeze(-1), dim=-2)           # [B, Q, n, K]

        # §3.2.4 interest embedding generation (Eq. 5)
        w = (P_kt * P_tk).transpose(-1, -2)                            # [B, Q, K, n]
        # the Q K rows of w against the window's one X: no copy of X per prefix
        phi = self.ln3((w.flatten(1, 2) @ X).reshape(w.shape[:-1] + X.shape[-1:]))   # [B, Q, K, D]
        if self.ln5 is not None:                                       # deviation 10
            latest = X if prefixes else X[:, :1]                       # [B, Q, D]: each prefix's slot 0
            phi = phi + self.ln5(latest).unsqueeze(-2)                 # [B, Q, K, D]

        # §3.3 interest aggregation (Eq. 6-8)
        if c.aggregation == "mean":
            e = torch.full_like(phi[..., 0], 1.0 / c.K)                # [B, Q, K]
        else:
            if c.aggregation == "latest":                              # deviation 9
                C_apt = self.ln4(X if prefixes else X[:, :1])          # [B, Q, D]: each prefix's slot 0
            else:
                X_hat_W3 = P_kt @ (self.prototype_map(idx) * gate)     # [B, Q, n, D] = X_hat W3'
                b = masked_softmax(matvec(torch.tanh(X_hat_W3), self.W4), M, dim=-1)   # [B, Q, n]
                # sum_t b_t X_hat_t with X_hat = P_kt C_u, summed over t before the K-mix: X_hat
                # itself ([B, Q, n, D]) is never built (a tenth of a dense-target step)
                bP = b.unsqueeze(-2) @ P_kt                            # [B, Q, 1, K]
                C_apt = self.ln4((bP @ C_u).squeeze(-2))               # [B, Q, D]
            if c.literal:
                logits_e = (phi @ C_apt.unsqueeze(-1)).squeeze(-1) / c.tau   # [B, Q, K]
            else:
                logits_e = (unit(phi) @ unit(C_apt).unsqueeze(-1)).squeeze(-1) / c.tau   # [B, Q, K]
            e = torch.softmax(logits_e, dim=-1)                        # [B, Q, K]
        v = (e.unsqueeze(-1) * phi).sum(-2)                            # [B, Q, D]
        return phi, v, e

    def forward(self, item_ids: torch.Tensor):
        """item_ids [B, n] int64 -> (interests [B, K, D], user_vector [B, D], weights [B, K])."""
        phi, v, e = self._encode(item_ids, prefixes=False)            # [B, 1, K, D], [B, 1, D], [B, 1, K]
        return phi.squeeze(1), v.squeeze(1), e.squeeze(1)

    def forward_prefixes(self, item_ids: torch.Tensor):
        """The outputs of every prefix of the window at once (dense targets): [:, i] is what
        `forward` gives for the window of the clicks up to the i-th most recent (exactly,
        without `blocks`) -> (interests [B, n, K, D], user_vector [B, n, D], weights [B, n, K])."""
        return self._encode(item_ids, prefixes=True)

    # -- §3.4 model optimization (Eq. 9-11): Eq. 9 from `ItemSoftmax` --------------------------

    def covariance_loss(self) -> torch.Tensor:
        """Eq. 10: 1/2 (||M||_F^2 - ||diag M||^2), M = (C - mean)(C - mean)^T / D, L x L."""
        D = self.config.D
        Cc = self.C - self.C.mean(dim=1, keepdim=True)                 # [L, D]
        # ||Cc Cc^T||_F = ||Cc^T Cc||_F: a D x D product instead of L x L
        fro2 = (Cc.t() @ Cc).pow(2).sum() / D ** 2
        diag2 = (Cc.pow(2).sum(1) / D).pow(2).sum()
        return 0.5 * (fro2 - diag2)


class FoldedSINE(SINE):
    """SINE's encoder with the linear maps of the item embeddings folded into per-item tables.

    Eq. 1, 3 and 4 apply W1, W3 and W_{k,1} to item embeddings before any nonlinearity, and
    H[ids] W = (H W)[ids]: the tables H W1 [M + 1, D], H W3 [M + 1, D] and H W_{k,1}
    [M + 1, K D] turn a user's [n, D] x [D, (2 + K) D] products into gathers. P W_{k,1} and C W3'
    are folded the same way. A SINE with a backbone (`blocks`) has no such tables. Outputs equal
    SINE's up to float rounding. Made from a trained model for export;
    the tables cost `table_bytes_per_item` of memory per item.
    """

    HW1: torch.Tensor                  # [M + 1, D]     the buffers made below
    HW3: torch.Tensor                  # [M + 1, D]
    HWk1: torch.Tensor                 # [M + 1, K*D]
    PWk1: torch.Tensor                 # [n, K*D]
    CW3: torch.Tensor                  # [L, D]

    def __init__(self, model: SINE):
        if model.config.blocks:
            raise ValueError("a SINE with a self-attention backbone (blocks > 0) has no item-side "
                             "tables to fold: its clicks are contextualised first")
        super().__init__(model.config)
        self.load_state_dict(model.state_dict())
        c = self.config
        with torch.no_grad():
            Wk1 = self.Wk1.permute(1, 0, 2).reshape(c.D, c.K * c.D)   # [D, K*D]
            H = self.H.weight                                          # [M + 1, D]
            for name, W in (("HW1", self.W1), ("HW3", self.W3), ("HWk1", Wk1)):
                table = H @ W                                          # [M + 1, D] or [M + 1, K*D]
                table[0] = 0.0                                         # padding maps to 0, as X does
                self.register_buffer(name, table)
            self.register_buffer("PWk1", SINE.position_map(self))      # [n, K*D]
            self.register_buffer("CW3", SINE.prototype_map(self, torch.arange(c.L)))  # [L, D]
        self.eval()

    @staticmethod
    def table_bytes_per_item(config: SINEConfig) -> int:
        return (2 + config.K) * config.D * 4                           # float32

    def item_maps(self, X: torch.Tensor, item_ids: torch.Tensor):
        gather = lambda table: F.embedding(item_ids, table)           # one Gather a table, no copies
        return gather(self.HW1), gather(self.HW3), gather(self.HWk1)   # [B, n, D], [B, n, D], [B, n, K*D]

    def position_map(self) -> torch.Tensor:
        return self.PWk1                                               # [n, K*D]

    def prototype_map(self, idx: torch.Tensor) -> torch.Tensor:
        return self.CW3[idx]                                           # [B, K, D]


class LogUniformSampler:
    """Log-uniform (Zipf) proposal over ids 1..M, which are sorted by decreasing popularity.

    Draws `num_sampled` unique ids shared by the batch; `log_q` is the log of the expected count
    of an id in the draw (TF semantics: -expm1(tries * log1p(-p))), subtracted from the logits.
    """

    def __init__(self, n_items: int, num_sampled: int):
        self.M, self.S = n_items, min(num_sampled, n_items)
        r = torch.arange(1, n_items + 1, dtype=torch.float64)
        self.p = (torch.log(r + 1) - torch.log(r)) / math.log(n_items + 1)   # [M], sums to 1
        self._p_full = torch.cat([torch.zeros(1, dtype=torch.float64), self.p])   # [M + 1]
        self._tries = self._expected_tries()

    def sample(self, generator: torch.Generator | None = None):
        # Gumbel-top-S: S distinct ids drawn without replacement with probabilities p
        g = -torch.log(-torch.log(torch.rand(self.M, generator=generator, dtype=torch.float64)))
        ids = torch.topk(torch.log(self.p) + g, self.S).indices + 1   # [S]
        return ids, self.log_q(ids)

    def _expected_tries(self) -> float:
        # number of with-replacement draws that yields S distinct ids on average
        lo, hi = float(self.S), float(self.S) * 1e4
        for _ in range(60):
            mid = (lo + hi) / 2
            distinct = float((-torch.expm1(mid * torch.log1p(-self.p))).sum())
            lo, hi = (mid, hi) if distinct < self.S else (lo, mid)
        return (lo + hi) / 2

    def log_q(self, ids: torch.Tensor) -> torch.Tensor:
        p = self._p_full[ids]
        return torch.log(-torch.expm1(self._tries * torch.log1p(-p))).float()
