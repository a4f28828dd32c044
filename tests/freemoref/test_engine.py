import pytest
import torch
from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

from freemoref.config import GenerationOptions, MoRefConfig, ResolvedMoRef
from freemoref.decoder_layers import split_lm
from freemoref.engine import MoRefSession, moref_generate, moref_prefill_logits
from tests.freemoref.moref_inputs import TEXT, tiny_qwen, video_prompt


@torch.no_grad()
def test_moref_off_equals_model_forward_and_generate():
    model = tiny_qwen()
    for cfg in (MoRefConfig(enabled=False).resolve(8, 6), MoRefConfig(temporal_units=64).resolve(8, 6)):
        assert cfg.references == 1
        prefix, refs, pos, suffix, video = video_prompt(model, references=cfg.references)
        full = torch.cat([prefix, video, suffix])[None]
        expected = model(inputs_embeds=full).logits[0, -1]
        logits = moref_prefill_logits(model, prefix, refs, pos, suffix, cfg)
        assert (logits - expected).abs().max() < 1e-4

        out = moref_generate(model, prefix, refs, pos, suffix, cfg, GenerationOptions(max_new_tokens=8))
        hf = model.generate(inputs_embeds=full, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
        assert out.tokens == hf[0, -8:].tolist()
        assert len(set(out.tokens)) > 2  # a model that repeats one token would prove little
        assert (out.visual_tokens_native, out.visual_tokens_used, out.prompt_tokens) == (24, 24, 33)


@torch.no_grad()
def test_llava_onevision_language_model_is_driven():
    torch.manual_seed(0)
    config = LlavaOnevisionConfig(
        text_config=dict(model_type="qwen2", **TEXT),
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14),
    )
    vlm = LlavaOnevisionForConditionalGeneration(config).eval()
    decoder, head = split_lm(vlm)
    assert decoder is vlm.model.language_model and head is vlm.lm_head
    x = decoder.get_input_embeddings()(torch.randint(0, 300, (20,)))
    cfg = ResolvedMoRef(1, 64, 0, 1.0)
    logits = moref_prefill_logits(vlm, x[:3], [x[3:15]], [torch.arange(12)], x[15:], cfg)
    expected = vlm.lm_head(decoder(inputs_embeds=x[None]).last_hidden_state)[0, -1]
    assert (logits - expected).abs().max() < 1e-4


@pytest.mark.parametrize("granularity,layer", [("chunk", 2), ("head", 3), ("token", 1), ("chunk", 6)])
@torch.no_grad()
def test_cached_decoding_equals_recompute_from_scratch(granularity, layer):
    """At every step the cached logits equal a full MoRef forward over prompt + generated tokens."""
    model = tiny_qwen()
    prefix, refs, pos, suffix, _ = video_prompt(model)  # 3 references of 9, 9, 6 tokens: padded
    assert sorted(len(r) for r in refs) == [6, 9, 9]
    cfg = ResolvedMoRef(3, 4, layer, 1 / 3, granularity)
    session = MoRefSession(model, cfg)
    logits = session.prefill(prefix, refs, pos, suffix, max_new_tokens=6)
    tokens = []
    for _ in range(6):
        tokens.append(int(logits.argmax()))
        logits = session.step(tokens[-1])
        extra = model.get_input_embeddings()(torch.tensor(tokens))
        recomputed = moref_prefill_logits(model, prefix, refs, pos, suffix, cfg, extra_embeds=extra)
        assert (logits - recomputed).abs().max() < 1e-4
    assert moref_generate(model, prefix, refs, pos, suffix, cfg, GenerationOptions(max_new_tokens=6)).tokens == tokens
    with pytest.raises(RuntimeError, match="cache is full"):
        session.step(tokens[-1])


