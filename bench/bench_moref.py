#!/usr/bin/env python3
"""Free-MoRef vs native inference at LLaVA-Video-7B-Qwen2 shapes, random weights.

Decoder: Qwen2-7B (28 layers, hidden 3584, 28 heads, 4 KV heads, head dim 128, MLP 18944, vocab
152064), random bf16 weights, SDPA. Video: llava_vid layout, 182 tokens per frame; the visual
embeddings are random tensors of that shape (timing does not depend on values). Prompt: 20
system tokens | video | 30 question tokens; 32 tokens generated greedily with EOS disabled.

Cases: native (one sequence, MoRef off) through the HF decoder with its own KV cache (what
`VideoLLM`'s native path runs under `generate`), one native row through the engine (N=1) for a
like-for-like decode loop, and Free-MoRef through `freemoref.engine.moref_generate` with the
paper's defaults (128 frames N=2 L=3, 256 N=4 L=6, 512 N=8 L=12; 1024 N=16 L=12). Per case: prefill seconds and
decode ms/token (median of `--repeats` runs after one warm-up, CUDA synchronised), peak GPU
memory (reset per case), attn_flops_ratio and total_flops from `freemoref.flops`. The SigLIP
tower + projector + pooling is timed separately per frame (`freemoref.layouts.frame_tokens`).

    python3 bench/bench_moref.py --out DIR          # GPU, real shapes (~3-5 min on an H100)
    python3 bench/bench_moref.py --tiny --device cpu  # seconds: a self-check of the script

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

import torch
import transformers
from transformers import LlavaOnevisionConfig, Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig

from freemoref import flops, layouts
from freemoref.config import (
    GenerationOptions,
    MoRefConfig,
    ResolvedMoRef,
)
from freemoref.engine import moref_generate
from freemoref.partition import partition_frames

GIB = 2**30
LAYOUT = "llava_vid"
SYSTEM_TOKENS, QUESTION_TOKENS = 20, 30

# LLaVA-Video-7B-Qwen2: Qwen2-7B decoder, SigLIP-so400m tower (26 of 27 layers, as LLaVA uses it).
REAL_TEXT = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                 num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
                 rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                 tie_word_embeddings=False, initializer_range=0.02)
REAL_VISION = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26, num_attention_heads=16,
                   image_size=384, patch_size=14, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh",
                   vision_use_head=False)
# --tiny: same depth (so the paper's fusion layers and FLOP ratios apply), small widths.
TINY_TEXT = dict(REAL_TEXT, vocab_size=1000, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                 num_key_value_heads=2, initializer_range=0.2)
TINY_VISION = dict(REAL_VISION, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                   image_size=28, patch_size=4)


def model_config(tiny: bool) -> LlavaOnevisionConfig:
    text = Qwen2Config(**(TINY_TEXT if tiny else REAL_TEXT))
    vision = SiglipVisionConfig(**(TINY_VISION if tiny else REAL_VISION))
    return LlavaOnevisionConfig(text_config=text, vision_config=vision, vision_feature_select_strategy="full",
                                vision_feature_layer=-1, multimodal_projector_bias=True, tie_word_embeddings=False)


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


def build_decoder(config, device, dtype):
    """Qwen2ForCausalLM with HF's random init, allocated directly on `device` in `dtype` (no CPU
    copy, no fp32 detour: seconds for 7.6B parameters on a GPU). Built this way rather than on
    `meta` + `to_empty` because the rotary `inv_freq` buffer is computed at construction."""
    text = config.text_config
    with torch.device(device), _DefaultDtype(dtype):
        model = Qwen2ForCausalLM(text)
    model.set_attn_implementation("sdpa")
    model.eval().requires_grad_(False)
    return model


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


def bench_vision(config, device, dtype, repeats: int, batch: int):
    """Tower + projector + llava_vid pooling for `batch` frames; returns a result dict."""
    vision = build_vision(config, device, dtype)
    size = config.vision_config.image_size
    pixels = torch.randn(batch, 3, size, size, device=device, dtype=dtype)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    # partial, not a closure: the `del` below must be the last reference to free the GPU memory
    encode = functools.partial(layouts.frame_tokens, vision, pixels, LAYOUT, frames_per_batch=batch)
    median, runs, tokens = timed(encode, device, repeats)
    result = {
        "batch_frames": batch, "tokens_per_frame": int(tokens.shape[1]), "batch_s": median, "runs_s": runs,
        "ms_per_frame": 1000 * median / batch,
        "flops_per_frame": flops.vision_flops_per_frame(config),
        "params": sum(p.numel() for p in vision.vision_tower.parameters())
        + sum(p.numel() for p in vision.multi_modal_projector.parameters()),
        "peak_gib": torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None,
    }
    result["tflops_per_s"] = result["flops_per_frame"] * batch / median / 1e12
    del vision, pixels, tokens, encode
    free(device)
    return result


def sdpa_backend_check(config, device, dtype, frames: int = 512, repeats: int = 3) -> dict:
    """Which SDPA kernel runs the engine's causal row pass (MoRef rows below L at `frames`
    frames: N = frames / 64 rows of system + 64 frames' tokens, GQA): each kernel alone, timed,
    or the error that rules it out, and the one the engine's allowed list picks (the first that
    runs, in `ENGINE_SDPA_BACKENDS` order: cuDNN is left out on purpose)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from freemoref.attention import ENGINE_SDPA_BACKENDS, causal_attention

    t = config.text_config
    head_dim = t.hidden_size // t.num_attention_heads
    rows, length = frames // 64, SYSTEM_TOKENS + 64 * layouts.tokens_per_frame(config, LAYOUT)
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


