"""Decoding a batch of prefilled questions together: one token per question per step, through the
layers below L (over the video's rows, gated) and the fused layers from L on (each question's fused
cache, or in video scope the shared prefix and its own tokens), on static caches;
on CUDA the step is recorded once as a CUDA graph and replayed. Then the loop that samples tokens
and stops each question at its EOS, a stop string or max_new_tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from freemoref.attention import cache_attention, engine_sdpa
from freemoref.config import GenerationOptions
from freemoref.decoder_layers import finish_layer, project_qkv
from freemoref.fusion import Fusion
from freemoref.prefill import QuestionPrefill, VideoRows, attend_rows
from freemoref.shared_prefix import attend_prefix

if TYPE_CHECKING:
    from freemoref.engine import MoRefEngine

# Decoding checks on the host for finished questions (and stop strings) every this many tokens:
# each check is a device sync, and tokens past a question's end are simply discarded.
CHECK_EVERY = 8


@dataclass
class QuestionBatch:
    """B questions of one video: prefilled (`logits` (B, vocab)), then `step` one token at a time.

    A step reads its inputs from device buffers (`tokens`, `step_index`) and writes in place into
    the prefill's caches, so its shapes never change: `capture_cuda_graph` records it once."""

    engine: MoRefEngine
    video: VideoRows
    prompt: QuestionPrefill
    max_new_tokens: int
    generated: int = 0
    tokens: torch.Tensor = field(init=False)  # (B,) this step's input token per question
    step_index: torch.Tensor = field(init=False)  # () tokens generated before this step
    step_logits: torch.Tensor | None = None  # (B, vocab) the last step's output (the graph's output buffer)
    graph: torch.cuda.CUDAGraph | None = None

    def __post_init__(self):
        device = self.prompt.logits.device
        self.tokens = torch.zeros(self.size, dtype=torch.long, device=device)
        self.step_index = torch.zeros((), dtype=torch.long, device=device)

    @property
    def size(self) -> int:
        return len(self.prompt.fusions)

    @property
    def logits(self) -> torch.Tensor:
        """(B, vocab) after the prompt."""
        return self.prompt.logits

    @property
    def fusions(self) -> list[Fusion | None]:
        return self.prompt.fusions

    @property
    def visual_tokens_used(self) -> list[int]:
        return self.prompt.visual_tokens_used

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append one generated token per question (B,); return the next logits (B, vocab)."""
        if self.generated >= self.max_new_tokens:
            raise RuntimeError("the cache is full: pass a larger max_new_tokens to prefill")
        self.tokens.copy_(tokens.view(-1))
        self.step_index.fill_(self.generated)
        if self.graph is not None:
            self.graph.replay()
            assert self.step_logits is not None  # the graph's output buffer, set when it was captured
            logits = self.step_logits
        else:
            logits = self.step_logits = self._step()
        self.generated += 1
        return logits

    def capture_cuda_graph(self) -> None:
        """Record `step`'s kernels once as a CUDA graph and replay it for every later token: the
        decoding step has fixed shapes (caches at full size, unfilled slots masked, the step
        number on the device), so Python and kernel-launch overhead are paid once, not per token.
        Call after one eager `step` (which warms up the kernels); the batch keeps the graph."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        graph = torch.cuda.CUDAGraph()
        # capture_begin/capture_end, not the torch.cuda.graph context: its entry synchronizes and
        # empties the caching allocator, and every batch (each video's questions) captures once, so
        # the next prefill would cudaMalloc all its activations again. The graph keeps its own pool.
        with torch.cuda.stream(stream), torch.no_grad():
            graph.capture_begin()
            try:
                self.step_logits = self._step()
            finally:
                graph.capture_end()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = graph

    def _step(self) -> torch.Tensor:
        """One decoding step on the device state: `tokens` (B,) at step `step_index`. Fixed shapes only."""
        engine, video, prompt, t = self.engine, self.video, self.prompt, self.step_index
        h = engine.decoder.get_input_embeddings()(self.tokens[:, None])  # hidden: (B, 1, D)
        own = prompt.own
        slot = own.add_token(t)
        # The new token is a generated one: no prompt block, one real query.
        zeros, ones = torch.zeros_like(prompt.question_len), torch.ones_like(prompt.question_len)
        filled = own.real.shape[1]
        with engine_sdpa():
            cos, sin = engine.cos_sin(h, (own.next_position + t)[:, None])
            for li, (layer, cache) in enumerate(zip(engine.layers[: video.shared_layers], own.layers)):
                q, k, v = project_qkv(layer, h, cos, sin)
                cache.update(slot, k, v)
                o = attend_rows(engine, video, li, q, cache, own.real, filled, slot, zeros, ones, prompt.gate_running)
                h = finish_layer(layer, h, o)
            if prompt.fused is not None:
                fused = prompt.fused
                slot = fused.add_token(t)
                cos, sin = engine.cos_sin(h, (fused.next_position + t)[:, None])
                for li, (layer, cache) in enumerate(zip(engine.layers[video.shared_layers :], fused.layers)):
                    q, k, v = project_qkv(layer, h, cos, sin)
                    cache.update(slot, k, v)
                    if prompt.shared_prefix is not None:  # video scope: the shared prefix, then own tokens
                        attended = attend_prefix(prompt.shared_prefix, li, q, cache, fused.real, fused.real.shape[1],
                                                 slot, layer.self_attn.scaling)
                    else:  # split-KV over the question's fused cache, whatever the backend: it needs no mask kernel
                        attended = cache_attention(q, cache.k, cache.v, fused.real, layer.self_attn.scaling)
                    h = finish_layer(layer, h, attended)
        return engine.logits(h[:, -1])


