"""Convert a LLaVA-NeXT-format LLaVA-Video checkpoint to the HF LlavaOnevision layout.

lmms-lab publishes LLaVA-Video-7B-Qwen2 in LLaVA-NeXT's own format (`LlavaQwenForCausalLM`):
Qwen2 weights under `model.*`, the SigLIP tower under `model.vision_tower.vision_tower.*`, the
projector as `model.mm_projector.{0,2}`, and no `<image>`/`<video>` tokens (LLaVA-NeXT uses a
sentinel id). This writes a directory `LlavaOnevisionForConditionalGeneration.from_pretrained` and
`AutoProcessor.from_pretrained` load, with the `llava_vid` video layout recorded in its config.
Weights are streamed one shard at a time.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import torch

from freemoref.families.llava_onevision import CHAT_TEMPLATE
from freemoref.layouts import VIDEO_LAYOUT_KEY

IMAGE_TOKEN, VIDEO_TOKEN = "<image>", "<video>"
SIGLIP_MEAN = SIGLIP_STD = [0.5, 0.5, 0.5]

# LLaVA-NeXT key prefix -> HF LlavaOnevision key prefix, in the on-disk form of the llava-hf
# checkpoints (language_model.model.*, language_model.lm_head, vision_tower.vision_model.*,
# multi_modal_projector.*, image_newline). transformers maps these to its in-memory names
# (model.language_model.*, model.vision_tower.*, ...) on load, in 4.x and 5.x alike; its own
# save_pretrained writes this form too. Anything else (a resampler, say) is an error, not dropped.
KEY_PREFIXES = (
    ("model.vision_tower.vision_tower.", "vision_tower."),
    ("model.mm_projector.0.", "multi_modal_projector.linear_1."),
    ("model.mm_projector.2.", "multi_modal_projector.linear_2."),
    ("model.image_newline", "image_newline"),
    ("lm_head.", "language_model.lm_head."),
    ("model.embed_tokens.", "language_model.model.embed_tokens."),
    ("model.layers.", "language_model.model.layers."),
    ("model.norm.", "language_model.model.norm."),
)
# LLaVA-NeXT replaces SigLIP's pooling head with Identity; a checkpoint may still carry its weights.
DROPPED_PREFIXES = ("model.vision_tower.vision_tower.vision_model.head.",)
_VISION_LAYER = re.compile(r"^model\.vision_tower\.vision_tower\.vision_model\.encoder\.layers\.(\d+)\.")

# Towers LLaVA-NeXT names by hub id, for converting without network access.
KNOWN_VISION_TOWERS = {
    "google/siglip-so400m-patch14-384": dict(
        hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
        image_size=384, patch_size=14, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh"),
}


def rename_key(key: str) -> str | None:
    """LLaVA-NeXT key -> HF LlavaOnevision key; None for keys that are dropped."""
    if key.startswith(DROPPED_PREFIXES):
        return None
    for source, target in KEY_PREFIXES:
        if key.startswith(source):
            return target + key[len(source):]
    raise KeyError(f"unexpected LLaVA-NeXT checkpoint key: {key}")


def parse_grid_pinpoints(value, image_size: int) -> list[list[int]]:
    """LLaVA-NeXT's `image_grid_pinpoints`: a list of [h, w], or a range such as "(1x1),...,(6x6)"
    meaning every grid from 1x1 to 6x6 tiles of `image_size`."""
    if isinstance(value, str):
        matches = re.findall(r"\((\d+)x(\d+)\)", value)
        if not matches:
            raise ValueError(f"cannot parse image_grid_pinpoints {value!r}")
        (r0, c0), (r1, c1) = (tuple(map(int, m)) for m in (matches[0], matches[-1]))
        return [[i * image_size, j * image_size] for i in range(r0, r1 + 1) for j in range(c0, c1 + 1)]
    return [list(map(int, pair)) for pair in value]


def _weight_files(src: Path) -> list[str]:
    index = src / "model.safetensors.index.json"
    if index.is_file():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    if (src / "model.safetensors").is_file():
        return ["model.safetensors"]
    raise FileNotFoundError(f"no safetensors weights in {src} (model.safetensors or an index)")


def _tower_dir(next_config: dict, vision_config_dir):
    """Where the SigLIP config lives: `vision_config_dir`, else `mm_vision_tower` if it is local."""
    tower = next_config.get("mm_vision_tower")
    if vision_config_dir is None and tower and Path(tower).is_dir():
        return tower
    return vision_config_dir


def _vision_config(next_config: dict, vision_layers: int, vision_config_dir):
    """SigLIP config from `vision_config_dir` (see `_tower_dir`), else from the known tower that
    `mm_vision_tower` names. The layer count is the checkpoint's (LLaVA-NeXT drops the last)."""
    from transformers import SiglipVisionConfig

    tower = next_config.get("mm_vision_tower")
    if vision_config_dir is not None:
        config = SiglipVisionConfig.from_pretrained(str(vision_config_dir))
    elif tower in KNOWN_VISION_TOWERS:
        config = SiglipVisionConfig(**KNOWN_VISION_TOWERS[tower])
    else:
        raise ValueError(f"unknown vision tower {tower!r}: pass vision_config_dir (a SigLIP checkpoint or config)")
    config.num_hidden_layers = vision_layers
    config.vision_use_head = False
    if next_config.get("mm_hidden_size", config.hidden_size) != config.hidden_size:
        raise ValueError(f"mm_hidden_size {next_config['mm_hidden_size']} != vision hidden {config.hidden_size}")
    return config


