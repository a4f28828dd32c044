"""Free-MoRef prefill on the layers of an HF decoder, in its three phases (DESIGN.md section 3).

1. Reference rows, the layers below the fusion layer L (all layers when nothing is fused: native,
   or L = num_layers). Once per video, `reference_rows`: row i is [system prompt | reference i's
   visual tokens, right-padded to the longest, rounded up to whole split-KV chunks]; the N rows run
   batch N with causal attention and their K/V is cached. Attention is causal, so nothing here
   depends on a question. Then per batch of B questions, `question_rows`: each question's tokens run
   through the same layers attending to the cached rows and to their own tokens, gated
   (`question_attention`), so a question's hidden states are one copy, identical across the rows.
2. Fusion at L, `fuse`: each question keeps its own top visual tokens of the N rows (scored by its
   queries on layer L's visual keys) in one sequence [system | kept visual | question].
3. Fused sequence, `fused_sequence`: the B fused sequences, right-padded, through layers L on.
In video scope (`fusion_scope: video`), phases 2 and 3 are freemoref/shared_prefix.py's: one fusion
for the batch's questions, run once as a shared prefix, and only the questions' own tokens on top.

Positions, two ways. By default every row shares positions 0..T0-1 (T0 = system + longest
reference), every question starts at T0 (a shorter reference leaves a gap of a few slots before
the question; RoPE only sees distances) and the fused sequence is renumbered 0..Tf-1. A family with
multimodal rotary positions (Qwen2.5-VL, Qwen3-VL) passes `RotaryPositions` instead: each visual
token keeps its own (t, h, w) position in its row and in the fused sequence, and the question and
generated tokens continue from the family's text start, the same in every row.

Right padding needs no attention mask in the causal passes: padded slots come after every real slot
of their row. Masks appear only where queries are few (question tokens, decoding).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from freemoref.attention import (
    causal_attention,
    decode_slots,
    engine_sdpa,
    gate_mix_weights,
    question_attention,
    questions_per_call,
)
from freemoref.decoder_layers import finish_layer, project_qkv, project_rotated
from freemoref.fusion import Fusion, keep_counts, select_visual_tokens, visual_importance
from freemoref.kv_cache import KVCache, SequenceCache
from freemoref.shared_prefix import SharedPrefix, questions_on_prefix, run_shared_prefix, video_fusion

if TYPE_CHECKING:
    from freemoref.engine import MoRefEngine


@dataclass
class FusionInputs:
    """What fusion at layer L reads from the rows: their hidden states entering L, and L's keys."""

    h_prefix: torch.Tensor  # (1, p, D) system prompt, the same in every row
    h_vis: torch.Tensor  # (N, lv, D) visual tokens
    k_vis: torch.Tensor | None  # (N, Hkv, lv, Dh) layer L's rotary keys; None when fusion keeps every token


@dataclass
class RotaryPositions:
    """Explicit rotary positions of a video prompt, P axes each (3 for multimodal RoPE).

    prefix (P, p) and references[i] (P, l_i): the positions of the system prompt's and of each
    reference's visual tokens; text_start: the position of the first token after the video (the
    question), the same in every row. Text tokens have one position repeated on every axis."""

    prefix: torch.Tensor
    references: list[torch.Tensor]
    text_start: int


@dataclass
class VideoRows:
    """A video's reference rows after `reference_rows`, shared by all its questions.

    Slots of row i: [0, p) system prompt, [p, p + lv) reference i's visual tokens, right-padded to
    lv, the longest reference rounded up so that p + lv is whole split-KV chunks (`decode_slots`)."""

    prefix_len: int  # p
    lengths: list[int]  # l_i, visual tokens of reference i
    vis_mask: torch.Tensor  # (N, lv) True at real visual slots
    positions: torch.Tensor  # (N, lv) global position in the un-partitioned visual sequence, -1 at padding
    rows_real: torch.Tensor  # (N, p + lv) True at real slots
    kv: list[KVCache]  # the rows' K/V in each layer below L, (N, Hkv, p + lv, Dh)
    fusion_inputs: FusionInputs | None  # None when nothing is fused
    seconds: float  # time the rows took
    question_start: int  # position of each question's first token
    rope_rows: torch.Tensor | None = None  # (N, P, p + lv) explicit rotary positions; None: the slots
    # DeepStack (Qwen3-VL): per early layer k, (N, lv, D) features added to the visual tokens'
    # hidden states after layer k; None for families without it.
    deepstack: list[torch.Tensor] | None = None

    @property
    def rows(self) -> int:
        return len(self.lengths)

    @property
    def vis_len(self) -> int:
        return self.vis_mask.shape[1]

    @property
    def slots(self) -> int:
        return self.prefix_len + self.vis_len

    @property
    def shared_layers(self) -> int:
        """Layers the rows ran through: L, or every layer when nothing is fused."""
        return len(self.kv)

    @property
    def fused(self) -> bool:
        return self.fusion_inputs is not None


