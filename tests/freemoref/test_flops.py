import pytest
from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

from freemoref.flops import answer_flops, attn_flops_ratio, split_counts


@pytest.mark.parametrize("frames, refs, layer, paper", [(128, 2, 3, 1.104), (256, 4, 6, 1.632), (512, 8, 12, 4.00)])
def test_attn_ratio_reproduces_the_paper(frames, refs, layer, paper):
    assert attn_flops_ratio(frames, refs, layer) == pytest.approx(paper, abs=0.015)


@pytest.mark.parametrize("refs, paper", [(2, 0.276), (4, 0.250), (8, 0.236)])
def test_attn_ratio_reproduces_the_ablation(refs, paper):
    ratio = attn_flops_ratio(128, refs, 3, keep_ratio=0.5, baseline_frames=128)
    assert ratio == pytest.approx(paper, abs=0.0015)


def test_attn_ratio_by_hand():
    # 128 frames, N=2, L=3: 3 layers of 2 * (2/2)^2 plus 25 layers of (2 * 1/2)^2, over 28 * 1^2
    assert attn_flops_ratio(128, 2, 3) == pytest.approx((3 * 2 + 25 * 1) / 28)
    assert attn_flops_ratio(128, 2, 3, keep_ratio=0.5) == attn_flops_ratio(128, 2, 3)  # None means 1/N
    assert attn_flops_ratio(128, 2, 3, keep_ratio=0.25) == pytest.approx((3 * 2 + 25 * 0.25) / 28)
    assert attn_flops_ratio(96, 2, 0, num_layers=4) == pytest.approx((96 / 64 / 2) ** 2)


def test_one_reference_is_the_native_ratio():
    assert attn_flops_ratio(64, 1, 3) == 1.0
    assert attn_flops_ratio(128, 1, 0) == pytest.approx(4.0)
    assert attn_flops_ratio(32, 1, 12, keep_ratio=0.5) == pytest.approx(0.25)  # nothing is fused
    with pytest.raises(ValueError):
        attn_flops_ratio(128, 2, 29)


def test_split_counts():
    assert split_counts(7, 3) == [3, 2, 2] and split_counts(4, 2) == [2, 2]


# The tiny model's shapes, counted by hand below.
CONFIG = LlavaOnevisionConfig(
    vision_config=SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=2, image_size=28, patch_size=4),
    text_config=Qwen2Config(vocab_size=977, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                            num_attention_heads=4, num_key_value_heads=2),
)
LIN = 2 * 64 * 64 + 2 * 64 * 32 + 2 * 64 * 32 + 2 * 64 * 64 + 3 * 2 * 64 * 128  # q k v o, gate up down
PAIR = 2 * 4 * 16 * 2  # QK^T and AV, 4 heads of 16
LM_HEAD = 2 * 64 * 977
PATCHES = 7 * 7
VISION_FRAME = (PATCHES * 2 * 3 * 4 * 4 * 32  # patch embedding
                + 2 * (PATCHES * (4 * 2 * 32 * 32 + 2 * 2 * 32 * 64) + 2 * 2 * 32 * PATCHES ** 2)  # 2 layers
                + PATCHES * (2 * 32 * 64 + 2 * 64 * 64))  # projector
