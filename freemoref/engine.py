"""Free-MoRef prefill and decoding on an HF decoder (Qwen2-style layers), driven layer by layer:
the batch changes from N rows to one sequence per question at the fusion layer L, which the HF
forward cannot do. Native inference (one reference, N = 1) runs through the same code.

A video's questions share its work, in two phases:

1. `MoRefEngine.encode_video`, once per video and frame selection. Row i is [system prompt |
   reference i's visual tokens, right-padded to the longest]; the N rows run batch N through the
   layers below L (all layers when nothing is fused: native, or L = num_layers) with causal flash
   attention, and their K/V is cached. Attention is causal, so nothing here depends on a question.
2. `QuestionBatch`, per batch of questions. Each question's tokens run through the layers below L
   attending to the cached rows and to their own tokens, gated (`question_attention`); at L each
   question keeps its own top visual tokens (fusion) and [system | kept visual | question] runs
   through the layers from L on, batch B, right-padded; decoding steps all B questions together.

Every row shares positions 0..T0-1 (T0 = system + longest reference) and every question starts at
slot T0, so a shorter reference leaves a gap of a few slots before the question (RoPE only sees
distances). Questions of different lengths are right-padded; a question's generated tokens follow
its own last token in position, whatever slot holds them, so a question answers exactly as alone.

Right padding needs no attention mask in the causal passes: padded slots come after every real
slot of their row. Masks appear only where queries are few (question tokens, decoding).
Caches are static buffers sized for the prompt plus max_new_tokens (as in gpt-fast).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import cast

import torch

from freemoref.attention import (
    attend,
    backend_for,
    causal_attention,
    engine_sdpa,
    gate_mix_weights,
    question_attention,
    questions_per_call,
)
from freemoref.config import GenerationOptions, ResolvedMoRef
from freemoref.fusion import Fusion, keep_counts, select_visual_tokens, visual_importance

# Tokens per MLP call in the long passes: the MLP's intermediate activations (3 x 18944 wide in
# Qwen2-7B) of a whole 93k-token batch of rows would take ~10 GiB; chunks bound that.
MLP_CHUNK_TOKENS = 16384

# Default budget of tokens in one batch of questions through the layers from L on (their fused
# sequences together); larger question sets are answered in several batches.
MAX_BATCH_TOKENS = 131072


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
    q (B, H, T, Dh), k and v (B, Hkv, T, Dh), contiguous (they are cached)."""
    attn = layer.self_attn
    x = layer.input_layernorm(h)
    shape = (*x.shape[:-1], -1, attn.head_dim)
    q = attn.q_proj(x).view(shape).transpose(1, 2)
    k = attn.k_proj(x).view(shape).transpose(1, 2)
    v = attn.v_proj(x).view(shape).transpose(1, 2)
    return _rope(q, cos, sin), _rope(k, cos, sin).contiguous(), v.contiguous()


def _rotated(layer, h, cos, sin, proj: str):
    """One projection ("q_proj" or "k_proj") of a layer's normed input, with rotary applied; for
    fusion scoring, which needs only the question's queries and the visual tokens' keys."""
    attn = layer.self_attn
    x = layer.input_layernorm(h)
    return _rope(getattr(attn, proj)(x).view(*x.shape[:-1], -1, attn.head_dim).transpose(1, 2), cos, sin)


def _finish(layer, h, o):
    """Rest of the layer after attention: o (B, T, H, Dh) -> next hidden states (B, T, D). The MLP
    runs in chunks of MLP_CHUNK_TOKENS tokens, in place, so long batches never hold it whole."""
    h = h + layer.self_attn.o_proj(o.flatten(2))
    flat = h.view(-1, h.shape[-1])
    for i in range(0, flat.shape[0], MLP_CHUNK_TOKENS):
        part = flat[i : i + MLP_CHUNK_TOKENS]
        part += layer.mlp(layer.post_attention_layernorm(part))
    return h