@dataclass
class QuestionPrefill:
    """B questions of one video after prefill, ready to decode."""

    logits: torch.Tensor  # (B, vocab) at each question's last token
    fusions: list[Fusion | None]  # each question's kept visual tokens; None when nothing is fused
    visual_tokens_used: list[int]  # visual tokens the layers from L on see, per question
    question_len: torch.Tensor  # (B,) tokens per question
    own: SequenceCache  # the questions' own tokens (then generated ones) in the layers below L
    fused: SequenceCache | None  # the fused sequences in the layers from L on; None when not fused
    # (layers below L, N, B, H', 1): each question's gate running max (H' = 1 for "chunk", H for
    # "head"), carried into decoding; None when no gate keeps state (N = 1, "token", fixed weights).
    gate_running: torch.Tensor | None
    # Video scope: the fused prefix every question reads from L on; `fused` then holds only the
    # questions' own tokens there. None in question scope.
    shared_prefix: SharedPrefix | None = None


@torch.no_grad()
def reference_rows(engine: MoRefEngine, prefix, references, positions, rope: RotaryPositions | None = None,
                   deepstack=None) -> VideoRows:
    """Phase 1, once per video: prefix (p, D) and N references (l_i, D) with their global positions
    (l_i,) (their order in the un-partitioned video), as N rows through the layers below L.
    rope: explicit rotary positions (None: the slots). deepstack: per early layer, each
    reference's features (l_i, D) to add after that layer (None: none)."""
    n = len(references)
    if n != engine.cfg.references:
        raise ValueError(f"got {n} references, the resolved config expects {engine.cfg.references}")
    lengths = [r.shape[0] for r in references]
    if min(lengths) < 1:
        raise ValueError("every reference needs at least one visual token")
    start = time.perf_counter()
    p, d, device = prefix.shape[0], prefix.shape[-1], prefix.device
    # Rows right-padded to whole split-KV chunks (`decode_slots`): every decoding step reads them.
    lv = decode_slots(p + max(lengths)) - p
    h = prefix.new_zeros(n, p + lv, d)  # hidden: (N, p + lv, D)
    h[:, :p] = prefix
    vis_mask = torch.zeros(n, lv, dtype=torch.bool, device=device)
    gpos = torch.full((n, lv), -1, dtype=torch.long, device=device)
    for i, (r, pos) in enumerate(zip(references, positions)):
        h[i, p : p + r.shape[0]], vis_mask[i, : r.shape[0]], gpos[i, : r.shape[0]] = r, True, pos
    rows_real = torch.cat([vis_mask.new_ones(n, p), vis_mask], 1)
    shared = engine.fusion_layer
    rope_rows = None
    if rope is None:
        cos, sin = engine.cos_sin(prefix, torch.arange(p + lv, device=device))
        question_start = p + max(lengths)  # the padding has no positions
    else:
        rope_rows = torch.zeros(n, rope.prefix.shape[0], p + lv, dtype=torch.long, device=device)
        rope_rows[:, :, :p] = rope.prefix.to(device)
        for i, r in enumerate(rope.references):
            rope_rows[i, :, p : p + r.shape[1]] = r.to(device)
        cos, sin = engine.cos_sin(prefix, rope_rows)
        question_start = rope.text_start
    stacked = None
    if deepstack is not None:  # per layer: the references' features, right-padded like the rows
        stacked = [h.new_zeros(n, lv, d) for _ in deepstack]
        for layer_features, padded in zip(deepstack, stacked):
            for i, f in enumerate(layer_features):
                padded[i, : f.shape[0]] = f
    kv = []
    with engine_sdpa():
        for li, layer in enumerate(engine.layers[:shared]):  # causal, no mask
            q, k, v = project_qkv(layer, h, cos, sin)
            h = finish_layer(layer, h, causal_attention(q, k, v, layer.self_attn.scaling, engine.backend))
            if stacked is not None and li < len(stacked):
                h[:, p:] += stacked[li]
            kv.append(KVCache(k, v))
    fusion_inputs = None
    if shared < len(engine.layers):
        h_vis = h[:, p:]  # (N, lv, D)
        k_vis = None
        if keep_counts(lengths, engine.cfg.keep_ratio) != lengths:
            k_vis = project_rotated(engine.layers[shared], h_vis, cos[:, p:], sin[:, p:], "k_proj")
        fusion_inputs = FusionInputs(h[:1, :p], h_vis, k_vis)
    return VideoRows(p, lengths, vis_mask, gpos, rows_real, kv, fusion_inputs, time.perf_counter() - start,
                     question_start, rope_rows, stacked)