# 4 frames of 16 tokens + one newline; 5 system tokens, 7 question tokens, 3 output tokens
NATIVE = (4 * VISION_FRAME
          + 4 * ((77 * LIN + 77 * 78 // 2 * PAIR) + (LIN + 78 * PAIR) + (LIN + 79 * PAIR))
          + 3 * LM_HEAD)


def test_native_answer_flops_by_hand():
    assert LIN == 73728 and PAIR == 256 and VISION_FRAME == 2972928
    total, native = answer_flops(CONFIG, frames=4, visual_tokens_per_frame=16, text_tokens=12, output_tokens=3,
                                 prefix_tokens=5, extra_visual_tokens=1)
    assert total == native == NATIVE


def test_moref_answer_flops_by_hand():
    # N=2 rows of 2 frames (32 tokens, plus the one newline in one row: padded to 33), L=1,
    # keep 0.5 -> 17 + 16 fused visual tokens
    system_pairs = 5 * 6 // 2
    row_pairs = 33 * 5 + 33 * 34 // 2 + 7 * (5 + 33) + 7 * 8 // 2
    below = (5 + 2 * 33 + 7) * LIN + (system_pairs + 2 * row_pairs) * PAIR  # system, question once
    below += 2 * LIN + 2 * (46 + 47) * PAIR  # two decode steps, each attending to both rows
    fused = 5 + 33 + 7
    above = 3 * ((fused * LIN + fused * (fused + 1) // 2 * PAIR) + (LIN + 46 * PAIR) + (LIN + 47 * PAIR))
    total, native = answer_flops(CONFIG, frames=4, visual_tokens_per_frame=16, text_tokens=12, output_tokens=3,
                                 references=2, fusion_layer=1, keep_ratio=0.5, prefix_tokens=5,
                                 extra_visual_tokens=1)
    assert native == NATIVE
    assert total == 4 * VISION_FRAME + below + above + 3 * LM_HEAD
    assert total < native


def test_video_scope_counts_the_shared_prefix_once_per_video():
    kwargs = dict(frames=4, visual_tokens_per_frame=16, text_tokens=12, output_tokens=3, references=2,
                  fusion_layer=1, keep_ratio=0.5, prefix_tokens=5, extra_visual_tokens=1)
    question_scope, native = answer_flops(CONFIG, **kwargs)
    alone, same_native = answer_flops(CONFIG, fusion_scope="video", shared_with=1, **kwargs)
    assert alone == question_scope and same_native == native  # causal: prefix then question is one sequence
    prefix = 5 + 33  # system + fused visual
    prefix_layer = prefix * LIN + prefix * (prefix + 1) // 2 * PAIR
    for shared in (2, 5):
        share, _ = answer_flops(CONFIG, fusion_scope="video", shared_with=shared, **kwargs)
        # layers 1..3 (3 of them) run the prefix once for `shared` questions
        assert share == pytest.approx(question_scope - 3 * prefix_layer * (1 - 1 / shared), abs=3)
    # gated in every layer, nothing is fused: the scope changes nothing
    assert answer_flops(CONFIG, fusion_scope="video", shared_with=5, **{**kwargs, "fusion_layer": 4}) == \
        answer_flops(CONFIG, **{**kwargs, "fusion_layer": 4})


def test_uneven_rows_are_padded_and_keep_defaults_to_one_over_n():
    # 5 frames over 2 rows: 3 and 2 frames; rows padded to 3 frames below L; fused 2 + 1 frames
    total, _ = answer_flops(CONFIG, frames=5, visual_tokens_per_frame=10, text_tokens=0, output_tokens=1,
                            references=2, fusion_layer=2)
    below = 2 * (60 * LIN + 2 * (30 * 31 // 2) * PAIR)
    above = 2 * (25 * LIN + 25 * 26 // 2 * PAIR)
    assert total == 5 * VISION_FRAME + below + above + LM_HEAD


def test_crop_counts_in_native_at_full_frame():
    cropped, native = answer_flops(CONFIG, frames=4, visual_tokens_per_frame=4, text_tokens=12, output_tokens=3,
                                   prefix_tokens=5, extra_visual_tokens=1, native_visual_tokens_per_frame=16)
    assert native == NATIVE and cropped < native
    with pytest.raises(ValueError):
        answer_flops(CONFIG, frames=4, visual_tokens_per_frame=4, text_tokens=3, output_tokens=1, prefix_tokens=5)


def test_real_model_saving_at_128_frames():
    real = LlavaOnevisionConfig(text_config=Qwen2Config(hidden_size=3584, intermediate_size=18944,
                                                        num_hidden_layers=28, num_attention_heads=28,
                                                        num_key_value_heads=4, vocab_size=152064))
    kwargs = dict(visual_tokens_per_frame=182, text_tokens=60, output_tokens=16, prefix_tokens=20)
    total, native = answer_flops(real, frames=128, references=2, fusion_layer=3, **kwargs)
    native_64, _ = answer_flops(real, frames=64, **kwargs)
    # after fusion the decoder sees 64 frames' worth of tokens; the vision tower still encodes 128
    assert 0.5 < total / native < 0.65
    assert native_64 < total < 1.5 * native_64