@dataclass
class KVCache:
    """One layer's keys and values, (B, Hkv, T, Dh) each."""

    k: torch.Tensor
    v: torch.Tensor

    @classmethod
    def holding(cls, k, v, slots: int) -> KVCache:
        """A cache of `slots` slots whose first slots hold k, v."""
        # Zeros, not garbage: unfilled slots are masked, but 0 x NaN would still poison a sum.
        cache = cls(k.new_zeros(*k.shape[:2], slots, k.shape[3]), v.new_zeros(*v.shape[:2], slots, v.shape[3]))
        cache.k[:, :, : k.shape[2]], cache.v[:, :, : v.shape[2]] = k, v
        return cache

    def write(self, slot: torch.Tensor, k, v) -> None:
        """Store one token's k, v (B, Hkv, 1, Dh) at `slot` (a (1,) device tensor: no host sync)."""
        self.k.index_copy_(2, slot, k)
        self.v.index_copy_(2, slot, v)


@dataclass
class VideoRows:
    """A video's shared work (`MoRefEngine.encode_video`), reused by all its questions.

    rows: N; prefix_len: p (system prompt); vis_len: lv (longest reference); the rows' slots are
    [0, p) system, [p, p + lv) visual. shared_layers: layers whose row K/V is in `kv` (L, or every
    layer when nothing is fused). fused: whether layers from L on run on fused sequences; then
    h_prefix (1, p, D) and h_vis (N, lv, D) are the rows' hidden states entering layer L, and
    k_vis_fusion (N, Hkv, lv, Dh) layer L's keys of the visual tokens (None when fusion keeps every
    token and needs no scores).
    """

    rows: int
    prefix_len: int
    vis_len: int
    lengths: list[int]
    vis_mask: torch.Tensor  # (N, lv) True at real visual slots
    positions: torch.Tensor  # (N, lv) global position in the un-partitioned visual sequence, -1 at padding
    rows_real: torch.Tensor  # (N, p + lv) True at real slots
    shared_layers: int
    fused: bool
    kv: list[KVCache]
    h_prefix: torch.Tensor | None = None
    h_vis: torch.Tensor | None = None
    k_vis_fusion: torch.Tensor | None = None
    seconds: float = 0.0

    @property
    def slots(self) -> int:
        return self.prefix_len + self.vis_len


