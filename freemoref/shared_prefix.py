"""Video-scope fusion (`fusion_scope: video`, docs/DESIGN.md section 3): one fusion for all the
questions answered together on a video's rows, run once as a shared prefix.

At layer L each question scores the rows' visual tokens as in question scope (`visual_importance`).
`video_fusion` scores a token by its maximum over the questions (a token any question attends to
strongly survives) and keeps the same ceil(l_i * keep_ratio) tokens per reference. The prefix
[system | merged visual] then runs once through the layers from L on (`run_shared_prefix`), its K/V
cached, and each question runs only its own tokens on top of it (`questions_on_prefix`), attending
to the prefix and causally to its own tokens, as it would at the end of the fused sequence: same
slots, same positions. With one question this is question scope computed in two pieces.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from freemoref.attention import causal_attention, question_attention, questions_per_call
from freemoref.decoder_layers import finish_layer, project_qkv
from freemoref.fusion import Fusion, select_visual_tokens
from freemoref.kv_cache import KVCache, SequenceCache

if TYPE_CHECKING:
    from freemoref.engine import MoRefEngine


@dataclass
class SharedPrefix:
    """[system | merged visual] in the layers from L on, shared by every question of the batch.

    Slots 0..T_p-1 are positions 0..T_p-1; a question's own token s sits at position T_p + s."""

    fusion: Fusion  # the kept visual tokens
    layers: list[KVCache]  # the prefix's K/V in each layer from L on, (1, Hkv, T_p, Dh)
    real: torch.Tensor  # (1, T_p) all True: the prefix as the one row of `question_attention`
    # Once a batch's questions are on it (`questions_on_prefix`): each layer's prefix K/V followed
    # by the B questions' own slots, (1, Hkv, T_p + B * S, Dh), `layers` and the questions' caches
    # being views into it, so a decoding step attends to everything in one SDPA call.
    joint: list[KVCache] | None = None

    @property
    def length(self) -> int:
        return self.real.shape[1]


def video_fusion(importances: list[torch.Tensor], vis_mask, positions, keep_ratio: float) -> Fusion:
    """One fusion from the questions' importances (each (N, Tv), `visual_importance`): per reference
    and visual slot, the maximum over the questions; each reference keeps its top
    ceil(l_i * keep_ratio) real tokens, as a single question's fusion would."""
    return select_visual_tokens(torch.stack(importances).amax(0), vis_mask, positions, keep_ratio)


def run_shared_prefix(engine: MoRefEngine, h_prefix, h_vis, fusion: Fusion) -> SharedPrefix:
    """[system h_prefix (1, p, D) | kept tokens of h_vis (N, lv, D)] through the layers from L on
    with causal attention, K/V cached. The last layer only projects K/V: nothing reads its output."""
    h = torch.cat([h_prefix, h_vis[fusion.rows, fusion.slots][None]], 1)  # hidden: (1, T_p, D)
    length = h.shape[1]
    cos, sin = engine.cos_sin(h, torch.arange(length, device=h.device))
    layers = engine.layers[engine.fusion_layer :]
    caches = []
    for i, layer in enumerate(layers):
        q, k, v = project_qkv(layer, h, cos, sin)
        caches.append(KVCache(k, v))
        if i + 1 < len(layers):
            h = finish_layer(layer, h, causal_attention(q, k, v, layer.self_attn.scaling, engine.backend))
    real = torch.ones(1, length, dtype=torch.bool, device=h.device)
    return SharedPrefix(fusion, caches, real)


def attend_prefix(prefix: SharedPrefix, layer_index: int, q, own: KVCache, own_real, filled: int, slots,
                  scaling: float):
    """Attention of B questions' queries q (B, H, M, Dh) at own slots `slots` (M,) over the prefix
    (layer `layer_index` counted from L) and their first `filled` own slots, causal by slot. The
    prefix's K/V is read once for all questions. A decoding step (M = 1, own slots filled up to the
    new token) is one SDPA call over the joint cache (`decode_step_attention`); otherwise
    `question_attention` with one row and no gate, split over questions to stay within the score
    budget. Returns (B, M, H, Dh)."""
    if q.shape[2] == 1 and prefix.joint is not None:
        return decode_step_attention(prefix.joint[layer_index], q, own_real, prefix.length, scaling)
    rows = prefix.layers[layer_index]
    b, heads, m, _ = q.shape
    step = questions_per_call(1, heads, m, prefix.length + filled)
    return torch.cat([
        question_attention(q[i : i + step], rows.k, rows.v, prefix.real, own.k[i : i + step, :, :filled],
                           own.v[i : i + step, :, :filled], own_real[i : i + step, :filled], slots, scaling)
        for i in range(0, b, step)])


