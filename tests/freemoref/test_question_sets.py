"""A video's questions share its prefill: batched answers equal answering each question alone, for
questions of different lengths, MoRef on (fused, and gated in every layer) and off, and through the
memory-budget split; the rows' causal pass without a mask equals the dense-mask reference."""

import pytest
import torch

import freemoref.attention as attention
from freemoref.config import GenerationOptions, ResolvedMoRef
from freemoref.engine import MoRefEngine, generate_answers, question_batches
from tests.freemoref.moref_inputs import tiny_qwen, video_prompt

CONFIGS = {
    "native": ResolvedMoRef(1, 64, 0, 1.0),
    "moref-fused": ResolvedMoRef(3, 4, 2, 1 / 3, "chunk"),
    "moref-fused-head": ResolvedMoRef(3, 4, 3, 0.5, "head"),
    "moref-gated-all-layers": ResolvedMoRef(3, 4, 6, 1 / 3, "token"),
}


def questions(model, lengths=(5, 2, 9, 1), seed=7):
    gen = torch.Generator().manual_seed(seed)
    emb = model.get_input_embeddings()
    with torch.no_grad():
        return [emb(torch.randint(0, 300, (n,), generator=gen)) for n in lengths]


def inputs(model, cfg):
    prefix, refs, pos, _, video = video_prompt(model, references=cfg.references)
    if cfg.references == 1:
        refs, pos = [video], [torch.arange(video.shape[0])]
    return prefix, refs, pos


@pytest.mark.parametrize("name", sorted(CONFIGS))
@torch.no_grad()
def test_batched_questions_equal_each_question_alone(name):
    cfg = CONFIGS[name]
    model = tiny_qwen()
    prefix, refs, pos = inputs(model, cfg)
    assert cfg.references == 1 or len({len(r) for r in refs}) > 1  # padded rows are exercised
    qs = questions(model)
    engine = MoRefEngine(model, cfg)
    video = engine.encode_video(prefix, refs, pos)
    together = engine.start(video, qs, max_new_tokens=6)
    for i, q in enumerate(qs):
        alone = MoRefEngine(model, cfg).start(engine.encode_video(prefix, refs, pos), [q], max_new_tokens=6)
        assert (together.logits[i] - alone.logits[0]).abs().max() < 1e-4
        if together.fusions[i] is not None:
            assert torch.equal(together.fusions[i].positions, alone.fusions[0].positions)

    gen = GenerationOptions(max_new_tokens=6)
    batched = generate_answers(MoRefEngine(model, cfg), prefix, refs, pos, qs, gen)
    split = generate_answers(MoRefEngine(model, cfg, max_batch_tokens=1), prefix, refs, pos, qs, gen)
    single = [generate_answers(MoRefEngine(model, cfg), prefix, refs, pos, [q], gen)[0] for q in qs]
    assert [o.tokens for o in batched] == [o.tokens for o in split] == [o.tokens for o in single]
    assert len({tuple(o.tokens) for o in single}) > 1  # different questions, different answers
    assert all(o.shared_with == len(qs) for o in batched) and single[0].shared_with == 1


@pytest.mark.parametrize("chunk", [4, 256], ids=["split-kv", "one-chunk"])
@torch.no_grad()
def test_decoding_a_batch_equals_recomputing_each_question(monkeypatch, chunk):
    """Step by step, every question's logits equal a fresh prefill of its prompt + generated tokens;
    also with the decode caches cut into many split-KV chunks."""
    monkeypatch.setattr(attention, "DECODE_CHUNK", chunk)
    cfg = CONFIGS["moref-fused"]
    model = tiny_qwen()
    prefix, refs, pos = inputs(model, cfg)
    qs = questions(model, lengths=(4, 1, 7))
    engine = MoRefEngine(model, cfg)
    video = engine.encode_video(prefix, refs, pos)
    batch = engine.start(video, qs, max_new_tokens=4)
    generated = [[] for _ in qs]
    logits = batch.logits
    for _ in range(4):
        tokens = logits.argmax(-1)
        for i, t in enumerate(tokens.tolist()):
            generated[i].append(t)
        logits = batch.step(tokens)
        for i, q in enumerate(qs):
            extra = model.get_input_embeddings()(torch.tensor(generated[i]))
            again = engine.start(video, [torch.cat([q, extra])], blocks=[q.shape[0]])
            assert (logits[i] - again.logits[0]).abs().max() < 1e-4


@torch.no_grad()
def test_rows_without_a_mask_equal_the_dense_mask_reference():
    """Unpadded and padded rows: the engine's causal pass (no mask) gives the logits of the HF
    forward with "moref" attention and a dense padding mask (L = num_layers: gated, not fused)."""
    from freemoref.attention import MoRefContext

    model = tiny_qwen()
    emb = model.get_input_embeddings()
    x = emb(torch.randint(0, 300, (40,), generator=torch.Generator().manual_seed(3)))
    prefix, suffix = x[:3], x[33:]
    for lengths in ([6, 6, 6], [7, 5, 6]):
        refs = [x[3 + 10 * i : 3 + 10 * i + n] for i, n in enumerate(lengths)]
        lv, n = max(lengths), len(refs)
        cfg = ResolvedMoRef(n, 64, 6, 1 / 3, "head")
        engine = MoRefEngine(model, cfg)
        got = engine.start(engine.encode_video(prefix, refs, [torch.arange(len(r)) for r in refs]), [suffix]).logits[0]
        rows = torch.stack([torch.cat([prefix, r, r.new_zeros(lv - len(r), 64), suffix]) for r in refs])
        pad = torch.ones(n, rows.shape[1], dtype=torch.long)
        for i, length in enumerate(lengths):
            pad[i, 3 + length : 3 + lv] = 0
        model.set_attn_implementation("moref")
        ctx = MoRefContext(vis_start=3, vis_mask=pad[:, 3 : 3 + lv].bool(), ques_start=3 + lv, fusion_layer=6,
                           granularity="head")
        reference = model(inputs_embeds=rows, attention_mask=pad, moref=ctx).logits[:, -1]
        model.set_attn_implementation("sdpa")
        for i in range(n):
            torch.testing.assert_close(got, reference[i], atol=1e-4, rtol=1e-4)


def test_question_batches_respect_the_token_budget():
    lengths = [5, 30, 12, 30, 1]
    batches = question_batches(lengths, fixed_tokens=100, max_batch_tokens=270)
    assert sorted(i for b in batches for i in b) == list(range(5))
    for b in batches:
        assert len(b) == 1 or len(b) * (100 + max(lengths[i] for i in b)) <= 270
    assert batches[0] == [1, 3]  # longest first, so similar lengths share a batch
    assert question_batches(lengths, 100, 1) == [[1], [3], [2], [0], [4]]