def _text_config(c: dict):
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
        num_hidden_layers=c["num_hidden_layers"], num_attention_heads=c["num_attention_heads"],
        num_key_value_heads=c.get("num_key_value_heads", c["num_attention_heads"]),
        hidden_act=c.get("hidden_act", "silu"), max_position_embeddings=c.get("max_position_embeddings", 32768),
        rms_norm_eps=c.get("rms_norm_eps", 1e-6),
        rope_parameters={"rope_type": "default", "rope_theta": float(c.get("rope_theta", 10000.0))},
        tie_word_embeddings=c.get("tie_word_embeddings", False),
        use_sliding_window=c.get("use_sliding_window", False), sliding_window=c.get("sliding_window", 4096),
        max_window_layers=c.get("max_window_layers", c["num_hidden_layers"]),
        attention_dropout=c.get("attention_dropout", 0.0),
        bos_token_id=c.get("bos_token_id"), eos_token_id=c.get("eos_token_id"),
    )


def make_processor(tokenizer, *, image_size: int, patch_size: int, grid_pinpoints, vision_aspect_ratio: str,
                   image_mean=SIGLIP_MEAN, image_std=SIGLIP_STD):
    """A LlavaOnevisionProcessor for a SigLIP tower of `image_size` / `patch_size`."""
    from transformers import LlavaOnevisionImageProcessor, LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor

    common = {"size": {"height": image_size, "width": image_size}, "image_mean": image_mean, "image_std": image_std}
    return LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(image_grid_pinpoints=grid_pinpoints, **common),
        video_processor=LlavaOnevisionVideoProcessor(**common), tokenizer=tokenizer,
        num_image_tokens=(image_size // patch_size) ** 2, vision_feature_select_strategy="full",
        vision_aspect_ratio=vision_aspect_ratio, chat_template=CHAT_TEMPLATE,
    )


def _normalisation(vision_config_dir) -> dict:
    """image_mean/std from the tower's preprocessor config when there is one, else SigLIP's."""
    if vision_config_dir is not None:
        path = Path(vision_config_dir) / "preprocessor_config.json"
        if path.is_file():
            pre = json.loads(path.read_text())
            return {"image_mean": pre.get("image_mean", SIGLIP_MEAN), "image_std": pre.get("image_std", SIGLIP_STD)}
    return {"image_mean": SIGLIP_MEAN, "image_std": SIGLIP_STD}


