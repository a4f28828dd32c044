"""The model-family seam: what a Video-LLM family implements so that `VideoLLM`, the engine and the
pipeline stay family-independent (docs/DESIGN.md section 3, "Model families").

A family turns sampled frames into visual features (batched across frames), lays a video's tokens
out for the engine (one or N references, with the order that fusion sorts by and, where the model
uses multimodal rotary positions, each token's own position), owns the chat template's pieces and
counts its FLOPs. The decoder layers and rotary embedding are the checkpoint's own HF modules,
which the engine drives (freemoref/decoder_layers.py).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from freemoref.config import MoRefConfig, ResolvedMoRef
from freemoref.partition import partition_frames
from freemoref.prefill import RotaryPositions


@dataclass
class VisualPrompt:
    """A video's visual tokens laid out for the engine (`freemoref.engine.generate_answers`).

    references: each reference's visual embeddings (l_i, D) (one reference natively).
    order: each token's place in the un-partitioned video (l_i,), which fusion sorts by.
    rope: explicit rotary positions (multimodal RoPE families); None: positions are the slots.
    deepstack: per early decoder layer, each reference's features (l_i, D) (Qwen3-VL); else None.
    tokens: visual tokens of the whole video in one sequence after the RoI crop (what native reads).
    tokens_native: the same without the crop.
    """

    references: list[torch.Tensor]
    order: list[torch.Tensor]
    rope: RotaryPositions | None
    deepstack: list[list[torch.Tensor]] | None
    tokens: int
    tokens_native: int


@dataclass(frozen=True)
class FlopShape:
    """What one answer's FLOP count needs from the family (freemoref.flops.answer_flops): temporal
    items (frames, or temporal patches of frames), visual tokens per item after and before the crop,
    tokens added to the whole video (newline, timestamps), and the vision tower's FLOPs."""

    items: int
    tokens_per_item: int
    native_tokens_per_item: int
    extra_tokens: int
    vision_flops: int


class ModelFamily(ABC):
    """One Video-LLM architecture. Subclasses name the HF architectures they load."""

    name: ClassVar[str]
    architectures: ClassVar[tuple[str, ...]]  # config.json `architectures` entries
    model_types: ClassVar[tuple[str, ...]]  # config.json `model_type` values

    def __init__(self, model, processor):
        self.model = model
        self.processor = processor
        self.config = model.config
        self.device = next(model.parameters()).device
        self.dtype = model.dtype

    @classmethod
    def model_class(cls):
        """The HF `...ForConditionalGeneration` class of this family."""
        import transformers

        return getattr(transformers, cls.architectures[0])

    @property
    def num_layers(self) -> int:
        return self.config.text_config.num_hidden_layers

    # --- frames -> features ---

    @abstractmethod
    def preprocess(self, frames: np.ndarray, frame_times_s: np.ndarray | None) -> Any:
        """uint8 frames (T, H, W, 3) and their times in seconds -> the vision tower's input, on the
        host (so a caller can prepare one video while another holds the device)."""

    @abstractmethod
    def encode(self, pixels: Any) -> Any:
        """`preprocess`' output -> the encoded video on the device, indexable by frame
        (`encoded[indices]` keeps those frames), as the answer stage selects per question."""

    @abstractmethod
    def frame_count(self, video: Any) -> int:
        """Frames of an encoded video."""

    @abstractmethod
    def crop(self, video: Any, box) -> Any:
        """The encoded video with only the visual tokens inside box (x0, y0, x1, y1) in [0, 1]."""

    # --- layout ---

    def resolve(self, moref: MoRefConfig | None, video: Any) -> ResolvedMoRef:
        """The MoRef settings for this video; one reference (native) when MoRef is off."""
        frames = self.frame_count(video)
        if moref is None or not moref.enabled:
            return ResolvedMoRef(1, frames, 0, 1.0)
        return moref.resolve(frames, self.num_layers)

    def longest_reference_share(self, video: Any, resolved: ResolvedMoRef) -> float:
        """The largest reference's share of the video's visual tokens (1.0 for one reference): the
        frames of `partition_frames`' largest reference over all frames. Families that partition
        other units (the Qwen families' temporal patches) count those."""
        frames = self.frame_count(video)
        if resolved.references <= 1:
            return 1.0
        return max(map(len, partition_frames(frames, resolved.temporal_units, resolved.references))) / frames

    @abstractmethod
    def visual_prompt(self, video: Any, resolved: ResolvedMoRef, prefix_len: int, uncropped: Any) -> VisualPrompt:
        """The video's references for `resolved` (one when references == 1) after a text prefix of
        `prefix_len` tokens; `uncropped` is the video before the RoI crop (for the native count)."""

    @abstractmethod
    def flop_shape(self, video: Any, uncropped: Any) -> FlopShape:
        """The shapes FLOP accounting needs for this (cropped) video."""

    # --- prompt ---

    @abstractmethod
    def prompt_pieces(self, question: str, system_prompt: str | None, template: str) -> list:
        """freemoref.prompts pieces of one question's prompt, with one VIDEO marker."""

    video_token: str = "<video>"  # the processor's video placeholder: what VIDEO shows as in displayed prompts