class MoRefEngine:
    """A decoder, its resolved MoRef settings and attention backend.

    fixed_weights (N,): gate weights used instead of the computed ones (ablations, tests).
    max_batch_tokens: budget of fused tokens per batch of questions (`generate_answers`).
    cuda_graphs: on CUDA, decode by replaying a recorded CUDA graph of the step."""

    def __init__(self, lm, cfg: ResolvedMoRef, backend: str | None = None, fixed_weights=None,
                 max_batch_tokens: int = MAX_BATCH_TOKENS, cuda_graphs: bool = True):
        self.decoder, self.lm_head = split_lm(lm)
        self.layers = list(self.decoder.layers)
        self.cfg = cfg
        self.backend = backend or backend_for(getattr(self.decoder.config, "_attn_implementation", None))
        device = self.decoder.get_input_embeddings().weight.device
        self.fixed_weights = None if fixed_weights is None else fixed_weights.to(device, torch.float32)
        self.max_batch_tokens = max_batch_tokens
        self.cuda_graphs = cuda_graphs and device.type == "cuda"
        # N = 1 is plain attention: nothing gated or fused. L >= num_layers gates every layer.
        self.fusion_layer = min(cfg.fusion_layer, len(self.layers)) if cfg.references > 1 else len(self.layers)

    def cos_sin(self, like, positions):
        """Rotary tables for positions (B, T) or (T,) -> cos, sin (B or 1, T, Dh)."""
        positions = positions if positions.dim() == 2 else positions[None]
        return self.decoder.rotary_emb(like, positions)

    def logits(self, h):
        """Logits (B, vocab) of hidden states (B, D): the vocabulary is large, so last tokens only."""
        return self.lm_head(self.decoder.norm(h)).float()

    @torch.no_grad()
    def encode_video(self, prefix, references, positions) -> VideoRows:
        """Phase 1: prefix (P, D) and N references (l_i, D) with their global positions (l_i,)."""
        n = len(references)
        if n != self.cfg.references:
            raise ValueError(f"got {n} references, the resolved config expects {self.cfg.references}")
        lengths = [r.shape[0] for r in references]
        if min(lengths) < 1:
            raise ValueError("every reference needs at least one visual token")
        start = time.perf_counter()
        p, lv, d, device = prefix.shape[0], max(lengths), prefix.shape[-1], prefix.device
        h = prefix.new_zeros(n, p + lv, d)
        h[:, :p] = prefix
        vis_mask = torch.zeros(n, lv, dtype=torch.bool, device=device)
        gpos = torch.full((n, lv), -1, dtype=torch.long, device=device)
        for i, (r, pos) in enumerate(zip(references, positions)):
            h[i, p : p + r.shape[0]], vis_mask[i, : r.shape[0]], gpos[i, : r.shape[0]] = r, True, pos
        rows_real = torch.cat([vis_mask.new_ones(n, p), vis_mask], 1)
        shared = self.fusion_layer
        cos, sin = self.cos_sin(prefix, torch.arange(p + lv, device=device))
        kv = []
        with engine_sdpa():
            for layer in self.layers[:shared]:  # (N, p + lv, D) -> same; causal, no mask
                q, k, v = _project(layer, h, cos, sin)
                h = _finish(layer, h, causal_attention(q, k, v, layer.self_attn.scaling, self.backend))
                kv.append(KVCache(k, v))
        video = VideoRows(n, p, lv, lengths, vis_mask, gpos, rows_real, shared, shared < len(self.layers), kv)
        if video.fused:
            video.h_prefix, video.h_vis = h[:1, :p], h[:, p:]
            if keep_counts(lengths, self.cfg.keep_ratio) != lengths:
                video.k_vis_fusion = _rotated(self.layers[shared], video.h_vis, cos[:, p:], sin[:, p:], "k_proj")
        video.seconds = time.perf_counter() - start
        return video

    def start(self, video: VideoRows, questions, blocks=None, max_new_tokens: int = 0) -> QuestionBatch:
        """Phase 2's prefill for B questions (each (q_b, D), identical across rows); blocks[b]: how
        many leading tokens form the prompt's question (default all; later tokens count as
        generated ones, for recomputing a decode from scratch). Returns the prefilled batch."""
        return QuestionBatch(self, video, questions, blocks, max_new_tokens)


