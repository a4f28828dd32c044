import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoProcessor, AutoTokenizer, LlavaOnevisionForConditionalGeneration

from freemoref.loading import _is_local, load_video_llm, resolve_dtype
from freemoref.tiny import build_tiny_llava_onevision, build_tiny_tokenizer


def test_tokenizer_has_qwen2_id_layout_and_round_trips(tmp_path):
    tok = build_tiny_tokenizer(tmp_path)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]
    ids = tok.convert_tokens_to_ids(specials)
    bpe_size = ids[0]
    assert 800 <= bpe_size <= 2048
    assert ids == list(range(bpe_size, bpe_size + 5))  # specials follow the BPE vocabulary, as in Qwen2
    assert len(tok) == bpe_size + 5

    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert type(loaded).__name__ == "Qwen2Tokenizer"
    text = "<|im_start|>user\n<video>\nWhat does the cat carry in the park?<|im_end|>"
    encoded = loaded(text, add_special_tokens=False)["input_ids"]
    assert loaded.decode(encoded) == text
    assert encoded.count(ids[4]) == 1 and encoded[0] == ids[1]  # special tokens are never split
    assert len(encoded) < len(text) / 2  # BPE merged common words


def test_tokenizer_without_multimodal_tokens():
    tok = build_tiny_tokenizer(multimodal_tokens=False)
    assert "<video>" not in tok.get_vocab() and "<|im_end|>" in tok.get_vocab()


def test_chat_template_is_qwen2_chatml():
    tok = build_tiny_tokenizer()
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Why?"}]}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                    "<|im_start|>user\n<video>\nWhy?<|im_end|>\n<|im_start|>assistant\n")
    with_system = [{"role": "system", "content": "Be brief."}] + messages
    assert tok.apply_chat_template(with_system, tokenize=False).startswith(
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")


def test_tiny_checkpoint_loads_back_with_hf_classes(tiny_onevision_dir):
    model, info = LlavaOnevisionForConditionalGeneration.from_pretrained(tiny_onevision_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    processor = AutoProcessor.from_pretrained(tiny_onevision_dir)
    assert type(processor).__name__ == "LlavaOnevisionProcessor"
    config = model.config
    assert config.text_config.num_key_value_heads < config.text_config.num_attention_heads  # GQA
    assert config.text_config.vocab_size == len(processor.tokenizer)
    assert config.video_token_id == processor.tokenizer.convert_tokens_to_ids("<video>")
    assert config.moref_video_layout == "onevision"
    assert processor.num_image_tokens == (config.vision_config.image_size // config.vision_config.patch_size) ** 2
    assert processor.tokenizer.convert_tokens_to_ids("<|im_end|>") in model.generation_config.eos_token_id


def test_build_is_deterministic_per_seed(tmp_path):
    a = load_file(f"{build_tiny_llava_onevision(tmp_path / 'a', seed=1)}/model.safetensors")
    b = load_file(f"{build_tiny_llava_onevision(tmp_path / 'b', seed=1)}/model.safetensors")
    c = load_file(f"{build_tiny_llava_onevision(tmp_path / 'c', seed=2)}/model.safetensors")
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["image_newline"], c["image_newline"])
    assert any(k.endswith("bias") and a[k].abs().sum() > 0 for k in a)  # biases are not left at zero


def test_layout_is_recorded_and_picked_by_loading(tiny_llava_vid_dir):
    assert json.load(open(f"{tiny_llava_vid_dir}/config.json"))["moref_video_layout"] == "llava_vid"
    llm = load_video_llm(tiny_llava_vid_dir)
    assert llm.layout == "llava_vid"
    assert llm.dtype == torch.float32 and llm.device.type == "cpu"  # auto on a CPU machine
    assert load_video_llm(tiny_llava_vid_dir, layout="onevision").layout == "onevision"


def test_load_video_llm_honours_dtype(tiny_onevision_dir):
    llm = load_video_llm(tiny_onevision_dir, dtype="bfloat16", device="cpu", attn_implementation="eager")
    assert llm.dtype == torch.bfloat16 and next(llm.model.parameters()).dtype == torch.bfloat16
    assert llm.model.config.text_config._attn_implementation == "eager"
    assert llm.processor.tokenizer is llm.tokenizer


def test_resolve_dtype():
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("float16", torch.device("cpu")) == torch.float16
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("float7", torch.device("cpu"))


def test_missing_directory_error_names_the_path(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_video_llm(str(missing))


def test_not_a_llava_onevision_checkpoint(tmp_path):
    (tmp_path / "qwen").mkdir()
    (tmp_path / "qwen" / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    with pytest.raises(ValueError, match=r"qwen.*not a LlavaOnevision checkpoint.*'qwen2'"):
        load_video_llm(tmp_path / "qwen")
    (tmp_path / "next").mkdir()
    next_config = {"model_type": "llava", "mm_projector_type": "mlp2x_gelu"}
    (tmp_path / "next" / "config.json").write_text(json.dumps(next_config))
    with pytest.raises(ValueError, match="convert_llava_next_checkpoint"):
        load_video_llm(tmp_path / "next")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        load_video_llm(tmp_path / "empty")


def test_hub_ids_are_not_taken_for_paths():
    assert not _is_local("lmms-lab/LLaVA-Video-7B-Qwen2")
    assert _is_local("./models/x") and _is_local("/abs/path") and _is_local("a/b/c")
