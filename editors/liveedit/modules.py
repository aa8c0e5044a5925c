"""LiveEdit's trainable modules (spec §6.2), batched with padding masks.

- `Attention`: multi-head cross-attention, no output projection (as in the paper).
- `FeatureExtractor` (f_fe): learned query tokens read the prompt ("query") and then the image
  ("vision") representations at layer l_e; the input-side one also owns the visual prototype.
- `ExpertGenerator` (f_eg): rank-r factors of one expert from an edit's representations.
Parameter names match the paper's checkpoints (spec §6.10).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    """softmax(q k^T / sqrt(d_h)) v per head; `key_mask` [b, lk] bool hides padding."""

    def __init__(self, query_dim: int, key_dim: int, qk_dim: int, v_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_mlp = nn.Linear(query_dim, qk_dim)
        self.k_mlp = nn.Linear(key_dim, qk_dim)
        self.v_mlp = nn.Linear(key_dim, v_dim)

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, key_mask: torch.Tensor | None = None):
        """queries [1 or b, lq, .], keys [1 or b, lk, .]: a batch-1 side is projected once and broadcast."""
        b, lk, h = max(queries.shape[0], keys.shape[0]), keys.shape[1], self.heads
        q = self.q_mlp(queries).expand(b, -1, -1)  # [b, lq, qk]
        lq = q.shape[1]
        q = q.reshape(b, lq, h, -1).transpose(1, 2)  # [b, h, lq, qk/h]
        k = self.k_mlp(keys).expand(b, -1, -1).reshape(b, lk, h, -1).transpose(1, 2)  # [b, h, lk, qk/h]
        v = self.v_mlp(keys).expand(b, -1, -1).reshape(b, lk, h, -1).transpose(1, 2)  # [b, h, lk, v/h]
        mask = None if key_mask is None else key_mask[:, None, None, :]  # [b, 1, 1, lk], True = attend
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [b, h, lq, v/h], one fused op
        return out.transpose(1, 2).reshape(b, lq, -1)  # [b, lq, v]


class FeatureExtractor(nn.Module):
    """Routing features of a sample: query features [b, e, md] and image features [b, e, md]."""

    def __init__(self, eqe_n: int, hidden: int, module_dim: int, heads: int, vision_tokens: int = 0):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(hidden)
        self.eqe1 = nn.Parameter(torch.empty(1, eqe_n, module_dim))
        self.ca_query_info_ext1 = Attention(module_dim, hidden, module_dim, module_dim, heads)
        self.ca_vision_info_ext = Attention(module_dim, hidden, module_dim, module_dim, heads)
        self.layer_norm2 = nn.LayerNorm(hidden)
        self.eqe2 = nn.Parameter(torch.empty(1, eqe_n, module_dim))
        self.ca_query_info_ext2 = Attention(module_dim, hidden, module_dim, module_dim, heads)
        # the learned visual prototype (input-side extractor only): a query-conditioned threshold
        self.vis_rep_prot = nn.Parameter(torch.empty(1, vision_tokens, hidden)) if vision_tokens else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for p in (self.eqe1, self.eqe2, self.vis_rep_prot):
            if p is not None:
                nn.init.kaiming_normal_(p)

    def query_summary(self, query, query_mask) -> torch.Tensor:
        """The prompt read by the first query tokens: query [b, lq, D] -> [b, e, md]."""
        return self.ca_query_info_ext1(self.eqe1, self.layer_norm1(query), query_mask)  # [b, e, md]

    def read_vision(self, summary, vision, vision_mask=None) -> torch.Tensor:
        """Image features seen through a prompt summary: vision [b or 1, lv, D] -> [b, e, md]."""
        return self.ca_vision_info_ext(summary, self.layer_norm1(vision), vision_mask)  # [b, e, md]

    def extract_vision(self, query, query_mask, vision, vision_mask=None) -> torch.Tensor:
        """Image summary conditioned on the prompt: query [b, lq, D], vision [b, lv, D] -> [b, e, md]."""
        return self.read_vision(self.query_summary(query, query_mask), vision, vision_mask)

    def extract_query(self, query, query_mask) -> torch.Tensor:
        """Prompt features: query [b, lq, D] -> [b, e, md]."""
        return self.ca_query_info_ext2(self.eqe2, self.layer_norm2(query), query_mask)  # [b, e, md]

    def pooled_vision(self, vision, vision_mask=None) -> torch.Tensor:
        """HR* (the paper's Table-2 ablation): the WHOLE image compressed, no prompt: vision [b, lv, D] ->
        [b, e, md], e identical rows of v(mean_t LN1(vision_t)).

        This is `read_vision` with uniform attention over the image tokens instead of attention led by
        the prompt summary: v is the same value projection, and the mean of v(x_t) over the tokens is
        v of their mean (v is affine). No parameter is added, so a checkpoint fits either mode.
        """
        x = self.layer_norm1(vision)  # [b, lv, D]
        if vision_mask is None:
            pooled = x.mean(1)  # [b, D]
        else:
            weights = vision_mask.to(x.dtype)[..., None]  # [b, lv, 1]
            pooled = (x * weights).sum(1) / weights.sum(1).clamp(min=1)  # [b, D]
        rows = self.ca_vision_info_ext.v_mlp(pooled)  # [b, md]
        return rows[:, None, :].expand(-1, self.eqe1.shape[1], -1)  # [b, e, md]

    def extract_from_prototype(self, query, query_mask, summary=None) -> torch.Tensor:
        """`extract_vision` against the learned prototype instead of an image -> [b, e, md].

        Pass the `query_summary` already computed for the same query to skip recomputing it; the
        prototype's projections are computed once and broadcast over the batch.
        """
        if summary is None:
            summary = self.query_summary(query, query_mask)
        return self.read_vision(summary, self.vis_rep_prot)


class ExpertGenerator(nn.Module):
    """One factor (U or V) of a rank-r expert from an edit's [vision; query; answer] reps."""

    def __init__(self, hidden: int, rank: int, scale: float, module_dim: int, heads: int):
        super().__init__()
        self.phi = nn.Parameter(torch.empty(1, rank, module_dim))
        self.ca_lora = Attention(module_dim, hidden, module_dim, hidden, heads)
        self.layer_norm = nn.LayerNorm(hidden)
        self.out_scale = 1.0 / (scale * math.sqrt(rank))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_normal_(self.phi)

    def forward(self, reps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """reps [b, L, D], mask [b, L] -> factor [b, r, D]."""
        return self.ca_lora(self.phi, self.layer_norm(reps), mask) * self.out_scale  # [b, r, D]
