"""Model families behind one seam (freemoref/families/base.py). `family_for_config` picks one from a
checkpoint's own config.json (`architectures`, else `model_type`): no configuration key names it."""

from __future__ import annotations

from importlib import import_module

# name -> (module, class); imported on use, so picking a family does not import the others.
FAMILIES = {
    "llava_onevision": ("freemoref.families.llava_onevision", "LlavaOnevisionFamily"),
    "qwen2_5_vl": ("freemoref.families.qwen2_5_vl", "Qwen25VLFamily"),
    "qwen3_vl": ("freemoref.families.qwen3_vl", "Qwen3VLFamily"),
}
# What a checkpoint's config says -> family name.
ARCHITECTURES = {
    "LlavaOnevisionForConditionalGeneration": "llava_onevision",
    "Qwen2_5_VLForConditionalGeneration": "qwen2_5_vl",
    "Qwen3VLForConditionalGeneration": "qwen3_vl",
}
MODEL_TYPES = {"llava_onevision": "llava_onevision", "qwen2_5_vl": "qwen2_5_vl", "qwen3_vl": "qwen3_vl"}


def family_class(name: str):
    """The family class registered under `name`."""
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; expected one of {sorted(FAMILIES)}")
    module, cls = FAMILIES[name]
    return getattr(import_module(module), cls)


def family_name_for_config(config: dict) -> str | None:
    """The family of a checkpoint's config.json contents, or None when no family loads it."""
    for architecture in config.get("architectures") or ():
        if architecture in ARCHITECTURES:
            return ARCHITECTURES[architecture]
    return MODEL_TYPES.get(str(config.get("model_type")))