def convert_llava_next_checkpoint(src_dir, dst_dir, *, vision_config_dir=None,
                                  dtype: torch.dtype | str | None = None) -> str:
    """Convert `src_dir` (LLaVA-NeXT format) into `dst_dir` (HF LlavaOnevision). Returns dst_dir.

    `vision_config_dir` is a SigLIP checkpoint or config directory, needed when the source's
    `mm_vision_tower` is neither a local directory nor a tower this module knows. `dtype` casts
    floating weights (default: keep the source's).
    """
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, GenerationConfig, LlavaOnevisionConfig

    src, dst = Path(src_dir), Path(dst_dir)
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in {src}")
    next_config = json.loads((src / "config.json").read_text())
    if next_config.get("mm_projector_type") != "mlp2x_gelu":
        raise ValueError(f"{src}: mm_projector_type {next_config.get('mm_projector_type')!r} is not mlp2x_gelu")
    for key, expected in (("mm_spatial_pool_mode", "average"), ("mm_newline_position", "grid")):
        if next_config.get(key, expected) != expected:
            warnings.warn(f"{src}: {key}={next_config[key]!r}; the llava_vid layout assumes {expected!r}",
                          stacklevel=2)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)

    files = _weight_files(src)
    keys = []
    for name in files:
        with safe_open(str(src / name), framework="pt") as f:
            keys.extend(f.keys())
    vision_layers = 1 + max((int(m.group(1)) for k in keys if (m := _VISION_LAYER.match(k))), default=-1)
    if vision_layers == 0:
        raise ValueError(f"{src}: no vision tower weights (model.vision_tower.vision_tower.*)")
    tower_dir = _tower_dir(next_config, vision_config_dir)
    vision = _vision_config(next_config, vision_layers, tower_dir)
    text = _text_config(next_config)

    tokenizer = AutoTokenizer.from_pretrained(str(src))
    missing = [t for t in (IMAGE_TOKEN, VIDEO_TOKEN) if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing})
    image_id, video_id = tokenizer.convert_tokens_to_ids([IMAGE_TOKEN, VIDEO_TOKEN])
    if max(image_id, video_id) >= text.vocab_size:
        raise ValueError(
            f"{src}: <image>/<video> ids {image_id}/{video_id} exceed the embedding rows ({text.vocab_size})")
    tokenizer.chat_template = CHAT_TEMPLATE

    aspect = next_config.get("image_aspect_ratio", "anyres_max_9")
    aspect = aspect if str(aspect).startswith("anyres_max_") else "anyres_max_9"
    pinpoints = parse_grid_pinpoints(next_config.get("image_grid_pinpoints") or [[vision.image_size] * 2],
                                     vision.image_size)
    config = LlavaOnevisionConfig(
        vision_config=vision, text_config=text, image_token_index=image_id, video_token_index=video_id,
        projector_hidden_act="gelu", vision_feature_select_strategy="full", vision_feature_layer=-1,
        multimodal_projector_bias=True, tie_word_embeddings=text.tie_word_embeddings,
        image_grid_pinpoints=pinpoints, vision_aspect_ratio=aspect,
    )
    setattr(config, VIDEO_LAYOUT_KEY, "llava_vid")

    dst.mkdir(parents=True, exist_ok=True)
    weight_map, total_size, saved_dtype = {}, 0, None
    for name in files:
        shard = {}
        with safe_open(str(src / name), framework="pt") as f:
            for key in f.keys():
                new_key = rename_key(key)
                if new_key is None:
                    continue
                tensor = f.get_tensor(key)
                if dtype is not None and tensor.is_floating_point():
                    tensor = tensor.to(dtype)
                if tensor.is_floating_point():
                    saved_dtype = tensor.dtype
                shard[new_key] = tensor.contiguous()
        out_name = name if len(files) > 1 else "model.safetensors"
        save_file(shard, str(dst / out_name), metadata={"format": "pt"})
        weight_map.update({k: out_name for k in shard})
        total_size += sum(t.numel() * t.element_size() for t in shard.values())
        del shard
    if len(files) > 1:
        (dst / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total_size}, "weight_map": weight_map}, indent=2))

    config.dtype = str(saved_dtype).removeprefix("torch.") if saved_dtype is not None else None
    config.save_pretrained(str(dst))
    endoftext, im_end = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])
    generation = GenerationConfig(eos_token_id=[im_end, endoftext], pad_token_id=endoftext, do_sample=False)
    generation.save_pretrained(str(dst))
    make_processor(tokenizer, image_size=vision.image_size, patch_size=vision.patch_size, grid_pinpoints=pinpoints,
                   vision_aspect_ratio=aspect, **_normalisation(tower_dir)).save_pretrained(str(dst))
    return str(dst)
