import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoProcessor, LlavaOnevisionForConditionalGeneration

from freemoref.convert import convert_llava_next_checkpoint, parse_grid_pinpoints, rename_key
from freemoref.loading import load_video_llm
from freemoref.tiny import write_tiny_llava_next_checkpoint
from freemoref.video_llm import GenerationOptions


@pytest.fixture(scope="module")
def next_checkpoint(tmp_path_factory):
    return write_tiny_llava_next_checkpoint(tmp_path_factory.mktemp("llava_next"), seed=0)


@pytest.fixture(scope="module")
def converted(next_checkpoint, tmp_path_factory):
    return convert_llava_next_checkpoint(next_checkpoint, tmp_path_factory.mktemp("converted"))


def test_tiny_checkpoint_has_llava_next_key_names(next_checkpoint):
    weight_map = json.load(open(f"{next_checkpoint}/model.safetensors.index.json"))["weight_map"]
    assert len(set(weight_map.values())) == 2
    for key in ("model.embed_tokens.weight", "model.layers.3.self_attn.k_proj.bias", "lm_head.weight",
                "model.mm_projector.0.weight", "model.mm_projector.2.bias", "model.image_newline",
                "model.vision_tower.vision_tower.vision_model.encoder.layers.1.mlp.fc2.weight"):
        assert key in weight_map


def test_converted_weights_equal_the_originals(converted, tiny_llava_vid_dir):
    model, info = LlavaOnevisionForConditionalGeneration.from_pretrained(converted, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    original = LlavaOnevisionForConditionalGeneration.from_pretrained(tiny_llava_vid_dir)  # same seed, HF layout
    ours, theirs = model.state_dict(), original.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key

    ids = torch.tensor([[3, 17, 250, 9, 400]])
    pixels = torch.randn(1, 2, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    video_id = model.config.video_token_id
    ids_with_video = torch.cat([ids, torch.full((1, 2 * 16 + 1), video_id)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids_with_video, pixel_values_videos=pixels).logits,
                                   original(input_ids=ids_with_video, pixel_values_videos=pixels).logits,
                                   rtol=0, atol=0)


def test_converted_config_tokenizer_and_processor(converted):
    config = json.load(open(f"{converted}/config.json"))
    assert config["model_type"] == "llava_onevision" and config["moref_video_layout"] == "llava_vid"
    assert config["vision_config"]["num_hidden_layers"] == 2  # the checkpoint's, not the tower config's 3
    assert config["vision_config"]["image_size"] == 28 and config["vision_config"]["patch_size"] == 4
    assert config["text_config"]["rope_parameters"]["rope_theta"] == 10000.0
    assert config["image_grid_pinpoints"] == [[28, 28], [28, 56], [56, 28], [56, 56]]
    processor = AutoProcessor.from_pretrained(converted)
    tok = processor.tokenizer
    image_id, video_id = tok.convert_tokens_to_ids(["<image>", "<video>"])
    assert (config["image_token_index"], config["video_token_index"]) == (image_id, video_id)
    assert video_id == image_id + 1 == tok.convert_tokens_to_ids("<|im_end|>") + 2  # appended after the specials
    assert processor.num_image_tokens == 49
    assert list(processor.video_processor.image_mean) == [0.5, 0.5, 0.5]
    eos = json.load(open(f"{converted}/generation_config.json"))["eos_token_id"]
    assert tok.convert_tokens_to_ids("<|im_end|>") in eos


def test_converted_checkpoint_answers_like_the_original(converted, tiny_video_llm_llava_vid, random_frames):
    llm = load_video_llm(converted)
    assert llm.layout == "llava_vid"
    options = GenerationOptions(max_new_tokens=6)
    ours = llm.answer(llm.encode_frames(random_frames), "Who opens the door?", system_prompt=None, generation=options)
    reference = tiny_video_llm_llava_vid
    theirs = reference.answer(reference.encode_frames(random_frames), "Who opens the door?", system_prompt=None,
                              generation=options)
    assert ours.token_ids == theirs.token_ids and ours.visual_tokens_used == 6 * 12


def test_dtype_cast(next_checkpoint, tmp_path):
    out = convert_llava_next_checkpoint(next_checkpoint, tmp_path / "bf16", dtype="bfloat16")
    with safe_open(f"{out}/model-00001-of-00002.safetensors", framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert json.load(open(f"{out}/config.json"))["dtype"] == "bfloat16"


def test_rename_key_and_pinpoints():
    q_proj = "model.layers.0.self_attn.q_proj.weight"
    assert rename_key(q_proj) == "language_model." + q_proj
    assert rename_key("lm_head.weight") == "language_model.lm_head.weight"
    assert rename_key("model.mm_projector.2.bias") == "multi_modal_projector.linear_2.bias"
    assert rename_key("model.vision_tower.vision_tower.vision_model.head.probe") is None
    with pytest.raises(KeyError, match="vision_resampler"):
        rename_key("model.vision_resampler.weight")
    assert parse_grid_pinpoints("(1x1),...,(2x3)", 384) == [[384, 384], [384, 768], [384, 1152],
                                                             [768, 384], [768, 768], [768, 1152]]
    assert len(parse_grid_pinpoints("(1x1),...,(6x6)", 384)) == 36


def test_rejects_other_projectors(next_checkpoint, tmp_path):
    config = json.load(open(f"{next_checkpoint}/config.json"))
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text(json.dumps({**config, "mm_projector_type": "linear"}))
    with pytest.raises(ValueError, match="mlp2x_gelu"):
        convert_llava_next_checkpoint(tmp_path / "src", tmp_path / "dst")
