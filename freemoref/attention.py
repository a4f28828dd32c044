"""MoRef attention (DESIGN.md section 3): causal attention on N reference rows, then a gated mix of
the question tokens' outputs, so question hidden states stay identical across rows.

Registered in transformers as attention implementation "moref" (with `sdpa_mask` as its mask
function, or padding would be silently dropped). Per-call context travels as the `moref=` keyword:
transformers forwards unknown model-forward kwargs down to the attention function, so

    model.set_attn_implementation("moref")
    model(inputs_embeds=rows, attention_mask=pad_mask, moref=MoRefContext(...))

runs MoRef attention (without fusion) through the model's own forward. Without `moref=` it is plain
causal attention. `engine.py` calls `moref_attention` directly on the layers below L.

The gate, in one place (`_gate`), for question queries q and row i's real visual keys K_i:
    A_i = softmax(q K_i^T * scale) over the visual keys; m_i = max of A_i over the visual keys
    chunk: s_i = max of m_i over heads and question tokens;  head: over question tokens;  token: m_i
    w_i = s_i / sum_j s_j;   O_ques = sum_i w_i O_ques[i]
Decoding extends the question: generated tokens are question tokens, and the max over question
tokens runs over those seen so far (the prompt's question as one block, then a running max), so a
token's gate never depends on later tokens and cached decoding equals recomputing from scratch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from freemoref.config import GRANULARITIES

BACKENDS = ("sdpa", "eager", "flash")


def backend_for(attn_implementation: str | None) -> str:
    """Attention backend matching a model's `attn_implementation`."""
    if attn_implementation and attn_implementation.startswith("flash_attention"):
        return "flash"
    return "eager" if attn_implementation == "eager" else "sdpa"


def _expand_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, Hkv, T, D) -> (B, H, T, D); query head h uses KV head h // n_rep (as HF's repeat_kv)."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def _causal(tq: int, tk: int, device) -> torch.Tensor:
    """(Tq, Tk) bool: the Tq queries are the last Tq of the Tk key slots."""
    return torch.arange(tq, device=device)[:, None] + (tk - tq) >= torch.arange(tk, device=device)[None, :]


def _key_real(mask: torch.Tensor | None, key: torch.Tensor) -> torch.Tensor:
    """(B, Tk) bool of real key slots. The last query of a causal padding mask sees every real key."""
    b, tk = key.shape[0], key.shape[2]
    if mask is None:
        return torch.ones(b, tk, dtype=torch.bool, device=key.device)
    last = mask[:, 0, -1, :]
    real = last if last.dtype == torch.bool else last > torch.finfo(last.dtype).min / 2
    return real.expand(b, tk)


