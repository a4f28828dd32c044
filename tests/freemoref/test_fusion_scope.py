"""Video-scope fusion (freemoref/shared_prefix.py): with one question it is question scope; with
several it equals a dense implementation of its definition (per reference, each visual token's
importance is its maximum over the questions; ceil(l_i * keep_ratio) kept; every question reads
[system | merged visual | its own tokens] through the layers from L on), built here from the HF
model's own forward ("moref" attention below L) and its decoder layers called whole above L."""

import math

import pytest
import torch
from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

import freemoref.attention as attention
from freemoref.attention import MoRefContext
from freemoref.config import GenerationOptions, ResolvedMoRef
from freemoref.engine import MoRefEngine, generate_answers
from tests.freemoref.moref_inputs import tiny_qwen, video_prompt
from tests.freemoref.test_question_sets import questions


def scoped(cfg: ResolvedMoRef, scope: str) -> ResolvedMoRef:
    return ResolvedMoRef(cfg.references, cfg.temporal_units, cfg.fusion_layer, cfg.keep_ratio, cfg.granularity,
                         scope)


@pytest.mark.parametrize("cfg", [ResolvedMoRef(3, 4, 2, 1 / 3, "chunk"), ResolvedMoRef(3, 4, 3, 0.5, "head"),
                                 ResolvedMoRef(3, 4, 1, 1 / 3, "token"), ResolvedMoRef(3, 4, 2, 1.0, "chunk")],
                         ids=["chunk", "head", "token", "keep-all"])
@torch.no_grad()
def test_one_question_gives_the_same_answer_in_both_scopes(cfg):
    model = tiny_qwen()
    prefix, refs, pos, suffix, _ = video_prompt(model)
    runs = {}
    for scope in ("question", "video"):
        engine = MoRefEngine(model, scoped(cfg, scope))
        batch = engine.start(engine.encode_video(prefix, refs, pos), [suffix], max_new_tokens=6)
        tokens, logits = [], [batch.logits[0]]
        for _ in range(6):
            tokens.append(int(logits[-1].argmax()))
            logits.append(batch.step(torch.tensor([tokens[-1]]))[0])
        runs[scope] = tokens, torch.stack(logits), batch.fusions[0].positions
        out = generate_answers(MoRefEngine(model, scoped(cfg, scope)), prefix, refs, pos, [suffix],
                               GenerationOptions(max_new_tokens=6))[0]
        assert out.tokens == tokens
    (q_tokens, q_logits, q_kept), (v_tokens, v_logits, v_kept) = runs["question"], runs["video"]
    assert v_tokens == q_tokens and len(set(q_tokens)) > 2
    assert (v_logits - q_logits).abs().max() < 1e-4
    assert torch.equal(v_kept, q_kept)


def _rows_entering(model, prefix, refs, question, extra, cfg):
    """Hidden states (N, T, D) entering layer L of the rows [system | reference i, padded |
    question | extra] from the HF forward with "moref" attention (gated below L)."""
    n, p, lv = len(refs), prefix.shape[0], max(len(r) for r in refs)
    tokens = torch.cat([question, extra])
    rows = torch.stack([torch.cat([prefix, r, r.new_zeros(lv - len(r), r.shape[1]), tokens]) for r in refs])
    pad = torch.ones(n, rows.shape[1], dtype=torch.long)
    for i, r in enumerate(refs):
        pad[i, p + len(r) : p + lv] = 0
    ctx = MoRefContext(vis_start=p, vis_mask=pad[:, p : p + lv].bool(), ques_start=p + lv,
                       fusion_layer=cfg.fusion_layer, granularity=cfg.granularity, gate_block=question.shape[0])
    model.set_attn_implementation("moref")
    try:
        return model(inputs_embeds=rows, attention_mask=pad, moref=ctx, output_hidden_states=True
                     ).hidden_states[cfg.fusion_layer]
    finally:
        model.set_attn_implementation("sdpa")


