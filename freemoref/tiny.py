"""Tiny real checkpoints for tests and the demo: no network, seconds to build.

`build_tiny_tokenizer` trains a byte-level BPE tokenizer of the Qwen2 kind on an embedded corpus;
`build_tiny_llava_onevision` writes a random LlavaOnevision (SigLIP + Qwen2) checkpoint with its
processor; `write_tiny_llava_next_checkpoint` writes the same weights under LLaVA-NeXT key names,
the format LLaVA-Video-7B-Qwen2 is published in, to exercise `freemoref.convert`.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from freemoref.convert import IMAGE_TOKEN, VIDEO_TOKEN, make_processor
from freemoref.families.llava_onevision import CHAT_TEMPLATE
from freemoref.layouts import LAYOUTS, VIDEO_LAYOUT_KEY

QWEN2_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

_SUBJECTS = (
    "the cat", "a dog", "the man", "a woman", "the child", "a bird", "the robot", "a horse", "the chef",
    "a player", "the driver", "a teacher", "the crowd", "a girl", "the boy", "a farmer", "the pilot",
    "a student", "the doctor", "a musician", "the soldier", "a monkey", "the family", "a stranger",
)
_VERBS = (
    "runs", "jumps", "sits", "walks", "drives", "flies", "eats", "reads", "opens", "throws", "catches",
    "cooks", "paints", "climbs", "swims", "dances", "watches", "carries", "pushes", "builds", "cuts",
    "drops", "lifts", "cleans", "follows", "repairs", "touches", "kicks", "pulls", "washes", "finds",
    "hides", "points at", "waves at", "picks up", "puts down", "looks at", "talks about", "laughs at",
)
_ADJECTIVES = (
    "red", "blue", "green", "yellow", "white", "black", "orange", "purple", "brown", "grey", "small",
    "large", "tiny", "huge", "wooden", "metal", "plastic", "glass", "old", "new", "broken", "shiny",
    "heavy", "light", "round", "square", "bright", "dark", "wet", "dry", "soft", "hard", "empty", "full",
)
_NOUNS = (
    "ball", "door", "box", "car", "cup", "bag", "boat", "table", "kite", "chair", "map", "bike", "stone",
    "camera", "lamp", "clock", "phone", "window", "bottle", "hat", "shoe", "book", "guitar", "umbrella",
    "basket", "ladder", "bucket", "blanket", "candle", "flower", "apple", "banana", "sandwich", "pizza",
    "computer", "keyboard", "mirror", "picture", "bridge", "tower", "train", "truck", "helmet", "jacket",
)
_PLACES = (
    "in the park", "on the road", "near the house", "across the street", "under a tree", "in the kitchen",
    "on the beach", "inside the room", "at the station", "by the river", "on the stage", "in the garden",
    "at the market", "in the office", "on the mountain", "behind the fence", "in the classroom",
)
_TIMES = ("at night", "in the morning", "after lunch", "before sunset", "during the game", "at the end",
          "suddenly", "slowly", "quickly", "twice", "again", "finally")
_QUESTIONS = (
    "What is {s} doing {p}?", "Where does {s} go {t}?", "How many people appear in the video?",
    "What color is the {n}?", "Why does {s} stop {t}?", "Which object does {s} hold?",
    "Describe what happens {t}.", "When does {s} leave {p}?", "Who {v} the {a} {n}?",
    "Is there a {a} {n} {p}?", "What happens after {s} {v} the {n}?",
)


def _corpus(seed: int = 0, sentences: int = 800) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for i in range(sentences):
        s, v, p, t = rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_PLACES), rng.choice(_TIMES)
        a, n = rng.choice(_ADJECTIVES), rng.choice(_NOUNS)
        if i % 3 == 0:
            lines.append(rng.choice(_QUESTIONS).format(s=s, v=v, a=a, n=n, p=p, t=t))
        elif i % 3 == 1:
            lines.append(f"{a.capitalize()} {n}s and {rng.choice(_NOUNS)}es were {t} {p}; {v}!")
        else:
            lines.append(f"{s.capitalize()} {v} the {a} {n} {p} {t}. It took {rng.randint(1, 120)} seconds.")
    return lines


def build_tiny_tokenizer(out_dir: str | Path | None = None, *, vocab_size: int = 1024,
                         multimodal_tokens: bool = True):
    """Train a byte-level BPE tokenizer offline and wrap it as a transformers `Qwen2Tokenizer`.

    The id layout mirrors Qwen2: the BPE vocabulary, then `<|endoftext|>`, `<|im_start|>`,
    `<|im_end|>`, then (with `multimodal_tokens`) `<image>` and `<video>` as LLaVA adds them.
    Returns the tokenizer; saves it to `out_dir` when given.
    """
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, trainers
    from tokenizers.models import BPE
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX, Qwen2Tokenizer

    bpe = Tokenizer(BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bpe.train_from_iterator(_corpus(), trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]

    # Qwen2Tokenizer appends its unk/eos/pad token (<|endoftext|>) after the BPE vocabulary.
    tokenizer = Qwen2Tokenizer(vocab=model["vocab"], merges=merges)
    extra = list(QWEN2_SPECIAL_TOKENS[1:]) + ([IMAGE_TOKEN, VIDEO_TOKEN] if multimodal_tokens else [])
    tokenizer.add_special_tokens({"additional_special_tokens": extra})
    tokenizer.chat_template = CHAT_TEMPLATE
    if out_dir is not None:
        tokenizer.save_pretrained(str(out_dir))
    return tokenizer


@dataclass
class TinyModelShape:
    """Shapes of the tiny model. The 7x7 SigLIP grid is odd like the real 27x27, so the two layouts
    differ the way they do on the real model (onevision 4x4 by ceil, llava_vid 3x3 by floor)."""

    image_size: int = 28
    patch_size: int = 4
    vision_hidden: int = 32
    vision_intermediate: int = 64
    vision_layers: int = 2
    vision_heads: int = 2
    text_hidden: int = 64
    text_intermediate: int = 128
    text_layers: int = 4
    text_heads: int = 4
    text_kv_heads: int = 2


def _grid_pinpoints(image_size: int) -> list[list[int]]:
    return [[image_size * i, image_size * j] for i in (1, 2) for j in (1, 2)]


def tiny_llava_onevision_config(tokenizer, shape: TinyModelShape, layout: str):
    from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

    image_token_id, video_token_id = tokenizer.convert_tokens_to_ids([IMAGE_TOKEN, VIDEO_TOKEN])
    endoftext_id, im_end_id = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])
    vision = SiglipVisionConfig(
        hidden_size=shape.vision_hidden, intermediate_size=shape.vision_intermediate,
        num_hidden_layers=shape.vision_layers, num_attention_heads=shape.vision_heads,
        image_size=shape.image_size, patch_size=shape.patch_size, vision_use_head=False,
    )
    text = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=shape.text_hidden, intermediate_size=shape.text_intermediate,
        num_hidden_layers=shape.text_layers, num_attention_heads=shape.text_heads,
        num_key_value_heads=shape.text_kv_heads, max_position_embeddings=4096, tie_word_embeddings=False,
        eos_token_id=im_end_id, pad_token_id=endoftext_id,
    )
    config = LlavaOnevisionConfig(
        vision_config=vision, text_config=text, image_token_index=image_token_id,
        video_token_index=video_token_id, vision_feature_select_strategy="full", vision_feature_layer=-1,
        image_grid_pinpoints=_grid_pinpoints(shape.image_size), tie_word_embeddings=False,
    )
    setattr(config, VIDEO_LAYOUT_KEY, layout)
    return config


def tiny_processor(tokenizer, shape: TinyModelShape):
    return make_processor(tokenizer, image_size=shape.image_size, patch_size=shape.patch_size,
                          grid_pinpoints=_grid_pinpoints(shape.image_size), vision_aspect_ratio="anyres_max_9")


@torch.no_grad()
def _randomize(model, seed: int) -> None:
    """Redraw every parameter from a generator seeded by `seed`: deterministic, independent of the
    global RNG, and with non-zero biases and non-unit norms so that a key mapped wrongly shows."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in sorted(model.named_parameters()):
        noise = torch.randn(param.shape, generator=gen)
        if name.endswith("bias"):
            param.copy_(0.1 * noise)
        elif "norm" in name:  # LayerNorm / RMSNorm scales
            param.copy_(1.0 + 0.1 * noise)
        elif param.dim() == 1:  # image_newline
            param.copy_(noise)
        elif "embed" in name:  # token and position embeddings
            param.copy_(0.5 * noise)
        else:  # Linear (out, in) and Conv2d (out, in, k, k): unit-variance outputs
            param.copy_(noise / param[0].numel() ** 0.5)