def next_tokens(logits, gen, generator=None) -> torch.Tensor:
    """(B,) next tokens of logits (B, vocab): greedy, or sampling with temperature and nucleus
    (top_p). Stays on the device: no host sync."""
    if not gen.do_sample:
        return logits.argmax(-1)
    probs = (logits.float() / gen.temperature).softmax(-1)
    if gen.top_p < 1.0:
        sorted_p, idx = probs.sort(-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p >= gen.top_p  # mass before a token already reaches top_p
        probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p.masked_fill(drop, 0.0))
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA work, so host timers measure it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode_batch(batch: QuestionBatch, gen: GenerationOptions, eos_token_ids, stop_checker):
    """Decode all questions of a batch together. Returns [(tokens, finish_reason)] per question."""
    logits, b, limit = batch.logits, batch.size, gen.max_new_tokens
    device = logits.device
    generator = None
    if gen.do_sample:
        generator = torch.Generator(device=device)
        generator.manual_seed(gen.seed) if gen.seed is not None else generator.seed()
    eos = torch.tensor(sorted(set(eos_token_ids or ())), dtype=torch.long, device=device)
    out = torch.zeros(b, limit, dtype=torch.long, device=device)
    none = limit + 1
    eos_at = torch.full((b,), none, dtype=torch.long, device=device)  # tokens up to the EOS, or `none`
    ends: list[int | None] = [None] * b  # from stop strings, found on the host
    checked = 0
    for i in range(limit):
        token = next_tokens(logits, gen, generator)
        out[:, i] = token
        if eos.numel():
            eos_at = torch.where(torch.isin(token, eos) & (eos_at == none), i + 1, eos_at)
        if (i + 1) % CHECK_EVERY == 0 or i + 1 == limit:
            eos_host, tokens_host = eos_at.tolist(), out[:, : i + 1].tolist()
            for j in range(b):
                if stop_checker is None or ends[j] is not None:
                    continue
                for n in range(checked + 1, min(i + 1, eos_host[j]) + 1):  # a stop before the EOS
                    if stop_checker(tokens_host[j][:n]):
                        ends[j] = n
                        break
            checked = i + 1
            if all(e is not None or a != none for e, a in zip(ends, eos_host)):
                break
        if i + 1 < limit:
            logits = batch.step(token)
            if i == 0 and batch.engine.cuda_graphs:  # the first step warmed the kernels up
                batch.capture_cuda_graph()
    eos_host, tokens_host = eos_at.tolist(), out.tolist()
    results = []
    for j in range(b):
        if ends[j] is not None:
            results.append((tokens_host[j][: ends[j]], "stop"))
        elif eos_host[j] != none:
            results.append((tokens_host[j][: eos_host[j]], "eos"))
        else:
            results.append((tokens_host[j], "length"))
    return results
