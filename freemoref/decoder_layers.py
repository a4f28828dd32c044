"""One HF decoder layer (Qwen2/Qwen3-style: pre-norm, per-head q/k norms where present, rotary, GQA
attention, gated MLP) run piece by piece. The engine drives the layers itself because the batch
changes shape at the fusion layer (N rows below it, one sequence per question from it on), which the
HF forward cannot do; between `project_qkv` and `finish_layer` it runs whichever attention the phase
needs.
"""

from __future__ import annotations

import torch

# Tokens per MLP call in the long passes: the MLP's intermediate activations (3 x 18944 wide in
# Qwen2-7B) of a whole 93k-token batch of rows would take ~10 GiB; chunks bound that.
MLP_CHUNK_TOKENS = 16384


def split_lm(lm):
    """(decoder, lm_head) of a `*ForCausalLM`, a LlavaOnevisionForConditionalGeneration (its
    `.model.language_model` and `.lm_head`), or a (decoder, lm_head) pair."""
    if isinstance(lm, tuple):
        return lm
    decoder = getattr(lm, "model", lm)
    return getattr(decoder, "language_model", decoder), lm.get_output_embeddings()


def rope(x, cos, sin):
    """Rotary embedding of x (B, H, T, Dh) with cos, sin (B or 1, T, Dh)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos[:, None] + rotated * sin[:, None]


def project_qkv(layer, h, cos, sin):
    """Pre-norm, q/k/v projections and rotary of a decoder layer: h (B, T, D) ->
    q (B, H, T, Dh), k and v (B, Hkv, T, Dh), contiguous (they are cached)."""
    attn = layer.self_attn
    x = layer.input_layernorm(h)
    shape = (*x.shape[:-1], -1, attn.head_dim)
    q = head_norm(attn, "q_proj", attn.q_proj(x).view(shape)).transpose(1, 2)
    k = head_norm(attn, "k_proj", attn.k_proj(x).view(shape)).transpose(1, 2)
    v = attn.v_proj(x).view(shape).transpose(1, 2)
    return rope(q, cos, sin), rope(k, cos, sin).contiguous(), v.contiguous()


def project_rotated(layer, h, cos, sin, proj: str):
    """One projection ("q_proj" or "k_proj") of a layer's normed input, with rotary applied; for
    fusion scoring, which needs only the question's queries and the visual tokens' keys."""
    attn = layer.self_attn
    x = layer.input_layernorm(h)
    heads = head_norm(attn, proj, getattr(attn, proj)(x).view(*x.shape[:-1], -1, attn.head_dim))
    return rope(heads.transpose(1, 2), cos, sin)


def head_norm(attn, proj: str, x):
    """Qwen3-style per-head RMSNorm of queries or keys (B, T, H, Dh) before rotary (`q_norm`,
    `k_norm`); unchanged for layers without one (Qwen2)."""
    norm = getattr(attn, proj[0] + "_norm", None)
    return x if norm is None else norm(x)


def finish_layer(layer, h, o):
    """Rest of the layer after attention: o (B, T, H, Dh) -> next hidden states (B, T, D). The MLP
    runs in chunks of MLP_CHUNK_TOKENS tokens, in place, so long batches never hold it whole."""
    h = h + layer.self_attn.o_proj(o.flatten(2))
    flat = h.view(-1, h.shape[-1])
    for i in range(0, flat.shape[0], MLP_CHUNK_TOKENS):
        part = flat[i : i + MLP_CHUNK_TOKENS]
        part += layer.mlp(layer.post_attention_layernorm(part))
    return h