def attend_rows(engine: MoRefEngine, video: VideoRows, li: int, q, own: KVCache, own_real, filled: int, slots,
                blocks, real_len, gate_running):
    """`question_attention` of queries q (B, H, M, Dh) at own slots `slots` (M,) over the rows'
    layer-li cache and the first `filled` own slots; gated below L for N > 1. Split over questions
    to stay within the score budget; each question's gate running max is kept in `gate_running`.
    Used by the prefill (M question tokens) and by every decoding step (M = 1)."""
    rows = video.kv[li]
    b, heads, m, _ = q.shape
    step = questions_per_call(video.rows, heads, m, video.slots + filled)
    vis = slice(video.prefix_len, video.slots)
    out = []
    for i in range(0, b, step):
        part = slice(i, i + step)

        def gate(scores, part=part):
            if engine.fixed_weights is not None:
                return engine.fixed_weights.view(-1, 1, 1, 1)
            carry = None if gate_running is None else gate_running[li][:, part]
            w, running = gate_mix_weights(scores, engine.cfg.granularity, blocks[part], carry, real_len[part])
            if running is not None:
                gate_running[li][:, part] = running
            return w

        out.append(question_attention(
            q[part], rows.k, rows.v, video.rows_real, own.k[part, :, :filled], own.v[part, :, :filled],
            own_real[part, :filled], slots, engine.layers[li].self_attn.scaling, vis,
            gate if video.rows > 1 else None))
    return torch.cat(out)


def question_rows(engine: MoRefEngine, video: VideoRows, h, own_real, blocks, question_len, max_new_tokens: int,
                  gate_running):
    """Phase 1 for a batch of questions: their tokens h (B, qm, D), right-padded, at own slots
    0..qm-1 (positions T0..), through the layers below L over the rows. Returns the hidden states
    entering L (B, qm, D), the own caches (sized for max_new_tokens more) and the rotary tables."""
    qm = h.shape[1]
    slots = torch.arange(qm, device=h.device)
    cos, sin = engine.cos_sin(h, video.question_start + slots)
    caches = []
    for li, layer in enumerate(engine.layers[: video.shared_layers]):
        q, k, v = project_qkv(layer, h, cos, sin)  # q: (B, H, qm, Dh)
        cache = KVCache.holding(k, v, qm + max_new_tokens)
        caches.append(cache)
        o = attend_rows(engine, video, li, q, cache, own_real, qm, slots, blocks, question_len, gate_running)
        h = finish_layer(layer, h, o)
    return h, caches, cos, sin


def question_importance(engine: MoRefEngine, video: VideoRows, h, blocks, cos, sin) -> list[torch.Tensor]:
    """Each question's importance (N, lv) of the rows' visual tokens at layer L, scored by its
    prompt question's queries (blocks[b] leading tokens of h (B, qm, D)) on L's visual keys."""
    inputs = video.fusion_inputs
    assert inputs is not None  # called only for a fused video
    if inputs.k_vis is None:  # everything is kept, no need to score
        return [video.vis_mask.float()] * h.shape[0]
    layer = engine.layers[video.shared_layers]
    q = project_rotated(layer, h, cos, sin, "q_proj")  # (B, H, qm, Dh)
    return [visual_importance(q[i : i + 1, :, : int(blocks[i])], inputs.k_vis, layer.self_attn.scaling,
                              video.vis_mask) for i in range(h.shape[0])]


