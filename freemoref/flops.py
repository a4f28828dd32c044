"""FLOP accounting for one answer (docs/DESIGN.md section 3, "FLOPs").

Two measures:

- `attn_flops_ratio`: the paper's metric, attention's quadratic term only, relative to full
  attention over a baseline number of frames.
- `answer_flops`: the whole forward counted from the model config (vision tower, projector,
  decoder projections, MLP, attention QK^T and AV, lm_head; prefill and decode), for an answer
  with and without Free-MoRef.

Conventions: one multiply-add is 2 FLOPs; norms, rotary embeddings, softmax, activations, biases,
pooling and the MoRef gate's small (question x visual) softmax are not counted; attention is
counted causally (query i attends to i + past keys) in the LLM and densely in the vision tower.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def attn_flops_ratio(frames: int, references: int, fusion_layer: int, keep_ratio: float | None = None,
                     num_layers: int = 28, baseline_frames: int = 64) -> float:
    """Attention's quadratic cost relative to full attention over `baseline_frames` (1.0 = equal).

    With n the visual length (proportional to frames) and N = `references`, layers
    0..L-1 cost N * (n/N)^2 each (N rows of n/N tokens) and layers L..num_layers-1 cost
    (n * keep)^2 each (one fused row keeping `keep_ratio` of the visual tokens, default 1/N);
    the baseline is num_layers * n_base^2. The formula read literally reproduces the paper:
    128 frames N=2 L=3 -> 1.107 (paper 110.4%), 256/4/6 -> 1.643 (163.2%), 512/8/12 -> 4.000
    (400%); the paper truncates per-row values, hence the small gaps. Its ablation (baseline 128
    frames, 128 frames, L=3, keep=0.5) gives 0.277 / 0.250 / 0.237 for N = 2 / 4 / 8 (27.6% /
    25.0% / 23.6%). With one reference nothing is fused, so the result is (frames/baseline)^2
    whatever `keep_ratio` says.
    """
    if frames <= 0 or baseline_frames <= 0 or references <= 0:
        raise ValueError("frames, baseline_frames and references must be positive")
    n = frames / baseline_frames
    if references == 1:
        return n * n
    if not 0 <= fusion_layer <= num_layers:
        raise ValueError(f"fusion_layer must be in [0, {num_layers}], got {fusion_layer}")
    keep = 1.0 / references if keep_ratio is None else keep_ratio
    multi_reference = fusion_layer * references * (n / references) ** 2
    fused = (num_layers - fusion_layer) * (n * keep) ** 2
    return (multi_reference + fused) / num_layers


@dataclass(frozen=True)
class TextShape:
    """What the decoder's FLOPs depend on (Qwen2 text config)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def from_config(cls, text_config) -> TextShape:
        heads = text_config.num_attention_heads
        head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
        return cls(hidden=text_config.hidden_size, intermediate=text_config.intermediate_size,
                   layers=text_config.num_hidden_layers, heads=heads,
                   kv_heads=text_config.num_key_value_heads or heads, head_dim=head_dim,
                   vocab=text_config.vocab_size)

    @property
    def linear_per_token(self) -> int:
        """One layer, one token: q, k, v, o projections and the gated MLP (gate, up, down)."""
        q_out, kv_out = self.heads * self.head_dim, self.kv_heads * self.head_dim
        projections = 2 * self.hidden * (q_out + 2 * kv_out) + 2 * q_out * self.hidden
        return projections + 3 * 2 * self.hidden * self.intermediate

    @property
    def attention_per_pair(self) -> int:
        """One layer, one (query, key) pair: QK^T and AV over all query heads (GQA shares K/V
        memory, not compute)."""
        return 2 * 2 * self.heads * self.head_dim

    @property
    def lm_head_per_token(self) -> int:
        return 2 * self.hidden * self.vocab


def causal_pairs(queries: int, past: int = 0) -> int:
    """(query, key) pairs when `queries` new tokens attend causally after `past` cached ones."""
    return queries * past + queries * (queries + 1) // 2


def layer_flops(text: TextShape, tokens: int, past: int = 0) -> int:
    """One decoder layer over `tokens` new tokens after `past` cached ones."""
    return tokens * text.linear_per_token + causal_pairs(tokens, past) * text.attention_per_pair


