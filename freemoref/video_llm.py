"""`VideoLLM`: a loaded Video-LLM of any model family (freemoref.families) with the steps the answer stage needs.

Frames are encoded once per video (`encode_frames`, by the family); a question's prompt is
[system + user-turn start | visual tokens | question + assistant-turn start]. `answer_many` answers
a video's questions that use the same frames together: the system prompt and visual tokens are
computed once (freemoref.engine), natively (one reference) or with Free-MoRef over N references.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from freemoref import flops, prompts
from freemoref.config import MAX_BATCH_TOKENS, GenerationOptions, ResolvedMoRef
from freemoref.engine import MoRefEngine, MoRefOutput, generate_answers
from freemoref.families.base import ModelFamily, VisualPrompt
from freemoref.families.llava_onevision import LlavaOnevisionFamily

if TYPE_CHECKING:
    from freemoref.config import MoRefConfig

BASELINE_FRAMES = 64  # attn_flops_ratio is relative to full attention over 64 frames (the paper's)


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
    frame_tokens: Any  # the encoded video after the RoI crop, on the model's device (the family's type)
    frames: int
    uncropped: Any  # the encoded video before the crop


class VideoLLM:
    """A loaded Video-LLM: its HF model, processor and model family (freemoref.families).

    `layout` applies to LlavaOnevision (its video token layout); `family` defaults to LlavaOnevision."""

    def __init__(self, model, processor, layout: str = "onevision", family: ModelFamily | None = None):
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.family = family if family is not None else LlavaOnevisionFamily(model, processor, layout)
        self.device = next(model.parameters()).device
        self.dtype = model.dtype
        self.video_token = self.family.video_token

    @property
    def config(self):
        return self.model.config

    @property
    def layout(self) -> str:
        """LlavaOnevision's video token layout (freemoref.layouts)."""
        return self._llava().layout

    def _llava(self) -> LlavaOnevisionFamily:
        if not isinstance(self.family, LlavaOnevisionFamily):
            raise TypeError(f"video token layouts belong to LlavaOnevision, not {self.family.name}")
        return self.family

    def encode_frames(self, frames: np.ndarray, frame_times_s=None):
        """uint8 frames (T, H, W, 3) and their times in seconds (None: the family's default frame
        rate) -> the encoded video (LlavaOnevision: per-frame visual tokens (T, t, D)). Run once per
        video; questions reuse the result, `encoded[indices]` selects frames."""
        return self.encode_pixels(self.preprocess_frames(frames, frame_times_s))

    def preprocess_frames(self, frames: np.ndarray, frame_times_s=None):
        """uint8 frames (T, H, W, 3) -> the vision tower's input, on the host. Host work only, so a
        caller can prepare one video while another holds the device."""
        return self.family.preprocess(frames, frame_times_s)

    def encode_pixels(self, pixels):
        """`preprocess_frames`' output -> the encoded video on the device."""
        return self.family.encode(pixels)

    def assemble(self, frame_tokens: torch.Tensor) -> torch.Tensor:
        """LlavaOnevision frames (F, t, D) -> one visual sequence (l, D) in this model's layout."""
        return self._llava().assemble(frame_tokens)

    # Which of freemoref.prompts.PROMPT_TEMPLATES builds a LlavaOnevision prompt; load_video_llm sets
    # it. The Qwen families take their template from the checkpoint's processor.
    prompt_template = "llava_vid"

    def chat_prompt(self, question: str, system_prompt: str | None) -> str:
        """The prompt text with one video placeholder, ending with the assistant-turn start, for
        display. `system_prompt` None is the template's default system turn."""
        pieces = self.family.prompt_pieces(question, system_prompt, self.prompt_template)
        return prompts.render_text(pieces, self.video_token)

    def build_prompt(self, question: str, system_prompt: str | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(prefix_ids, suffix_ids): the prompt's ids before the video (system + user-turn start)
        and after it (question + assistant-turn start). Question and system prompt stay text:
        no special or added token can come from them (freemoref.prompts.encode_prompt)."""
        pieces = self.family.prompt_pieces(question, system_prompt, self.prompt_template)
        return prompts.encode_prompt(self.tokenizer, pieces)

    @property
    def context_tokens(self) -> int | None:
        """The language model's context length (its max_position_embeddings); None if unstated."""
        value = getattr(self.config.text_config, "max_position_embeddings", None)
        return int(value) if value else None

    def text_tokens(self, question: str, system_prompt: str | None) -> tuple[int, int]:
        """(tokens before the video, tokens after it) of `question`'s prompt: the system turn and
        the user-turn start; the question with its options and the assistant-turn start. Text only."""
        prefix_ids, suffix_ids = self.build_prompt(question, system_prompt)
        return len(prefix_ids), len(suffix_ids)

    def visual_tokens(self, video, roi_box=None) -> int:
        """Positions the encoded `video` spans in a prompt, cropped to `roi_box` (with MoRef too:
        the references keep the un-partitioned positions), as `AnswerResult.prompt_tokens` counts
        them. No model work: the family's shapes only."""
        cropped = video if roi_box is None else self.family.crop(video, roi_box)
        shape = self.family.flop_shape(cropped, video)
        return shape.items * shape.tokens_per_item + shape.extra_tokens

    @torch.no_grad()
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids (n,) -> input embeddings (n, D) in the model's dtype."""
        return self.model.get_input_embeddings()(ids.to(self.device)).to(self.dtype)

    def prepare(self, frame_tokens, question: str, *, system_prompt: str | None, roi_box=None) -> PromptParts:
        """Tokenize and embed the prompt around the video, and crop the frames to `roi_box`."""
        video = frame_tokens if roi_box is None else self.family.crop(frame_tokens, roi_box)
        if isinstance(video, torch.Tensor):
            video = video.to(self.device, self.dtype)
        prefix_ids, suffix_ids = self.build_prompt(question, system_prompt)
        return PromptParts(prefix_ids=prefix_ids, suffix_ids=suffix_ids, prefix_embeds=self.embed(prefix_ids),
                           suffix_embeds=self.embed(suffix_ids), frame_tokens=video,
                           frames=self.family.frame_count(frame_tokens), uncropped=frame_tokens)

    @torch.no_grad()
    def prompt_embeds(self, frame_tokens, question: str, *, system_prompt: str | None,
                      roi_box=None) -> torch.Tensor:
        """The native prompt as input embeddings (1, L, D): [prefix | visual | suffix]."""
        parts = self.prepare(frame_tokens, question, system_prompt=system_prompt, roi_box=roi_box)
        visual = self.visual_prompt(parts, ResolvedMoRef(1, parts.frames, 0, 1.0)).references[0]
        return torch.cat([parts.prefix_embeds, visual, parts.suffix_embeds], dim=0)[None]

    def visual_prompt(self, parts: PromptParts, resolved: ResolvedMoRef) -> VisualPrompt:
        """The prepared video's references for `resolved` (freemoref.families.base.VisualPrompt)."""
        return self.family.visual_prompt(parts.frame_tokens, resolved, len(parts.prefix_ids), parts.uncropped)

    @torch.no_grad()
    def answer(self, frame_tokens, question: str, *, system_prompt: str | None,
               generation: GenerationOptions, moref: MoRefConfig | None = None, roi_box=None) -> AnswerResult:
        """Answer one question about a video whose frames `encode_frames` encoded."""
        return self.answer_many(frame_tokens, [question], system_prompt=system_prompt, generation=generation,
                                moref=moref, roi_box=roi_box)[0]

    @torch.no_grad()
    def answer_many(self, frame_tokens, questions: list[str], *, system_prompt: str | None,
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
        resolved = self.resolve(moref, first.frame_tokens)
        visual = self.visual_prompt(first, resolved)
        engine = MoRefEngine(self.model, resolved, max_batch_tokens=max_batch_tokens)
        outputs = generate_answers(engine, first.prefix_embeds, visual.references, visual.order,
                                   [p.suffix_embeds for p in parts], generation,
                                   self.generation_config(generation).eos_token_id, self._stop_checker(generation),
                                   visual.rope, visual.deepstack)
        return [self._result(out, generation, p, resolved, visual) for out, p in zip(outputs, parts)]

    def resolve(self, moref: MoRefConfig | None, video) -> ResolvedMoRef:
        """The MoRef settings for this encoded video; one reference (native) when MoRef is off."""
        return self.family.resolve(moref, video)

    def longest_reference_share(self, moref: MoRefConfig | None, video) -> float:
        """The largest MoRef reference's share of the encoded video's visual tokens (1.0 without
        MoRef): what the longest sequence one attention pass holds takes of the video."""
        return self.family.longest_reference_share(video, self.resolve(moref, video))

    def moref_references(self, frame_tokens: torch.Tensor, resolved: ResolvedMoRef):
        """LlavaOnevision: the N references of `partition_frames` and their positions in the
        un-partitioned visual sequence (`LlavaOnevisionFamily.references`)."""
        return self._llava().references(frame_tokens, resolved)

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
                 resolved: ResolvedMoRef, visual: VisualPrompt) -> AnswerResult:
        """Fill the statistics; N, M, L and the keep ratio only where MoRef ran (N > 1)."""
        moref = resolved.references > 1
        output_ids = torch.tensor(out.tokens, dtype=torch.long)
        fusion_layer = resolved.fusion_layer if moref else None
        keep_ratio = resolved.keep_ratio if moref else None
        shape = self.family.flop_shape(parts.frame_tokens, parts.uncropped)
        prefix_tokens, text_tokens = len(parts.prefix_ids), len(parts.prefix_ids) + len(parts.suffix_ids)
        total, total_native = flops.answer_flops(
            self.config, frames=shape.items, visual_tokens_per_frame=shape.tokens_per_item,
            text_tokens=text_tokens, output_tokens=len(out.tokens), references=resolved.references,
            fusion_layer=fusion_layer or 0, keep_ratio=keep_ratio, prefix_tokens=prefix_tokens,
            extra_visual_tokens=shape.extra_tokens, native_visual_tokens_per_frame=shape.native_tokens_per_item,
            vision_flops=shape.vision_flops, fusion_scope=resolved.fusion_scope, shared_with=out.shared_with)
        ratio = flops.attn_flops_ratio(parts.frames, resolved.references, fusion_layer or 0, keep_ratio,
                                       num_layers=self.family.num_layers, baseline_frames=BASELINE_FRAMES)
        return AnswerResult(
            text=self.decode(output_ids, generation.stop_strings),
            prompt_tokens=text_tokens + visual.tokens,
            output_tokens=len(out.tokens),
            visual_tokens_native=visual.tokens_native,
            visual_tokens_used=out.visual_tokens_used, references=resolved.references,
            temporal_units=resolved.temporal_units if moref else None, fusion_layer=fusion_layer,
            attn_flops_ratio=ratio, total_flops=total, total_flops_native=total_native,
            prefill_s=out.prefill_s, generate_s=out.generate_s, token_ids=out.tokens, shared_with=out.shared_with,
            fusion_scope=resolved.fusion_scope if moref else None)
