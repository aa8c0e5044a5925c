"""The one path from layer-l_e representations to LiveEdit's routing and residual.

Inference (`LiveEdit.route` and its layer edit), training (`training.py`) and the benchmark's
forced routing all call these functions, so the three compute the same thing with the same ops:
- `visual_features`: an input's image features seen through its prompt (f_fe, input side);
- `edit_visual_keys`: the same for an edit (f_fe, edit side: the repository's hard-routing keys);
- `prototype_similarity`: the same input's similarity to the learned visual prototype (the
  hard-routing threshold);
- `query_weights`: soft-routing weights c of the selected experts from the prompt features;
- `expert_residual`: sum_m c_m ReLU(U_m LN(h)) V_m, LayerNorm in the modules' dtype, the products
  in a chosen dtype (the repository's at inference), optionally in chunks of experts.
Shapes: k inputs, e feature tokens, md module width, D hidden size, m experts, r rank.

Two of the paper's Table-2 ablations switch here (docs/ABLATIONS.md), their defaults are LiveEdit:
`pooled=True` (HR*) makes the three visual functions use the whole image, mean-pooled, instead of
prompt-conditioned features; `mixing="mean"` (-SR) gives each selected expert the weight 1/k.
"""
from __future__ import annotations

import torch
from torch import nn

from .modules import FeatureExtractor
from .routing import mean_weights, mixture_residual, paired_similarity, similarity, soft_weights

RESIDUAL_CHUNK_ELEMENTS = 2 ** 25  # activations + copied experts per residual chunk (128 MiB in float32)


def visual_features(ext: FeatureExtractor, query, query_mask, vision, vision_mask,
                    pooled: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Image features conditioned on the prompt: query [k, lq, D], vision [k, lv, D] ->
    (visual [k, e, md], the prompt summary [k, e, md] that `prototype_similarity` reuses).
    pooled (HR*): the whole image without the prompt, and no summary (None)."""
    if pooled:
        return ext.pooled_vision(vision, vision_mask), None  # [k, e, md]
    summary = ext.query_summary(query, query_mask)  # [k, e, md]
    return ext.read_vision(summary, vision, vision_mask), summary  # [k, e, md]


def edit_visual_keys(ext: FeatureExtractor, query, query_mask, vision, vision_mask,
                     pooled: bool = False) -> torch.Tensor:
    """An edit's visual routing keys: query [k, lq, D], vision [k, lv, D] -> [k, e, md] (pooled: HR*)."""
    if pooled:
        return ext.pooled_vision(vision, vision_mask)  # [k, e, md]
    return ext.extract_vision(query, query_mask, vision, vision_mask)  # [k, e, md]


def prototype_similarity(ext: FeatureExtractor, visual, query, query_mask, summary, scale: float,
                         pooled: bool = False) -> torch.Tensor:
    """sim(visual features, the prototype read through the same prompt summary): -> [k].
    pooled (HR*): the prototype pooled like an image, the same for every input."""
    if pooled:
        return paired_similarity(visual, ext.pooled_vision(ext.vis_rep_prot), scale)  # [k], prototype [1, e, md]
    return paired_similarity(visual, ext.extract_from_prototype(query, query_mask, summary), scale)  # [k]


def query_weights(ext: FeatureExtractor, query, query_mask, query_keys, selected, scale: float,
                  experts: torch.Tensor | None = None, mixing: str = "soft") -> torch.Tensor:
    """Soft-routing weights: softmax x sigmoid of the prompt features' similarity to the experts' query keys.

    query [k, lq, D], query_keys [m, e, md], selected [k, m] bool -> [k, m]; with `experts` [s],
    only those columns ([k, s]; the similarity is still one product over all m keys, no copy of them).
    mixing "mean" (-SR): 1/k over each row's selected experts; the prompt features are not computed.
    """
    if mixing == "mean":
        if experts is not None:
            selected = selected[:, experts]  # [k, s]
        return mean_weights(selected, query.dtype)
    sim = similarity(ext.extract_query(query, query_mask), query_keys, scale)  # [k, m]
    if experts is not None:
        sim, selected = sim[:, experts], selected[:, experts]  # [k, s]
    return soft_weights(sim, selected)


def expert_residual(norm: nn.LayerNorm, hidden, up, down, weights, dtype: torch.dtype,
                    experts: torch.Tensor | None = None) -> torch.Tensor:
    """sum_m c_m ReLU(U_m LN(h)) V_m: hidden [k, l, D], up / down [m, r, D], weights [k, m] -> [k, l, D] in `dtype`.

    LN runs in the norm's dtype, the products in `dtype`. With `experts` [s] (weights [k, s]) the
    experts are those rows of up / down, taken in chunks small enough that each chunk's [k, l, c*r]
    activations and its copied U, V [c, r, D] stay under RESIDUAL_CHUNK_ELEMENTS together (at LLaVA
    shapes, batch 32, all 10,000 experts at once would hold two 3 GB float32 activations).
    """
    x = norm(hidden.to(norm.weight.dtype)).to(dtype)  # [k, l, D]
    weights = weights.to(dtype)
    if experts is None:
        return mixture_residual(x, up, down, weights)  # [k, l, D]
    k, l, d = hidden.shape
    rank = up.shape[1]
    step = max(1, RESIDUAL_CHUNK_ELEMENTS // (rank * (k * l + 2 * d)))  # experts per chunk
    total = None
    for start in range(0, len(experts), step):
        part = experts[start:start + step]  # [c]
        term = mixture_residual(x, up.index_select(0, part), down.index_select(0, part),
                                weights[:, start:start + step])  # [k, l, D]
        total = term if total is None else total.add_(term)
    return total