class Prompt:
    """Random prompt embeddings: system (20, D), video (F * t, D), question (30, D)."""

    def __init__(self, decoder_lm, frames: int, tokens_per_frame: int, seed: int = 0):
        emb = decoder_lm.get_input_embeddings()
        device, dtype = emb.weight.device, emb.weight.dtype
        gen = torch.Generator(device=device).manual_seed(seed)
        vocab, dim = emb.weight.shape
        with torch.no_grad():
            ids = torch.randint(0, vocab, (SYSTEM_TOKENS + QUESTION_TOKENS,), device=device, generator=gen)
            self.prefix, self.suffix = emb(ids[:SYSTEM_TOKENS]), emb(ids[SYSTEM_TOKENS:])
            self.video = torch.randn(frames * tokens_per_frame, dim, device=device, generator=gen).to(dtype)
            self.video *= emb.weight[:4096].float().std().to(dtype)  # the token embeddings' scale
        self.frames, self.tokens_per_frame = frames, tokens_per_frame

    def references(self, temporal_units: int, n: int):
        t = self.tokens_per_frame
        parts = partition_frames(self.frames, temporal_units, n)
        positions = [torch.tensor([f * t + j for f in part for j in range(t)], device=self.video.device)
                     for part in parts]
        return [self.video[p] for p in positions], positions


def native_hf_run(lm, prompt: Prompt, new_tokens: int):
    """One sequence through the HF decoder and its KV cache: prefill (last-token logits only),
    then greedy decode. Returns (prefill_s, decode_s, tokens)."""
    decoder, head = lm.model, lm.lm_head
    device = prompt.prefix.device
    embeds = torch.cat([prompt.prefix, prompt.video, prompt.suffix])[None]
    with torch.no_grad():
        sync(device)
        t0 = time.perf_counter()
        out = decoder(inputs_embeds=embeds, use_cache=True)
        logits = head(out.last_hidden_state[:, -1:]).float()[0, -1]
        sync(device)
        t1 = time.perf_counter()
        cache, tokens = out.past_key_values, [int(logits.argmax())]
        del out
        for _ in range(new_tokens - 1):
            out = decoder(input_ids=torch.tensor([[tokens[-1]]], device=device), past_key_values=cache,
                          use_cache=True)
            tokens.append(int(head(out.last_hidden_state[:, -1:]).float()[0, -1].argmax()))
            cache = out.past_key_values
        sync(device)
        t2 = time.perf_counter()
    return t1 - t0, t2 - t1, tokens


def engine_run(lm, prompt: Prompt, cfg: ResolvedMoRef, new_tokens: int):
    """Free-MoRef (or N=1) through freemoref.engine.moref_generate. Returns (prefill_s, decode_s, out)."""
    if cfg.references == 1:
        refs, pos = [prompt.video], [torch.arange(prompt.video.shape[0], device=prompt.video.device)]
    else:
        refs, pos = prompt.references(cfg.temporal_units, cfg.references)
    out = moref_generate(lm, prompt.prefix, refs, pos, prompt.suffix, cfg,
                         gen=GenerationOptions(max_new_tokens=new_tokens), eos_token_ids=())
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