def _importance(model, hidden, refs, p, q_slice, cfg):
    """(N, lv) importance, written out head by head: layer L's question queries on each row's
    visual keys, softmax over the row's real visual keys, mean over heads and question tokens."""
    layer = model.model.layers[cfg.fusion_layer]
    attn, lv = layer.self_attn, max(len(r) for r in refs)
    x = layer.input_layernorm(hidden)
    cos, sin = model.model.rotary_emb(x, torch.arange(x.shape[1])[None])
    shape = (*x.shape[:-1], -1, attn.head_dim)
    q, k = apply_rotary_pos_emb(attn.q_proj(x).view(shape).transpose(1, 2),
                                attn.k_proj(x).view(shape).transpose(1, 2), cos, sin)
    heads, kv_heads = q.shape[1], k.shape[1]
    out = torch.zeros(len(refs), lv)
    for i, r in enumerate(refs):
        per_head = []
        for h in range(heads):
            keys = k[i, h // (heads // kv_heads), p : p + len(r)].double()
            scores = q[i, h, q_slice].double() @ keys.T * attn.scaling
            per_head.append(scores.softmax(-1).mean(0))
        out[i, : len(r)] = torch.stack(per_head).mean(0).float()
    return out


def dense_video_scope(model, prefix, refs, pos, prompts, extras, cfg):
    """Each question's last-token logits after [its prompt | its extra tokens], and the kept global
    positions, computed densely from the definition of video scope."""
    p, lv, layer_l = prefix.shape[0], max(len(r) for r in refs), cfg.fusion_layer
    entering = [_rows_entering(model, prefix, refs, q, x, cfg) for q, x in zip(prompts, extras)]
    importance = torch.stack([_importance(model, h, refs, p, slice(p + lv, p + lv + q.shape[0]), cfg)
                              for h, q in zip(entering, prompts)]).amax(0)
    kept_rows, kept_slots = [], []
    for i, r in enumerate(refs):
        count = math.ceil(len(r) * cfg.keep_ratio - 1e-9)
        top = importance[i, : len(r)].topk(count).indices
        kept_rows += [i] * count
        kept_slots += top.tolist()
    global_pos = torch.tensor([int(pos[i][s]) for i, s in zip(kept_rows, kept_slots)])
    order = global_pos.argsort()
    rows, slots = torch.tensor(kept_rows)[order], torch.tensor(kept_slots)[order]
    logits = []
    for h in entering:
        fused = torch.cat([h[0, :p], h[rows, p + slots], h[0, p + lv :]])[None]
        cos_sin = model.model.rotary_emb(fused, torch.arange(fused.shape[1])[None])
        for layer in model.model.layers[layer_l:]:
            fused = layer(fused, attention_mask=None, position_embeddings=cos_sin)  # causal
        logits.append(model.lm_head(model.model.norm(fused[0, -1])))
    return torch.stack(logits), global_pos[order]


@pytest.mark.parametrize("chunk", [4, 256], ids=["split-kv", "one-chunk"])
@pytest.mark.parametrize("cfg", [ResolvedMoRef(3, 4, 2, 1 / 3, "chunk"), ResolvedMoRef(3, 4, 3, 0.5, "head")],
                         ids=["chunk", "head"])
@torch.no_grad()
def test_several_questions_equal_the_dense_definition(cfg, chunk, monkeypatch):
    monkeypatch.setattr(attention, "DECODE_CHUNK", chunk)  # the shared prefix in many split-KV chunks, or one
    model = tiny_qwen()
    prefix, refs, pos, _, _ = video_prompt(model)
    qs = questions(model, lengths=(5, 2, 9))
    cfg = scoped(cfg, "video")
    engine = MoRefEngine(model, cfg)
    video = engine.encode_video(prefix, refs, pos)
    batch = engine.start(video, qs, max_new_tokens=4)
    none = [qs[0][:0]] * len(qs)
    expected, kept = dense_video_scope(model, prefix, refs, pos, qs, none, cfg)
    assert (batch.logits - expected).abs().max() < 1e-4
    assert all(torch.equal(f.positions, kept) for f in batch.fusions)
    # The aggregation is exercised: some question alone would keep other tokens.
    own = [MoRefEngine(model, scoped(cfg, "question")).start(video, [q]).fusions[0].positions for q in qs]
    assert any(not torch.equal(o, kept) for o in own)

    # Decoding: each step's logits equal the dense computation over prompt + generated tokens,
    # whose fusion is still chosen by the prompts' questions only.
    generated: list[list[int]] = [[] for _ in qs]
    logits = batch.logits
    emb = model.get_input_embeddings()
    for _ in range(4):
        tokens = logits.argmax(-1)
        for i, t in enumerate(tokens.tolist()):
            generated[i].append(t)
        logits = batch.step(tokens)
        extras = [emb(torch.tensor(g)) for g in generated]
        expected, again = dense_video_scope(model, prefix, refs, pos, qs, extras, cfg)
        assert torch.equal(again, kept)
        assert (logits - expected).abs().max() < 1e-4
    out = generate_answers(MoRefEngine(model, cfg), prefix, refs, pos, qs, GenerationOptions(max_new_tokens=5))
    assert [o.tokens[:4] for o in out] == generated
    assert all(o.kept_per_reference == batch.fusions[0].kept_per_reference for o in out)


@torch.no_grad()
def test_questions_in_several_batches_share_the_fusion_of_all():
    """Within a small batch budget each question is its own batch, yet the prefix is the one chosen
    from all of them: answers equal one batch's, not each question's alone."""
    model = tiny_qwen()
    prefix, refs, pos, _, _ = video_prompt(model)
    qs = questions(model)
    cfg = ResolvedMoRef(3, 4, 2, 1 / 3, "chunk", "video")
    gen = GenerationOptions(max_new_tokens=6)
    together = generate_answers(MoRefEngine(model, cfg), prefix, refs, pos, qs, gen)
    split = generate_answers(MoRefEngine(model, cfg, max_batch_tokens=1), prefix, refs, pos, qs, gen)
    alone = [generate_answers(MoRefEngine(model, cfg), prefix, refs, pos, [q], gen)[0] for q in qs]
    assert [o.tokens for o in split] == [o.tokens for o in together]
    assert [o.tokens for o in alone] != [o.tokens for o in together]
    assert all(o.shared_with == len(qs) and o.prefill_s > 0 for o in split)