class QuestionBatch:
    """B questions of one video: prefilled at construction (`logits`, (B, vocab)), then `step`.

    After prefill: `fusions` (one `Fusion` per question, None when nothing is fused),
    `visual_tokens_used` (visual tokens the layers from L on see, per question)."""

    fusions: list[Fusion | None]  # per question; None where nothing is fused (native or L = num_layers)

    def __init__(self, engine: MoRefEngine, video: VideoRows, questions, blocks, max_new_tokens: int):
        if not questions:
            raise ValueError("no questions")
        if min(q.shape[0] for q in questions) < 1:
            raise ValueError("the suffix (question) must hold at least one token")
        self.engine, self.video = engine, video
        device = questions[0].device
        b, qm, d = len(questions), max(q.shape[0] for q in questions), questions[0].shape[-1]
        self.size, self.qmax, self.max_new, self.generated = b, qm, max_new_tokens, 0
        self.q_len = torch.tensor([q.shape[0] for q in questions], device=device)
        blocks = self.q_len if blocks is None else torch.tensor(list(blocks), device=device)
        h = questions[0].new_zeros(b, qm, d)
        for i, q in enumerate(questions):
            h[i, : q.shape[0]] = q
        # Own slots: [question, right-padded to qm | generated]; real ones marked.
        self.own_real = torch.zeros(b, qm + max_new_tokens, dtype=torch.bool, device=device)
        self.own_real[:, :qm] = torch.arange(qm, device=device)[None] < self.q_len[:, None]
        self.running: dict[int, torch.Tensor] = {}  # layer -> gate running max (N, B, H', 1)
        self.own_kv: list[KVCache] = []
        slots = torch.arange(qm, device=device)
        cos, sin = engine.cos_sin(h, video.slots + slots)
        with engine_sdpa():
            for li, layer in enumerate(engine.layers[: video.shared_layers]):
                q, k, v = _project(layer, h, cos, sin)
                cache = KVCache.holding(k, v, qm + max_new_tokens)
                self.own_kv.append(cache)
                o = self._attend(li, q, cache, qm, slots, blocks, self.q_len)
                h = _finish(layer, h, o)
            last = torch.arange(b, device=device)
            if not video.fused:
                self.fusions, self.visual_tokens_used = [None] * b, [sum(video.lengths)] * b
                self.logits = engine.logits(h[last, self.q_len - 1])
                return
            fusions = self._fuse(h, blocks, cos, sin)
            self.fusions = list(fusions)
            self.visual_tokens_used = [len(f.rows) for f in fusions]
            kept, p = len(fusions[0].rows), video.prefix_len
            assert video.h_vis is not None  # encode_video keeps it whenever the video is fused
            tf = p + kept + qm  # fused slots: [system | kept visual | question, right-padded]
            fused = h.new_empty(b, tf, d)
            fused[:, :p] = video.h_prefix
            for i, f in enumerate(fusions):
                fused[i, p : p + kept] = video.h_vis[f.rows, f.slots]
            fused[:, p + kept :] = h
            self.fused_len = p + kept + self.q_len  # (B,) real fused tokens per question
            self.fused_slots = tf
            self.fused_real = torch.zeros(b, tf + max_new_tokens, dtype=torch.bool, device=device)
            self.fused_real[:, :tf] = torch.arange(tf, device=device)[None] < self.fused_len[:, None]
            cos, sin = engine.cos_sin(h, torch.arange(tf, device=device))
            self.fused_kv: list[KVCache] = []
            for layer in engine.layers[video.shared_layers :]:
                q, k, v = _project(layer, fused, cos, sin)
                self.fused_kv.append(KVCache.holding(k, v, tf + max_new_tokens))
                fused = _finish(layer, fused, causal_attention(q, k, v, layer.self_attn.scaling, engine.backend))
            self.logits = engine.logits(fused[last, self.fused_len - 1])

    def _attend(self, li: int, q, cache: KVCache, filled: int, slots, blocks, real_len):
        """`question_attention` of the queries q (B, H, M, D) at own slots `slots`, over the rows'
        layer-li cache and the first `filled` own slots; gated below L for N > 1. Split over
        questions to stay within the score budget; the gate's running max is kept per question."""
        video, engine = self.video, self.engine
        rows = video.kv[li]
        b, h, m, _ = q.shape
        step = questions_per_call(video.rows, h, m, video.slots + filled)
        gated = video.rows > 1
        vis = slice(video.prefix_len, video.slots)
        out = []
        for i in range(0, b, step):
            part = slice(i, i + step)

            def gate(scores, part=part):
                if engine.fixed_weights is not None:
                    return engine.fixed_weights.view(-1, 1, 1, 1)
                carry = self.running.get(li)
                w, running = gate_mix_weights(scores, engine.cfg.granularity, blocks[part],
                                              None if carry is None else carry[:, part], real_len[part])
                if running is not None:
                    if li not in self.running:
                        self.running[li] = running.new_empty(running.shape[0], b, *running.shape[2:])
                    self.running[li][:, part] = running
                return w

            out.append(question_attention(
                q[part], rows.k, rows.v, video.rows_real, cache.k[part, :, :filled], cache.v[part, :, :filled],
                self.own_real[part, :filled], slots, engine.layers[li].self_attn.scaling, vis,
                gate if gated else None))
        return torch.cat(out)

    def _fuse(self, h, blocks, cos, sin) -> list[Fusion]:
        """Each question's fusion at layer L, scored by its prompt question's queries (blocks[b]
        leading tokens) on the rows' visual keys."""
        video, engine = self.video, self.engine
        keep = engine.cfg.keep_ratio
        if video.k_vis_fusion is None:  # everything is kept, no need to score
            importance = [video.vis_mask.float()] * self.size
        else:
            layer = engine.layers[video.shared_layers]
            q = _rotated(layer, h, cos, sin, "q_proj")
            importance = [visual_importance(q[i : i + 1, :, : int(blocks[i])], video.k_vis_fusion,
                                            layer.self_attn.scaling, video.vis_mask) for i in range(self.size)]
        return [select_visual_tokens(imp, video.vis_mask, video.positions, keep) for imp in importance]

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append one generated token per question (B,); return the next logits (B, vocab)."""
        if self.generated >= self.max_new:
            raise RuntimeError("the cache is full: pass a larger max_new_tokens to prefill")
        if not hasattr(self, "_tokens"):
            self._tokens = torch.zeros(self.size, dtype=torch.long, device=self.own_real.device)
            self._t = torch.zeros((), dtype=torch.long, device=self.own_real.device)
        self._tokens.copy_(tokens.view(-1))
        self._t.fill_(self.generated)
        if self._graph is not None:
            self._graph.replay()
        else:
            self._logits_out = self._step()
        self.generated += 1
        return self._logits_out

    _graph: torch.cuda.CUDAGraph | None = None

    def capture_cuda_graph(self) -> None:
        """Record `step`'s kernels once as a CUDA graph and replay it for every later token: the
        decoding step has fixed shapes (caches at full size, unfilled slots masked, the step
        number on the device), so Python and kernel-launch overhead are paid once, not per token.
        Call after one eager `step` (which warms up the kernels); the batch keeps the graph."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(stream), torch.no_grad(), torch.cuda.graph(graph, stream=stream):
            self._logits_out = self._step()
        torch.cuda.current_stream().wait_stream(stream)
        self._graph = graph

    def _step(self) -> torch.Tensor:
        """One decoding step on the device state: `_tokens` (B,) at step `_t`. Fixed shapes only."""
        engine, video, t = self.engine, self.video, self._t
        h = engine.decoder.get_input_embeddings()(self._tokens[:, None])
        slot = (self.qmax + t).view(1)
        self.own_real.index_fill_(1, slot, True)
        zeros, ones = torch.zeros_like(self.q_len), torch.ones_like(self.q_len)
        filled = self.own_real.shape[1]
        with engine_sdpa():
            cos, sin = engine.cos_sin(h, (video.slots + self.q_len + t)[:, None])
            for li, (layer, cache) in enumerate(zip(engine.layers[: video.shared_layers], self.own_kv)):
                q, k, v = _project(layer, h, cos, sin)
                cache.write(slot, k, v)
                h = _finish(layer, h, self._attend(li, q, cache, filled, slot, zeros, ones))
            if video.fused:
                slot = (self.fused_slots + t).view(1)
                self.fused_real.index_fill_(1, slot, True)
                mask = self.fused_real[:, None, None, :]
                cos, sin = engine.cos_sin(h, (self.fused_len + t)[:, None])
                for layer, cache in zip(engine.layers[video.shared_layers :], self.fused_kv):
                    q, k, v = _project(layer, h, cos, sin)
                    cache.write(slot, k, v)
                    h = _finish(layer, h, attend(q, cache.k, cache.v, mask, layer.self_attn.scaling, engine.backend))
        return engine.logits(h[:, -1])