def attend(query, key, value, mask, scaling: float, backend: str = "sdpa") -> torch.Tensor:
    """Causal attention; queries are the last Tq of the Tk key slots.

    query (B, H, Tq, D); key, value (B, Hkv, Tk, D); mask None (plain causal) or (B, 1, Tq, Tk),
    bool (True = attend) or additive float. Returns (B, Tq, H, D), the layout HF modules expect.
    """
    b, h, tq, d = query.shape
    n_rep = h // key.shape[1]
    if backend == "flash":
        return _flash_attend(query, key, value, _key_real(mask, key), scaling)
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
    if mask is None and 1 < tq < key.shape[2]:
        mask = _causal(tq, key.shape[2], query.device)[None, None]
    if backend == "eager":
        k, v = _expand_kv(key, n_rep), _expand_kv(value, n_rep)
        s = torch.matmul(query, k.transpose(2, 3)).float() * scaling
        if mask is None and tq > 1:
            mask = _causal(tq, tq, query.device)[None, None]
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask
        return torch.matmul(s.softmax(-1).to(value.dtype), v).transpose(1, 2)
    if tq == 1 and n_rep > 1 and (mask is None or mask.shape[1] == 1):
        # One query per head: fold the heads sharing a KV head onto the query axis, no K/V copy.
        o = F.scaled_dot_product_attention(
            query.view(b, h // n_rep, n_rep, d), key, value, attn_mask=mask, scale=scaling
        )
        return o.reshape(b, h, 1, d).transpose(1, 2)
    k, v = _expand_kv(key, n_rep), _expand_kv(value, n_rep)
    o = F.scaled_dot_product_attention(query, k, v, attn_mask=mask, is_causal=mask is None and tq > 1, scale=scaling)
    return o.transpose(1, 2)


def _flash_attend(query, key, value, key_real, scaling, varlen=None) -> torch.Tensor:
    """flash-attn on the unpadded rows: each row packed to its real tokens (positions are already in
    the rotary q/k), causal with bottom-right alignment, which is right because the queries are the
    last real slots of their row. `varlen` defaults to flash_attn.flash_attn_varlen_func."""
    if varlen is None:
        from flash_attn import flash_attn_varlen_func as varlen
    b, h, tq, d = query.shape
    q_real = key_real[:, key.shape[2] - tq:]
    cu = lambda real: F.pad(real.sum(1).cumsum(0), (1, 0)).to(torch.int32)  # noqa: E731
    o = varlen(
        query.transpose(1, 2)[q_real], key.transpose(1, 2)[key_real], value.transpose(1, 2)[key_real],
        cu(q_real), cu(key_real), int(q_real.sum(1).max()), int(key_real.sum(1).max()),
        softmax_scale=scaling, causal=True,
    )
    out = query.new_zeros(b, tq, h, d)
    out[q_real] = o.to(out.dtype)
    return out


def visual_scores(q, k_vis, scaling: float, vis_mask=None) -> torch.Tensor:
    """float32 logits (B, H, Tq, Tv) of queries (Bq, H, Tq, D) on visual keys (B, Hkv, Tv, D),
    -inf at padded keys. GQA: each query head meets its KV head (grouped, no K copy); a query
    batch of 1 broadcasts over the B rows."""
    bq, h, tq, d = q.shape
    b, hkv, tv, _ = k_vis.shape
    s = torch.matmul(q.float().reshape(bq, hkv, (h // hkv) * tq, d), k_vis.float().transpose(2, 3))
    s = s.view(max(b, bq), h, tq, tv) * scaling
    if vis_mask is not None:
        s = s.masked_fill(~vis_mask[:, None, None, :], float("-inf"))
    return s


def max_visual_attention(q, k_vis, scaling: float, vis_mask=None) -> torch.Tensor:
    """m (B, H, Tq): max over row i's real visual keys of A_i = softmax(q K_i^T * scale)."""
    s = visual_scores(q, k_vis, scaling, vis_mask)
    return torch.exp(s.amax(-1) - s.logsumexp(-1))  # = max of the softmax, without materializing it


def gate_weights(q_ques, k_vis, scaling: float, granularity: str = "chunk", vis_mask=None) -> torch.Tensor:
    """Gate weights of N references for one block of question tokens; they sum to 1 over axis 0.

    q_ques (N, H, Tq, D), k_vis (N, Hkv, Tv, D), vis_mask (N, Tv) True at real visual keys.
    Returns (N,) for "chunk", (N, H) for "head", (N, H, Tq) for "token".
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    m = max_visual_attention(q_ques, k_vis, scaling, vis_mask)
    score = {"chunk": lambda: m.amax((1, 2)), "head": lambda: m.amax(2), "token": lambda: m}[granularity]()
    return score / score.sum(0)


def _gate(m, granularity: str, block: int, carry):
    """Per-token weights (N, H or 1, T) from per-token maxima m (N, H, T), and the running max.

    The first `block` tokens (the prompt's question) share one max; later tokens (generated) take a
    running max that includes the block and `carry` (the running max of earlier calls)."""
    if granularity == "token":
        return m / m.sum(0), None
    if granularity == "chunk":
        m = m.amax(1, keepdim=True)
    if block > 0:
        head = m[..., :block].amax(-1, keepdim=True).expand(-1, -1, min(block, m.shape[-1]))
        m = torch.cat([head, m[..., block:]], -1)
    if carry is not None:
        m = torch.maximum(m, carry)
    m = m.cummax(-1).values
    return m / m.sum(0), m[..., -1:]


@dataclass
class MoRefContext:
    """What the "moref" attention needs to know about one call (same slots in every row).

    vis_start: key slot of the first visual token; vis_mask (N, Tv): True at real visual slots.
    ques_start: key slot of the first question token; every later slot is question or generated.
    fusion_layer: layers with layer_idx >= this run plain attention (no gate).
    gate_block: how many leading question tokens form the prompt's question (one shared max);
        None = every question token in the call.
    fixed_weights: (N,) gate weights to use instead of the computed ones (ablations, tests).
    running: layer_idx -> running max of the gate scores, carried from prefill into decoding.
    """

    vis_start: int
    vis_mask: torch.Tensor
    ques_start: int
    fusion_layer: int
    granularity: str = "chunk"
    gate_block: int | None = None
    backend: str = "sdpa"
    fixed_weights: torch.Tensor | None = None
    running: dict = field(default_factory=dict)


def moref_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, moref=None, **kwargs):
    """AttentionInterface function "moref": query (N, H, Tq, D), key/value (N, Hkv, Tk, D) at the
    KV-head count (HF passes them unexpanded); the queries are the last Tq key slots.
    Returns ((N, Tq, H, D), None) with every row's question outputs replaced by the gated mix."""
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    out = attend(query, key, value, attention_mask, scaling, moref.backend if moref is not None else "sdpa")
    if moref is None or module.layer_idx >= moref.fusion_layer:
        return out, None
    n, tq, tk = query.shape[0], query.shape[2], key.shape[2]
    first = max(moref.ques_start - (tk - tq), 0)  # first question query of this call
    if first >= tq:
        return out, None
    done = tk - tq + first - moref.ques_start  # question tokens already processed in earlier calls
    block = tq - first if moref.gate_block is None else moref.gate_block
    if 0 < done < block:
        raise ValueError("the prompt's question must reach MoRef attention in one call")
    if moref.fixed_weights is not None:
        w = moref.fixed_weights.float().view(n, 1, 1)
    else:
        vis = slice(moref.vis_start, moref.vis_start + moref.vis_mask.shape[1])
        m = max_visual_attention(query[:, :, first:], key[:, :, vis], scaling, moref.vis_mask)
        carry = moref.running.get(module.layer_idx) if done else None
        w, moref.running[module.layer_idx] = _gate(m, moref.granularity, block - done, carry)
    mixed = (w.permute(0, 2, 1)[..., None] * out[:, first:].float()).sum(0, keepdim=True)
    return torch.cat([out[:, :first], mixed.to(out.dtype).expand(n, -1, -1, -1)], 1), None


AttentionInterface.register("moref", moref_attention)
AttentionMaskInterface.register("moref", sdpa_mask)
