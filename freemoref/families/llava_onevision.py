"""LlavaOnevision (LLaVA-Video-7B-Qwen2, LLaVA-OneVision): SigLIP features per frame, pooled in one of
two token layouts (freemoref.layouts), 1-D rotary positions and ChatML prompts (freemoref.prompts).

Encoded video: the per-frame visual tokens (F, t, D). A reference is a subset of frames assembled in
the layout; its tokens sit at consecutive slots, and the fused sequence is renumbered (the engine's
default positions).
"""

from __future__ import annotations

import numpy as np
import torch

from freemoref import flops, layouts, prompts
from freemoref.config import ResolvedMoRef
from freemoref.families.base import FlopShape, ModelFamily, VisualPrompt
from freemoref.partition import partition_frames

# Qwen2-style ChatML. A message's content is a string or a list of parts ({"type": "text" | "image" |
# "video"}); media placeholders come first, each on its own line, as LLaVA-Video's prompts do.
CHAT_TEMPLATE = (
    "{%- if not messages or messages[0]['role'] != 'system' -%}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}"
    "{%- for part in message['content'] if part['type'] == 'image' -%}{{ '<image>\\n' }}{%- endfor -%}"
    "{%- for part in message['content'] if part['type'] == 'video' -%}{{ '<video>\\n' }}{%- endfor -%}"
    "{%- for part in message['content'] if part['type'] == 'text' -%}{{ part['text'] }}{%- endfor -%}"
    "{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)



class LlavaOnevisionFamily(ModelFamily):
    name = "llava_onevision"
    architectures = ("LlavaOnevisionForConditionalGeneration",)
    model_types = ("llava_onevision",)


    def __init__(self, model, processor, layout: str = "onevision"):
        super().__init__(model, processor)
        self.layout = layouts.check_layout(layout)
        self.video_token = getattr(processor, "video_token", "<video>")

    def preprocess(self, frames: np.ndarray, frame_times_s=None) -> torch.Tensor:
        """uint8 frames (T, H, W, 3) -> the vision tower's input (1, T, C, H, W); times unused
        (the model has no notion of time beyond frame order)."""
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"frames must be uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
        pixels = self.processor.video_processor(videos=[frames], return_tensors="pt")["pixel_values_videos"]
        # Page-locked memory makes the later copy to the GPU a DMA at full bus speed.
        return pixels.pin_memory() if self.device.type == "cuda" else pixels

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """-> per-frame visual tokens (T, t, D) on the device (`layouts.frame_tokens`)."""
        return layouts.frame_tokens(self.model, pixels, self.layout)

    def frame_count(self, video: torch.Tensor) -> int:
        return video.shape[0]

    def crop(self, video: torch.Tensor, box) -> torch.Tensor:
        return layouts.crop_frame_tokens(video, box, self.layout)

    def assemble(self, frame_tokens: torch.Tensor) -> torch.Tensor:
        """Frames (F, t, D) -> one visual sequence (l, D) in this model's layout."""
        return layouts.assemble_visual_tokens(frame_tokens, self.layout, layouts.image_newline(self.model))

    def references(self, frame_tokens: torch.Tensor, resolved: ResolvedMoRef):
        """Split frames (F, t, D) into the N references of `partition_frames`: each reference's
        visual tokens (l_i, D) and their positions in the un-partitioned visual sequence. The
        onevision layout's one end-of-video newline goes with the reference holding the last frame."""
        frames, per_frame, dim = frame_tokens.shape
        offsets = torch.arange(per_frame, device=frame_tokens.device)
        references, positions = [], []
        for ids in partition_frames(frames, resolved.temporal_units, resolved.references):
            index = torch.tensor(ids, device=frame_tokens.device)
            tokens = frame_tokens[index].reshape(-1, dim)
            pos = (index[:, None] * per_frame + offsets[None]).reshape(-1)
            if self.layout == "onevision" and ids[-1] == frames - 1:
                newline = layouts.image_newline(self.model).to(tokens.device, tokens.dtype)
                tokens = torch.cat([tokens, newline.reshape(1, dim)])
                pos = torch.cat([pos, pos.new_tensor([frames * per_frame])])
            references.append(tokens)
            positions.append(pos)
        return references, positions

    @property
    def newline_tokens(self) -> int:
        """Tokens added once per video: the onevision layout's end-of-video newline."""
        return 1 if self.layout == "onevision" else 0

    def visual_prompt(self, video: torch.Tensor, resolved: ResolvedMoRef, prefix_len: int,
                      uncropped: torch.Tensor) -> VisualPrompt:
        frames, per_frame = video.shape[:2]
        if resolved.references > 1:
            references, order = self.references(video, resolved)
        else:
            visual = self.assemble(video)
            references, order = [visual], [torch.arange(visual.shape[0], device=visual.device)]
        return VisualPrompt(references, order, None, None, frames * per_frame + self.newline_tokens,
                            frames * uncropped.shape[1] + self.newline_tokens)

    def flop_shape(self, video: torch.Tensor, uncropped: torch.Tensor) -> FlopShape:
        frames, per_frame = video.shape[:2]
        return FlopShape(frames, per_frame, uncropped.shape[1], self.newline_tokens,
                         frames * flops.vision_flops_per_frame(self.config))

    def prompt_pieces(self, question: str, system_prompt: str | None, template: str) -> list:
        """`template` names one of freemoref.prompts.PROMPT_TEMPLATES (LLaVA-Video's evaluation
        prompt, or the converted checkpoint's own chat template)."""
        return prompts.prompt_pieces(template, question, system_prompt)
