"""Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`): frames in temporal patches of two, a windowed
ViT batched across frames, multimodal rotary positions (t, h, w) with absolute-time temporal ids.
What it shares with Qwen3-VL (processing, tower batching, crop, partitions, prompts) is in
families/qwen_vl.py.

Frames are resized and normalized at one resolution per video chosen from the processor's min/max
pixels and capped so that the frame count fits the context (`cap_pixels_per_frame`, with the text
config's context length as the token budget).

Positions (docs/DESIGN.md section 3, "Model families"): after a text prefix of p tokens, the merged
token (i, j) of temporal patch k sits at (p + tid_k, p + i, p + j), tid_k = floor((t_{2k} - t_0) x
tokens_per_second), t the frames' times in seconds: the model's absolute-time temporal ids (HF's
`second_per_grid_ts` reduces to this for evenly spaced frames). Text after the video continues at
the largest visual position + 1, as the released model does. Free-MoRef partitions temporal patches,
not frames: a reference is every N-th patch (the same video at 1/N the frame rate) and each of its
tokens keeps its true position, in its row and in the fused sequence.
"""

from __future__ import annotations

import numpy as np
import torch

from freemoref.config import ResolvedMoRef
from freemoref.families.base import VisualPrompt
from freemoref.families.qwen_vl import QwenVideo, QwenVLFamily
from freemoref.prefill import RotaryPositions


class Qwen25VLFamily(QwenVLFamily):
    name = "qwen2_5_vl"
    architectures = ("Qwen2_5_VLForConditionalGeneration",)
    model_types = ("qwen2_5_vl",)

    def __init__(self, model, processor):
        super().__init__(model, processor)
        self.tokens_per_second = self.config.vision_config.tokens_per_second

    def processor_options(self) -> dict:
        """The processor's video token budget, capped at the text context."""
        vp = self.processor.video_processor
        return {"max_video_tokens": min(int(getattr(vp, "max_video_tokens", 128000)),
                                        int(self.config.text_config.max_position_embeddings))}

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
        references, orders, rope = [], [], []
        for patches in self.patch_groups(t, resolved):
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
        embedding, every block's projections and gated MLP, attention within windows (full in the
        `fullatt_block_indexes` blocks), and the 2-layer merger."""
        v = self.config.vision_config
        n = grid_h * grid_w
        window = max(1, (v.window_size // self.patch_size) ** 2)
        attended = [n if i in v.fullatt_block_indexes else min(n, window) for i in range(v.depth)]
        return self.vision_block_flops(n, 3, attended) + self.merger_flops(n)
