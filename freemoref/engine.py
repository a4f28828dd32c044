"""Free-MoRef inference on an HF decoder (Qwen2-style layers), driven layer by layer: the batch
changes from N rows to one sequence per question at the fusion layer L, which the HF forward cannot
do. Native inference (one reference, N = 1) runs through the same code.

A video's questions share its work: `MoRefEngine.encode_video` runs the reference rows once per
video and frame selection (freemoref/prefill.py, phase 1), then `MoRefEngine.start` prefills a
batch of questions on them (the question tokens below L, fusion at L, the fused sequences from L
on) and the batch decodes all its questions together (freemoref/decoding.py). A question's answer
equals answering it alone, except in video scope (`fusion_scope: video`), where one fusion chosen
from all the questions is a shared prefix (freemoref/shared_prefix.py). `generate_answers` answers
a video's questions in batches within a token budget; `MoRefSession`, `moref_generate` and
`moref_prefill_logits` serve one prompt.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from freemoref.attention import backend_for
from freemoref.config import MAX_BATCH_TOKENS, GenerationOptions, ResolvedMoRef
from freemoref.decoder_layers import split_lm
from freemoref.decoding import QuestionBatch, decode_batch, synchronize
from freemoref.fusion import Fusion, keep_counts
from freemoref.prefill import RotaryPositions, VideoRows, prefill_questions, reference_rows
from freemoref.shared_prefix import SharedPrefix

# Default budget of tokens in one batch of questions through the layers from L on (their fused
# sequences together); larger question sets are answered in several batches.


class MoRefEngine:
    """A decoder, its resolved MoRef settings and attention backend.

    fixed_weights (N,): gate weights used instead of the computed ones (ablations, tests).
    max_batch_tokens: budget of fused tokens per batch of questions (`generate_answers`).
    cuda_graphs: on CUDA, decode by replaying a recorded CUDA graph of the step."""

    def __init__(self, lm, cfg: ResolvedMoRef, backend: str | None = None, fixed_weights=None,
                 max_batch_tokens: int = MAX_BATCH_TOKENS, cuda_graphs: bool = True):
        self.decoder, self.lm_head = split_lm(lm)
        self.layers = list(self.decoder.layers)
        self.cfg = cfg
        self.backend: str = backend or backend_for(getattr(self.decoder.config, "_attn_implementation", None))
        device = self.decoder.get_input_embeddings().weight.device
        self.fixed_weights: torch.Tensor | None = (
            None if fixed_weights is None else fixed_weights.to(device, torch.float32))
        self.max_batch_tokens = max_batch_tokens
        self.cuda_graphs = cuda_graphs and device.type == "cuda"
        # N = 1 is plain attention: nothing gated or fused. L >= num_layers gates every layer.
        self.fusion_layer = min(cfg.fusion_layer, len(self.layers)) if cfg.references > 1 else len(self.layers)
        # Multimodal rotary embeddings (Qwen2.5-VL, Qwen3-VL) take (3, B, T) positions.
        self.multimodal_rope = hasattr(self.decoder.rotary_emb, "mrope_section")

    def cos_sin(self, like, positions):
        """Rotary tables -> cos, sin (B or 1, T, Dh). positions: text positions (T,) or (B, T), the
        same on every axis of a multimodal rotary embedding; or (B, P, T), one row per axis."""
        positions = positions[None] if positions.dim() == 1 else positions
        if positions.dim() == 3:
            return self.decoder.rotary_emb(like, positions.transpose(0, 1))
        return self.decoder.rotary_emb(like, positions[None] if self.multimodal_rope else positions)

    def logits(self, h):
        """Logits (B, vocab) of hidden states (B, D): the vocabulary is large, so last tokens only."""
        return self.lm_head(self.decoder.norm(h)).float()

    def encode_video(self, prefix, references, positions, rope: RotaryPositions | None = None,
                     deepstack=None) -> VideoRows:
        """The video's reference rows (`freemoref.prefill.reference_rows`): prefix (p, D) and N
        references (l_i, D) with their global positions (l_i,); rope and deepstack as there."""
        return reference_rows(self, prefix, references, positions, rope, deepstack)

    def start(self, video: VideoRows, questions, blocks=None, max_new_tokens: int = 0,
              prefix: SharedPrefix | None = None) -> QuestionBatch:
        """Prefill B questions (each (q_b, D), identical across rows) on the video's rows; blocks[b]:
        how many leading tokens form the prompt's question (default all; later tokens count as
        generated ones, for recomputing a decode from scratch). Video scope: `prefix` is the shared
        prefix of a larger set of questions; None builds it from these. Returns the batch, ready to decode."""
        prompt = prefill_questions(self, video, questions, blocks, max_new_tokens, prefix)
        return QuestionBatch(self, video, prompt, max_new_tokens)


class MoRefSession:
    """One prompt: `prefill` once, then `step` one token at a time (a batch of one question).

    After `prefill`: `fusion` (kept tokens, None when nothing is fused), `visual_tokens_native`
    (sum of l_i), `visual_tokens_used`, `prompt_tokens` (prefix + native visual + suffix: what the
    native model would read)."""

    def __init__(self, lm, cfg: ResolvedMoRef, backend: str | None = None, fixed_weights=None):
        self.engine = MoRefEngine(lm, cfg, backend, fixed_weights)
        self.batch: QuestionBatch | None = None
        self.fusion: Fusion | None = None
        self.visual_tokens_native = 0
        self.visual_tokens_used = 0
        self.prompt_tokens = 0

    @torch.no_grad()
    def prefill(self, prefix, references, positions, suffix, extra=None, max_new_tokens: int = 0,
                rope: RotaryPositions | None = None, deepstack=None):
        """Last-token logits (vocab,) of [prefix | references | suffix | extra]. extra (E, D):
        tokens already generated (to recompute a decode from scratch): question tokens gated with
        a running max and left out of fusion scoring, exactly as in `step`. rope, deepstack: as
        in `freemoref.prefill.reference_rows`."""
        video = self.engine.encode_video(prefix, references, positions, rope, deepstack)
        question = suffix if extra is None else torch.cat([suffix, extra])
        self.batch = self.engine.start(video, [question], [suffix.shape[0]], max_new_tokens)
        self.fusion = self.batch.fusions[0]
        self.visual_tokens_native = sum(video.lengths)
        self.visual_tokens_used = self.batch.visual_tokens_used[0]
        self.prompt_tokens = prefix.shape[0] + sum(video.lengths) + suffix.shape[0]
        return self.batch.logits[0]

    def step(self, token: int):
        """Append one generated token; return the next logits (vocab,)."""
        if self.batch is None:
            raise RuntimeError("call prefill before step")
        return self.batch.step(torch.tensor([token]))[0]


@dataclass
class MoRefOutput:
    """Generated token ids (the EOS that ended it included, as HF generate), why it stopped
    ("eos" | "stop" | "length"), seconds attributed to this question, and token counts.

    prefill_s: the video's shared prefill divided among the questions that shared it, plus this
    question's share of its batch's prefill; generate_s: its share of its batch's decoding.
    shared_with: how many questions shared the video's prefill (1 = not shared)."""

    tokens: list[int]
    finish_reason: str
    prefill_s: float
    generate_s: float
    visual_tokens_native: int
    visual_tokens_used: int
    prompt_tokens: int
    kept_per_reference: list[int] = field(default_factory=list)
    shared_with: int = 1