class MoRefSession:
    """One prompt: `prefill` once, then `step` one token at a time (a batch of one question).

    After `prefill`: `fusion` (kept tokens, None when nothing is fused), `visual_tokens_native`
    (sum of l_i), `visual_tokens_used`, `prompt_tokens` (prefix + native visual + suffix: what the
    native model would read)."""

    def __init__(self, lm, cfg: ResolvedMoRef, backend: str | None = None, fixed_weights=None):
        self.engine = MoRefEngine(lm, cfg, backend, fixed_weights)

    @torch.no_grad()
    def prefill(self, prefix, references, positions, suffix, extra=None, max_new_tokens: int = 0):
        """Last-token logits (vocab,) of [prefix | references | suffix | extra]. extra (E, D):
        tokens already generated (to recompute a decode from scratch): question tokens gated with
        a running max and left out of fusion scoring, exactly as in `step`."""
        video = self.engine.encode_video(prefix, references, positions)
        question = suffix if extra is None else torch.cat([suffix, extra])
        self.batch = self.engine.start(video, [question], [suffix.shape[0]], max_new_tokens)
        self.fusion = self.batch.fusions[0]
        self.visual_tokens_native = sum(video.lengths)
        self.visual_tokens_used = self.batch.visual_tokens_used[0]
        self.prompt_tokens = prefix.shape[0] + sum(video.lengths) + suffix.shape[0]
        return self.batch.logits[0]

    def step(self, token: int):
        """Append one generated token; return the next logits (vocab,)."""
        return self.batch.step(torch.tensor([token]))[0]


