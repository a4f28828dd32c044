"""Video token layouts: how SigLIP patch features of each frame become LLM input tokens.

Two layouts exist for LLaVA-Video-7B-Qwen2 (docs/DESIGN.md section 3):

- ``llava_vid`` (what LLaVA-Video was trained and evaluated with): the g x g grid (27x27) is
  2x2 average pooled with floor to p x p (13x13), then an ``image_newline`` token closes every row:
  p * (p + 1) tokens per frame (182).
- ``onevision`` (HF ``LlavaOnevisionModel.get_video_features``): bilinear resize to
  ceil(g/2) x ceil(g/2) (14x14 = 196 tokens per frame), and ONE ``image_newline`` per video, after
  all frames.

Frames are encoded once (`frame_tokens`) and assembled later (`assemble_visual_tokens`), so that
Free-MoRef can assemble several references from subsets of the same frames.
"""

from __future__ import annotations

import math
from typing import get_args

import torch
import torch.nn.functional as F

from freemoref.config import VideoLayout

LAYOUTS = get_args(VideoLayout)
# Config key under which a checkpoint records its layout (written by freemoref.tiny and .convert).
VIDEO_LAYOUT_KEY = "moref_video_layout"


def check_layout(layout: str) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown video layout {layout!r}; expected one of {LAYOUTS}")
    return layout


def patch_grid(config) -> int:
    """Side g of the SigLIP patch grid (27 on the real model)."""
    vision = config.vision_config
    return vision.image_size // vision.patch_size


def pooled_grid(config, layout: str) -> int:
    """Side p of the pooled grid: ceil(g/2) for onevision, floor(g/2) for llava_vid."""
    g = patch_grid(config)
    return math.ceil(g / 2) if check_layout(layout) == "onevision" else g // 2


def tokens_per_frame(config, layout: str) -> int:
    """Visual tokens per frame: 196 (onevision) or 182 (llava_vid, newline tokens included)."""
    p = pooled_grid(config, layout)
    return p * p if layout == "onevision" else p * (p + 1)


def visual_token_count(config, layout: str, frames: int) -> int:
    """Length of one assembled video: onevision adds its single per-video newline."""
    return frames * tokens_per_frame(config, layout) + (1 if layout == "onevision" else 0)


def _llava_onevision_model(model):
    """The LlavaOnevisionModel inside a ...ForConditionalGeneration (or the model itself)."""
    inner = getattr(model, "model", model)
    if not hasattr(inner, "vision_tower") or not hasattr(inner, "multi_modal_projector"):
        raise TypeError(f"expected a LlavaOnevision model, got {type(model).__name__}")
    return inner


def image_newline(model) -> torch.Tensor:
    """The learned newline embedding (D,)."""
    return _llava_onevision_model(model).image_newline


def _projected_patches(inner, pixels: torch.Tensor) -> torch.Tensor:
    """(F, C, H, W) -> (F, g*g, D): vision tower, feature-layer selection, projector; the same
    steps and config options `get_video_features` uses."""
    config = inner.config
    outputs = inner.vision_tower(pixels, output_hidden_states=True, return_dict=True)
    layer = config.vision_feature_layer
    if isinstance(layer, int):
        features = outputs.hidden_states[layer]
    else:
        features = torch.cat([outputs.hidden_states[i] for i in layer], dim=-1)
    if config.vision_feature_select_strategy == "default":
        features = features[:, 1:]
    return inner.multi_modal_projector(features)


def _pool_llava_vid(features: torch.Tensor, g: int, newline: torch.Tensor) -> torch.Tensor:
    """(F, g*g, D) -> (F, p*(p+1), D): 2x2 average pool (floor), newline after each row."""
    frames, _, dim = features.shape
    grid = features.view(frames, g, g, dim).permute(0, 3, 1, 2)
    pooled = F.avg_pool2d(grid, kernel_size=2, stride=2).permute(0, 2, 3, 1)  # (F, p, p, D)
    p = pooled.shape[1]
    newlines = newline.to(pooled.dtype).expand(frames, p, 1, dim)
    return torch.cat([pooled, newlines], dim=2).reshape(frames, p * (p + 1), dim)


