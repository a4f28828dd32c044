#!/usr/bin/env python3
"""Free-MoRef vs native inference at a model family's real shapes, random weights.

`--family` (bench/model_shapes.py): llava_onevision (LLaVA-Video-7B-Qwen2, the default: Qwen2-7B
decoder, llava_vid layout, 182 tokens per frame), qwen2_5_vl (Qwen2.5-VL-7B) or qwen3_vl
(Qwen3-VL-8B); random bf16 weights, SDPA. The visual embeddings are random tensors of the family's
shape (timing does not depend on values), laid out by the family's own code: for the Qwen families
448 x 448 frames in temporal patches of two (Qwen2.5-VL: 256 merged tokens per patch at their
multimodal positions; Qwen3-VL: 196 plus each patch's timestamp and start/end tokens, with random
DeepStack features). Prompt: 20 system tokens | video | 30 question tokens; 32 tokens generated
greedily with EOS disabled.

Cases: native (one sequence, MoRef off) through the HF decoder with its own KV cache (what
`VideoLLM`'s native path runs under `generate`), one native row through the engine (N=1) for a
like-for-like decode loop, and Free-MoRef through `freemoref.engine.moref_generate` with the
paper's defaults (128 frames N=2 L=3, 256 N=4 L=6, 512 N=8 L=12; 1024 N=16 L=12). Per case: prefill seconds and
decode ms/token (median of `--repeats` runs after one warm-up, CUDA synchronised), peak GPU
memory (reset per case), attn_flops_ratio and total_flops from `freemoref.flops`. The SigLIP
tower (LlavaOnevision: SigLIP + projector + pooling, `freemoref.layouts.frame_tokens`; Qwen: the
family's `vision_tokens`) is timed separately per frame.

    python3 bench/bench_moref.py --out DIR          # GPU, real shapes (~3-5 min on an H100)
    python3 bench/bench_moref.py --family qwen3_vl --out DIR
    python3 bench/bench_moref.py --tiny --device cpu [--family F]  # seconds: a self-check of the script

Writes DIR/bench_moref.json (rewritten after every case) and DIR/bench_moref.md.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import platform
import statistics
import sys
import time
import types
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
import transformers
from model_shapes import FAMILIES, FRAME_SIDE, SHAPE_NAMES, build_model, model_config, text_and_vision
from transformers import Qwen2ForCausalLM

from freemoref import flops, layouts
from freemoref.config import (
    GenerationOptions,
    MoRefConfig,
    ResolvedMoRef,
)
from freemoref.decoder_layers import split_lm
from freemoref.engine import moref_generate
from freemoref.partition import partition_frames

GIB = 2**30
LAYOUT = "llava_vid"
SYSTEM_TOKENS, QUESTION_TOKENS = 20, 30
TOWERS = {"llava_onevision": "SigLIP + projector + llava_vid pooling"}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class _DefaultDtype:
    def __init__(self, dtype):
        self.dtype = dtype

    def __enter__(self):
        self.saved = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)

    def __exit__(self, *exc):
        torch.set_default_dtype(self.saved)


def build_vision(config, device, dtype):
    """SigLIP tower + 2-layer projector + image_newline, in the shape `layouts.frame_tokens` reads."""
    from transformers import SiglipVisionModel
    from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionMultiModalProjector

    with torch.device(device), _DefaultDtype(dtype):
        tower = SiglipVisionModel(config.vision_config)
        projector = LlavaOnevisionMultiModalProjector(config)
        newline = torch.randn(config.text_config.hidden_size) * 0.02
    tower.set_attn_implementation("sdpa")
    tower.eval().requires_grad_(False)
    projector.eval().requires_grad_(False)
    return types.SimpleNamespace(config=config, vision_tower=tower, multi_modal_projector=projector,
                                 image_newline=newline)


def param_bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def timed(fn, device, repeats: int, warmup: int = 1):
    """Seconds of `fn()` (synchronised): (median, all runs, last result)."""
    times, result = [], None
    for i in range(warmup + repeats):
        sync(device)
        t0 = time.perf_counter()
        result = fn()
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times), times, result


def bench_vision(bench: BenchModel, device, dtype, repeats: int, batch: int):
    """The family's vision tower on `batch` frames (LlavaOnevision: tower + projector + llava_vid
    pooling; Qwen: `vision_tokens` on batch / 2 temporal patches); returns a result dict."""
    config = bench.config
    if bench.family is None:
        vision = build_vision(config, device, dtype)
        size = config.vision_config.image_size
        pixels = torch.randn(batch, 3, size, size, device=device, dtype=dtype)
        # partial, not a closure: the `del` below must be the last reference to free the GPU memory
        encode = functools.partial(layouts.frame_tokens, vision, pixels, LAYOUT, frames_per_batch=batch)
        flops_per_frame = flops.vision_flops_per_frame(config)
        params = sum(p.numel() for p in vision.vision_tower.parameters()) + sum(
            p.numel() for p in vision.multi_modal_projector.parameters())
    else:
        vision = bench.lm.model.visual
        side = bench.frame_side
        pixels = torch.randn(batch, 3, side, side, device=device, dtype=dtype)
        encode = functools.partial(bench.family.vision_tokens, pixels)
        grid = side // bench.family.patch_size
        flops_per_frame = bench.family.vision_flops_per_patch(grid, grid) // bench.family.temporal_patch
        params = sum(p.numel() for p in vision.parameters())
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    median, runs, tokens = timed(encode, device, repeats)
    tokens = tokens if bench.family is None else tokens[0]
    result = {
        "batch_frames": batch, "tokens_per_frame": tokens[0].numel() // tokens.shape[-1] * tokens.shape[0] // batch,
        "batch_s": median, "runs_s": runs, "ms_per_frame": 1000 * median / batch, "flops_per_frame": flops_per_frame,
        "params": params, "peak_gib": torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None,
    }
    result["tflops_per_s"] = result["flops_per_frame"] * batch / median / 1e12
    del vision, pixels, tokens, encode
    free(device)
    return result


def sdpa_backend_check(config, tokens_per_frame: float, device, dtype, frames: int = 512, repeats: int = 3) -> dict:
    """Which SDPA kernel runs the engine's causal row pass (MoRef rows below L at `frames`
    frames: N = frames / 64 rows of system + 64 frames' tokens, GQA): each kernel alone, timed,
    or the error that rules it out, and the one the engine's allowed list picks (the first that
    runs, in `ENGINE_SDPA_BACKENDS` order: cuDNN is left out on purpose)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from freemoref.attention import ENGINE_SDPA_BACKENDS, causal_attention

    t = config.text_config
    head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
    rows, length = frames // 64, SYSTEM_TOKENS + int(64 * tokens_per_frame)
    q = torch.randn(rows, t.num_attention_heads, length, head_dim, device=device, dtype=dtype)
    k = torch.randn(rows, t.num_key_value_heads, length, head_dim, device=device, dtype=dtype)
    result: dict[str, Any] = {"rows": rows, "row_tokens": length, "kernels": {}}
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION):
        try:
            with sdpa_kernel([backend]):
                median, _, _ = timed(functools.partial(causal_attention, q, k, k, head_dim**-0.5), device, repeats)
            result["kernels"][backend.name] = {"ms": 1000 * median}
        except (RuntimeError, torch.OutOfMemoryError) as exc:
            result["kernels"][backend.name] = {"error": str(exc).splitlines()[0][:200]}
    engine = [b.name for b in ENGINE_SDPA_BACKENDS if "ms" in result["kernels"].get(b.name, {})]
    result["engine_uses"] = engine[0] if engine else "MATH"
    del q, k
    free(device)
    return result


