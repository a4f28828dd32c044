"""Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`): frames in temporal patches of two, a windowed
ViT batched across frames, multimodal rotary positions (t, h, w) with absolute-time temporal ids.

Frames are resized and normalized by the checkpoint's own video processor, at one resolution per
video chosen from its min/max pixels and capped so that the frame count fits the context
(`cap_pixels_per_frame`, with the text config's context length as the token budget). The encoded
video keeps the processed frames, so the answer stage can select frames per question; the vision
tower runs on a selection's temporal patches (consecutive pairs of its frames) when first needed.

Positions (docs/DESIGN.md section 3, "Model families"): after a text prefix of p tokens, the merged
token (i, j) of temporal patch k sits at (p + tid_k, p + i, p + j), tid_k = floor((t_{2k} - t_0) x
tokens_per_second), t the frames' times in seconds: the model's absolute-time temporal ids (HF's
`second_per_grid_ts` reduces to this for evenly spaced frames). Text after the video continues at
the largest visual position + 1, as the released model does. Free-MoRef partitions temporal patches,
not frames: a reference is every N-th patch (the same video at 1/N the frame rate) and each of its
tokens keeps its true position, in its row and in the fused sequence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from freemoref import prompts
from freemoref.config import MoRefConfig, ResolvedMoRef
from freemoref.families.base import FlopShape, ModelFamily, VisualPrompt
from freemoref.layouts import box_to_cells
from freemoref.partition import partition_frames
from freemoref.prefill import RotaryPositions

# Sentinels for reading the prompt's pieces out of the processor's chat template.
_SYSTEM, _QUESTION = "\x00SYSTEM\x00", "\x00QUESTION\x00"
# Temporal patches through the vision tower at once: bounds activation memory on long videos
# (attention is per temporal patch, so chunks give the same features).
PATCHES_PER_BATCH = 16


@dataclass
class QwenFrames:
    """Processed frames of one video: (F, C, H, W) normalized at the video's resolution, and their
    times in seconds (F,)."""

    pixels: torch.Tensor
    times: np.ndarray


@dataclass
class QwenVideo:
    """An encoded Qwen video: its processed frames on the device, their times, and, once the vision
    tower has run on them, the merged tokens (T, h, w, D) of its T temporal patches (after an RoI
    crop only the cells inside it; `grid_offset` is the crop's top-left cell). `video[indices]`
    selects frames (the tower then runs on the selection's own patches)."""

    pixels: torch.Tensor
    times: np.ndarray
    family: Qwen25VLFamily = field(repr=False)
    tokens: torch.Tensor | None = None
    box: tuple | None = None

    def __getitem__(self, indices) -> QwenVideo:
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        return QwenVideo(self.pixels[torch.as_tensor(indices, device=self.pixels.device)], self.times[indices],
                         self.family)

    def __len__(self) -> int:
        return self.pixels.shape[0]

    @property
    def patches(self) -> int:
        return math.ceil(len(self) / self.family.temporal_patch)

    def features(self) -> torch.Tensor:
        """(T, h, w, D) merged tokens, computed once."""
        if self.tokens is None:
            self.tokens = self.family.vision_tokens(self.pixels)
        return self.tokens


class Qwen25VLFamily(ModelFamily):
    name = "qwen2_5_vl"
    architectures = ("Qwen2_5_VLForConditionalGeneration",)
    model_types = ("qwen2_5_vl",)


    def __init__(self, model, processor):
        super().__init__(model, processor)
        vision = self.config.vision_config
        self.patch_size, self.merge = vision.patch_size, vision.spatial_merge_size
        self.temporal_patch = vision.temporal_patch_size
        self.tokens_per_second = vision.tokens_per_second
        self.video_token = getattr(processor, "video_token", "<|video_pad|>")

    # --- frames -> features ---

    def preprocess(self, frames: np.ndarray, frame_times_s=None) -> QwenFrames:
        """Resize and normalize with the checkpoint's video processor, one resolution for the video
        sized so its frames fit the context. Times default to the processor's frame rate."""
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"frames must be uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
        vp = self.processor.video_processor
        if frame_times_s is None:
            frame_times_s = np.arange(len(frames)) / float(getattr(vp, "fps", None) or 2.0)
        times = np.asarray(frame_times_s, dtype=np.float64)
        if times.shape != (len(frames),):
            raise ValueError(f"frame_times_s must hold one time per frame ({len(frames)}), got shape {times.shape}")
        budget = min(int(getattr(vp, "max_video_tokens", 128000)),
                     int(self.config.text_config.max_position_embeddings))
        out = vp(videos=[frames], return_tensors="pt", do_sample_frames=False, cap_pixels_per_frame=True,
                 max_video_tokens=budget)
        pixels = self._unpatchify(out["pixel_values_videos"], out["video_grid_thw"][0].tolist())[: len(frames)]
        return QwenFrames(pixels.pin_memory() if self.device.type == "cuda" else pixels, times)

    def _unpatchify(self, flat: torch.Tensor, grid: list[int]) -> torch.Tensor:
        """The video processor's flat patches (T*gh*gw, C*tp*p*p) back to frames (T*tp, C, H, W):
        the inverse of its `patchify` permutation."""
        t, gh, gw = grid
        p, m, tp = self.patch_size, self.merge, self.temporal_patch
        c = flat.shape[1] // (tp * p * p)
        x = flat.view(t, gh // m, gw // m, m, m, c, tp, p, p)  # patchify's order: t, h/m, w/m, m, m, c, tp, p, p
        x = x.permute(0, 6, 5, 1, 3, 7, 2, 4, 8)  # -> t, tp, c, h/m, m, p, w/m, m, p
        return x.reshape(t * tp, c, gh * p, gw * p)

    def encode(self, pixels: QwenFrames) -> QwenVideo:
        """Moves the processed frames to the device; the tower runs per selection (`QwenVideo`)."""
        return QwenVideo(pixels.pixels.to(self.device, non_blocking=True), pixels.times, self)

    @torch.no_grad()
    def vision_tokens(self, frames: torch.Tensor) -> torch.Tensor:
        """Frames (F, C, H, W) -> merged tokens (T, h, w, D): consecutive pairs form temporal patches
        (an odd last frame is repeated, as the processor does), the tower runs PATCHES_PER_BATCH at a
        time."""
        vp = self.processor.video_processor
        visual = self.model.model.visual
        flat, t, gh, gw = vp.patchify(frames[None].float(), patch_size=self.patch_size, merge_size=self.merge,
                                      temporal_patch_size=self.temporal_patch)
        flat = flat[0].to(visual.dtype)
        per_patch = gh * gw
        chunks = []
        for start in range(0, t, PATCHES_PER_BATCH):
            n = min(PATCHES_PER_BATCH, t - start)
            grid = torch.tensor([[n, gh, gw]], device=flat.device)
            out = visual(flat[start * per_patch : (start + n) * per_patch], grid_thw=grid)
            chunks.append(out.pooler_output)
        h, w = gh // self.merge, gw // self.merge
        return torch.cat(chunks).view(t, h, w, -1).to(self.dtype)

    def frame_count(self, video: QwenVideo) -> int:
        return len(video)

    def crop(self, video: QwenVideo, box) -> QwenVideo:
        """Keep the merged tokens inside the box: a smaller grid, so fewer tokens per patch (the
        cropped region is laid out as a video of that grid)."""
        tokens = video.features()
        _, h, w, _ = tokens.shape
        c0, r0, c1, r1 = box_to_cells(box, w, rows=h)
        return QwenVideo(video.pixels, video.times, self, tokens[:, r0:r1, c0:c1], tuple(box))

    # --- layout ---

    def resolve(self, moref: MoRefConfig | None, video: QwenVideo) -> ResolvedMoRef:
        """As the base, with at most one reference per temporal patch."""
        resolved = super().resolve(moref, video)
        if resolved.references > video.patches:
            assert moref is not None  # one reference without MoRef
            return MoRefConfig(**{**moref.__dict__, "references": video.patches}).resolve(len(video), self.num_layers)
        return resolved

    def temporal_ids(self, video: QwenVideo) -> torch.Tensor:
        """(T,) absolute-time temporal ids of the temporal patches, from their first frames' times."""
        starts = video.times[:: self.temporal_patch]
        ids = np.floor((starts - video.times[0]) * self.tokens_per_second + 1e-6).astype(np.int64)
        return torch.as_tensor(ids, device=video.pixels.device)

    def token_positions(self, video: QwenVideo, prefix_len: int) -> tuple[torch.Tensor, int]:
        """(3, T, h, w) positions of every merged token and the text start after the video."""
        tokens = video.features()
        t, h, w, _ = tokens.shape
        device = tokens.device
        tid = self.temporal_ids(video)
        grid = torch.stack(torch.meshgrid(tid, torch.arange(h, device=device), torch.arange(w, device=device),
                                          indexing="ij"))
        text_start = prefix_len + int(max(int(tid.max()), h - 1, w - 1)) + 1
        return grid + prefix_len, text_start

    def visual_prompt(self, video: QwenVideo, resolved: ResolvedMoRef, prefix_len: int,
                      uncropped: QwenVideo) -> VisualPrompt:
        tokens = video.features()
        t, h, w, dim = tokens.shape
        positions, text_start = self.token_positions(video, prefix_len)
        order = torch.arange(t * h * w, device=tokens.device).view(t, h, w)
        if resolved.references > 1:
            units = max(1, resolved.temporal_units // self.temporal_patch)
            groups = partition_frames(t, units, resolved.references)
        else:
            groups = [list(range(t))]
        references, orders, rope = [], [], []
        for patches in groups:
            index = torch.tensor(patches, device=tokens.device)
            references.append(tokens[index].reshape(-1, dim))
            orders.append(order[index].reshape(-1))
            rope.append(positions[:, index].reshape(3, -1))
        prefix = torch.arange(prefix_len, device=tokens.device).expand(3, -1)
        full = uncropped.features().shape
        return VisualPrompt(references, orders, RotaryPositions(prefix, rope, text_start), None,
                            t * h * w, full[0] * full[1] * full[2])

    def vision_flops_per_patch(self, grid_h: int, grid_w: int) -> int:
        """The windowed ViT and the merger for one temporal patch of grid_h x grid_w patches: patch
        embedding, every block's projections and MLP, attention within windows (full in the
        `fullatt_block_indexes` blocks), and the 2-layer merger."""
        v = self.config.vision_config
        n = grid_h * grid_w
        hidden, inter = v.hidden_size, v.intermediate_size
        embed = n * 2 * v.in_channels * self.temporal_patch * self.patch_size ** 2 * hidden
        window = max(1, (v.window_size // self.patch_size) ** 2)
        per_block = n * (4 * 2 * hidden * hidden + 3 * 2 * hidden * inter)
        attention = [2 * 2 * hidden * n * (n if i in v.fullatt_block_indexes else min(n, window))
                     for i in range(v.depth)]
        merged = n // self.merge ** 2
        merger_in = hidden * self.merge ** 2
        merger = merged * (2 * merger_in * merger_in + 2 * merger_in * v.out_hidden_size)
        return embed + v.depth * per_block + sum(attention) + merger

    def flop_shape(self, video: QwenVideo, uncropped: QwenVideo) -> FlopShape:
        t, h, w, _ = video.features().shape
        full = uncropped.features().shape
        gh, gw = full[1] * self.merge, full[2] * self.merge
        return FlopShape(t, h * w, full[1] * full[2], 0, t * self.vision_flops_per_patch(gh, gw))

    # --- prompt ---

    def prompt_pieces(self, question: str, system_prompt: str | None, template: str) -> list:
        """The checkpoint processor's chat template, read into pieces: what it renders around a
        sentinel system prompt, video and question is control text; the question and system prompt
        are user text. `system_prompt` None is the template's default system turn; `template` (a
        LlavaOnevision option) is unused."""
        return chat_template_pieces(self.processor, question, system_prompt, self.video_token)


def chat_template_pieces(processor, question: str, system_prompt: str | None, video_token: str) -> list:
    """freemoref.prompts pieces from `processor.apply_chat_template` on one system turn (unless
    None), one user turn of [video, question], and the assistant-turn start."""
    messages = [] if system_prompt is None else [{"role": "system", "content": [{"type": "text", "text": _SYSTEM}]}]
    messages.append({"role": "user", "content": [{"type": "video"}, {"type": "text", "text": _QUESTION}]})
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if text.count(video_token) != 1:
        raise ValueError(f"the chat template must render the video as one {video_token!r}, got {text!r}")
    pieces: list = []
    for part in _split_keep(text, (_SYSTEM, _QUESTION, video_token)):
        if part == _SYSTEM:
            pieces.append(prompts.User(system_prompt or ""))
        elif part == _QUESTION:
            pieces.append(prompts.User(question))
        elif part == video_token:
            pieces.append(prompts.VIDEO)
        elif part:
            pieces.append(prompts.Control(part))
    return pieces


def _split_keep(text: str, markers: tuple[str, ...]) -> list[str]:
    import re

    return re.split("(" + "|".join(map(re.escape, markers)) + ")", text)