@torch.no_grad()
def frame_tokens(model, pixel_values_videos: torch.Tensor, layout: str, *,
                 frames_per_batch: int | None = 32) -> torch.Tensor:
    """Per-frame visual tokens in the LLM embedding space, (F, t, D).

    `pixel_values_videos` is one video, (F, C, H, W) or (1, F, C, H, W), as the HF video
    processor returns it. For onevision the per-video newline is NOT included (see
    `assemble_visual_tokens`); for llava_vid each row's newline is part of the frame's tokens.
    Frames go through the vision tower `frames_per_batch` at a time to bound activation memory.
    """
    check_layout(layout)
    inner = _llava_onevision_model(model)
    if pixel_values_videos.dim() == 5:
        if pixel_values_videos.shape[0] != 1:
            raise ValueError("frame_tokens takes one video at a time")
        pixel_values_videos = pixel_values_videos[0]
    vision_param = next(inner.vision_tower.parameters())
    pixels = pixel_values_videos.to(device=vision_param.device, dtype=vision_param.dtype)
    g = patch_grid(inner.config)
    step = frames_per_batch or pixels.shape[0]
    chunks = []
    for start in range(0, pixels.shape[0], step):
        features = _projected_patches(inner, pixels[start:start + step])
        if layout == "onevision":
            chunks.append(inner.apply_pooling(features))
        else:
            chunks.append(_pool_llava_vid(features, g, inner.image_newline))
    return torch.cat(chunks, dim=0)


def assemble_visual_tokens(frame_tokens: torch.Tensor, layout: str,
                           newline: torch.Tensor | None = None) -> torch.Tensor:
    """Concatenate frames in order into one visual sequence (l, D).

    onevision appends its single `newline` (the model's ``image_newline``, required there);
    llava_vid frames already end each row with one, so `newline` is unused.
    """
    check_layout(layout)
    tokens = frame_tokens.reshape(-1, frame_tokens.shape[-1])
    if layout == "llava_vid":
        return tokens
    if newline is None:
        raise ValueError("the onevision layout needs the model's image_newline embedding")
    return torch.cat([tokens, newline.to(tokens.device, tokens.dtype)[None]], dim=0)


def _grid_side(tokens: int, layout: str) -> int:
    """Pooled grid side p from tokens per frame (p*p or p*(p+1))."""
    p = math.isqrt(tokens)
    if layout == "llava_vid":
        p = (math.isqrt(4 * tokens + 1) - 1) // 2
        if p * (p + 1) != tokens:
            raise ValueError(f"{tokens} tokens per frame is not p*(p+1) for llava_vid")
    elif p * p != tokens:
        raise ValueError(f"{tokens} tokens per frame is not a square grid for onevision")
    return p


def box_to_cells(box, p: int, rows: int | None = None) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) in [0, 1] -> grid (col0, row0, col1, row1), end exclusive: every cell the box
    overlaps with positive area, at least one cell per axis. The grid is p x p, or p columns and
    `rows` rows."""
    x0, y0, x1, y1 = (float(v) for v in box)
    if not (0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0):
        raise ValueError(f"box must satisfy 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1, got {box}")
    eps = 1e-6  # so that 0.5 * 4 = 2.0000001 does not pull in a neighbouring cell

    def span(lo: float, hi: float, p: int) -> tuple[int, int]:
        start = min(math.floor(lo * p + eps), p - 1)
        return start, max(start + 1, min(math.ceil(hi * p - eps), p))

    c0, c1 = span(x0, x1, p)
    r0, r1 = span(y0, y1, p if rows is None else rows)
    return c0, r0, c1, r1


def crop_frame_tokens(frame_tokens: torch.Tensor, box, layout: str) -> torch.Tensor:
    """Keep only the pooled-grid tokens of every frame inside `box` (RoI, docs/DESIGN.md section 4).

    (F, t, D) -> (F, t', D). For llava_vid the kept rows keep their newline token, so a cropped
    frame is still rows of (cols + 1) tokens.
    """
    check_layout(layout)
    frames, tokens, dim = frame_tokens.shape
    p = _grid_side(tokens, layout)
    c0, r0, c1, r1 = box_to_cells(box, p)
    row_len = p + 1 if layout == "llava_vid" else p
    grid = frame_tokens.view(frames, p, row_len, dim)[:, r0:r1]
    kept = grid[:, :, c0:c1]
    if layout == "llava_vid":
        kept = torch.cat([kept, grid[:, :, p:]], dim=2)
    return kept.reshape(frames, -1, dim)