def build_tiny_llava_onevision(out_dir: str | Path, *, layout: str = "onevision", seed: int = 0,
                               shape: TinyModelShape | None = None) -> str:
    """Write a tiny random LlavaOnevision checkpoint plus its processor to `out_dir`.

    Loads back with `AutoProcessor.from_pretrained` and
    `LlavaOnevisionForConditionalGeneration.from_pretrained`. The video token layout is recorded
    in the config under `moref_video_layout`. Same seed, same weights. Returns the directory.
    """
    from transformers import GenerationConfig, LlavaOnevisionForConditionalGeneration

    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    shape = shape or TinyModelShape()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    tokenizer = build_tiny_tokenizer()
    config = tiny_llava_onevision_config(tokenizer, shape, layout)
    model = LlavaOnevisionForConditionalGeneration(config)
    _randomize(model, seed)
    endoftext_id, im_end_id = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])
    model.generation_config = GenerationConfig(
        eos_token_id=[im_end_id, endoftext_id], pad_token_id=endoftext_id, do_sample=False)
    model.save_pretrained(str(out_dir))
    tiny_processor(tokenizer, shape).save_pretrained(str(out_dir))
    return str(out_dir)


def _llava_next_key(key: str) -> str:
    """In-memory HF LlavaOnevision key -> LLaVA-NeXT key (the inverse of freemoref.convert)."""
    if key.startswith("model.vision_tower."):
        rest = key[len("model.vision_tower."):].removeprefix("vision_model.")
        return "model.vision_tower.vision_tower.vision_model." + rest
    for hf_prefix, next_prefix in (("model.language_model.", "model."),
                                   ("model.multi_modal_projector.linear_1.", "model.mm_projector.0."),
                                   ("model.multi_modal_projector.linear_2.", "model.mm_projector.2."),
                                   ("model.image_newline", "model.image_newline"), ("lm_head.", "lm_head.")):
        if key.startswith(hf_prefix):
            return next_prefix + key[len(hf_prefix):]
    raise KeyError(f"no LLaVA-NeXT name for {key}")