def flop_stats(config, frames: int, tokens_per_frame: int, cfg: ResolvedMoRef, new_tokens: int) -> dict:
    n, layer, keep = cfg.references, cfg.fusion_layer, cfg.keep_ratio
    kwargs: dict[str, Any] = dict(frames=frames, visual_tokens_per_frame=tokens_per_frame,
                  text_tokens=SYSTEM_TOKENS + QUESTION_TOKENS, prefix_tokens=SYSTEM_TOKENS,
                  references=n, fusion_layer=layer, keep_ratio=keep)
    total, native = flops.answer_flops(config, output_tokens=new_tokens, **kwargs)
    prefill_total, _ = flops.answer_flops(config, output_tokens=1, **kwargs)
    vision = frames * flops.vision_flops_per_frame(config)
    return {
        "attn_flops_ratio": flops.attn_flops_ratio(frames, n, layer, keep,
                                                   num_layers=config.text_config.num_hidden_layers,
                                                   baseline_frames=64),
        "total_flops": total, "total_flops_native": native,
        "prefill_llm_flops": prefill_total - vision, "vision_flops": vision,
    }


def run_case(case: dict, lm, config, device, args, weights_bytes: int) -> dict:
    frames, mode = case["frames"], case["mode"]
    tpf = layouts.tokens_per_frame(config, LAYOUT)
    layers = config.text_config.num_hidden_layers
    if mode == "moref":
        cfg = MoRefConfig().resolve(frames, layers)
    else:
        cfg = ResolvedMoRef(1, 64, 0, 1.0)
    row = {"case": case["name"], "mode": mode, "frames": frames, "references": cfg.references,
           "fusion_layer": cfg.fusion_layer, "keep_ratio": cfg.keep_ratio,
           "prompt_tokens": SYSTEM_TOKENS + frames * tpf + QUESTION_TOKENS, "visual_tokens": frames * tpf,
           "new_tokens": args.new_tokens}
    row.update(flop_stats(config, frames, tpf, cfg, args.new_tokens))
    if mode == "native-hf" and device.type == "cuda":
        estimate = estimate_native_gib(config, row["prompt_tokens"] + args.new_tokens, weights_bytes,
                                       torch.finfo(lm.dtype).bits // 8)
        row["estimated_gib"] = estimate
        limit = min(args.max_gib, torch.cuda.get_device_properties(device).total_memory / GIB - 2)
        if estimate > limit:
            row["status"] = f"skipped (estimated {estimate:.0f} GiB > {limit:.0f})"
            return row
    prompt = None
    try:
        prompt = Prompt(lm, frames, tpf)
        free(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        prefill, decode = [], []
        tokens: Any = None  # the last run's generated tokens
        for i in range(1 + args.repeats):
            if mode == "native-hf":
                p, d, tokens = native_hf_run(lm, prompt, args.new_tokens)
            else:
                p, d, out = engine_run(lm, prompt, cfg, args.new_tokens)
                tokens = out.tokens
                row["visual_tokens_used"] = out.visual_tokens_used
                row["kept_per_reference"] = out.kept_per_reference
            if i > 0:
                prefill.append(p)
                decode.append(d)
        row["visual_tokens_used"] = row.get("visual_tokens_used", frames * tpf)
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
            f"Vision tower + projector + llava_vid pooling: {vision['ms_per_frame']:.2f} ms/frame at batch "
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
    parser.add_argument("--tiny", action="store_true", help="small widths (28 layers kept): a quick self-check")
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
    config = model_config(args.tiny)
    out_dir = Path(args.out) if args.out else None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "dtype": str(dtype).removeprefix("torch."), "shapes": "tiny" if args.tiny else "LLaVA-Video-7B-Qwen2",
        "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
        "layout": LAYOUT, "tokens_per_frame": layouts.tokens_per_frame(config, LAYOUT),
        "system_tokens": SYSTEM_TOKENS, "question_tokens": QUESTION_TOKENS, "new_tokens": args.new_tokens,
        "repeats": args.repeats, "text_config": {k: v for k, v in (TINY_TEXT if args.tiny else REAL_TEXT).items()},
        "cases": [],
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
            report["vision"] = bench_vision(config, device, dtype, args.repeats, args.vision_batch)
            print(f"vision: {report['vision']['ms_per_frame']:.2f} ms/frame", flush=True)
        except torch.OutOfMemoryError as exc:
            report["vision"] = {"status": "OOM", "error": str(exc).splitlines()[0][:300]}
            free(device)
    if device.type == "cuda":
        report["sdpa_backends"] = sdpa_backend_check(config, device, dtype)
        print(f"sdpa: {report['sdpa_backends']}", flush=True)
    t0 = time.perf_counter()
    lm = build_decoder(config, device, dtype)
    sync(device)
    weights = param_bytes(lm)
    report["decoder_build_s"] = time.perf_counter() - t0
    report["decoder_weights_gib"] = weights / GIB
    report["attn_implementation"] = lm.config._attn_implementation
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
        row = run_case(case, lm, config, device, args, weights)
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