@dataclass
class MoRefOutput:
    """Generated token ids (the EOS that ended it included, as HF generate), why it stopped
    ("eos" | "stop" | "length"), seconds attributed to this question, and token counts.

    prefill_s: the video's shared prefill divided among the questions that shared it, plus this
    question's share of its batch's prefill; generate_s: its share of its batch's decoding.
    shared_with: how many questions shared the video's prefill (1 = not shared)."""

    tokens: list[int]
    finish_reason: str
    prefill_s: float
    generate_s: float
    visual_tokens_native: int
    visual_tokens_used: int
    prompt_tokens: int
    kept_per_reference: list[int] = field(default_factory=list)
    shared_with: int = 1


def next_tokens(logits, gen, generator=None) -> torch.Tensor:
    """(B,) next tokens of logits (B, vocab): greedy, or sampling with temperature and nucleus
    (top_p). Stays on the device: no host sync."""
    if not gen.do_sample:
        return logits.argmax(-1)
    probs = (logits.float() / gen.temperature).softmax(-1)
    if gen.top_p < 1.0:
        sorted_p, idx = probs.sort(-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p >= gen.top_p  # mass before a token already reaches top_p
        probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p.masked_fill(drop, 0.0))
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA work, so host timers measure it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# Decoding checks on the host for finished questions (and stop strings) every this many tokens:
# each check is a device sync, and tokens past a question's end are simply discarded.
CHECK_EVERY = 8


def _decode(batch: QuestionBatch, gen: GenerationOptions, eos_token_ids, stop_checker):
    """Decode all questions of a batch together. Returns [(tokens, finish_reason)] per question."""
    logits, b, limit = batch.logits, batch.size, gen.max_new_tokens
    device = logits.device
    generator = None
    if gen.do_sample:
        generator = torch.Generator(device=device)
        generator.manual_seed(gen.seed) if gen.seed is not None else generator.seed()
    eos = torch.tensor(sorted(set(eos_token_ids or ())), dtype=torch.long, device=device)
    out = torch.zeros(b, limit, dtype=torch.long, device=device)
    none = limit + 1
    eos_at = torch.full((b,), none, dtype=torch.long, device=device)  # tokens up to the EOS, or `none`
    ends: list[int | None] = [None] * b  # from stop strings, found on the host
    checked = 0
    for i in range(limit):
        token = next_tokens(logits, gen, generator)
        out[:, i] = token
        if eos.numel():
            eos_at = torch.where(torch.isin(token, eos) & (eos_at == none), i + 1, eos_at)
        if (i + 1) % CHECK_EVERY == 0 or i + 1 == limit:
            eos_host, tokens_host = eos_at.tolist(), out[:, : i + 1].tolist()
            for j in range(b):
                if stop_checker is None or ends[j] is not None:
                    continue
                for n in range(checked + 1, min(i + 1, eos_host[j]) + 1):  # a stop before the EOS
                    if stop_checker(tokens_host[j][:n]):
                        ends[j] = n
                        break
            checked = i + 1
            if all(e is not None or a != none for e, a in zip(ends, eos_host)):
                break
        if i + 1 < limit:
            logits = batch.step(token)
            if i == 0 and batch.engine.cuda_graphs:  # the first step warmed the kernels up
                batch.capture_cuda_graph()
    eos_host, tokens_host = eos_at.tolist(), out.tolist()
    results = []
    for j in range(b):
        if ends[j] is not None:
            results.append((tokens_host[j][: ends[j]], "stop"))
        elif eos_host[j] != none:
            results.append((tokens_host[j][: eos_host[j]], "eos"))
        else:
            results.append((tokens_host[j], "length"))
    return results


