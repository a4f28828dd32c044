"""MoRef attention (docs/DESIGN.md section 3): causal attention on N reference rows, then a gated mix of
the question tokens' outputs, so question hidden states stay identical across rows.

Registered in transformers as attention implementation "moref" (with `sdpa_mask` as its mask
function, or padding would be silently dropped). Per-call context travels as the `moref=` keyword:
transformers forwards unknown model-forward kwargs down to the attention function, so

    model.set_attn_implementation("moref")
    model(inputs_embeds=rows, attention_mask=pad_mask, moref=MoRefContext(...))

runs MoRef attention (without fusion) through the model's own forward. Without `moref=` it is plain
causal attention. The engine (prefill.py, decoding.py) calls `question_attention` on the layers
below L instead, with the rows' K/V cached once per video.

The gate, in one place (`_gate`), for question queries q and row i's real visual keys K_i:
    A_i = softmax(q K_i^T * scale) over the visual keys; m_i = max of A_i over the visual keys
    chunk: s_i = max of m_i over heads and question tokens;  head: over question tokens;  token: m_i
    w_i = s_i / sum_j s_j;   O_ques = sum_i w_i O_ques[i]
Decoding extends the question: generated tokens are question tokens, and the max over question
tokens runs over those seen so far (the prompt's question as one block, then a running max), so a
token's gate never depends on later tokens and cached decoding equals recomputing from scratch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from freemoref.config import GRANULARITIES

BACKENDS = ("sdpa", "eager", "flash")

# SDPA kernels the engine allows, in this order. Not cuDNN: it builds a plan for every new shape
# (about 2.5 s each on an H200), so every question of a new length would pay it; the flash and
# memory-efficient kernels are exact and need no warm-up.
ENGINE_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

# Elements of float32 score matrix `question_attention` holds at once (1 GiB); larger batches of
# questions are split, so no full float32 score map of all rows and questions is ever built.
SCORE_BUDGET = 2**28

# Split-KV (as flash-decoding) for a decoding step's few queries: a cache's key axis is cut into
# chunks of DECODE_CHUNK slots, each its own batch entry of the probabilities-by-values matmul, so
# its long reduction spreads over the GPU instead of a thread block per head (SDPA's
# memory-efficient kernel, the only one taking a mask, ran a 12k-slot step at ~50 GB/s). The long
# caches decoding attends over (fused sequences, the shared prefix) hold a multiple of it
# (`decode_slots`); float32 partial sums of up to SPLIT_BUDGET elements, so a prefill's many
# queries take the plain matmul.
DECODE_CHUNK = 256
SPLIT_BUDGET = 2**25


def engine_sdpa():
    """Context restricting SDPA to `ENGINE_SDPA_BACKENDS`."""
    return sdpa_kernel(ENGINE_SDPA_BACKENDS, set_priority=True)


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


def float_scores(a, b) -> torch.Tensor:
    """a (..., M, D) @ b (..., D, T) as float32, batch dims equal. Half-precision inputs on CUDA
    accumulate into float32 output directly (bmm's out_dtype), as the flash kernel keeps its
    scores: rounding q.k to bf16 first would shift a softmax by up to a few percent."""
    if a.is_cuda and a.dtype in (torch.bfloat16, torch.float16):
        out = torch.bmm(a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:]), out_dtype=torch.float32)
        return out.view(*a.shape[:-1], b.shape[-1])
    return torch.matmul(a, b).float()


def decode_slots(slots: int) -> int:
    """`slots` rounded up to whole DECODE_CHUNK chunks: the capacity of a long cache decoding reads."""
    return -(-slots // DECODE_CHUNK) * DECODE_CHUNK


def probs_by_values(p, v) -> torch.Tensor:
    """p (..., M, T) @ v (..., T, D) as float32 (p in v's dtype). When T is a whole number (> 1) of
    DECODE_CHUNK chunks and the partial sums fit SPLIT_BUDGET, each chunk is a batch entry of one
    matmul and the partials are summed (split-KV); v's chunks are views, p's few rows are copied."""
    *batch, m, t = p.shape
    chunks = t // DECODE_CHUNK
    if t % DECODE_CHUNK or chunks < 2 or v.shape[-1] * m * chunks * math.prod(batch) > SPLIT_BUDGET:
        return float_scores(p, v)
    split_p = p.unflatten(-1, (chunks, DECODE_CHUNK)).transpose(-3, -2)  # (..., C, M, chunk)
    return float_scores(split_p, v.unflatten(-2, (chunks, DECODE_CHUNK))).sum(-3)


def cache_attention(q, k, v, real, scaling: float) -> torch.Tensor:
    """Attention of B sequences' newest queries q (B, H, M, D) over their caches k, v (B, Hkv, T, D),
    every query seeing the slots `real` (B, T) marks (a decoding step: M = 1, the new token's slot
    marked). GQA folds a KV head's query heads onto the query axis (no K/V copy); the key axis is
    split as in `probs_by_values`, so a step reads each cache once with the whole GPU. Returns
    (B, M, H, D)."""
    b, h, m, d = q.shape
    hkv = k.shape[1]
    qg = q.reshape(b, hkv, (h // hkv) * m, d)
    s = float_scores(qg, k.transpose(2, 3)).mul_(scaling).masked_fill_(~real[:, None, None, :], float("-inf"))
    e = (s - s.amax(-1, keepdim=True)).exp_()
    o = probs_by_values(e.to(v.dtype), v) / e.sum(-1, keepdim=True)
    return o.view(b, h, m, d).to(q.dtype).transpose(1, 2)


def questions_per_call(rows: int, heads: int, queries: int, keys: int) -> int:
    """How many questions one `question_attention` call may take within SCORE_BUDGET."""
    return max(1, SCORE_BUDGET // max(rows * heads * queries * keys, 1))


def causal_attention(query, key, value, scaling: float, backend: str = "sdpa") -> torch.Tensor:
    """Causal self-attention over whole rows (queries = keys = slots 0..T-1), GQA without copying
    K/V. query (B, H, T, D), key/value (B, Hkv, T, D) -> (B, T, H, D).

    Rows may be right-padded with no mask: padded slots come after every real slot of their row,
    so causality already hides them from real queries (padded queries get an output nobody reads).
    That keeps SDPA on its flash / memory-efficient kernels, which a dense mask rules out."""
    if backend != "sdpa":
        return attend(query, key, value, None, scaling, backend)
    o = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, enable_gqa=True)
    return o.transpose(1, 2)


def question_attention(q, rows_k, rows_v, rows_real, own_k, own_v, own_real, q_slots, scaling: float,
                       vis: slice | None = None, gate=None) -> torch.Tensor:
    """Attention of B questions' tokens over R shared rows and over their own earlier tokens.

    q (B, H, M, D): queries of the tokens at own slots `q_slots` (M,). rows_k/v (R, Hkv, T0, D),
    rows_real (R, T0): the rows every question shares (system prompt + one reference's visual
    tokens each; cached once per video). own_k/v (B, Hkv, Tk, D), own_real (B, Tk): each question's
    own tokens (its text, then generated ones), causal by slot. The rows' K/V are never copied per
    question: all questions' queries meet a row's keys in one matmul per KV head.

    R = 1 is plain attention. R > 1 is MoRef attention below the fusion layer: each row's output,
    then the mix O = sum_i w_i O_i with w = gate(m), m (R, B, H, M) the max over row i's visual
    keys (slots `vis`) of the softmax over those keys (docs/DESIGN.md section 3). Returns (B, M, H, D).
    It holds R * B * H * M * (T0 + Tk) float32 scores: callers split B by `questions_per_call`."""
    b, h, mq, d = q.shape
    r, hkv, t0, _ = rows_k.shape
    rep, x = h // hkv, (h // hkv) * mq
    qg = q.reshape(b, hkv, x, d)  # query heads sharing a KV head fold onto the query axis
    # (R, B, Hkv, X, T0) scores of every row for every question, one matmul per KV head.
    queries = qg.transpose(0, 1).reshape(hkv, b * x, d)[None].expand(r, -1, -1, -1)
    s_rows = float_scores(queries, rows_k.transpose(2, 3)).mul_(scaling).view(r, hkv, b, x, t0).transpose(1, 2)
    s_rows = s_rows.masked_fill(~rows_real[:, None, None, None, :], float("-inf"))
    s_own = float_scores(qg, own_k.transpose(2, 3)).mul_(scaling)  # (B, Hkv, X, Tk)
    tk = own_k.shape[2]
    own_mask = own_real[:, None, :] & (torch.arange(tk, device=q.device)[None, None] <= q_slots[None, :, None])
    s_own = s_own.masked_fill(~own_mask[:, None, None].expand(b, 1, rep, mq, tk).reshape(b, 1, x, tk), float("-inf"))
    top = torch.maximum(s_rows.amax(-1), s_own.amax(-1)[None])[..., None]  # (R, B, Hkv, X, 1)
    e_rows, e_own = (s_rows - top).exp_(), (s_own[None] - top).exp_()
    z = e_rows.sum(-1, keepdim=True) + e_own.sum(-1, keepdim=True)
    o = probs_by_values(e_rows.transpose(1, 2).reshape(r, hkv, b * x, t0).to(rows_v.dtype), rows_v)
    o = o.view(r, hkv, b, x, d).transpose(1, 2)
    # Own tokens: the R rows' probabilities fold onto the query axis, so each own V is read once.
    p_own = e_own.permute(1, 2, 0, 3, 4).reshape(b, hkv, r * x, -1).to(own_v.dtype)
    o = (o + probs_by_values(p_own, own_v).view(b, hkv, r, x, d).permute(2, 0, 1, 3, 4)) / z  # (R, B, Hkv, X, D)
    o = o.reshape(r, b, h, mq, d)
    if gate is not None and r > 1:
        sv = s_rows[..., vis]
        m = (sv.amax(-1) - sv.logsumexp(-1)).exp().reshape(r, b, h, mq)
        o = (gate(m)[..., None] * o).sum(0, keepdim=True)
    return o[0].to(q.dtype).transpose(1, 2)


def _flash_attend(query, key, value, key_real, scaling, varlen=None) -> torch.Tensor:
    """flash-attn on the unpadded rows: each row packed to its real tokens (positions are already in
    the rotary q/k), causal with bottom-right alignment, which is right because the queries are the
    last real slots of their row. `varlen` defaults to flash_attn.flash_attn_varlen_func."""
    if varlen is None:
        from flash_attn import flash_attn_varlen_func

        varlen = flash_attn_varlen_func
    b, h, tq, d = query.shape
    q_real = key_real[:, key.shape[2] - tq:]
    cu = lambda real: F.pad(real.sum(1).cumsum(0), (1, 0)).to(torch.int32)  # noqa: E731 - cumulative lengths, used twice below
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
    """`gate_mix_weights` for one question: m (N, H, T) -> weights (N, H or 1, T), running max."""
    w, running = gate_mix_weights(m[:, None], granularity, torch.tensor([block], device=m.device),
                                  None if carry is None else carry[:, None],
                                  torch.tensor([m.shape[-1]], device=m.device))
    return w[:, 0], None if running is None else running[:, 0]


def gate_mix_weights(m, granularity: str, block, carry, real_len):
    """Per-token gate weights for B questions at once, and each question's running max.

    m (N, B, H, T): max visual attention of every reference, question and query token.
    block (B,): leading tokens forming each question's prompt block (one shared max); later
    tokens (generated) take a running max that includes the block and `carry` (N, B, H', 1), the
    running max of earlier calls. real_len (B,): real tokens per question; tokens past it are
    padding, which only follows real tokens, so a left-to-right running max never sees it.
    Returns (N, B, H or 1, T) weights summing to 1 over N, and the running max at each question's
    last real token (N, B, H', 1), None for "token" granularity (no state)."""
    if granularity == "token":
        return m / m.sum(0), None
    if granularity == "chunk":
        m = m.amax(2, keepdim=True)
    t = torch.arange(m.shape[-1], device=m.device)
    in_block = t[None] < block[:, None]  # (B, T)
    head = m.masked_fill(~in_block[None, :, None], 0.0).amax(-1, keepdim=True)  # maxima are > 0
    m = torch.where(in_block[None, :, None], head, m)
    if carry is not None:
        m = torch.maximum(m, carry)
    m = m.cummax(-1).values
    last = (real_len - 1).clamp(min=0).view(1, -1, 1, 1).expand(m.shape[0], -1, m.shape[2], 1)
    return m / m.sum(0), m.gather(-1, last)


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