def question_batches(lengths: list[int], fixed_tokens: int, max_batch_tokens: int) -> list[list[int]]:
    """Split questions (their token counts) into batches whose padded fused sequences,
    (fixed_tokens + longest question) each, total at most max_batch_tokens (at least one per batch).
    Questions are taken longest first, so similar lengths share a batch and padding stays small."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches and (len(batches[-1]) + 1) * (fixed_tokens + lengths[batches[-1][0]]) <= max_batch_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def generate_answers(engine: MoRefEngine, prefix, references, positions, suffixes, gen=None, eos_token_ids=(),
                     stop_checker=None, rope: RotaryPositions | None = None, deepstack=None) -> list[MoRefOutput]:
    """Answer several questions of one video, sharing its prefill: the reference rows once, then the
    questions in batches within `engine.max_batch_tokens`, each prefilled and decoded together.
    suffixes: each question's embeddings (q_b, D); other inputs (rope, deepstack included) as in
    `MoRefEngine.encode_video`. In video scope the batches count only the questions' own tokens,
    and the shared prefix is chosen from all the questions (built first when they take several
    batches). Outputs in the order of `suffixes`."""
    gen = gen or GenerationOptions()
    device = prefix.device
    synchronize(device)
    t0 = time.perf_counter()
    video = engine.encode_video(prefix, references, positions, rope, deepstack)
    synchronize(device)
    shared_s = time.perf_counter() - t0
    per_row = video.prefix_len + (sum(keep_counts(video.lengths, engine.cfg.keep_ratio)) if video.fused
                                  else max(video.lengths))
    video_scope = video.fused and engine.cfg.fusion_scope == "video"
    if video_scope:  # from L on a question holds only its own tokens; the shared prefix comes once
        per_row = 0
    batches = question_batches([s.shape[0] for s in suffixes], per_row, engine.max_batch_tokens)
    shared_prefix = None
    if video_scope and len(batches) > 1:
        # The fusion is chosen from all the questions, so it is built once before any batch.
        shared_prefix = engine.start(video, suffixes).prompt.shared_prefix
        synchronize(device)
        shared_s = time.perf_counter() - t0
    outputs: dict[int, MoRefOutput] = {}  # question_batches covers every question once
    native = sum(video.lengths)
    for batch_ids in batches:
        t1 = time.perf_counter()
        batch = engine.start(video, [suffixes[i] for i in batch_ids], max_new_tokens=gen.max_new_tokens,
                             prefix=shared_prefix)
        synchronize(device)
        t2 = time.perf_counter()
        decoded = decode_batch(batch, gen, eos_token_ids, stop_checker)
        synchronize(device)
        t3 = time.perf_counter()
        for j, i in enumerate(batch_ids):
            tokens, reason = decoded[j]
            fusion = batch.fusions[j]
            outputs[i] = MoRefOutput(
                tokens, reason, shared_s / len(suffixes) + (t2 - t1) / len(batch_ids), (t3 - t2) / len(batch_ids),
                native, batch.visual_tokens_used[j], prefix.shape[0] + native + suffixes[i].shape[0],
                fusion.kept_per_reference if fusion is not None else [], len(suffixes))
    return [outputs[i] for i in range(len(suffixes))]


def moref_prefill_logits(lm, prefix_embeds, references, reference_positions, suffix_embeds, cfg: ResolvedMoRef,
                         extra_embeds=None, backend: str | None = None, fixed_weights=None,
                         rope: RotaryPositions | None = None, deepstack=None):
    """Last-token logits (vocab,) of one MoRef forward without a decode cache (see `MoRefSession.prefill`)."""
    session = MoRefSession(lm, cfg, backend, fixed_weights)
    return session.prefill(prefix_embeds, references, reference_positions, suffix_embeds, extra_embeds,
                           rope=rope, deepstack=deepstack)


def moref_generate(lm, prefix_embeds, references, reference_positions, suffix_embeds, cfg: ResolvedMoRef,
                   gen=None, eos_token_ids=(), stop_checker=None, backend: str | None = None,
                   rope: RotaryPositions | None = None, deepstack=None) -> MoRefOutput:
    """Free-MoRef prefill, then decode until EOS, `stop_checker(tokens) -> True` (e.g. stop strings
    on the decoded text) or gen.max_new_tokens. Inputs as in `MoRefSession.prefill`."""
    engine = MoRefEngine(lm, cfg, backend)
    return generate_answers(engine, prefix_embeds, references, reference_positions, [suffix_embeds], gen,
                            eos_token_ids, stop_checker, rope, deepstack)[0]