def vision_flops_per_frame(model_config) -> int:
    """SigLIP tower (patch embedding + every encoder layer, as HF runs them all) and the 2-layer
    projector for one frame."""
    vision, text_hidden = model_config.vision_config, model_config.text_config.hidden_size
    patches = (vision.image_size // vision.patch_size) ** 2
    hidden, inter = vision.hidden_size, vision.intermediate_size
    channels = getattr(vision, "num_channels", 3)
    embed = patches * 2 * channels * vision.patch_size ** 2 * hidden
    per_layer = patches * (4 * 2 * hidden * hidden + 2 * 2 * hidden * inter) + 2 * 2 * hidden * patches ** 2
    projector = patches * (2 * hidden * text_hidden + 2 * text_hidden * text_hidden)
    return embed + vision.num_hidden_layers * per_layer + projector


def split_counts(total: int, parts: int) -> list[int]:
    """`total` items over `parts` consecutive groups differing by at most one (larger first)."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def single_sequence_flops(text: TextShape, prompt: int, output_tokens: int, layers: int | None = None) -> int:
    """`layers` decoder layers (default all) on one sequence: prefill of `prompt` tokens,
    then one token per decode step (the first output token comes from the prefill)."""
    layers = text.layers if layers is None else layers
    decode = sum(layer_flops(text, 1, prompt + step) for step in range(max(output_tokens - 1, 0)))
    return layers * (layer_flops(text, prompt) + decode)


def moref_rows_flops(text: TextShape, system: int, row_visual: int, question: int, references: int,
                     output_tokens: int, layers: int) -> int:
    """Layers below the fusion layer: `references` rows [system | row_visual | question] sharing
    positions. System, question and generated tokens are identical across rows, so their
    projections and MLP run once; the system's attention runs once (same keys in every row);
    the visual tokens and every question/generated token's attention run per row. Rows are padded
    to `row_visual`, the longest row's visual length."""
    linear = (system + references * row_visual + question) * text.linear_per_token
    pairs = causal_pairs(system) + references * (causal_pairs(row_visual, system)
                                                 + causal_pairs(question, system + row_visual))
    prompt = system + row_visual + question
    for step in range(max(output_tokens - 1, 0)):
        linear += text.linear_per_token
        pairs += references * causal_pairs(1, prompt + step)
    return layers * (linear + pairs * text.attention_per_pair)


def shared_prefix_flops(text: TextShape, prefix: int, question: int, output_tokens: int, layers: int,
                        shared_with: int) -> int:
    """Video scope, the layers from L on for one question: its 1/shared_with share of the fused
    prefix [system | merged visual] (run once for the `shared_with` questions), plus its own
    question tokens and decode steps attending to the prefix and to themselves. With
    shared_with = 1 it equals `single_sequence_flops` of prefix + question (attention is causal)."""
    own = layer_flops(text, question, prefix) + sum(
        layer_flops(text, 1, prefix + question + step) for step in range(max(output_tokens - 1, 0)))
    return layers * (round(layer_flops(text, prefix) / shared_with) + own)


def answer_flops(model_config, *, frames: int, visual_tokens_per_frame: int, text_tokens: int,
                 output_tokens: int, references: int = 1, fusion_layer: int = 0,
                 keep_ratio: float | None = None, prefix_tokens: int = 0, extra_visual_tokens: int = 0,
                 native_visual_tokens_per_frame: int | None = None,
                 vision_flops: int | None = None, fusion_scope: str = "question",
                 shared_with: int = 1) -> tuple[int, int]:
    """Whole-model FLOPs of one answer: (total_flops, total_flops_native).

    `text_tokens` are the prompt's text tokens, `prefix_tokens` of them (system prompt and
    user-turn start) before the video and the rest (question, assistant-turn start) after it.
    `extra_visual_tokens` are added to each assembled visual sequence (the onevision layout's one
    newline per video, and so per reference). Native = the same frames in one sequence without
    MoRef, at `native_visual_tokens_per_frame` (default: the same; pass the uncropped count to
    include an RoI crop's saving). With MoRef, layers below `fusion_layer` run the reference rows
    (`moref_rows_flops`); from it on, one fused sequence of system + the kept visual tokens
    (ceil(row length x keep_ratio) per row, keep_ratio default 1/N) + question. The vision tower
    and projector cost the same in both (`vision_flops`, default: the SigLIP tower's
    `vision_flops_per_frame` per frame; other families pass their own). For a family whose visual
    unit is a temporal patch of frames, `frames` counts those patches. Decode runs
    output_tokens - 1 steps; lm_head runs once per output token. `fusion_scope` "video": the fused
    prefix [system | merged visual] ran once for the `shared_with` questions answered together, so
    this answer counts 1/shared_with of it (`shared_prefix_flops`): summed over those answers, it
    counts once. Everything else is counted as if the question were answered alone, in both scopes.
    """
    text = TextShape.from_config(model_config.text_config)
    system, question = prefix_tokens, text_tokens - prefix_tokens
    if question < 0:
        raise ValueError("prefix_tokens cannot exceed text_tokens")
    vision = frames * vision_flops_per_frame(model_config) if vision_flops is None else vision_flops
    lm_head = max(output_tokens, 1) * text.lm_head_per_token

    native_per_frame = visual_tokens_per_frame if native_visual_tokens_per_frame is None \
        else native_visual_tokens_per_frame
    native_prompt = system + frames * native_per_frame + extra_visual_tokens + question
    native = vision + single_sequence_flops(text, native_prompt, output_tokens) + lm_head
    if references <= 1:
        prompt = system + frames * visual_tokens_per_frame + extra_visual_tokens + question
        return vision + single_sequence_flops(text, prompt, output_tokens) + lm_head, native

    if not 0 <= fusion_layer <= text.layers:
        raise ValueError(f"fusion_layer must be in [0, {text.layers}], got {fusion_layer}")
    keep = 1.0 / references if keep_ratio is None else keep_ratio
    rows = [f * visual_tokens_per_frame for f in split_counts(frames, references)]
    rows[-1] += extra_visual_tokens  # onevision's one end-of-video newline joins one reference
    below = moref_rows_flops(text, system, max(rows), question, references, output_tokens, fusion_layer)
    fused_visual = sum(math.ceil(row * keep - 1e-9) for row in rows)  # 1e-9: 21 * (1/3) is 7
    if fusion_scope == "video" and fusion_layer < text.layers:
        above = shared_prefix_flops(text, system + fused_visual, question, output_tokens, text.layers - fusion_layer,
                                    shared_with)
    else:
        above = single_sequence_flops(text, system + fused_visual + question, output_tokens,
                                      layers=text.layers - fusion_layer)
    return vision + below + above + lm_head, native
