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

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from freemoref.attention import causal_attention, decode_slots, question_attention, questions_per_call
from freemoref.decoder_layers import finish_layer, project_qkv
from freemoref.fusion import Fusion, select_visual_tokens
from freemoref.kv_cache import KVCache, SequenceCache

if TYPE_CHECKING:
    from freemoref.engine import MoRefEngine


@dataclass
class SharedPrefix:
    """[system | merged visual] in the layers from L on, shared by every question of the batch.

    Slots 0..T_p-1 are positions 0..T_p-1; a question's own token s sits at position T_p + s. The
    caches hold `decode_slots(T_p)` slots (split-KV decoding), the ones past T_p unreal."""

    fusion: Fusion  # the kept visual tokens
    layers: list[KVCache]  # the prefix's K/V in each layer from L on, (1, Hkv, decode_slots(T_p), Dh)
    real: torch.Tensor  # (1, decode_slots(T_p)), True at the T_p real slots: the one row of `question_attention`
    length: int  # T_p


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
    real = torch.zeros(1, decode_slots(length), dtype=torch.bool, device=h.device)
    real[:, :length] = True
    caches = []
    for i, layer in enumerate(layers):
        q, k, v = project_qkv(layer, h, cos, sin)
        caches.append(KVCache.holding(k, v, real.shape[1]))
        if i + 1 < len(layers):
            h = finish_layer(layer, h, causal_attention(q, k, v, layer.self_attn.scaling, engine.backend))
    return SharedPrefix(fusion, caches, real, length)


def attend_prefix(prefix: SharedPrefix, layer_index: int, q, own: KVCache, own_real, filled: int, slots,
                  scaling: float):
    """Attention of B questions' queries q (B, H, M, Dh) at own slots `slots` (M,) over the prefix
    (layer `layer_index` counted from L) and their first `filled` own slots, causal by slot:
    `question_attention` with the prefix as its one row, whose K/V every question's queries read
    together (split-KV for a decoding step's few queries), split over questions to stay within the
    score budget. Returns (B, M, H, Dh)."""
    rows = prefix.layers[layer_index]
    b, heads, m, _ = q.shape
    step = questions_per_call(1, heads, m, prefix.real.shape[1] + filled)
    return torch.cat([
        question_attention(q[i : i + step], rows.k, rows.v, prefix.real, own.k[i : i + step, :, :filled],
                           own.v[i : i + step, :, :filled], own_real[i : i + step, :filled], slots, scaling)
        for i in range(0, b, step)])


def questions_on_prefix(engine: MoRefEngine, prefix: SharedPrefix, h, own_real, question_len,
                        max_new_tokens: int):
    """The questions' tokens h (B, qm, D), entering L, right-padded (`own_real` (B, qm +
    max_new_tokens) marks real slots), through the layers from L on over the prefix. Returns the
    last hidden states (B, qm, D) and their caches (sized for max_new_tokens more; generated tokens
    follow each question's last real token)."""
    qm = h.shape[1]
    slots = torch.arange(qm, device=h.device)
    cos, sin = engine.cos_sin(h, prefix.length + slots)
    real = own_real.clone()
    caches = []
    for li, layer in enumerate(engine.layers[engine.fusion_layer :]):
        q, k, v = project_qkv(layer, h, cos, sin)
        cache = KVCache.holding(k, v, real.shape[1])
        caches.append(cache)
        h = finish_layer(layer, h, attend_prefix(prefix, li, q, cache, real, qm, slots, layer.self_attn.scaling))
    return h, SequenceCache(caches, real, qm, prefix.length + question_len)