def fuse(engine: MoRefEngine, video: VideoRows, h, blocks, cos, sin, question_len):
    """Phase 2, at layer L: each question's fusion, scored by its prompt question's queries (blocks[b]
    leading tokens of h (B, qm, D)) on the rows' visual keys. Returns the fusions, the fused
    sequences (B, Tf, D) = [system | kept visual | question, right-padded], their real lengths (B,)
    and, with explicit rotary positions, the fused sequences' positions (B, P, Tf) (else None)."""
    inputs = video.fusion_inputs
    assert inputs is not None  # called only for a fused video (see `prefill_questions`)
    b, qm, d = h.shape
    fusions = [select_visual_tokens(imp, video.vis_mask, video.positions, engine.cfg.keep_ratio)
               for imp in question_importance(engine, video, h, blocks, cos, sin)]
    kept, p = len(fusions[0].rows), video.prefix_len
    fused = h.new_empty(b, p + kept + qm, d)  # hidden: (B, Tf, D)
    fused[:, :p] = inputs.h_prefix
    for i, f in enumerate(fusions):
        fused[i, p : p + kept] = inputs.h_vis[f.rows, f.slots]
    fused[:, p + kept :] = h
    positions = None
    if video.rope_rows is not None:  # the kept tokens keep their own positions
        rope_rows, axes = video.rope_rows, video.rope_rows.shape[1]
        positions = rope_rows.new_empty(b, axes, p + kept + qm)
        positions[:, :, :p] = rope_rows[:1, :, :p]
        for i, f in enumerate(fusions):
            positions[i, :, p : p + kept] = rope_rows[f.rows, :, p + f.slots].T
        positions[:, :, p + kept :] = video.question_start + torch.arange(qm, device=h.device)
    return fusions, fused, p + kept + question_len, positions


def fused_sequence(engine: MoRefEngine, fused, fused_len, max_new_tokens: int, positions=None, next_position=None,
                   deepstack=None):
    """Phase 3: the fused sequences (B, Tf, D), real up to fused_len (B,), through the layers from L
    on with causal attention, at `positions` (B, P, Tf) (None: renumbered 0..Tf-1; the first
    generated token then follows at fused_len, else at `next_position` (B,)). deepstack: per early
    layer from L on, (B, Tf, D) features to add after it (kept visual tokens only). Returns the last
    hidden states (B, Tf, D) and their caches."""
    b, tf, _ = fused.shape
    # Capacity in whole split-KV chunks: decoding reads these caches with `cache_attention`.
    real = torch.zeros(b, decode_slots(tf + max_new_tokens), dtype=torch.bool, device=fused.device)
    real[:, :tf] = torch.arange(tf, device=fused.device)[None] < fused_len[:, None]
    cos, sin = engine.cos_sin(fused, torch.arange(tf, device=fused.device) if positions is None else positions)
    caches = []
    for li, layer in enumerate(engine.layers[engine.fusion_layer :], engine.fusion_layer):
        q, k, v = project_qkv(layer, fused, cos, sin)
        caches.append(KVCache.holding(k, v, real.shape[1]))
        fused = finish_layer(layer, fused, causal_attention(q, k, v, layer.self_attn.scaling, engine.backend))
        if deepstack is not None and li < len(deepstack):
            fused += deepstack[li]
    return fused, SequenceCache(caches, real, tf, fused_len if positions is None else next_position)


def fused_deepstack(video: VideoRows, fusions, tf: int, first_layer: int):
    """Per layer from `first_layer` on that has DeepStack features: (B, Tf, D) holding each kept
    token's features at its fused slot (zero elsewhere); earlier layers' entries are None."""
    if video.deepstack is None or first_layer >= len(video.deepstack):
        return None
    p = video.prefix_len
    out: list[torch.Tensor | None] = [None] * first_layer
    for features in video.deepstack[first_layer:]:
        padded = features.new_zeros(len(fusions), tf, features.shape[-1])
        for i, f in enumerate(fusions):
            padded[i, p : p + len(f.rows)] = features[f.rows, f.slots]
        out.append(padded)
    return out


