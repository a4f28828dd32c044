"""The MoRef branch of VideoLLM.answer on the tiny LlavaOnevision checkpoints."""

import numpy as np
import pytest
import torch

from freemoref.config import MoRefConfig
from freemoref.engine import moref_generate
from freemoref.video_llm import GenerationOptions

GREEDY = GenerationOptions(max_new_tokens=6)


@pytest.fixture
def frames():
    return np.random.default_rng(1).integers(0, 256, size=(8, 40, 40, 3), dtype=np.uint8)


@pytest.mark.parametrize("llm_fixture", ["tiny_video_llm", "tiny_video_llm_llava_vid"])
def test_references_cover_the_visual_sequence_once_in_layout_order(request, llm_fixture, frames):
    llm = request.getfixturevalue(llm_fixture)
    tokens = llm.encode_frames(frames)
    resolved = MoRefConfig(temporal_units=4, references=3).resolve(8, llm.config.text_config.num_hidden_layers)
    refs, positions = llm.moref_references(tokens, resolved)
    assert len(refs) == 3
    flat_pos = torch.cat(positions)
    order = torch.argsort(flat_pos)
    full = llm.assemble(tokens)  # the native visual sequence, newline included for onevision
    assert torch.equal(flat_pos[order], torch.arange(full.shape[0]))
    torch.testing.assert_close(torch.cat(refs)[order], full, rtol=0, atol=0)


def test_moref_answer_reports_references_and_fewer_tokens(tiny_video_llm, frames):
    tokens = tiny_video_llm.encode_frames(frames)
    result = tiny_video_llm.answer(tokens, "What happens?", system_prompt=None, generation=GREEDY,
                                   moref=MoRefConfig(temporal_units=4, references=2, fusion_layer=2))
    native = tiny_video_llm.answer(tokens, "What happens?", system_prompt=None, generation=GREEDY)
    assert (result.references, result.temporal_units, result.fusion_layer) == (2, 4, 2)
    assert result.visual_tokens_native == native.visual_tokens_native == native.visual_tokens_used
    # keep = 1/N: each row keeps ceil(l_i / 2) of its visual tokens
    assert result.visual_tokens_used < result.visual_tokens_native
    assert 1 <= result.output_tokens <= GREEDY.max_new_tokens
    assert result.total_flops < result.total_flops_native == native.total_flops_native
    assert result.attn_flops_ratio < native.attn_flops_ratio


def test_moref_answer_is_the_engine_output(tiny_video_llm, frames):
    llm = tiny_video_llm
    tokens = llm.encode_frames(frames)
    cfg = MoRefConfig(temporal_units=8, references=2, granularity="token")
    result = llm.answer(tokens, "Who?", system_prompt="Be brief.", generation=GREEDY, moref=cfg)
    parts = llm.prepare(tokens, "Who?", system_prompt="Be brief.")
    resolved = cfg.resolve(8, llm.config.text_config.num_hidden_layers)
    refs, pos = llm.moref_references(parts.frame_tokens, resolved)
    direct = moref_generate(llm.model, parts.prefix_embeds, refs, pos, parts.suffix_embeds, resolved, gen=GREEDY,
                            eos_token_ids=llm.generation_config(GREEDY).eos_token_id)
    assert result.token_ids == direct.tokens


def test_one_reference_falls_back_to_native(tiny_video_llm, frames):
    tokens = tiny_video_llm.encode_frames(frames)
    native = tiny_video_llm.answer(tokens, "Why?", system_prompt=None, generation=GREEDY)
    single = tiny_video_llm.answer(tokens, "Why?", system_prompt=None, generation=GREEDY,
                                   moref=MoRefConfig(temporal_units=64))  # 8 frames, M=64 -> N=1
    assert single.token_ids == native.token_ids and single.references == 1


@pytest.mark.parametrize("llm_fixture", ["tiny_video_llm", "tiny_video_llm_llava_vid"])
@pytest.mark.parametrize("count, references", [(8, 3), (7, 2), (5, 4)])
def test_longest_reference_share_is_the_largest_reference(request, llm_fixture, count, references):
    """What the answer stage's context check counts for the longest attention pass: the largest
    reference's visual tokens (the onevision newline rides with one reference: at most one more)."""
    import math

    llm = request.getfixturevalue(llm_fixture)
    tokens = llm.encode_frames(np.random.default_rng(2).integers(0, 256, size=(count, 40, 40, 3), dtype=np.uint8))
    moref = MoRefConfig(temporal_units=2, references=references)
    refs, _ = llm.moref_references(tokens, llm.resolve(moref, tokens))
    longest = max(len(r) for r in refs)
    estimate = math.ceil(llm.longest_reference_share(moref, tokens) * llm.visual_tokens(tokens))
    assert longest <= estimate <= longest + 1
    assert llm.longest_reference_share(None, tokens) == 1.0
