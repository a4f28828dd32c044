"""Loading open_clip CLIP models for the guidance stage, and a tiny one for offline tests.

`load_clip` is the one loading path for every source: a built-in open_clip name with a pretrained
tag or weights file (`ViT-L-14-336-quickgelu` + `openai`), a hub id (`hf-hub:org/name`), or a local
directory in open_clip's own layout (`open_clip_config.json` + weights). `build_tiny_clip` writes
such a directory, so tests run the real loader without network access (docs/DESIGN.md section 6).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import pathlib
from typing import Any

import torch

LOCAL_DIR_PREFIX = "local-dir:"
HF_HUB_PREFIX = "hf-hub:"
CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"

# OpenAI's normalisation: the default of open_clip's preprocess, kept explicit in the saved config.
_OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

# A real CLIP ViT in miniature. The text tower keeps CLIP's vocabulary (49408) and context (77) so
# open_clip's stock SimpleTokenizer, whose BPE vocabulary ships inside the package, drives it.
TINY_CLIP_CONFIG: dict[str, Any] = {
    "embed_dim": 32,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


@dataclasses.dataclass(frozen=True)
class ClipBundle:
    """A loaded CLIP model with what is needed to feed it."""

    model: Any  # an open_clip CLIP, eval mode, on its device (torch types its towers as Tensor | Module)
    preprocess: Any  # open_clip's inference transform (PIL image -> normalised tensor)
    tokenizer: Any  # open_clip tokenizer: list[str] -> LongTensor (N, context_length), truncating
    name: str  # readable model name for outputs; never a local filesystem path
    embed_dim: int  # joint image-text embedding size D
    image_size: tuple[int, int]  # (height, width) the image tower takes

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def preprocess_cfg(self) -> dict[str, Any]:
        """open_clip's final preprocessing settings: size, mean, std, interpolation, resize_mode."""
        return dict(self.model.visual.preprocess_cfg)


def tiny_clip_model(seed: int = 0) -> torch.nn.Module:
    """The tiny random CLIP of `TINY_CLIP_CONFIG`; the same seed gives the same weights."""
    import open_clip

    # A forked RNG: building a model never disturbs the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.CLIP(**copy.deepcopy(TINY_CLIP_CONFIG))
        # CLIP initialises norms and biases to constants; perturb every tensor so that a loader
        # that skipped any weight would show in the embeddings.
        with torch.no_grad():
            for param in model.parameters():
                param.add_(0.02 * torch.randn_like(param))
    return model.eval()


def build_tiny_clip(out_dir: str | os.PathLike, seed: int = 0) -> str:
    """Write `tiny_clip_model(seed)` to `out_dir` in open_clip's local-dir layout
    (open_clip_config.json + open_clip_model.safetensors).

    Returns the directory path, which `load_clip` (and
    `open_clip.create_model_and_transforms('local-dir:<path>')`) loads.
    """
    size = TINY_CLIP_CONFIG["vision_cfg"]["image_size"]
    return save_clip_dir(tiny_clip_model(seed), TINY_CLIP_CONFIG, size, out_dir)


def build_random_clip(out_dir: str | os.PathLike, model_name: str, *, device: str | torch.device = "cpu",
                      dtype: torch.dtype = torch.float32, seed: int = 0) -> str:
    """Write a randomly initialised open_clip built-in model (e.g. 'ViT-L-14-336-quickgelu': the
    real shapes, for benchmarks without downloads) in the local-dir layout `load_clip` reads.
    Built directly on `device`; weights are stored in `dtype`."""
    import open_clip

    model_cfg = open_clip.get_model_config(model_name)
    if model_cfg is None:
        raise ValueError(f"unknown open_clip model {model_name!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.create_model(model_name, pretrained=None, device=device)
    size = model.visual.image_size
    return save_clip_dir(model.to(dtype).eval(), model_cfg, size[0] if isinstance(size, tuple) else size, out_dir)


def save_clip_dir(model: torch.nn.Module, model_cfg: dict[str, Any], image_size: int,
                  out_dir: str | os.PathLike) -> str:
    """Save an open_clip model and its config in open_clip's local-dir layout, OpenAI normalisation."""
    from safetensors.torch import save_file

    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "model_cfg": model_cfg,
        "preprocess_cfg": {
            "size": image_size,
            "mean": list(_OPENAI_MEAN),
            "std": list(_OPENAI_STD),
            "interpolation": "bicubic",
            "resize_mode": "shortest",
        },
    }
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS_NAME))
    return str(out)


