"""`VideoLLM`: a loaded LlavaOnevision model with the steps the answer stage needs.

Frames are encoded once per video (`encode_frames`); a question's prompt is
[system + user-turn start | visual tokens | question + assistant-turn start]. `answer_many` answers
a video's questions that use the same frames together: the system prompt and visual tokens are
computed once (freemoref.engine), natively (one reference) or with Free-MoRef over N references.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from freemoref import flops, layouts, prompts
from freemoref.config import GenerationOptions, ResolvedMoRef
from freemoref.engine import MAX_BATCH_TOKENS, MoRefEngine, MoRefOutput, generate_answers
from freemoref.partition import partition_frames

if TYPE_CHECKING:
    from freemoref.config import MoRefConfig

BASELINE_FRAMES = 64  # attn_flops_ratio is relative to full attention over 64 frames (the paper's)

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


@dataclass
class AnswerResult:
    """One answer and its statistics.

    visual_tokens_native: what the frames take in one sequence at full frame (no RoI crop, no
    MoRef); visual_tokens_used: what the LLM's last layers actually hold (after crop and fusion).
    total_flops_native counts the same native setting. prefill_s is the time to the first output
    token attributed to this question (its share of the shared video prefill plus its share of its
    batch's); generate_s its share of the decoding after it. output_tokens counts every generated token, the
    stopping one included; text leaves out special tokens and ends before any stop string.
    """

    text: str
    prompt_tokens: int
    output_tokens: int
    visual_tokens_native: int
    visual_tokens_used: int
    references: int
    temporal_units: int | None
    fusion_layer: int | None
    attn_flops_ratio: float
    total_flops: int
    total_flops_native: int
    prefill_s: float
    generate_s: float
    token_ids: list[int] = field(default_factory=list)  # the generated ids, for inspection and tests
    shared_with: int = 1  # questions that shared this video prefix's prefill (1 = not shared)
    fusion_scope: str | None = None  # "question" or "video" where MoRef ran (N > 1), else None


@dataclass
class PromptParts:
    """A question's prompt around the video, ready for either generation path."""

    prefix_ids: torch.Tensor  # (p,) system + user-turn start
    suffix_ids: torch.Tensor  # (q,) question + assistant-turn start
    prefix_embeds: torch.Tensor  # (p, D)
    suffix_embeds: torch.Tensor  # (q, D)
    frame_tokens: torch.Tensor  # (F, t, D) after the RoI crop, on the model's device and dtype
    frames: int
    native_tokens_per_frame: int  # t before the crop


class VideoLLM:
    """A LlavaOnevision model, its processor and its video token layout."""

    def __init__(self, model, processor, layout: str):
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.layout = layouts.check_layout(layout)
        self.device = next(model.parameters()).device
        self.dtype = model.dtype
        self.video_token = getattr(processor, "video_token", "<video>")

    @property
    def config(self):
        return self.model.config

    def encode_frames(self, frames: np.ndarray) -> torch.Tensor:
        """uint8 frames (T, H, W, 3) -> per-frame visual tokens (T, t, D), via the HF video
        processor and `layouts.frame_tokens`. Run once per video; questions reuse the result."""
        return self.encode_pixels(self.preprocess_frames(frames))

    def preprocess_frames(self, frames: np.ndarray) -> torch.Tensor:
        """uint8 frames (T, H, W, 3) -> the vision tower's input (1, T, C, H, W), on the host.
        Host work only, so a caller can prepare one video while another holds the device."""
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"frames must be uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
        pixels = self.processor.video_processor(videos=[frames], return_tensors="pt")["pixel_values_videos"]
        # Page-locked memory makes the later copy to the GPU a DMA at full bus speed.
        return pixels.pin_memory() if self.device.type == "cuda" else pixels

    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """`preprocess_frames`' output -> per-frame visual tokens (T, t, D) on the device."""
        return layouts.frame_tokens(self.model, pixels, self.layout)

    def assemble(self, frame_tokens: torch.Tensor) -> torch.Tensor:
        """Frames (F, t, D) -> one visual sequence (l, D) in this model's layout."""
        return layouts.assemble_visual_tokens(frame_tokens, self.layout, layouts.image_newline(self.model))

    # Which of freemoref.prompts.PROMPT_TEMPLATES builds the prompt; load_video_llm sets it.
    prompt_template = "llava_vid"

    def chat_prompt(self, question: str, system_prompt: str | None) -> str:
        """The prompt text with one video placeholder, ending with the assistant-turn start, for
        display. `system_prompt` None is the template's default system turn."""
        pieces = prompts.prompt_pieces(self.prompt_template, question, system_prompt)
        return prompts.render_text(pieces, self.video_token)

    def build_prompt(self, question: str, system_prompt: str | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(prefix_ids, suffix_ids): the prompt's ids before the video (system + user-turn start)
        and after it (question + assistant-turn start). Question and system prompt stay text:
        no special or added token can come from them (freemoref.prompts.encode_prompt)."""
        pieces = prompts.prompt_pieces(self.prompt_template, question, system_prompt)
        return prompts.encode_prompt(self.tokenizer, pieces)

    @torch.no_grad()
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids (n,) -> input embeddings (n, D) in the model's dtype."""
        return self.model.get_input_embeddings()(ids.to(self.device)).to(self.dtype)

    def prepare(self, frame_tokens: torch.Tensor, question: str, *, system_prompt: str | None,
                roi_box=None) -> PromptParts:
        """Tokenize and embed the prompt around the video, and crop the frames to `roi_box`."""
        frames, native_per_frame = frame_tokens.shape[0], frame_tokens.shape[1]
        if roi_box is not None:
            frame_tokens = layouts.crop_frame_tokens(frame_tokens, roi_box, self.layout)
        prefix_ids, suffix_ids = self.build_prompt(question, system_prompt)
        return PromptParts(prefix_ids=prefix_ids, suffix_ids=suffix_ids, prefix_embeds=self.embed(prefix_ids),
                           suffix_embeds=self.embed(suffix_ids),
                           frame_tokens=frame_tokens.to(self.device, self.dtype), frames=frames,
                           native_tokens_per_frame=native_per_frame)

    @torch.no_grad()
    def prompt_embeds(self, frame_tokens: torch.Tensor, question: str, *, system_prompt: str | None,
                      roi_box=None) -> torch.Tensor:
        """The native prompt as input embeddings (1, L, D): [prefix | visual | suffix]."""
        parts = self.prepare(frame_tokens, question, system_prompt=system_prompt, roi_box=roi_box)
        visual = self.assemble(parts.frame_tokens)
        return torch.cat([parts.prefix_embeds, visual, parts.suffix_embeds], dim=0)[None]

    @torch.no_grad()
    def answer(self, frame_tokens: torch.Tensor, question: str, *, system_prompt: str | None,
               generation: GenerationOptions, moref: MoRefConfig | None = None, roi_box=None) -> AnswerResult:
        """Answer one question about a video whose frames `encode_frames` encoded."""
        return self.answer_many(frame_tokens, [question], system_prompt=system_prompt, generation=generation,
                                moref=moref, roi_box=roi_box)[0]

    @torch.no_grad()
    def answer_many(self, frame_tokens: torch.Tensor, questions: list[str], *, system_prompt: str | None,
                    generation: GenerationOptions, moref: MoRefConfig | None = None, roi_box=None,
                    max_batch_tokens: int = MAX_BATCH_TOKENS) -> list[AnswerResult]:
        """Answer questions about the same frames and RoI together: the system prompt and the
        visual tokens run once (below the fusion layer for MoRef, through every layer natively),
        then the questions in batches of at most `max_batch_tokens` fused tokens. Each answer
        equals answering its question alone."""
        # The frames are cropped and moved to the device once; each question only adds its text.
        first = self.prepare(frame_tokens, questions[0], system_prompt=system_prompt, roi_box=roi_box)
        parts = [first]
        for question in questions[1:]:
            prefix_ids, suffix_ids = self.build_prompt(question, system_prompt)
            parts.append(dataclasses.replace(first, prefix_ids=prefix_ids, suffix_ids=suffix_ids,
                                             suffix_embeds=self.embed(suffix_ids)))
        if any(not torch.equal(p.prefix_ids, first.prefix_ids) for p in parts[1:]):
            raise ValueError("questions with different prompt prefixes cannot share a prefill")
        resolved = self.resolve(moref, first.frames)
        if resolved.references > 1:
            references, positions = self.moref_references(first.frame_tokens, resolved)
        else:  # native: MoRef off, or too few frames for more than one reference
            visual = self.assemble(first.frame_tokens)
            references, positions = [visual], [torch.arange(visual.shape[0], device=visual.device)]
        engine = MoRefEngine(self.model, resolved, max_batch_tokens=max_batch_tokens)
        outputs = generate_answers(engine, first.prefix_embeds, references, positions,
                                   [p.suffix_embeds for p in parts], generation,
                                   self.generation_config(generation).eos_token_id, self._stop_checker(generation))
        return [self._result(out, generation, p, resolved) for out, p in zip(outputs, parts)]

    def resolve(self, moref: MoRefConfig | None, frames: int) -> ResolvedMoRef:
        """The MoRef settings for `frames` frames; one reference (native) when MoRef is off."""
        if moref is None or not moref.enabled:
            return ResolvedMoRef(1, frames, 0, 1.0)
        return moref.resolve(frames, self.config.text_config.num_hidden_layers)

    def moref_references(self, frame_tokens: torch.Tensor, resolved: ResolvedMoRef):
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

    def _stop_checker(self, generation: GenerationOptions):
        """`tokens -> True` once the decoded text holds a stop string; None without stop strings."""
        stops = [s for s in generation.stop_strings if s]
        if not stops:
            return None
        # A stop string ends within the last len(stop) tokens (each token is at least one
        # character), so only that tail is decoded at each step.
        tail = max(len(s) for s in stops) + 1

        def hit_stop(tokens: list[int]) -> bool:
            text = self.tokenizer.decode(tokens[-tail:], skip_special_tokens=True)
            return any(s in text for s in stops)

        return hit_stop

    def generation_config(self, generation: GenerationOptions):
        """The model's generation config with `generation`'s options; `<|im_end|>` always stops."""
        config = copy.deepcopy(self.model.generation_config)
        config.max_new_tokens = generation.max_new_tokens
        config.do_sample = generation.do_sample
        config.temperature = generation.temperature if generation.do_sample else None
        config.top_p = generation.top_p if generation.do_sample else None
        config.top_k = None
        eos = config.eos_token_id
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        im_end = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        if isinstance(im_end, int) and im_end != self.tokenizer.unk_token_id and im_end not in eos:
            eos.append(im_end)
        config.eos_token_id = eos
        if config.pad_token_id is None:
            config.pad_token_id = eos[0] if eos else None
        config.stop_strings = list(generation.stop_strings) or None
        return config

    def decode(self, output_ids: torch.Tensor, stop_strings=()) -> str:
        """Output ids -> text, without special tokens, cut before the first stop string."""
        text = self.tokenizer.decode(output_ids, skip_special_tokens=True)
        cuts = [text.find(s) for s in stop_strings if s and s in text]
        return text[:min(cuts)] if cuts else text

    def _result(self, out: MoRefOutput, generation: GenerationOptions, parts: PromptParts,
                 resolved: ResolvedMoRef) -> AnswerResult:
        """Fill the statistics; N, M, L and the keep ratio only where MoRef ran (N > 1)."""
        moref = resolved.references > 1
        output_ids = torch.tensor(out.tokens, dtype=torch.long)
        fusion_layer = resolved.fusion_layer if moref else None
        keep_ratio = resolved.keep_ratio if moref else None
        newline = 1 if self.layout == "onevision" else 0
        prefix_tokens, text_tokens = len(parts.prefix_ids), len(parts.prefix_ids) + len(parts.suffix_ids)
        total, total_native = flops.answer_flops(
            self.config, frames=parts.frames, visual_tokens_per_frame=parts.frame_tokens.shape[1],
            text_tokens=text_tokens, output_tokens=len(out.tokens), references=resolved.references,
            fusion_layer=fusion_layer or 0, keep_ratio=keep_ratio, prefix_tokens=prefix_tokens,
            extra_visual_tokens=newline, native_visual_tokens_per_frame=parts.native_tokens_per_frame,
            fusion_scope=resolved.fusion_scope, shared_with=out.shared_with)
        ratio = flops.attn_flops_ratio(parts.frames, resolved.references, fusion_layer or 0, keep_ratio,
                                       num_layers=self.config.text_config.num_hidden_layers,
                                       baseline_frames=BASELINE_FRAMES)
        return AnswerResult(
            text=self.decode(output_ids, generation.stop_strings),
            prompt_tokens=text_tokens + parts.frames * parts.frame_tokens.shape[1] + newline,
            output_tokens=len(out.tokens),
            visual_tokens_native=parts.frames * parts.native_tokens_per_frame + newline,
            visual_tokens_used=out.visual_tokens_used, references=resolved.references,
            temporal_units=resolved.temporal_units if moref else None, fusion_layer=fusion_layer,
            attn_flops_ratio=ratio, total_flops=total, total_flops_native=total_native,
            prefill_s=out.prefill_s, generate_s=out.generate_s, token_ids=out.tokens, shared_with=out.shared_with,
            fusion_scope=resolved.fusion_scope if moref else None)
