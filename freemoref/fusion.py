"""Reference fusion at layer L (docs/DESIGN.md section 3): keep each row's most attended visual tokens and
merge the survivors of all rows, in original time order, into one sequence."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from freemoref.attention import visual_scores


@dataclass
class Fusion:
    """The kept visual tokens, in original time order.

    rows (K,): reference of each kept token; slots (K,): its slot in that reference's row;
    positions (K,): its global position in the un-partitioned visual sequence.
    """

    rows: torch.Tensor
    slots: torch.Tensor
    positions: torch.Tensor
    kept_per_reference: list[int]


def keep_counts(lengths: list[int], keep_ratio: float) -> list[int]:
    """ceil(l * keep_ratio) per reference, at least 1 and at most l. The 1e-9 keeps float noise
    from rounding up an exact product (9 * (1/3) = 3.0000000000000004 keeps 3, not 4)."""
    return [min(n, max(1, math.ceil(n * keep_ratio - 1e-9))) for n in lengths]


def visual_importance(q_ques, k_vis, scaling: float, vis_mask=None) -> torch.Tensor:
    """(N, Tv) importance of each visual token: A = softmax over the row's real visual keys of the
    question queries, averaged over question tokens and heads; 0 at padding.

    q_ques (1 or N, H, Tq, D) and k_vis (N, Hkv, Tv, D) come from layer L's projections and rotary
    on layer L's input hidden states."""
    return visual_scores(q_ques, k_vis, scaling, vis_mask).softmax(-1).mean((1, 2))


def select_visual_tokens(importance, vis_mask, positions, keep_ratio: float) -> Fusion:
    """Each row keeps its top ceil(l_row * keep_ratio) real tokens; survivors sorted by `positions`
    (N, Tv), the original global position of every slot."""
    counts = keep_counts(vis_mask.sum(1).tolist(), keep_ratio)
    row_parts, slot_parts = [], []
    for i, k in enumerate(counts):
        top = importance[i].masked_fill(~vis_mask[i], float("-inf")).topk(k).indices
        row_parts.append(torch.full_like(top, i))
        slot_parts.append(top)
    rows, slots = torch.cat(row_parts), torch.cat(slot_parts)
    pos = positions[rows, slots]
    order = pos.argsort()
    return Fusion(rows[order], slots[order], pos[order], counts)


def merge(h_prefix, h_vis, h_ques, fusion: Fusion) -> torch.Tensor:
    """[system | merged visual | question] as one sequence (1, P + K + Q, D); the caller gives it
    fresh positions 0..l'-1."""
    return torch.cat([h_prefix, h_vis[fusion.rows, fusion.slots][None], h_ques], 1)