@pytest.mark.parametrize("pick", [0, 1])
@torch.no_grad()
def test_gate_fixed_on_one_reference_is_that_reference_alone(pick):
    """Gate weights fixed to one-hot, gated in every layer: the question sees only that reference,
    i.e. the model on [prefix | that reference | question] (equal lengths: same positions)."""
    model = tiny_qwen()
    prefix, refs, pos, suffix, _ = video_prompt(model, frames=8, references=2)
    fixed = torch.nn.functional.one_hot(torch.tensor(pick), 2).float()
    session = MoRefSession(model, ResolvedMoRef(2, 4, 6, 0.5), fixed_weights=fixed)
    logits = session.prefill(prefix, refs, pos, suffix, max_new_tokens=5)
    alone = torch.cat([prefix, refs[pick], suffix])[None]
    assert (logits - model(inputs_embeds=alone).logits[0, -1]).abs().max() < 1e-4
    tokens = [int(logits.argmax())]
    for _ in range(4):
        tokens.append(int(session.step(tokens[-1]).argmax()))
    hf = model.generate(inputs_embeds=alone, max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
    assert tokens == hf[0, -5:].tolist()


@torch.no_grad()
def test_sampling_seeded_and_top_p():
    model = tiny_qwen()
    cfg = MoRefConfig(temporal_units=4).resolve(8, 6)
    assert (cfg.references, cfg.fusion_layer) == (2, 3)
    prefix, refs, pos, suffix, _ = video_prompt(model, references=2)
    def run(**kw):
        return moref_generate(model, prefix, refs, pos, suffix, cfg, GenerationOptions(max_new_tokens=8, **kw)).tokens

    greedy = run()
    sample = run(do_sample=True, temperature=1.5, seed=3)
    assert sample == run(do_sample=True, temperature=1.5, seed=3)
    assert any(run(do_sample=True, temperature=1.5, seed=s) != sample for s in (4, 5, 6))
    assert run(do_sample=True, top_p=1e-6, seed=7) == greedy  # the nucleus holds only the top token


@torch.no_grad()
def test_stops_counts_and_timings():
    model = tiny_qwen()
    prefix, refs, pos, suffix, _ = video_prompt(model)
    cfg = ResolvedMoRef(3, 4, 2, 1 / 3)
    full = moref_generate(model, prefix, refs, pos, suffix, cfg, GenerationOptions(max_new_tokens=8))
    assert full.finish_reason == "length" and len(full.tokens) == 8
    assert (full.visual_tokens_native, full.visual_tokens_used, full.prompt_tokens) == (24, 3 + 3 + 2, 33)
    assert full.kept_per_reference == [3, 3, 2] and full.prefill_s > 0 and full.generate_s > 0

    eos = full.tokens[3]
    out = moref_generate(model, prefix, refs, pos, suffix, cfg, GenerationOptions(max_new_tokens=8),
                         eos_token_ids=[eos])
    assert out.finish_reason == "eos" and out.tokens == full.tokens[: full.tokens.index(eos) + 1]
    out = moref_generate(model, prefix, refs, pos, suffix, cfg, GenerationOptions(max_new_tokens=8),
                         stop_checker=lambda toks: toks[-2:] == full.tokens[1:3])
    assert out.finish_reason == "stop" and out.tokens == full.tokens[:3]


@pytest.mark.parametrize("granularity", ["head", "token"])
@torch.no_grad()
def test_backends_and_granularities_agree_where_they_should(granularity):
    model = tiny_qwen()
    prefix, refs, pos, suffix, _ = video_prompt(model)
    cfg = ResolvedMoRef(3, 4, 2, 0.5, granularity)
    sdpa = moref_prefill_logits(model, prefix, refs, pos, suffix, cfg, backend="sdpa")
    eager = moref_prefill_logits(model, prefix, refs, pos, suffix, cfg, backend="eager")
    assert sdpa.shape == (300,) and (sdpa - eager).abs().max() < 1e-4
    chunk = moref_prefill_logits(model, prefix, refs, pos, suffix, ResolvedMoRef(3, 4, 2, 0.5, "chunk"))
    assert (sdpa - chunk).abs().max() > 1e-3  # the granularity is actually used


def test_reference_count_must_match_config():
    model = tiny_qwen()
    prefix, refs, pos, suffix, _ = video_prompt(model)
    with pytest.raises(ValueError, match="expects 2"):
        moref_prefill_logits(model, prefix, refs, pos, suffix, ResolvedMoRef(2, 4, 2, 0.5))