def decode_step_attention(joint: KVCache, q, own_real, prefix_len: int, scaling: float):
    """One decoding step of B questions, q (B, H, 1, Dh), over `joint` (1, Hkv, T_p + B * S, Dh):
    the prefix, then question b's S own slots at T_p + b * S (`own_real` (B, S) marks the real
    ones, the new token's included). All questions' query heads fold onto the query axis of their
    KV head, so one SDPA call reads the prefix's K/V once for the whole batch; a mask keeps each
    question to the prefix and its own slots. Fixed shapes: the CUDA graph records it.
    Returns (B, 1, H, Dh)."""
    b, heads, _, d = q.shape
    hkv = joint.k.shape[1]
    rep = heads // hkv
    queries = q.view(b, hkv, rep, d).transpose(0, 1).reshape(1, hkv, b * rep, d)  # rows ordered (b, r)
    own = torch.eye(b, dtype=torch.bool, device=q.device)[:, None, :, None] & own_real[None, None]  # (B, 1, B, S)
    mask = torch.cat([own_real.new_ones(b * rep, prefix_len), own.expand(b, rep, b, -1).reshape(b * rep, -1)], 1)
    o = F.scaled_dot_product_attention(queries, joint.k, joint.v, attn_mask=mask[None, None], scale=scaling)
    return o.view(hkv, b, rep, d).transpose(0, 1).reshape(b, 1, heads, d)


def questions_on_prefix(engine: MoRefEngine, prefix: SharedPrefix, h, own_real, question_len,
                        max_new_tokens: int):
    """The questions' tokens h (B, qm, D), entering L, right-padded (`own_real` (B, qm +
    max_new_tokens) marks real slots), through the layers from L on over the prefix. Returns the
    last hidden states (B, qm, D), their caches (sized for max_new_tokens more; generated tokens
    follow each question's last real token) and the prefix for decoding them: its K/V copied once
    into `joint` buffers that also hold those caches."""
    b, qm = h.shape[:2]
    per_question = qm + max_new_tokens
    slots = torch.arange(qm, device=h.device)
    cos, sin = engine.cos_sin(h, prefix.length + slots)
    real = own_real.clone()
    # Prompt tokens attend causally by slot (`question_attention`), even one-token questions: only
    # decoding steps use the joint cache, which a prefix reused from another batch may carry.
    prompt_prefix = dataclasses.replace(prefix, joint=None)
    caches, joint, views = [], [], []
    for li, layer in enumerate(engine.layers[engine.fusion_layer :]):
        q, k, v = project_qkv(layer, h, cos, sin)
        both = KVCache.holding(prefix.layers[li].k, prefix.layers[li].v, prefix.length + b * per_question)
        joint.append(both)
        views.append(KVCache(both.k[:, :, : prefix.length], both.v[:, :, : prefix.length]))
        # question b's slots: (Hkv, B, S, Dh) after the prefix, seen as (B, Hkv, S, Dh)
        hkv, dh = k.shape[1], k.shape[3]
        cache = KVCache(*(x[0, :, prefix.length :].view(hkv, b, per_question, dh).transpose(0, 1)
                          for x in (both.k, both.v)))
        cache.k[:, :, :qm], cache.v[:, :, :qm] = k, v
        caches.append(cache)
        h = finish_layer(layer, h, attend_prefix(prompt_prefix, li, q, cache, real, qm, slots,
                                                 layer.self_attn.scaling))
    on_prefix = SharedPrefix(prefix.fusion, views, prefix.real, joint)
    return h, SequenceCache(caches, real, qm, prefix.length + question_len), on_prefix