def load_clip(model: str, pretrained: str | None = None, device: str | torch.device = "cpu",
              dtype: torch.dtype | None = None) -> ClipBundle:
    """Load a CLIP model, its inference preprocess and tokenizer with open_clip.

    `model` is an open_clip built-in name (with `pretrained` a tag such as 'openai' or a weights
    file), 'hf-hub:org/name', or a local directory (plain path or 'local-dir:' prefix) holding
    open_clip_config.json and weights; `pretrained` is ignored for the last two. OpenAI weights
    were trained with QuickGELU: when the tag says so, QuickGELU is forced, so 'ViT-L-14-336' +
    'openai' loads correctly as well as 'ViT-L-14-336-quickgelu' + 'openai'.
    """
    import open_clip

    source, name = _resolve_source(model, pretrained)
    kwargs: dict[str, Any] = {}
    if not source.startswith((LOCAL_DIR_PREFIX, HF_HUB_PREFIX)):
        kwargs["pretrained"] = pretrained
        kwargs["force_quick_gelu"] = needs_quick_gelu(source, pretrained)
    clip_model, _, preprocess = open_clip.create_model_and_transforms(source, device=device, **kwargs)
    clip_model.eval()
    if dtype is not None:
        clip_model.to(dtype)
    tokenizer = open_clip.get_tokenizer(source)
    size = clip_model.visual.preprocess_cfg["size"]
    image_size = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    return ClipBundle(
        model=clip_model,
        preprocess=preprocess,
        tokenizer=tokenizer,
        name=name,
        embed_dim=_embed_dim(clip_model, tokenizer),
        image_size=image_size,
    )


def needs_quick_gelu(model: str, pretrained: str | None) -> bool:
    """True when `pretrained` is an open_clip tag whose weights were trained with QuickGELU."""
    if not pretrained or os.path.isfile(pretrained):
        return False
    from open_clip.pretrained import get_pretrained_cfg

    return bool(get_pretrained_cfg(model, pretrained).get("quick_gelu", False))


def _resolve_source(model: str, pretrained: str | None) -> tuple[str, str]:
    """(open_clip model identifier, readable name for outputs)."""
    if model.startswith(HF_HUB_PREFIX):
        return model, model
    path = model[len(LOCAL_DIR_PREFIX):] if model.startswith(LOCAL_DIR_PREFIX) else model
    path = os.path.expanduser(path)
    if model.startswith((LOCAL_DIR_PREFIX, ".", "/", "~")) or os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, CONFIG_NAME)):
            raise FileNotFoundError(f"CLIP model directory has no {CONFIG_NAME}: {path}")
        # Outputs name the model by its directory, never by the full local path.
        return LOCAL_DIR_PREFIX + path, pathlib.Path(path).resolve().name
    if pretrained and os.path.isfile(pretrained):
        return model, f"{model}/{pathlib.Path(pretrained).stem}"
    return model, f"{model}/{pretrained}" if pretrained else model


def _embed_dim(model: Any, tokenizer: Any) -> int:
    output_dim = getattr(model.visual, "output_dim", None)
    if isinstance(output_dim, int):
        return output_dim
    # Towers that do not say (timm / HF wrappers): measure it on one empty prompt.
    with torch.inference_mode():
        tokens = tokenizer([""]).to(next(model.parameters()).device)
        return int(model.encode_text(tokens).shape[-1])