def write_tiny_llava_next_checkpoint(out_dir: str | Path, *, seed: int = 0, shards: int = 2,
                                     shape: TinyModelShape | None = None) -> str:
    """Write a tiny checkpoint in LLaVA-NeXT's own format (as lmms-lab publishes LLaVA-Video).

    Weights are those of `build_tiny_llava_onevision(seed=seed)` renamed to LLaVA-NeXT keys and
    split over `shards` safetensors files with an index; config.json carries LLaVA-NeXT fields;
    the tokenizer lacks `<image>`/`<video>` (LLaVA-NeXT uses a sentinel id instead). A SigLIP
    vision config is written to `out_dir/vision_tower` and named by `mm_vision_tower`.
    Returns the directory.
    """
    from safetensors.torch import save_file
    from transformers import LlavaOnevisionForConditionalGeneration

    shape = shape or TinyModelShape()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer()
    config = tiny_llava_onevision_config(tokenizer, shape, "llava_vid")
    model = LlavaOnevisionForConditionalGeneration(config)
    _randomize(model, seed)

    renamed = {_llava_next_key(key): tensor.contiguous() for key, tensor in model.state_dict().items()}
    keys = sorted(renamed)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: renamed[k] for k in keys[i::shards]}
        save_file(part, str(out_dir / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    total = sum(t.numel() * t.element_size() for t in renamed.values())
    (out_dir / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))

    # LLaVA-NeXT drops SigLIP's last layer when it loads the tower, so the tower's own config
    # (what mm_vision_tower names) has one layer more than the checkpoint holds.
    tower_config = config.vision_config.__class__(**{**config.vision_config.to_dict(),
                                                     "num_hidden_layers": shape.vision_layers + 1})
    tower_config.save_pretrained(str(out_dir / "vision_tower"))
    text = config.text_config
    endoftext_id, im_end_id = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])
    next_config = {
        "architectures": ["LlavaQwenForCausalLM"], "model_type": "llava",
        "hidden_size": text.hidden_size, "intermediate_size": text.intermediate_size,
        "num_hidden_layers": text.num_hidden_layers, "num_attention_heads": text.num_attention_heads,
        "num_key_value_heads": text.num_key_value_heads, "hidden_act": "silu",
        "max_position_embeddings": text.max_position_embeddings, "rms_norm_eps": text.rms_norm_eps,
        "rope_theta": 10000.0, "vocab_size": text.vocab_size, "tie_word_embeddings": False,
        "use_sliding_window": False, "sliding_window": 4096, "max_window_layers": text.num_hidden_layers,
        "attention_dropout": 0.0, "bos_token_id": endoftext_id, "eos_token_id": im_end_id,
        "torch_dtype": "float32", "image_aspect_ratio": "anyres_max_9",
        "image_grid_pinpoints": "(1x1),...,(2x2)", "image_crop_resolution": None,
        "image_split_resolution": None, "mm_hidden_size": shape.vision_hidden,
        "mm_patch_merge_type": "spatial_unpad", "mm_projector_type": "mlp2x_gelu",
        "mm_resampler_type": None, "mm_spatial_pool_mode": "average", "mm_spatial_pool_stride": 2,
        "mm_newline_position": "grid", "mm_use_im_patch_token": False, "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch", "mm_vision_select_layer": -2,
        "mm_vision_tower": str(out_dir / "vision_tower"),
    }
    (out_dir / "config.json").write_text(json.dumps(next_config, indent=2))
    build_tiny_tokenizer(out_dir, multimodal_tokens=False)
    return str(out_dir)


