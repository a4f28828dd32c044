"""What the Qwen vision-language families (Qwen2.5-VL, Qwen3-VL) share: frames resized and normalized
by the checkpoint's own video processor, temporal patches of two frames through the vision tower
batched across patches, the RoI crop on the merged-token grid, MoRef partitions of temporal patches,
and prompts read out of the processor's chat template. How a video's tokens are laid out and
positioned (`visual_prompt`) and how the tower is counted (`vision_flops_per_patch`) are each
family's own (families/qwen2_5_vl.py, families/qwen3_vl.py).

The encoded video keeps the processed frames, so the answer stage can select frames per question;
the vision tower runs on a selection's temporal patches (consecutive pairs of its frames) when
first needed.
"""

from __future__ import annotations

import math
import re
from abc import abstractmethod
from dataclasses import dataclass, field

import numpy as np
import torch

from freemoref import prompts
from freemoref.config import MoRefConfig, ResolvedMoRef
from freemoref.families.base import FlopShape, ModelFamily
from freemoref.layouts import box_to_cells
from freemoref.partition import partition_frames

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
    tower has run on them, the merged tokens (T, h, w, D) of its T temporal patches and, for
    DeepStack models, the tower's early-layer features of the same tokens (one (T, h, w, D) per
    decoder layer they feed). After an RoI crop only the cells inside the box remain.
    `video[indices]` selects frames (the tower then runs on the selection's own patches)."""

    pixels: torch.Tensor
    times: np.ndarray
    family: QwenVLFamily = field(repr=False)
    tokens: torch.Tensor | None = None
    box: tuple | None = None
    deepstack: list[torch.Tensor] = field(default_factory=list)

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
        """(T, h, w, D) merged tokens, computed once (with the DeepStack features)."""
        if self.tokens is None:
            self.tokens, *self.deepstack = self.family.vision_tokens(self.pixels)
        return self.tokens

    def deepstack_features(self) -> list[torch.Tensor]:
        """Per DeepStack decoder layer, (T, h, w, D) features of the merged tokens; [] without DeepStack."""
        self.features()
        return self.deepstack


class QwenVLFamily(ModelFamily):
    """The shared part of the Qwen VL families; subclasses lay the tokens out and count the tower."""

    def __init__(self, model, processor):
        super().__init__(model, processor)
        vision = self.config.vision_config
        self.patch_size, self.merge = vision.patch_size, vision.spatial_merge_size
        self.temporal_patch = vision.temporal_patch_size
        self.video_token = getattr(processor, "video_token", "<|video_pad|>")

    # --- frames -> features ---

    def processor_options(self) -> dict:
        """Extra options for the video processor call (the family's context cap)."""
        return {}

    def preprocess(self, frames: np.ndarray, frame_times_s=None) -> QwenFrames:
        """Resize and normalize with the checkpoint's video processor, one resolution for the video
        (capped per frame as the reference implementation does). Times default to the processor's
        frame rate."""
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"frames must be uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
        vp = self.processor.video_processor
        if frame_times_s is None:
            frame_times_s = np.arange(len(frames)) / float(getattr(vp, "fps", None) or 2.0)
        times = np.asarray(frame_times_s, dtype=np.float64)
        if times.shape != (len(frames),):
            raise ValueError(f"frame_times_s must hold one time per frame ({len(frames)}), got shape {times.shape}")
        out = vp(videos=[frames], return_tensors="pt", do_sample_frames=False, cap_pixels_per_frame=True,
                 **self.processor_options())
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
    def vision_tokens(self, frames: torch.Tensor) -> list[torch.Tensor]:
        """Frames (F, C, H, W) -> [merged tokens (T, h, w, D), then each DeepStack layer's (T, h, w, D)]:
        consecutive pairs form temporal patches (an odd last frame is repeated, as the processor
        does), the tower runs PATCHES_PER_BATCH at a time."""
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
            chunks.append([out.pooler_output, *(getattr(out, "deepstack_features", None) or ())])
        h, w = gh // self.merge, gw // self.merge
        return [torch.cat(parts).view(t, h, w, -1).to(self.dtype) for parts in zip(*chunks)]

    def frame_count(self, video: QwenVideo) -> int:
        return len(video)

    def crop(self, video: QwenVideo, box) -> QwenVideo:
        """Keep the merged tokens (and their DeepStack features) inside the box: a smaller grid, so
        fewer tokens per patch (the cropped region is laid out as a video of that grid)."""
        tokens = video.features()
        _, h, w, _ = tokens.shape
        c0, r0, c1, r1 = box_to_cells(box, w, rows=h)
        return QwenVideo(video.pixels, video.times, self, tokens[:, r0:r1, c0:c1], tuple(box),
                         [d[:, r0:r1, c0:c1] for d in video.deepstack])

    # --- layout ---

    def resolve(self, moref: MoRefConfig | None, video: QwenVideo) -> ResolvedMoRef:
        """As the base, with at most one reference per temporal patch."""
        resolved = super().resolve(moref, video)
        if resolved.references > video.patches:
            assert moref is not None  # one reference without MoRef
            return MoRefConfig(**{**moref.__dict__, "references": video.patches}).resolve(len(video), self.num_layers)
        return resolved

    def patch_groups(self, patches: int, resolved: ResolvedMoRef) -> list[list[int]]:
        """The temporal patches of each reference: every N-th patch (`partition_frames` over patch
        units, M / 2 per unit), or all of them for one reference."""
        if resolved.references > 1:
            units = max(1, resolved.temporal_units // self.temporal_patch)
            return partition_frames(patches, units, resolved.references)
        return [list(range(patches))]

    def longest_reference_share(self, video: QwenVideo, resolved: ResolvedMoRef) -> float:
        """References hold whole temporal patches (two frames each): the largest one's share of them."""
        return max(map(len, self.patch_groups(video.patches, resolved))) / video.patches

    # --- FLOPs ---

    @abstractmethod
    def vision_flops_per_patch(self, grid_h: int, grid_w: int) -> int:
        """The vision tower on one temporal patch of grid_h x grid_w patches (each family's tower)."""

    def vision_block_flops(self, n: int, mlp_matrices: int, attended: list[int]) -> int:
        """Patch embedding and the ViT blocks on n patches: each block's q, k, v, o projections, an
        MLP of `mlp_matrices` hidden x intermediate matrices, and attention over attended[i] keys."""
        v = self.config.vision_config
        hidden, inter = v.hidden_size, v.intermediate_size
        embed = n * 2 * v.in_channels * self.temporal_patch * self.patch_size ** 2 * hidden
        per_block = n * (4 * 2 * hidden * hidden + mlp_matrices * 2 * hidden * inter)
        return embed + v.depth * per_block + sum(2 * 2 * hidden * n * keys for keys in attended)

    def merger_flops(self, n: int) -> int:
        """One 2-layer patch merger on n patches (n / merge^2 merged tokens)."""
        v = self.config.vision_config
        merger_in = v.hidden_size * self.merge ** 2
        return n // self.merge ** 2 * (2 * merger_in * merger_in + 2 * merger_in * v.out_hidden_size)

    def flop_shape(self, video: QwenVideo, uncropped: QwenVideo) -> FlopShape:
        t, h, w, _ = video.features().shape
        full = uncropped.features().shape
        gh, gw = full[1] * self.merge, full[2] * self.merge
        return FlopShape(t, h * w, full[1] * full[2], self.extra_tokens(video),
                         t * self.vision_flops_per_patch(gh, gw))

    def extra_tokens(self, video: QwenVideo) -> int:
        """Text tokens the video section adds besides its merged tokens."""
        return 0

    # --- prompt ---

    def prompt_pieces(self, question: str, system_prompt: str | None, template: str) -> list:
        """The checkpoint processor's chat template, read into pieces: what it renders around a
        sentinel system prompt, video and question is control text; the question and system prompt
        are user text. `system_prompt` None is the template's default system turn; `template` (a
        LlavaOnevision option) is unused."""
        return chat_template_pieces(self.processor, question, system_prompt, self.video_token)


def chat_template_pieces(processor, question: str, system_prompt: str | None, video_marker: str) -> list:
    """freemoref.prompts pieces from `processor.apply_chat_template` on one system turn (unless
    None), one user turn of [video, question], and the assistant-turn start; `video_marker` (the
    video token, or the text around it that the video replaces) becomes the VIDEO piece."""
    messages = [] if system_prompt is None else [{"role": "system", "content": [{"type": "text", "text": _SYSTEM}]}]
    messages.append({"role": "user", "content": [{"type": "video"}, {"type": "text", "text": _QUESTION}]})
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if text.count(video_marker) != 1:
        raise ValueError(f"the chat template must render the video as one {video_marker!r}, got {text!r}")
    pieces: list = []
    for part in re.split("(" + "|".join(map(re.escape, (_SYSTEM, _QUESTION, video_marker))) + ")", text):
        if part == _SYSTEM:
            pieces.append(prompts.User(system_prompt or ""))
        elif part == _QUESTION:
            pieces.append(prompts.User(question))
        elif part == video_marker:
            pieces.append(prompts.VIDEO)
        elif part:
            pieces.append(prompts.Control(part))
    return pieces
