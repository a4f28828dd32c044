"""The benchmarks' model shapes, per model family (`--family`): the real checkpoints' configs and
tiny ones of the same depth, with random weights. Used by bench/bench_moref.py (decoder and tower
timings) and bench/pipeline_gpu.py (whole checkpoints on disk).

- llava_onevision: LLaVA-Video-7B-Qwen2 (Qwen2-7B decoder, SigLIP-so400m tower, 26 of its 27
  layers, as LLaVA uses it).
- qwen2_5_vl: Qwen2.5-VL-7B-Instruct (config.json): decoder hidden 3584, 28 layers, 28 heads, 4 KV
  heads, MLP 18944, M-RoPE sections [16, 24, 24]; windowed ViT of depth 32 (hidden 1280, windows of
  112 pixels, full attention in blocks 7, 15, 23, 31).
- qwen3_vl: Qwen3-VL-8B-Instruct (config.json; the Qwen3-8B decoder): hidden 4096, 36 layers, 32
  heads, 8 KV heads, head dim 128, MLP 12288, interleaved M-RoPE sections [24, 20, 20]; ViT of depth
  27 (hidden 1152, patch 16, 48 x 48 learned positions), DeepStack from blocks [8, 16, 24]. The
  vision shapes are transformers' `Qwen3VLVisionConfig` defaults (tests/bench checks them).

--tiny keeps each decoder's depth (so the paper's fusion layers and FLOP ratios apply) with small
widths, and a 2-3 block tower.
"""

from __future__ import annotations

FAMILIES = ("llava_onevision", "qwen2_5_vl", "qwen3_vl")
SHAPE_NAMES = {"llava_onevision": "LLaVA-Video-7B-Qwen2", "qwen2_5_vl": "Qwen2.5-VL-7B", "qwen3_vl": "Qwen3-VL-8B"}

LLAVA_TEXT = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                  num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
                  rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                  tie_word_embeddings=False, initializer_range=0.02)
LLAVA_VISION = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26, num_attention_heads=16,
                    image_size=384, patch_size=14, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh",
                    vision_use_head=False)
QWEN2_5_VL_TEXT = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000,
                       rms_norm_eps=1e-6, tie_word_embeddings=False, initializer_range=0.02,
                       rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                        "mrope_section": [16, 24, 24]})
QWEN2_5_VL_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, in_channels=3,
                         patch_size=14, spatial_merge_size=2, temporal_patch_size=2, tokens_per_second=2,
                         window_size=112, out_hidden_size=3584, fullatt_block_indexes=[7, 15, 23, 31],
                         hidden_act="silu")
QWEN3_VL_TEXT = dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=262144,
                     rms_norm_eps=1e-6, tie_word_embeddings=False, initializer_range=0.02,
                     rope_parameters={"rope_type": "default", "rope_theta": 5000000.0,
                                      "mrope_section": [24, 20, 20], "mrope_interleaved": True})
QWEN3_VL_VISION = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, in_channels=3,
                       patch_size=16, spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=4096,
                       num_position_embeddings=2304, deepstack_visual_indexes=[8, 16, 24],
                       hidden_act="gelu_pytorch_tanh")

# --tiny: the same decoder depth, small widths; towers of 2-3 blocks.
_TINY_TEXT = dict(vocab_size=1100, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                  initializer_range=0.2, bos_token_id=None, eos_token_id=None)
TINY = {
    "llava_onevision": (dict(LLAVA_TEXT, **_TINY_TEXT),
                        dict(LLAVA_VISION, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=2, image_size=28, patch_size=4)),
    "qwen2_5_vl": (dict(QWEN2_5_VL_TEXT, **_TINY_TEXT, rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                                      "mrope_section": [2, 3, 3]}),
                   dict(QWEN2_5_VL_VISION, depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=4,
                        window_size=16, out_hidden_size=64, fullatt_block_indexes=[1])),
    "qwen3_vl": (dict(QWEN3_VL_TEXT, **_TINY_TEXT, head_dim=16,
                      rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [4, 2, 2],
                                       "mrope_interleaved": True}),
                 dict(QWEN3_VL_VISION, depth=3, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=4,
                      out_hidden_size=64, num_position_embeddings=64, deepstack_visual_indexes=[0, 1])),
}
REAL = {"llava_onevision": (LLAVA_TEXT, LLAVA_VISION), "qwen2_5_vl": (QWEN2_5_VL_TEXT, QWEN2_5_VL_VISION),
        "qwen3_vl": (QWEN3_VL_TEXT, QWEN3_VL_VISION)}
# Frame side in pixels the Qwen benchmarks feed (448 x 448: 16 x 16 merged tokens per temporal patch
# on Qwen2.5-VL's 14-pixel patches, 14 x 14 on Qwen3-VL's 16-pixel ones); tiny: 32 x 32.
FRAME_SIDE = {"real": 448, "tiny": 32}


def check_family(family: str) -> str:
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    return family


def text_and_vision(family: str, tiny: bool) -> tuple[dict, dict]:
    """The decoder's and the tower's config fields of `family` (real or tiny)."""
    return (TINY if tiny else REAL)[check_family(family)]


def model_config(family: str, tiny: bool, token_ids: dict | None = None):
    """The whole `...ForConditionalGeneration` config of `family`. token_ids: the Qwen configs'
    image/video/vision start/end token ids (from the tokenizer in use)."""
    import transformers

    text, vision = text_and_vision(family, tiny)
    if family == "llava_onevision":
        return transformers.LlavaOnevisionConfig(
            text_config=transformers.Qwen2Config(**text), vision_config=transformers.SiglipVisionConfig(**vision),
            vision_feature_select_strategy="full", vision_feature_layer=-1, multimodal_projector_bias=True,
            tie_word_embeddings=False)
    config_class = transformers.Qwen2_5_VLConfig if family == "qwen2_5_vl" else transformers.Qwen3VLConfig
    return config_class(text_config=dict(text), vision_config=dict(vision), tie_word_embeddings=False,
                        **(token_ids or {}))


def build_model(config, device, dtype):
    """The family's `...ForConditionalGeneration` with HF's random init, allocated directly on
    `device` in `dtype` (no CPU copy, no fp32 detour: seconds for 8B parameters on a GPU). Built
    this way rather than on `meta` + `to_empty` because rotary `inv_freq` buffers are computed at
    construction."""
    import torch
    import transformers

    architecture = {"llava_onevision": "LlavaOnevisionForConditionalGeneration",
                    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
                    "qwen3_vl": "Qwen3VLForConditionalGeneration"}[config.model_type]
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = getattr(transformers, architecture)(config)
    finally:
        torch.set_default_dtype(saved)
    model.set_attn_implementation("sdpa")
    return model.eval().requires_grad_(False)
