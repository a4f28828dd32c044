"""Load a Video-LLM checkpoint (local directory or hub id) as a `VideoLLM`; its model family
(freemoref.families) comes from the checkpoint's own config."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from freemoref.devices import resolve_device
from freemoref.families import FAMILIES, family_class, family_name_for_config
from freemoref.layouts import VIDEO_LAYOUT_KEY, check_layout
from freemoref.video_llm import VideoLLM


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """"auto": bfloat16 on CUDA, float32 elsewhere; otherwise a torch dtype or its name."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}")
    return resolved


def _is_local(model: str) -> bool:
    """A path rather than a hub id ("org/name"): it exists, or it is spelled like a path."""
    return Path(model).expanduser().exists() or model.startswith(("/", ".", "~")) or model.count("/") > 1


def _unsupported(source, config: dict) -> ValueError:
    hint = ""
    if "mm_projector_type" in config:
        hint = (" It looks like a LLaVA-NeXT checkpoint: convert it with"
                " freemoref.convert.convert_llava_next_checkpoint.")
    return ValueError(f"{source} is not a LlavaOnevision checkpoint nor one of another supported model family "
                      f"({', '.join(sorted(FAMILIES))}) (model_type={config.get('model_type')!r}).{hint}")


def _check_local_checkpoint(path: Path) -> str:
    """The family of a local checkpoint directory."""
    if not path.is_dir():
        raise FileNotFoundError(f"model directory not found: {path}")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{path} is not a Video-LLM checkpoint: no config.json")
    config = json.loads(config_file.read_text())
    family = family_name_for_config(config)
    if family is None:
        raise _unsupported(path, config)
    return family


def load_video_llm(model: str | os.PathLike, *, dtype: str | torch.dtype = "auto",
                   device: str | torch.device = "auto", attn_implementation: str = "sdpa",
                   trust_remote_code: bool = False, layout: str = "auto",
                   prompt_template: str = "llava_vid") -> VideoLLM:
    """Load model and processor from a local directory or a hub id; the model family comes from
    the checkpoint's config (`architectures`, else `model_type`).

    dtype "auto" is bfloat16 on CUDA and float32 on CPU. LlavaOnevision only: layout "auto" takes the
    layout the checkpoint records under `moref_video_layout` (freemoref.tiny and freemoref.convert
    write it), else "onevision", the HF default; `prompt_template` names the prompt format
    (freemoref.prompts.PROMPT_TEMPLATES). The Qwen families prompt with their processor's chat
    template. `trust_remote_code` is passed through to transformers.
    """
    from transformers import AutoConfig, AutoProcessor

    from freemoref.prompts import PROMPT_TEMPLATES

    if prompt_template not in PROMPT_TEMPLATES:
        raise ValueError(f"unknown prompt template {prompt_template!r}; expected one of {sorted(PROMPT_TEMPLATES)}")
    source = str(model)
    if _is_local(source):
        path = Path(source).expanduser()
        _check_local_checkpoint(path)
        source = str(path)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)

    config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    name = family_name_for_config(config.to_dict())
    if name is None:
        raise _unsupported(source, config.to_dict())
    family = family_class(name)
    llm = family.model_class().from_pretrained(
        source, config=config, dtype=torch_dtype, attn_implementation=attn_implementation,
        trust_remote_code=trust_remote_code)
    llm.to(torch_device).eval()
    processor = AutoProcessor.from_pretrained(source, trust_remote_code=trust_remote_code)
    if name == "llava_onevision":
        if layout == "auto":
            layout = getattr(config, VIDEO_LAYOUT_KEY, None) or "onevision"
        video_llm = VideoLLM(llm, processor, check_layout(layout))
    else:
        video_llm = VideoLLM(llm, processor, family=family(llm, processor))
    video_llm.prompt_template = prompt_template
    return video_llm