# --- Qwen2.5-VL ---

QWEN_VL_SPECIAL_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")

# The chat template Qwen2-VL and Qwen2.5-VL checkpoints ship (chat_template.json): ChatML, a default
# system turn, media as <|vision_start|><|video_pad|><|vision_end|> in the content's order.
QWEN_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass
class TinyQwenVLShape:
    """Shapes of the tiny Qwen2.5-VL: 4-pixel patches merged 2x2, so a 32 x 40 frame is a 4 x 5 grid of
    merged tokens per temporal patch; head_dim 16 splits as mrope_section [2, 3, 3]."""

    patch_size: int = 4
    vision_hidden: int = 32
    vision_intermediate: int = 64
    vision_layers: int = 2
    vision_heads: int = 2
    window_size: int = 16
    text_hidden: int = 64
    text_intermediate: int = 128
    text_layers: int = 4
    text_heads: int = 4
    text_kv_heads: int = 2
    min_pixels: int = 16 * 16
    max_pixels: int = 32 * 40


def build_tiny_qwen_vl_tokenizer():
    """The tiny BPE tokenizer with Qwen2.5-VL's special tokens and chat template."""
    tokenizer = build_tiny_tokenizer(multimodal_tokens=False)
    tokenizer.add_special_tokens({"additional_special_tokens": list(QWEN2_SPECIAL_TOKENS[1:])
                                  + list(QWEN_VL_SPECIAL_TOKENS)})
    tokenizer.chat_template = QWEN_VL_CHAT_TEMPLATE
    return tokenizer


