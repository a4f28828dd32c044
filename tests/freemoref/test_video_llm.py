import pytest
import torch

from freemoref.flops import answer_flops
from freemoref.video_llm import GenerationOptions

QUESTION = "What does the cat carry in the park?"
SYSTEM = "Answer briefly."


def _hf_inputs(llm, frames):
    """The reference path: HF processor on the chat prompt with a <video> placeholder."""
    return llm.processor(text=llm.chat_prompt(QUESTION, SYSTEM), videos=[frames], return_tensors="pt")


def test_greedy_answer_equals_hf_generate(tiny_video_llm, random_frames):
    llm = tiny_video_llm
    inputs = _hf_inputs(llm, random_frames)
    with torch.no_grad():
        hf_ids = llm.model.generate(**inputs, max_new_tokens=10, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    result = llm.answer(llm.encode_frames(random_frames), QUESTION, system_prompt=SYSTEM,
                        generation=GenerationOptions(max_new_tokens=10))
    assert result.token_ids == hf_ids.tolist()
    assert len(set(result.token_ids)) > 1  # a real sequence, not one token repeated
    assert result.text == llm.tokenizer.decode(hf_ids, skip_special_tokens=True)
    assert result.output_tokens == len(hf_ids)
    assert result.prompt_tokens == inputs["input_ids"].shape[1]


def test_first_step_logits_match_hf(tiny_video_llm, random_frames):
    llm = tiny_video_llm
    inputs = _hf_inputs(llm, random_frames)
    embeds = llm.prompt_embeds(llm.encode_frames(random_frames), QUESTION, system_prompt=SYSTEM)
    assert embeds.shape[1] == inputs["input_ids"].shape[1]
    with torch.no_grad():
        ours = llm.model(inputs_embeds=embeds).logits[0, -1]
        theirs = llm.model(**inputs).logits[0, -1]
    assert ours.abs().max() > 0.1
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)


def test_build_prompt_splits_the_chat_text_around_the_video(tiny_video_llm):
    llm = tiny_video_llm
    prefix, suffix = llm.build_prompt(QUESTION, SYSTEM)
    decode = llm.tokenizer.decode
    assert decode(prefix) == f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n"
    assert decode(suffix) == f"\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n"
    default_prefix, _ = llm.build_prompt(QUESTION, None)
    assert "You are a helpful assistant." in decode(default_prefix)


def test_statistics_of_a_native_answer(tiny_video_llm, random_frames):
    llm = tiny_video_llm
    tokens = llm.encode_frames(random_frames)
    frames, per_frame = tokens.shape[:2]
    result = llm.answer(tokens, QUESTION, system_prompt=SYSTEM, generation=GenerationOptions(max_new_tokens=6))
    prefix, suffix = llm.build_prompt(QUESTION, SYSTEM)
    assert result.visual_tokens_native == result.visual_tokens_used == frames * per_frame + 1
    assert result.prompt_tokens == len(prefix) + len(suffix) + frames * per_frame + 1
    assert (result.references, result.temporal_units, result.fusion_layer) == (1, None, None)
    assert result.attn_flops_ratio == pytest.approx((frames / 64) ** 2)
    expected, _ = answer_flops(llm.config, frames=frames, visual_tokens_per_frame=per_frame,
                               text_tokens=len(prefix) + len(suffix), output_tokens=result.output_tokens,
                               prefix_tokens=len(prefix), extra_visual_tokens=1)
    assert result.total_flops == result.total_flops_native == expected
    assert 1 <= result.output_tokens <= 6
    assert result.prefill_s > 0 and result.generate_s >= 0


def test_roi_crop_cuts_visual_tokens_and_flops(tiny_video_llm, random_frames):
    llm = tiny_video_llm
    tokens = llm.encode_frames(random_frames)
    result = llm.answer(tokens, QUESTION, system_prompt=SYSTEM, generation=GenerationOptions(max_new_tokens=3),
                        roi_box=(0.0, 0.0, 0.5, 0.5))
    assert result.visual_tokens_native == 6 * 16 + 1
    assert result.visual_tokens_used == 6 * 4 + 1  # 2 x 2 of the 4 x 4 grid
    assert result.total_flops < result.total_flops_native


def test_sampling_is_seeded(tiny_video_llm, random_frames):
    llm = tiny_video_llm
    tokens = llm.encode_frames(random_frames)

    def sample(seed):
        options = GenerationOptions(max_new_tokens=8, do_sample=True, temperature=1.5, top_p=0.95, seed=seed)
        return llm.answer(tokens, QUESTION, system_prompt=SYSTEM, generation=options).token_ids

    first = sample(1)
    assert sample(1) == first
    assert any(sample(seed) != first for seed in (2, 3, 4))
    before = torch.random.get_rng_state()
    sample(5)
    assert torch.equal(torch.random.get_rng_state(), before)  # the global RNG is left alone


def test_stop_strings_and_max_new_tokens(tiny_video_llm, random_frames):
    llm = tiny_video_llm
    tokens = llm.encode_frames(random_frames)
    full = llm.answer(tokens, QUESTION, system_prompt=SYSTEM, generation=GenerationOptions(max_new_tokens=12))
    assert full.output_tokens <= 12
    pieces = [llm.tokenizer.decode([t]) for t in full.token_ids]
    k = next(i for i, piece in enumerate(pieces) if i > 0 and piece.strip().isalpha())
    stop = pieces[k]
    stopped = llm.answer(tokens, QUESTION, system_prompt=SYSTEM,
                         generation=GenerationOptions(max_new_tokens=12, stop_strings=(stop,)))
    assert stopped.output_tokens <= k + 1
    assert stopped.token_ids == full.token_ids[:stopped.output_tokens]
    assert stop not in stopped.text and full.text.startswith(stopped.text)


def test_llava_vid_answer(tiny_video_llm_llava_vid, random_frames):
    llm = tiny_video_llm_llava_vid
    tokens = llm.encode_frames(random_frames)
    assert tokens.shape[1] == 3 * 4  # 7x7 grid -> 3x3 pooled + a newline per row
    result = llm.answer(tokens, QUESTION, system_prompt=SYSTEM, generation=GenerationOptions(max_new_tokens=4))
    assert result.visual_tokens_used == result.visual_tokens_native == 6 * 12
    assert 1 <= result.output_tokens <= 4


def test_encode_frames_rejects_non_uint8(tiny_video_llm, random_frames):
    with pytest.raises(ValueError, match="uint8"):
        tiny_video_llm.encode_frames(random_frames.astype("float32"))
