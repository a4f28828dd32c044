"""Qwen3-VL (`Qwen3VLForConditionalGeneration`): Qwen2.5-VL's processing of temporal patches of two
frames (families/qwen_vl.py, shared), with three differences in how a video enters the decoder.

Timestamps as text. The video section is, per temporal patch k, `<{s_k:.1f} seconds>` (s_k the mean
time of the patch's first and last frame, in seconds from the video's start) then
`<|vision_start|>`, the patch's merged tokens and `<|vision_end|>`; it replaces the chat template's
`<|vision_start|><|video_pad|><|vision_end|>` whole, as the released processor does (transformers
5.23 replaces only the `<|video_pad|>` and so wraps the video twice).

Positions (interleaved multimodal RoPE; the checkpoint's rotary embedding interleaves the axes).
Positions run on from the prefix: text tokens take consecutive positions on all three axes, and
patch k's grid, starting at position c, sits at (c, c + i, c + j) and moves the next position to
c + max(h, w). There is no absolute-time temporal id: time is in the timestamp text.

DeepStack. The vision tower's features from a few early ViT blocks (`deepstack_visual_indexes`) are
added to the merged tokens' hidden states after the first decoder layers, one ViT block per layer.

Free-MoRef: a reference is every N-th temporal patch together with its own timestamp, start and
end tokens, each at its native position, and carries its own patches' DeepStack features (zero at
its text tokens). Fusion treats a reference's timestamp tokens like its visual tokens (scored,
kept or dropped, then sorted back into native order).
"""

from __future__ import annotations

import torch

from freemoref.config import ResolvedMoRef
from freemoref.families.base import VisualPrompt
from freemoref.families.qwen_vl import QwenVideo, QwenVLFamily
from freemoref.prefill import RotaryPositions
from freemoref.prompts import plain_text_ids


class Qwen3VLFamily(QwenVLFamily):
    name = "qwen3_vl"
    architectures = ("Qwen3VLForConditionalGeneration",)
    model_types = ("qwen3_vl",)

    def __init__(self, model, processor):
        super().__init__(model, processor)
        self.pad_token = self.video_token
        start = getattr(processor, "vision_start_token", "<|vision_start|>")
        end = getattr(processor, "vision_end_token", "<|vision_end|>")
        self.video_token = start + self.pad_token + end  # what the video replaces in the chat template
        self.start_id, self.end_id = self.config.vision_start_token_id, self.config.vision_end_token_id

    def timestamps(self, video: QwenVideo) -> list[float]:
        """Each temporal patch's time in seconds: the mean of its first and last frame's (an odd last
        frame is its own pair, as the processor repeats it)."""
        times = list(video.times)
        times += [times[-1]] * (-len(times) % self.temporal_patch)
        step = self.temporal_patch
        return [(times[i] + times[i + step - 1]) / 2 for i in range(0, len(times), step)]

    def lead_ids(self, video: QwenVideo) -> list[list[int]]:
        """Per temporal patch, the token ids before its merged tokens: its timestamp, then `<|vision_start|>`."""
        return [plain_text_ids(self.processor.tokenizer, f"<{s:.1f} seconds>") + [self.start_id]
                for s in self.timestamps(video)]

    def extra_tokens(self, video: QwenVideo) -> int:
        return sum(len(ids) + 1 for ids in self.lead_ids(video))

    @torch.no_grad()
    def visual_prompt(self, video: QwenVideo, resolved: ResolvedMoRef, prefix_len: int,
                      uncropped: QwenVideo) -> VisualPrompt:
        tokens = video.features()
        t, h, w, dim = tokens.shape
        device = tokens.device
        leads = self.lead_ids(video)
        text_ids = torch.tensor([i for ids in leads for i in [*ids, self.end_id]], device=device)
        text = self.model.get_input_embeddings()(text_ids).to(self.dtype)
        rows, cols = (g.reshape(-1) for g in torch.meshgrid(torch.arange(h, device=device),
                                                           torch.arange(w, device=device), indexing="ij"))
        stacks = video.deepstack_features()
        patches = []  # per patch: (embeddings, positions (3, n), DeepStack features per layer)
        position, used = prefix_len, 0
        for k, ids in enumerate(leads):
            lead = len(ids)
            lead_pos = (position + torch.arange(lead, device=device)).expand(3, -1)
            corner = position + lead
            grid_pos = torch.stack([torch.full_like(rows, corner), corner + rows, corner + cols])
            end = corner + max(h, w)
            position = end + 1
            embeds = torch.cat([text[used : used + lead], tokens[k].reshape(-1, dim), text[used + lead][None]])
            used += lead + 1
            rope = torch.cat([lead_pos, grid_pos, torch.full((3, 1), end, device=device)], 1)
            features = [torch.cat([d.new_zeros(lead, dim), d[k].reshape(-1, dim), d.new_zeros(1, dim)]) for d in stacks]
            patches.append((embeds, rope, features))
        starts = torch.tensor([0] + [p[0].shape[0] for p in patches], device=device).cumsum(0)
        references, orders, ropes = [], [], []
        deepstack: list[list[torch.Tensor]] = [[] for _ in stacks]
        for group in self.patch_groups(t, resolved):
            references.append(torch.cat([patches[k][0] for k in group]))
            ropes.append(torch.cat([patches[k][1] for k in group], 1))
            orders.append(torch.cat([starts[k] + torch.arange(patches[k][0].shape[0], device=device) for k in group]))
            for layer, features in enumerate(deepstack):
                features.append(torch.cat([patches[k][2][layer] for k in group]))
        prefix = torch.arange(prefix_len, device=device).expand(3, -1)
        full = uncropped.features().shape
        extra = int(text_ids.shape[0])
        return VisualPrompt(references, orders, RotaryPositions(prefix, ropes, position), deepstack or None,
                            t * h * w + extra, full[0] * full[1] * full[2] + extra)

    def vision_flops_per_patch(self, grid_h: int, grid_w: int) -> int:
        """The ViT and its mergers for one temporal patch of grid_h x grid_w patches: patch
        embedding, every block's projections and 2-matrix MLP, attention over the whole patch, the
        final merger and one merger per DeepStack layer."""
        v = self.config.vision_config
        n = grid_h * grid_w
        mergers = 1 + len(v.deepstack_visual_indexes)
        return self.vision_block_flops(n, 2, [n] * v.depth) + mergers * self.merger_flops(n)