def _qwen_vl_ids(tokenizer) -> dict:
    """The config's token ids of a tiny Qwen VL tokenizer."""
    ids = dict(zip(QWEN_VL_SPECIAL_TOKENS, tokenizer.convert_tokens_to_ids(list(QWEN_VL_SPECIAL_TOKENS))))
    return dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])


def _qwen_vl_text_config(tokenizer, shape: TinyQwenVLShape, **rope) -> dict:
    endoftext_id, im_end_id = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])
    return dict(vocab_size=len(tokenizer), hidden_size=shape.text_hidden, intermediate_size=shape.text_intermediate,
                num_hidden_layers=shape.text_layers, num_attention_heads=shape.text_heads,
                num_key_value_heads=shape.text_kv_heads, max_position_embeddings=4096, tie_word_embeddings=False,
                bos_token_id=endoftext_id, eos_token_id=im_end_id, pad_token_id=endoftext_id,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, **rope})


def _save_qwen_vl(model, processor, tokenizer, out_dir: Path, seed: int) -> str:
    """Randomize the model, give it greedy generation defaults, save model and processor."""
    import transformers

    _randomize(model, seed)
    endoftext_id, im_end_id = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])
    model.generation_config = transformers.GenerationConfig(
        eos_token_id=[im_end_id, endoftext_id], pad_token_id=endoftext_id, do_sample=False)
    model.save_pretrained(str(out_dir))
    processor.save_pretrained(str(out_dir))
    return str(out_dir)


def build_tiny_qwen2_5_vl(out_dir: str | Path, *, seed: int = 0, shape: TinyQwenVLShape | None = None) -> str:
    """Write a tiny random Qwen2.5-VL checkpoint with its processor (image and video processors,
    tokenizer with the family's special tokens, chat template) to `out_dir`, offline. Loads back
    with `AutoProcessor` and `Qwen2_5_VLForConditionalGeneration.from_pretrained`. Returns the dir."""
    import transformers

    shape = shape or TinyQwenVLShape()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_qwen_vl_tokenizer()
    half = shape.text_hidden // shape.text_heads // 2  # rotary frequencies per head
    spatial = half * 3 // 8  # Qwen2.5-VL-7B splits its 64 as 16 (t), 24 (h), 24 (w)
    config = transformers.Qwen2_5_VLConfig(
        text_config=_qwen_vl_text_config(tokenizer, shape, mrope_section=[half - 2 * spatial, spatial, spatial]),
        vision_config=dict(
            depth=shape.vision_layers, hidden_size=shape.vision_hidden, intermediate_size=shape.vision_intermediate,
            num_heads=shape.vision_heads, patch_size=shape.patch_size, spatial_merge_size=2, temporal_patch_size=2,
            tokens_per_second=2, window_size=shape.window_size, out_hidden_size=shape.text_hidden,
            fullatt_block_indexes=[shape.vision_layers - 1]),
        tie_word_embeddings=False, **_qwen_vl_ids(tokenizer))
    size = {"shortest_edge": shape.min_pixels, "longest_edge": shape.max_pixels}
    processor = qwen_vl_processor("qwen2_5_vl", tokenizer, shape.patch_size, size=size)
    return _save_qwen_vl(transformers.Qwen2_5_VLForConditionalGeneration(config), processor, tokenizer, out_dir, seed)


