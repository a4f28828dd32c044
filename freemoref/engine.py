"""Free-MoRef prefill and decoding on an HF decoder (Qwen2-style layers), driven layer by layer:
the batch changes from N rows to one sequence at the fusion layer, which the HF forward cannot do.

Layout. Row i is [prefix | reference i's visual tokens, right-padded to the longest | question].
Padded slots are masked keys. The slot index is the position, so every row shares positions
0..l-1 and the question starts at the same position in all rows (a shorter reference leaves a gap
of at most a few tokens between its visual tokens and the question; RoPE only sees distances).

Computed once, not N times:
- the prefix (system prompt) runs with batch 1 through layers < L (it attends only to itself);
  its K/V is copied into every row's cache;
- question and generated tokens are identical across rows (the gate mixes their attention outputs
  identically), so their norms, q/k/v projections, o_proj and MLP run with batch 1; only their
  attention runs per row (the queries broadcast over the rows' caches, which differ);
- from layer L on there is a single fused sequence.
Only the visual tokens run N rows wide through the projections and MLP below L.

Caches are static per-layer buffers sized for the prompt plus max_new_tokens (as in gpt-fast).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from freemoref.attention import MoRefContext, attend, backend_for, moref_attention
from freemoref.config import GenerationOptions, ResolvedMoRef
from freemoref.fusion import Fusion, keep_counts, merge, select_visual_tokens, visual_importance


def split_lm(lm):
    """(decoder, lm_head) of a `*ForCausalLM`, a LlavaOnevisionForConditionalGeneration (its
    `.model.language_model` and `.lm_head`), or a (decoder, lm_head) pair."""
    if isinstance(lm, tuple):
        return lm
    decoder = getattr(lm, "model", lm)
    return getattr(decoder, "language_model", decoder), lm.get_output_embeddings()


def _rope(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos[:, None] + rotated * sin[:, None]


def _project(layer, h, cos, sin):
    """Pre-norm, q/k/v projections and rotary of a decoder layer: h (B, T, D) ->
    q (B, H, T, Dh), k and v (B, Hkv, T, Dh)."""
    attn = layer.self_attn
    x = layer.input_layernorm(h)
    shape = (*x.shape[:-1], -1, attn.head_dim)
    q = attn.q_proj(x).view(shape).transpose(1, 2)
    k = attn.k_proj(x).view(shape).transpose(1, 2)
    v = attn.v_proj(x).view(shape).transpose(1, 2)
    return _rope(q, cos, sin), _rope(k, cos, sin), v


def _rotated(layer, h, cos, sin, proj: str):
    """One projection ("q_proj" or "k_proj") of a layer's normed input, with rotary applied; for
    fusion scoring, which needs only the question's queries and the visual tokens' keys."""
    attn = layer.self_attn
    x = layer.input_layernorm(h)
    return _rope(getattr(attn, proj)(x).view(*x.shape[:-1], -1, attn.head_dim).transpose(1, 2), cos, sin)


def _finish(layer, h, o):
    """Rest of the layer after attention: o (B, T, H, Dh) -> next hidden states (B, T, D)."""
    h = h + layer.self_attn.o_proj(o.flatten(2))
    return h + layer.mlp(layer.post_attention_layernorm(h))


class MoRefSession:
    """One prompt's Free-MoRef state: `prefill` once, then `step` one token at a time.

    After `prefill`: `fusion` (kept tokens, None when nothing is fused), `visual_tokens_native`
    (sum of l_i), `visual_tokens_used` (visual tokens the layers from L on see), `prompt_tokens`
    (prefix + native visual + suffix: what the native model would read).
    """

    def __init__(self, lm, cfg: ResolvedMoRef, backend: str | None = None, fixed_weights=None):
        self.decoder, self.lm_head = split_lm(lm)
        self.layers = list(self.decoder.layers)
        self.cfg = cfg
        self.backend = backend or backend_for(getattr(self.decoder.config, "_attn_implementation", None))
        self.fixed_weights = fixed_weights

    def _cos_sin(self, like, length):
        return self.decoder.rotary_emb(like, torch.arange(length, device=like.device)[None])

    def _logits(self, h):
        return self.lm_head(self.decoder.norm(h[:, -1:])).float()[0, -1]  # last token only: vocab is large

    @torch.no_grad()
    def prefill(self, prefix, references, positions, suffix, extra=None, max_new_tokens: int = 0):
        """Last-token logits (vocab,) of [prefix | references | suffix | extra].

        prefix (P, D), suffix (S, D): embeddings shared by all rows (suffix = question + assistant
        prompt); references: N tensors (l_i, D); positions: N long tensors (l_i,), each token's
        global position in the un-partitioned visual sequence (fixes the order after fusion).
        extra (E, D): tokens already generated (for recomputing a decode from scratch): they are
        question tokens, gated with a running max, and not used for fusion importance, exactly as
        in `step`. max_new_tokens: cache room for `step`.
        """
        n = len(references)
        if n != self.cfg.references:
            raise ValueError(f"got {n} references, the resolved config expects {self.cfg.references}")
        if suffix.shape[0] < 1:
            raise ValueError("the suffix (question) must hold at least one token")
        d, layers = prefix.shape[-1], self.layers
        lengths = [r.shape[0] for r in references]
        if min(lengths) < 1:
            raise ValueError("every reference needs at least one visual token")
        p, s, lv = prefix.shape[0], suffix.shape[0], max(lengths)
        ques = torch.cat([suffix, extra if extra is not None else suffix[:0]])[None]  # (1, Q, D)
        nq = ques.shape[1]
        vis = prefix.new_zeros(n, lv, d)
        vis_mask = torch.zeros(n, lv, dtype=torch.bool, device=prefix.device)
        gpos = torch.full((n, lv), -1, dtype=torch.long, device=prefix.device)
        for i, (r, pos) in enumerate(zip(references, positions)):
            vis[i, : r.shape[0]], vis_mask[i, : r.shape[0]], gpos[i, : r.shape[0]] = r, True, pos
        # N = 1 is plain attention: one sequence from layer 0, nothing gated or dropped.
        self.L = min(self.cfg.fusion_layer, len(layers)) if n > 1 else 0
        self.visual_tokens_native = sum(lengths)
        self.prompt_tokens = p + sum(lengths) + s
        h_pre, h_vis, h_q = prefix[None], vis, ques

        # Layers < L: N rows, MoRef attention. Rows cache slots: [prefix | visual | question | new].
        t = p + lv + nq
        self.n, self.len_r = n, t
        self.cos_r, self.sin_r = self._cos_sin(prefix, t + max_new_tokens)
        self.key_real = torch.ones(n, t + max_new_tokens, dtype=torch.bool, device=prefix.device)
        self.key_real[:, p : p + lv] = vis_mask
        self.ctx = MoRefContext(vis_start=p, vis_mask=vis_mask, ques_start=p + lv, fusion_layer=self.L,
                                granularity=self.cfg.granularity, gate_block=s, backend=self.backend,
                                fixed_weights=self.fixed_weights)
        self.kv_rows = []
        mask = (torch.ones(lv + nq, t, dtype=torch.bool, device=prefix.device).tril(p)[None, None]
                & self.key_real[:, None, None, :t])
        sl_p, sl_v, sl_q = slice(0, p), slice(p, p + lv), slice(p + lv, t)
        cs = lambda sl: (self.cos_r[:, sl], self.sin_r[:, sl])  # noqa: E731
        for layer in layers[: self.L]:
            attn = layer.self_attn
            q_v, k_v, v_v = _project(layer, h_vis, *cs(sl_v))
            q_q, k_q, v_q = _project(layer, h_q, *cs(sl_q))
            K = k_v.new_empty(n, k_v.shape[1], t + max_new_tokens, k_v.shape[3])
            V = torch.empty_like(K)
            K[:, :, sl_v], V[:, :, sl_v], K[:, :, sl_q], V[:, :, sl_q] = k_v, v_v, k_q, v_q
            if p:
                q_p, k_p, v_p = _project(layer, h_pre, *cs(sl_p))
                K[:, :, sl_p], V[:, :, sl_p] = k_p, v_p
                h_pre = _finish(layer, h_pre, attend(q_p, k_p, v_p, None, attn.scaling, self.backend))
            query = torch.cat([q_v, q_q.expand(n, -1, -1, -1)], 2)
            o, _ = moref_attention(attn, query, K[:, :, :t], V[:, :, :t], mask, attn.scaling, moref=self.ctx)
            h_vis, h_q = _finish(layer, h_vis, o[:, :lv]), _finish(layer, h_q, o[:1, lv:])
            self.kv_rows.append((K, V))

        if self.L == len(layers):  # gated every layer, nothing fused
            self.fusion, self.visual_tokens_used = None, sum(lengths)
            return self._logits(h_q)

        # Fusion at layer L, from layer L's queries (prompt question) and keys (visual tokens).
        if keep_counts(lengths, self.cfg.keep_ratio) == lengths or n == 1:
            importance = vis_mask.float()  # everything is kept, no need to score
        else:
            layer = layers[self.L]
            q_q = _rotated(layer, h_q[:, :s], *cs(slice(p + lv, p + lv + s)), "q_proj")
            k_v = _rotated(layer, h_vis, *cs(sl_v), "k_proj")
            importance = visual_importance(q_q, k_v, layer.self_attn.scaling, vis_mask)
        keep = 1.0 if n == 1 else self.cfg.keep_ratio
        self.fusion: Fusion = select_visual_tokens(importance, vis_mask, gpos, keep)
        self.visual_tokens_used = len(self.fusion.rows)
        h = merge(h_pre, h_vis, h_q, self.fusion)

        # Layers >= L: one sequence with fresh positions 0..l'-1.
        tf = h.shape[1]
        self.len_f = tf
        self.cos_f, self.sin_f = self._cos_sin(prefix, tf + max_new_tokens)
        self.kv_fused = []
        for layer in layers[self.L :]:
            q, k, v = _project(layer, h, self.cos_f[:, :tf], self.sin_f[:, :tf])
            K = k.new_empty(1, k.shape[1], tf + max_new_tokens, k.shape[3])
            V = torch.empty_like(K)
            K[:, :, :tf], V[:, :, :tf] = k, v
            h = _finish(layer, h, attend(q, k, v, None, layer.self_attn.scaling, self.backend))
            self.kv_fused.append((K, V))
        return self._logits(h)

    @torch.no_grad()
    def step(self, token: int):
        """Append one generated token; return the next logits (vocab,)."""
        if self.len_r >= self.key_real.shape[1]:
            raise RuntimeError("the cache is full: pass a larger max_new_tokens to prefill")
        h = self.decoder.get_input_embeddings()(torch.tensor([[token]], device=self.key_real.device))
        t = self.len_r
        for layer, (K, V) in zip(self.layers[: self.L], self.kv_rows):
            # Batch 1 through the projections; per-row attention over each row's cache.
            q, k, v = _project(layer, h, self.cos_r[:, t : t + 1], self.sin_r[:, t : t + 1])
            K[:, :, t], V[:, :, t] = k[:, :, 0], v[:, :, 0]
            mask = self.key_real[:, None, None, : t + 1]
            o, _ = moref_attention(layer.self_attn, q.expand(self.n, -1, -1, -1), K[:, :, : t + 1],
                                   V[:, :, : t + 1], mask, layer.self_attn.scaling, moref=self.ctx)
            h = _finish(layer, h, o[:1])
        self.len_r += 1
        if self.L < len(self.layers):
            tf = self.len_f
            for layer, (K, V) in zip(self.layers[self.L :], self.kv_fused):
                q, k, v = _project(layer, h, self.cos_f[:, tf : tf + 1], self.sin_f[:, tf : tf + 1])
                K[:, :, tf], V[:, :, tf] = k[:, :, 0], v[:, :, 0]
                o = attend(q, K[:, :, : tf + 1], V[:, :, : tf + 1], None, layer.self_attn.scaling, self.backend)
                h = _finish(layer, h, o)
            self.len_f += 1
        return self._logits(h)


@dataclass
class MoRefOutput:
    """Generated token ids (the EOS that ended it included, as HF generate), why it stopped
    ("eos" | "stop" | "length"), seconds, and token counts."""

    tokens: list[int]
    finish_reason: str
    prefill_s: float
    generate_s: float
    visual_tokens_native: int
    visual_tokens_used: int
    prompt_tokens: int
    kept_per_reference: list[int] = field(default_factory=list)


def next_token(logits, gen, generator=None) -> int:
    """Greedy, or sampling with temperature and nucleus (top_p)."""
    if not gen.do_sample:
        return int(logits.argmax())
    probs = (logits.float() / gen.temperature).softmax(-1)
    if gen.top_p < 1.0:
        sorted_p, idx = probs.sort(descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p >= gen.top_p  # mass before a token already reaches top_p
        probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p.masked_fill(drop, 0.0))
    return int(torch.multinomial(probs, 1, generator=generator))


def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA work, so host timers measure it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def moref_prefill_logits(lm, prefix_embeds, references, reference_positions, suffix_embeds, cfg: ResolvedMoRef,
                         extra_embeds=None, backend: str | None = None, fixed_weights=None):
    """Last-token logits (vocab,) of one MoRef forward without a decode cache (see `MoRefSession.prefill`)."""
    session = MoRefSession(lm, cfg, backend, fixed_weights)
    return session.prefill(prefix_embeds, references, reference_positions, suffix_embeds, extra_embeds)


def moref_generate(lm, prefix_embeds, references, reference_positions, suffix_embeds, cfg: ResolvedMoRef,
                   gen=None, eos_token_ids=(), stop_checker=None, backend: str | None = None) -> MoRefOutput:
    """Free-MoRef prefill, then decode until EOS, `stop_checker(tokens) -> True` (e.g. stop strings
    on the decoded text) or gen.max_new_tokens. Inputs as in `MoRefSession.prefill`."""
    gen = gen or GenerationOptions()
    device = prefix_embeds.device
    session = MoRefSession(lm, cfg, backend)
    synchronize(device)
    t0 = time.perf_counter()
    logits = session.prefill(prefix_embeds, references, reference_positions, suffix_embeds,
                             max_new_tokens=gen.max_new_tokens)
    synchronize(device)
    t1 = time.perf_counter()
    generator = None
    if gen.do_sample:
        generator = torch.Generator(device=logits.device)
        generator.manual_seed(gen.seed) if gen.seed is not None else generator.seed()
    eos, tokens, reason = set(eos_token_ids or ()), [], "length"
    for i in range(gen.max_new_tokens):
        tokens.append(next_token(logits, gen, generator))
        if tokens[-1] in eos:
            reason = "eos"
            break
        if stop_checker is not None and stop_checker(tokens):
            reason = "stop"
            break
        if i + 1 < gen.max_new_tokens:
            logits = session.step(tokens[-1])
    synchronize(device)
    return MoRefOutput(tokens, reason, t1 - t0, time.perf_counter() - t1, session.visual_tokens_native,
                       session.visual_tokens_used, session.prompt_tokens,
                       session.fusion.kept_per_reference if session.fusion is not None else [])