def question_batches(lengths: list[int], fixed_tokens: int, max_batch_tokens: int) -> list[list[int]]:
    """Split questions (their token counts) into batches whose padded fused sequences,
    (fixed_tokens + longest question) each, total at most max_batch_tokens (at least one per batch).
    Questions are taken longest first, so similar lengths share a batch and padding stays small."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches and (len(batches[-1]) + 1) * (fixed_tokens + lengths[batches[-1][0]]) <= max_batch_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def generate_answers(engine: MoRefEngine, prefix, references, positions, suffixes, gen=None, eos_token_ids=(),
                     stop_checker=None) -> list[MoRefOutput]:
    """Answer several questions of one video, sharing its prefill: phase 1 once, then the questions
    in batches within `engine.max_batch_tokens`, each prefilled and decoded together. suffixes: each
    question's embeddings (q_b, D); other inputs as in `MoRefEngine.encode_video`. Outputs in the
    order of `suffixes`."""
    gen = gen or GenerationOptions()
    device = prefix.device
    synchronize(device)
    t0 = time.perf_counter()
    video = engine.encode_video(prefix, references, positions)
    synchronize(device)
    shared_s = time.perf_counter() - t0
    per_row = video.prefix_len + (sum(keep_counts(video.lengths, engine.cfg.keep_ratio)) if video.fused
                                  else video.vis_len)
    outputs: list[MoRefOutput | None] = [None] * len(suffixes)
    native = sum(video.lengths)
    for batch_ids in question_batches([s.shape[0] for s in suffixes], per_row, engine.max_batch_tokens):
        t1 = time.perf_counter()
        batch = engine.start(video, [suffixes[i] for i in batch_ids], max_new_tokens=gen.max_new_tokens)
        synchronize(device)
        t2 = time.perf_counter()
        decoded = _decode(batch, gen, eos_token_ids, stop_checker)
        synchronize(device)
        t3 = time.perf_counter()
        for j, i in enumerate(batch_ids):
            tokens, reason = decoded[j]
            fusion = batch.fusions[j]
            outputs[i] = MoRefOutput(
                tokens, reason, shared_s / len(suffixes) + (t2 - t1) / len(batch_ids), (t3 - t2) / len(batch_ids),
                native, batch.visual_tokens_used[j], prefix.shape[0] + native + suffixes[i].shape[0],
                fusion.kept_per_reference if fusion is not None else [], len(suffixes))
    return cast(list[MoRefOutput], outputs)  # every question belongs to exactly one batch


def moref_prefill_logits(lm, prefix_embeds, references, reference_positions, suffix_embeds, cfg: ResolvedMoRef,
                         extra_embeds=None, backend: str | None = None, fixed_weights=None):
    """Last-token logits (vocab,) of one MoRef forward without a decode cache (see `MoRefSession.prefill`)."""
    session = MoRefSession(lm, cfg, backend, fixed_weights)
    return session.prefill(prefix_embeds, references, reference_positions, suffix_embeds, extra_embeds)


def moref_generate(lm, prefix_embeds, references, reference_positions, suffix_embeds, cfg: ResolvedMoRef,
                   gen=None, eos_token_ids=(), stop_checker=None, backend: str | None = None) -> MoRefOutput:
    """Free-MoRef prefill, then decode until EOS, `stop_checker(tokens) -> True` (e.g. stop strings
    on the decoded text) or gen.max_new_tokens. Inputs as in `MoRefSession.prefill`."""
    engine = MoRefEngine(lm, cfg, backend)
    return generate_answers(engine, prefix_embeds, references, reference_positions, [suffix_embeds], gen,
                            eos_token_ids, stop_checker)[0]