class BenchModel:
    """The benchmarked model: the family's HF model (LlavaOnevision: its Qwen2 decoder alone), its
    config and, for the Qwen families, a `freemoref.families` instance that lays out the video
    (with a tiny tokenizer for the Qwen3-VL timestamps and a video processor for `patchify`)."""

    def __init__(self, family_name: str, tiny: bool, device, dtype):
        self.name, self.family = family_name, None
        self.frame_side = FRAME_SIDE["tiny" if tiny else "real"]
        if family_name == "llava_onevision":
            self.config = model_config(family_name, tiny)
            with torch.device(device), _DefaultDtype(dtype):
                self.lm = Qwen2ForCausalLM(self.config.text_config)
            self.lm.set_attn_implementation("sdpa")
            self.lm.eval().requires_grad_(False)
            self.weights_module = self.lm
            return
        from freemoref.families import family_class
        from freemoref.tiny import QWEN_VL_SPECIAL_TOKENS, build_tiny_qwen_vl_tokenizer

        tokenizer = build_tiny_qwen_vl_tokenizer()
        ids = dict(zip(QWEN_VL_SPECIAL_TOKENS, tokenizer.convert_tokens_to_ids(list(QWEN_VL_SPECIAL_TOKENS))))
        self.config = model_config(family_name, tiny, dict(
            image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"]))
        self.lm = build_model(self.config, device, dtype)
        self.weights_module = self.lm.model.language_model
        if family_name == "qwen2_5_vl":
            from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor as Processor
        else:
            from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor as Processor
        processor = types.SimpleNamespace(tokenizer=tokenizer, video_processor=Processor())
        self.family = family_class(family_name)(self.lm, processor)

    def resolve(self, frames: int, video=None) -> ResolvedMoRef:
        """The paper's defaults for `frames` (capped at one reference per temporal patch)."""
        layers = self.config.text_config.num_hidden_layers
        if self.family is None:
            return MoRefConfig().resolve(frames, layers)
        return self.family.resolve(MoRefConfig(), video)


class Prompt:
    """Random prompt embeddings: system (20, D), the video's visual embeddings in the family's shape,
    question (30, D)."""

    def __init__(self, bench: BenchModel, frames: int, seed: int = 0):
        emb = bench.lm.get_input_embeddings()
        device, dtype = emb.weight.device, emb.weight.dtype
        gen = torch.Generator(device=device).manual_seed(seed)
        vocab, dim = emb.weight.shape
        scale = emb.weight[:4096].float().std().to(dtype)  # the token embeddings' scale

        def visual(*shape):
            return torch.randn(*shape, dim, device=device, generator=gen).to(dtype) * scale

        with torch.no_grad():
            ids = torch.randint(0, vocab, (SYSTEM_TOKENS + QUESTION_TOKENS,), device=device, generator=gen)
            self.prefix, self.suffix = emb(ids[:SYSTEM_TOKENS]), emb(ids[SYSTEM_TOKENS:])
            self.bench, self.frames, self.video = bench, frames, None
            if bench.family is None:
                self.tokens_per_frame = layouts.tokens_per_frame(bench.config, LAYOUT)
                self.visual = visual(frames * self.tokens_per_frame)
            else:  # a QwenVideo whose tower output is already there: random merged tokens (and DeepStack)
                from freemoref.families.qwen_vl import QwenVideo

                family = bench.family
                grid = bench.frame_side // family.patch_size // family.merge
                patches = -(-frames // family.temporal_patch)
                stacks = len(getattr(bench.config.vision_config, "deepstack_visual_indexes", ()))
                self.video = QwenVideo(torch.empty(frames, 0, device=device), np.arange(frames) / 2.0, family,
                                       visual(patches, grid, grid), deepstack=[visual(patches, grid, grid)
                                                                               for _ in range(stacks)])
                self.tokens_per_frame = self.layout(ResolvedMoRef(1, frames, 0, 1.0)).tokens / frames

    def layout(self, cfg: ResolvedMoRef):
        """(references, their positions in the video, RotaryPositions or None, DeepStack or None,
        visual tokens) for `cfg`."""
        if self.video is not None:
            assert self.bench.family is not None  # a Qwen video comes with its family
            vp = self.bench.family.visual_prompt(self.video, cfg, SYSTEM_TOKENS, self.video)
            return types.SimpleNamespace(references=vp.references, order=vp.order, rope=vp.rope,
                                         deepstack=vp.deepstack, tokens=vp.tokens)
        t = self.tokens_per_frame
        if cfg.references == 1:
            parts = [list(range(self.frames))]
        else:
            parts = partition_frames(self.frames, cfg.temporal_units, cfg.references)
        order = [torch.tensor([f * t + j for f in part for j in range(t)], device=self.visual.device)
                 for part in parts]
        return types.SimpleNamespace(references=[self.visual[o] for o in order], order=order, rope=None,
                                     deepstack=None, tokens=self.frames * t)

    def flop_kwargs(self) -> dict:
        """The visual part of `flops.answer_flops`' arguments."""
        if self.video is None:
            return dict(frames=self.frames, visual_tokens_per_frame=self.tokens_per_frame)
        assert self.bench.family is not None
        shape = self.bench.family.flop_shape(self.video, self.video)
        return dict(frames=shape.items, visual_tokens_per_frame=shape.tokens_per_item,
                    extra_visual_tokens=shape.extra_tokens, vision_flops=shape.vision_flops)


def native_hf_run(bench: BenchModel, prompt: Prompt, new_tokens: int):
    """One sequence through the HF decoder and its KV cache (at the family's positions, with its
    DeepStack): prefill (last-token logits only), then greedy decode. Returns (prefill_s, decode_s, tokens)."""
    decoder, head = split_lm(bench.lm)
    device = prompt.prefix.device
    native = prompt.layout(ResolvedMoRef(1, prompt.frames, 0, 1.0))
    embeds = torch.cat([prompt.prefix, native.references[0], prompt.suffix])[None]
    extra: dict[str, Any] = {}
    next_position = None
    if native.rope is not None:
        question = native.rope.text_start + torch.arange(QUESTION_TOKENS, device=device).expand(3, -1)
        positions = torch.cat([native.rope.prefix, native.rope.references[0], question], 1)
        extra["position_ids"] = positions[:, None]
        next_position = native.rope.text_start + QUESTION_TOKENS
    if native.deepstack is not None:
        mask = torch.zeros(1, embeds.shape[1], dtype=torch.bool, device=device)
        mask[0, SYSTEM_TOKENS : SYSTEM_TOKENS + native.tokens] = True
        extra.update(visual_pos_masks=mask, deepstack_visual_embeds=[layer[0] for layer in native.deepstack])
    with torch.no_grad():
        sync(device)
        t0 = time.perf_counter()
        out = decoder(inputs_embeds=embeds, use_cache=True, **extra)
        logits = head(out.last_hidden_state[:, -1:]).float()[0, -1]
        sync(device)
        t1 = time.perf_counter()
        cache, tokens = out.past_key_values, [int(logits.argmax())]
        del out
        for step in range(new_tokens - 1):
            position = {} if next_position is None else {
                "position_ids": torch.full((3, 1, 1), next_position + step, device=device)}
            out = decoder(input_ids=torch.tensor([[tokens[-1]]], device=device), past_key_values=cache,
                          use_cache=True, **position)
            tokens.append(int(head(out.last_hidden_state[:, -1:]).float()[0, -1].argmax()))
            cache = out.past_key_values
        sync(device)
        t2 = time.perf_counter()
    return t1 - t0, t2 - t1, tokens


def engine_run(bench: BenchModel, prompt: Prompt, cfg: ResolvedMoRef, new_tokens: int):
    """Free-MoRef (or N=1) through freemoref.engine.moref_generate. Returns (prefill_s, decode_s, out)."""
    layout = prompt.layout(cfg)
    out = moref_generate(bench.lm, prompt.prefix, layout.references, layout.order, prompt.suffix, cfg,
                         gen=GenerationOptions(max_new_tokens=new_tokens), eos_token_ids=(), rope=layout.rope,
                         deepstack=layout.deepstack)
    return out.prefill_s, out.generate_s, out


def estimate_native_gib(config, tokens: int, weights_bytes: int, dtype_bytes: int) -> float:
    """Rough peak for one native sequence: weights, KV cache, and one layer's transient
    activations (hidden states, q/k/v/o, GQA-expanded k/v, the MLP's three intermediates),
    generously counted (measured: 30.5 GiB at 86.7k tokens vs 37 GiB estimated)."""
    t = config.text_config
    head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
    kv = tokens * t.num_hidden_layers * 2 * t.num_key_value_heads * head_dim * dtype_bytes
    act = tokens * (4 * t.hidden_size + 3 * t.intermediate_size + 4 * t.num_attention_heads * head_dim) * dtype_bytes
    return (weights_bytes + kv + act) / GIB


def flop_stats(config, prompt: Prompt, cfg: ResolvedMoRef, new_tokens: int) -> dict:
    n, layer, keep = cfg.references, cfg.fusion_layer, cfg.keep_ratio
    kwargs: dict[str, Any] = dict(text_tokens=SYSTEM_TOKENS + QUESTION_TOKENS, prefix_tokens=SYSTEM_TOKENS,
                                  references=n, fusion_layer=layer, keep_ratio=keep, **prompt.flop_kwargs())
    total, native = flops.answer_flops(config, output_tokens=new_tokens, **kwargs)
    prefill_total, _ = flops.answer_flops(config, output_tokens=1, **kwargs)
    vision = kwargs.get("vision_flops") or prompt.frames * flops.vision_flops_per_frame(config)
    return {
        "attn_flops_ratio": flops.attn_flops_ratio(prompt.frames, n, layer, keep,
                                                   num_layers=config.text_config.num_hidden_layers,
                                                   baseline_frames=64),
        "total_flops": total, "total_flops_native": native,
        "prefill_llm_flops": prefill_total - vision, "vision_flops": vision,
    }


def run_case(case: dict, bench: BenchModel, device, args, weights_bytes: int) -> dict:
    frames, mode = case["frames"], case["mode"]
    config = bench.config
    prompt = Prompt(bench, frames)
    cfg = bench.resolve(frames, prompt.video) if mode == "moref" else ResolvedMoRef(1, 64, 0, 1.0)
    visual_tokens = prompt.layout(ResolvedMoRef(1, frames, 0, 1.0)).tokens
    row = {"case": case["name"], "mode": mode, "frames": frames, "references": cfg.references,
           "fusion_layer": cfg.fusion_layer, "keep_ratio": cfg.keep_ratio,
           "prompt_tokens": SYSTEM_TOKENS + visual_tokens + QUESTION_TOKENS, "visual_tokens": visual_tokens,
           "new_tokens": args.new_tokens}
    row.update(flop_stats(config, prompt, cfg, args.new_tokens))
    if mode == "native-hf" and device.type == "cuda":
        estimate = estimate_native_gib(config, row["prompt_tokens"] + args.new_tokens, weights_bytes,
                                       torch.finfo(bench.lm.dtype).bits // 8)
        row["estimated_gib"] = estimate
        limit = min(args.max_gib, torch.cuda.get_device_properties(device).total_memory / GIB - 2)
        if estimate > limit:
            row["status"] = f"skipped (estimated {estimate:.0f} GiB > {limit:.0f})"
            del prompt
            free(device)
            return row
    try:
        free(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        prefill, decode = [], []
        tokens: Any = None  # the last run's generated tokens
        for i in range(1 + args.repeats):
            if mode == "native-hf":
                p, d, tokens = native_hf_run(bench, prompt, args.new_tokens)
            else:
                p, d, out = engine_run(bench, prompt, cfg, args.new_tokens)
                tokens = out.tokens
                row["visual_tokens_used"] = out.visual_tokens_used
                row["kept_per_reference"] = out.kept_per_reference
            if i > 0:
                prefill.append(p)
                decode.append(d)
        row["visual_tokens_used"] = row.get("visual_tokens_used", visual_tokens)
        row["prefill_s"] = statistics.median(prefill)
        row["prefill_runs_s"] = prefill
        row["decode_ms_per_token"] = 1000 * statistics.median(decode) / max(args.new_tokens - 1, 1)
        row["prefill_tflops_per_s"] = row["prefill_llm_flops"] / row["prefill_s"] / 1e12
        row["generated_tokens"] = len(tokens)
        row["peak_gib"] = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None
        row["status"] = "ok" if len(tokens) == args.new_tokens else f"generated {len(tokens)} tokens"
    except torch.OutOfMemoryError as exc:
        row["status"] = "OOM"
        row["error"] = str(exc).splitlines()[0][:300]
        row["peak_gib"] = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None
    finally:
        del prompt
        free(device)
    return row


def default_cases(args) -> list[dict]:
    native = [int(f) for f in args.native_frames.split(",") if f]
    moref = [int(f) for f in args.moref_frames.split(",") if f]
    engine = [int(f) for f in args.engine_native_frames.split(",") if f]
    cases = []
    # Smallest first, largest last; at each frame count MoRef first (the time budget cuts the tail).
    for frames in sorted(set(native) | set(moref) | set(engine)):
        if frames in moref:
            cases.append({"name": f"moref-{frames}", "mode": "moref", "frames": frames})
        if frames in native:
            cases.append({"name": f"native-{frames}", "mode": "native-hf", "frames": frames})
        if frames in engine:
            cases.append({"name": f"native-engine-{frames}", "mode": "native-engine", "frames": frames})
    return cases


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown(report: dict) -> str:
    rows = report["cases"]
    native_prefill = {r["frames"]: r.get("prefill_s") for r in rows if r["mode"] == "native-hf"}
    lines = [
        f"Free-MoRef benchmark on {report['device']} ({report['dtype']}, {report['shapes']} shapes, random weights, "
        f"SDPA; {SYSTEM_TOKENS} system + video + {QUESTION_TOKENS} question tokens, "
        f"{report['new_tokens']} greedy tokens; median of {report['repeats']} after 1 warm-up).",
        "",
        "| case | frames | N | L | prompt tok | visual used | prefill s | vs native | decode ms/tok | peak GiB "
        "| prefill TFLOP/s | attn ratio | total TFLOP | native TFLOP | status |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        base = native_prefill.get(r["frames"])
        speedup = f"{base / r['prefill_s']:.2f}x" if base and r.get("prefill_s") and r["mode"] != "native-hf" else "-"
        lines.append(
            f"| {r['case']} | {r['frames']} | {r['references']} | {r['fusion_layer']} | {r['prompt_tokens']} "
            f"| {_fmt(r.get('visual_tokens_used'), 'd')} | {_fmt(r.get('prefill_s'), '.3f')} | {speedup} "
            f"| {_fmt(r.get('decode_ms_per_token'), '.1f')} | {_fmt(r.get('peak_gib'), '.1f')} "
            f"| {_fmt(r.get('prefill_tflops_per_s'), '.3g')} | {100 * r['attn_flops_ratio']:.1f}% "
            f"| {r['total_flops'] / 1e12:.4g} | {r['total_flops_native'] / 1e12:.4g} | {r.get('status', '-')} |")
    vision = report.get("vision")
    lines.append("")
    if vision and "ms_per_frame" in vision:
        lines.append(
            f"Vision tower ({TOWERS.get(report.get('family', ''), 'Qwen ViT and mergers')}): "
            f"{vision['ms_per_frame']:.2f} ms/frame at batch "
            f"{vision['batch_frames']} ({vision['tflops_per_s']:.0f} TFLOP/s; add frames x this to prefill "
            f"for time to first token: 64 frames {64 * vision['ms_per_frame'] / 1000:.2f} s, "
            f"512 frames {512 * vision['ms_per_frame'] / 1000:.2f} s). Not included in the table's prefill.")
    elif vision:
        lines.append(f"Vision tower: {vision.get('status')}")
    sdpa = report.get("sdpa_backends")
    if sdpa:
        kernels = ", ".join(f"{name} {v['ms']:.1f} ms" if "ms" in v else f"{name} unavailable ({v['error'][:60]})"
                            for name, v in sdpa["kernels"].items())
        lines.append(f"Causal row pass ({sdpa['rows']} rows x {sdpa['row_tokens']} tokens, GQA, one layer), each SDPA "
                     f"kernel alone: {kernels}; the engine runs {sdpa['engine_uses']}.")
    lines.append("attn ratio: the paper's attention FLOPs vs full attention over 64 frames; total TFLOP: whole "
                 "answer incl. vision tower, from freemoref.flops. native = HF decoder + its KV cache; "
                 "native-engine = the same sequence through freemoref.engine (N=1).")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="small widths (depth kept): a quick self-check")
    parser.add_argument("--family", default="llava_onevision", choices=FAMILIES,
                        help="model family whose real (or --tiny) shapes to build (bench/model_shapes.py)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--out", default=None, help="directory for bench_moref.json and bench_moref.md")
    parser.add_argument("--native-frames", default=None, help="default 64,128,256,512 (--tiny: 64,128)")
    parser.add_argument("--moref-frames", default=None, help="default 128,256,512,1024 (--tiny: 128,256,512)")
    parser.add_argument("--engine-native-frames", default="128", help="native through the engine (N=1)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs after 1 warm-up; default 3 (--tiny: 1)")
    parser.add_argument("--new-tokens", type=int, default=None, help="default 32 (--tiny: 8)")
    parser.add_argument("--vision-batch", type=int, default=None, help="default 32 (--tiny: 4)")
    parser.add_argument("--no-vision", action="store_true")
    parser.add_argument("--max-gib", type=float, default=70.0, help="skip native cases estimated above this")
    parser.add_argument("--budget-s", type=float, default=300.0, help="start no new case after this many seconds")
    args = parser.parse_args(argv)
    for name, real, tiny in (("native_frames", "64,128,256,512", "64,128"),
                             ("moref_frames", "128,256,512,1024", "128,256,512"), ("repeats", 3, 1),
                             ("new_tokens", 32, 8), ("vision_batch", 32, 4)):
        if getattr(args, name) is None:
            setattr(args, name, tiny if args.tiny else real)

    start = time.perf_counter()
    device = torch.device(args.device)
    if device.type != "cuda" and not args.tiny:
        parser.error("the real shapes need a GPU (15 GiB of weights): pass --tiny on CPU")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    torch.manual_seed(0)
    out_dir = Path(args.out) if args.out else None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    bench = BenchModel(args.family, args.tiny, device, dtype)
    sync(device)
    build_s = time.perf_counter() - t0
    text, vision = text_and_vision(args.family, args.tiny)
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "dtype": str(dtype).removeprefix("torch."), "family": args.family,
        "shapes": "tiny" if args.tiny else SHAPE_NAMES[args.family],
        "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
        "layout": LAYOUT if bench.family is None else f"{bench.frame_side}x{bench.frame_side} frames",
        "tokens_per_frame": Prompt(bench, 64).tokens_per_frame,
        "system_tokens": SYSTEM_TOKENS, "question_tokens": QUESTION_TOKENS, "new_tokens": args.new_tokens,
        "repeats": args.repeats, "text_config": text, "vision_config": vision, "cases": [],
    }

    def save():
        report["elapsed_s"] = time.perf_counter() - start
        if out_dir:
            (out_dir / "bench_moref.json").write_text(json.dumps(report, indent=2, default=str))
            (out_dir / "bench_moref.md").write_text(markdown(report))

    print(f"device {report['device']}, {report['dtype']}, torch {torch.__version__}, "
          f"transformers {transformers.__version__}", flush=True)
    if not args.no_vision:
        try:
            report["vision"] = bench_vision(bench, device, dtype, args.repeats, args.vision_batch)
            print(f"vision: {report['vision']['ms_per_frame']:.2f} ms/frame", flush=True)
        except torch.OutOfMemoryError as exc:
            report["vision"] = {"status": "OOM", "error": str(exc).splitlines()[0][:300]}
            free(device)
    if device.type == "cuda":
        report["sdpa_backends"] = sdpa_backend_check(bench.config, report["tokens_per_frame"], device, dtype)
        print(f"sdpa: {report['sdpa_backends']}", flush=True)
    weights = param_bytes(bench.weights_module)
    report["decoder_build_s"] = build_s
    report["decoder_weights_gib"] = weights / GIB
    report["attn_implementation"] = split_lm(bench.lm)[0].config._attn_implementation
    print(f"decoder built in {report['decoder_build_s']:.1f} s, {weights / GIB:.2f} GiB", flush=True)
    save()

    for case in default_cases(args):
        if time.perf_counter() - start > args.budget_s:
            row = {"case": case["name"], "mode": case["mode"], "frames": case["frames"],
                   "status": "skipped (time budget)"}
            row.update({"references": "-", "fusion_layer": "-", "prompt_tokens": "-", "attn_flops_ratio": float("nan"),
                        "total_flops": float("nan"), "total_flops_native": float("nan")})
            report["cases"].append(row)
            continue
        t = time.perf_counter()
        row = run_case(case, bench, device, args, weights)
        row["case_wall_s"] = time.perf_counter() - t
        report["cases"].append(row)
        print(f"{row['case']}: {row['status']}, prefill {_fmt(row.get('prefill_s'), '.3f')} s, "
              f"decode {_fmt(row.get('decode_ms_per_token'), '.1f')} ms/tok, "
              f"peak {_fmt(row.get('peak_gib'), '.1f')} GiB "
              f"({row['case_wall_s']:.1f} s)", flush=True)
        save()

    save()
    print()
    print(markdown(report))
    print(f"total {time.perf_counter() - start:.1f} s")
    return 0  # OOM and skips are results, recorded in the report; errors raise


if __name__ == "__main__":
    sys.exit(main())