def qwen_vl_processor(family: str, tokenizer, patch_size: int, **video_options):
    """The processor of a Qwen family ("qwen2_5_vl" or "qwen3_vl") around `tokenizer`: the
    family's image and video processors at `patch_size` (2 x 2 merge, temporal patches of two,
    the reference per-frame pixel cap; `video_options` such as `size` override their defaults) and
    its chat template."""
    import transformers
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    common = dict(patch_size=patch_size, merge_size=2, temporal_patch_size=2)
    image = Qwen2VLImageProcessor(**common, **({"size": video_options["size"]} if "size" in video_options else {}))
    if family == "qwen2_5_vl":
        return transformers.Qwen2_5_VLProcessor(
            image_processor=image, tokenizer=tokenizer, chat_template=QWEN_VL_CHAT_TEMPLATE,
            video_processor=Qwen2VLVideoProcessor(**common, cap_pixels_per_frame=True, **video_options))
    return transformers.Qwen3VLProcessor(
        image_processor=image, tokenizer=tokenizer, chat_template=QWEN3_VL_CHAT_TEMPLATE,
        video_processor=Qwen3VLVideoProcessor(**common, cap_pixels_per_frame=True, **video_options))


# Qwen3-VL's chat template (chat_template.json of the Qwen3-VL Instruct checkpoints), reduced to what
# a video question uses: ChatML with no default system turn, media as
# <|vision_start|><|video_pad|><|vision_end|> in the content's order.
QWEN3_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass
class TinyQwen3VLShape(TinyQwenVLShape):
    """Shapes of the tiny Qwen3-VL: as the tiny Qwen2.5-VL, with a third ViT block so that two
    DeepStack taps (blocks 0 and 1, feeding decoder layers 0 and 1) precede the last block, an 8 x 8
    learned position grid, and frames capped at 20 merged tokens each (32 x 40 pixels)."""

    vision_layers: int = 3
    deepstack_layers: tuple[int, ...] = (0, 1)
    position_grid: int = 8
    max_tokens_per_frame: int = 20
    max_frames: int = 16


def build_tiny_qwen3_vl(out_dir: str | Path, *, seed: int = 0, shape: TinyQwen3VLShape | None = None) -> str:
    """Write a tiny random Qwen3-VL checkpoint (interleaved multimodal RoPE, per-head q/k norms,
    DeepStack) with its processor (Qwen3-VL video processor, tokenizer with the family's special
    tokens, chat template) to `out_dir`, offline. Loads back with `AutoProcessor` and
    `Qwen3VLForConditionalGeneration.from_pretrained`. Returns the dir."""
    import transformers

    shape = shape or TinyQwen3VLShape()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_qwen_vl_tokenizer()
    tokenizer.chat_template = QWEN3_VL_CHAT_TEMPLATE
    head_dim = shape.text_hidden // shape.text_heads
    spatial = head_dim // 8  # Qwen3-VL-8B splits its 64 frequencies as 24 (t), 20 (h), 20 (w), interleaved
    config = transformers.Qwen3VLConfig(
        text_config=_qwen_vl_text_config(tokenizer, shape, mrope_interleaved=True,
                                         mrope_section=[head_dim // 2 - 2 * spatial, spatial, spatial])
        | {"head_dim": head_dim},
        vision_config=dict(
            depth=shape.vision_layers, hidden_size=shape.vision_hidden, intermediate_size=shape.vision_intermediate,
            num_heads=shape.vision_heads, patch_size=shape.patch_size, spatial_merge_size=2, temporal_patch_size=2,
            out_hidden_size=shape.text_hidden, num_position_embeddings=shape.position_grid ** 2,
            deepstack_visual_indexes=list(shape.deepstack_layers)),
        tie_word_embeddings=False, **_qwen_vl_ids(tokenizer))
    frame_pixels = shape.max_tokens_per_frame * (2 * shape.patch_size) ** 2
    size = {"shortest_edge": shape.min_pixels, "longest_edge": frame_pixels * shape.max_frames}
    processor = qwen_vl_processor("qwen3_vl", tokenizer, shape.patch_size, size=size,
                                  max_video_tokens=shape.max_tokens_per_frame)
    return _save_qwen_vl(transformers.Qwen3VLForConditionalGeneration(config), processor, tokenizer, out_dir, seed)