def prefill_questions(engine: MoRefEngine, video: VideoRows, questions, blocks, max_new_tokens: int,
                      prefix: SharedPrefix | None = None) -> QuestionPrefill:
    """Phases 1 (question tokens), 2 and 3 for B questions (each (q_b, D)); blocks[b]: how many
    leading tokens form the prompt's question (default all; later tokens count as generated ones,
    for recomputing a decode from scratch). In video scope, phases 2 and 3 build one shared prefix
    from these questions (`freemoref.shared_prefix`), or reuse `prefix`, built from a larger set."""
    if not questions:
        raise ValueError("no questions")
    if min(q.shape[0] for q in questions) < 1:
        raise ValueError("the suffix (question) must hold at least one token")
    device = questions[0].device
    b, qm, d = len(questions), max(q.shape[0] for q in questions), questions[0].shape[-1]
    question_len = torch.tensor([q.shape[0] for q in questions], device=device)
    blocks = question_len if blocks is None else torch.tensor(list(blocks), device=device)
    h = questions[0].new_zeros(b, qm, d)  # hidden: (B, qm, D), right-padded
    for i, q in enumerate(questions):
        h[i, : q.shape[0]] = q
    # Own slots: [question, right-padded to qm | generated]; real ones marked.
    own_real = torch.zeros(b, qm + max_new_tokens, dtype=torch.bool, device=device)
    own_real[:, :qm] = torch.arange(qm, device=device)[None] < question_len[:, None]
    gate_running = None
    if video.rows > 1 and engine.fixed_weights is None and engine.cfg.granularity != "token":
        # Starts at 0, below any gate score (each is a softmax maximum, > 0): the same as no carry.
        heads = 1 if engine.cfg.granularity == "chunk" else engine.decoder.config.num_attention_heads
        gate_running = torch.zeros(video.shared_layers, video.rows, b, heads, 1, dtype=torch.float32, device=device)
    last = torch.arange(b, device=device)
    with engine_sdpa():
        h, own_layers, cos, sin = question_rows(engine, video, h, own_real, blocks, question_len, max_new_tokens,
                                                gate_running)
        own = SequenceCache(own_layers, own_real, qm, video.question_start + question_len)
        if not video.fused:
            return QuestionPrefill(engine.logits(h[last, question_len - 1]), [None] * b, [sum(video.lengths)] * b,
                                   question_len, own, None, gate_running)
        if engine.cfg.fusion_scope == "video":
            assert video.fusion_inputs is not None  # video.fused
            if video.rope_rows is not None or video.deepstack is not None:
                raise ValueError("fusion_scope 'video' runs on families with 1-D positions (LlavaOnevision); "
                                 "this model's multimodal rotary positions need fusion_scope 'question'")
            if prefix is None:
                fusion = video_fusion(question_importance(engine, video, h, blocks, cos, sin), video.vis_mask,
                                      video.positions, engine.cfg.keep_ratio)
                prefix = run_shared_prefix(engine, video.fusion_inputs.h_prefix, video.fusion_inputs.h_vis, fusion)
            h, on_prefix = questions_on_prefix(engine, prefix, h, own_real, question_len, max_new_tokens)
            return QuestionPrefill(engine.logits(h[last, question_len - 1]), [prefix.fusion] * b,
                                   [len(prefix.fusion.rows)] * b, question_len, own, on_prefix, gate_running, prefix)
        fusions, fused, fused_len, positions = fuse(engine, video, h, blocks, cos, sin, question_len)
        stack = fused_deepstack(video, fusions, fused.shape[1], engine.fusion_layer)
        fused, fused_cache = fused_sequence(engine, fused, fused_len, max_new_tokens, positions,
                                            video.question_start + question_len, stack)
        return QuestionPrefill(engine.logits(fused[last, fused_len - 1]), fusions, [len(f.rows) for f in fusions],
                               question_len, own, fused_cache, gate_running)
