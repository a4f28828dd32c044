#!/usr/bin/env python3
"""Where one decoding step's time goes: a batch of a video's questions, prefilled on the real shapes
(LLaVA-Video-7B-Qwen2, random bf16 weights, as bench/bench_question_sets.py), then its first (eager)
step, the CUDA-graph capture and the replayed steps timed apart, each against the bandwidth floor
(`bench_question_sets.step_bytes`), and the kernels of a replayed and of an eager step from
torch.profiler (top kernels by device time).

    python3 bench/decode_step.py --out DIR --frames 128,512     # GPU: six cases, ~1.5 min on an H100
    python3 bench/decode_step.py --tiny --device cpu --cases question:1  # a self-check of the script

Writes DIR/decode_step.json and DIR/decode_step.md.
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from bench_moref import GIB, BenchModel, Prompt, free, sync
from bench_question_sets import engine_bench_parser, peak_bandwidth_gbs, question_embeddings, step_bytes

from freemoref.config import MoRefConfig
from freemoref.engine import MoRefEngine

TOP_KERNELS = 12


def seconds(fn, device) -> float:
    """Wall seconds of fn(), the device synchronised before and after."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def top_kernels(fn, device, steps: int) -> list[dict]:
    """The device kernels of `steps` calls of fn(), by device time per step (torch.profiler)."""
    if device.type != "cuda":
        return []
    from torch.profiler import ProfilerActivity, profile

    sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        sync(device)
    rows = [e for e in prof.key_averages() if e.device_time_total > 0]
    rows.sort(key=lambda e: -e.device_time_total)
    total = sum(e.device_time_total for e in rows)
    return [{"kernel": e.key[:120], "calls_per_step": e.count / steps, "us_per_step": e.device_time_total / steps,
             "share": e.device_time_total / total} for e in rows[:TOP_KERNELS]]


def run_case(bench: BenchModel, device, frames: int, scope: str, count: int, args) -> dict:
    lm, layers = bench.lm, bench.config.text_config.num_hidden_layers
    cfg = MoRefConfig(fusion_scope=scope).resolve(frames, layers)  # type: ignore[arg-type] # checked in main
    prompt = Prompt(bench, frames)
    laid_out = prompt.layout(cfg)
    questions = question_embeddings(lm, count)
    engine = MoRefEngine(lm, cfg)
    row: dict[str, Any] = {"frames": frames, "fusion_scope": scope, "questions": count, "references": cfg.references,
           "fusion_layer": cfg.fusion_layer}
    slots = 2 + args.steps + 2 * args.profile_steps  # eager, capture's first replay, timed, profiled
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with torch.no_grad():
        video = engine.encode_video(prompt.prefix, laid_out.references, laid_out.order)
        batch = engine.start(video, questions, max_new_tokens=slots)
        token = batch.logits.argmax(-1)
        eager = engine.start(video, questions, max_new_tokens=slots)  # a twin that never captures
        eager_token = eager.logits.argmax(-1)
        row["eager_step_ms"] = 1000 * seconds(lambda: batch.step(token), device)
        if engine.cuda_graphs:
            row["capture_ms"] = 1000 * seconds(batch.capture_cuda_graph, device)
            row["first_replay_ms"] = 1000 * seconds(lambda: batch.step(token), device)

        def replays():
            for _ in range(args.steps):
                batch.step(token)

        row["step_ms"] = 1000 * seconds(replays, device) / args.steps
        row["replayed_kernels"] = top_kernels(lambda: batch.step(token), device, args.profile_steps)
        row["eager_steps_ms"] = [1000 * seconds(lambda: eager.step(eager_token), device) for _ in range(2)]
        row["eager_kernels"] = top_kernels(lambda: eager.step(eager_token), device, args.profile_steps)
    moved = step_bytes(lm, cfg, len(prompt.prefix), [len(r) for r in laid_out.references],
                       [len(q) for q in questions], slots, scope)
    row.update(step_bytes=moved, achieved_gbs=moved / row["step_ms"] / 1e6,
               floor_ms=moved / args.peak_bandwidth_gbs / 1e6 if args.peak_bandwidth_gbs else None,
               peak_gib=torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None)
    return row


def markdown(report: dict) -> str:
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731 - a one-line formatter beside its use
    lines = [f"Decoding step, {report['device']} ({report['shapes']} shapes, random weights, {report['steps']} "
             f"replayed steps timed; floor at {report.get('peak_bandwidth_gbs') or '-'} GB/s).", "",
             "| frames | scope | questions | eager step ms | capture ms | first replay ms | replayed step ms "
             "| step GB read | achieved GB/s | floor ms |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["cases"]:
        lines.append(f"| {r['frames']} | {r['fusion_scope']} | {r['questions']} | {fmt(r.get('eager_step_ms'), '.1f')} "
                     f"| {fmt(r.get('capture_ms'), '.1f')} | {fmt(r.get('first_replay_ms'), '.1f')} "
                     f"| {fmt(r.get('step_ms'), '.2f')} | {r['step_bytes'] / 1e9:.2f} "
                     f"| {fmt(r.get('achieved_gbs'), '.0f')} | {fmt(r.get('floor_ms'), '.2f')} |")
    for r in report["cases"]:
        for kind in ("replayed", "eager"):
            kernels = r.get(f"{kind}_kernels") or []
            if kernels:
                lines += ["", f"{kind.capitalize()} step kernels, {r['frames']} frames, {r['fusion_scope']} scope, "
                              f"{r['questions']} questions:", "",
                          "| kernel | calls | us | share |", "|---|---:|---:|---:|"]
                lines += [f"| `{k['kernel'][:80]}` | {k['calls_per_step']:.0f} | {k['us_per_step']:.0f} "
                          f"| {k['share']:.0%} |" for k in kernels]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = engine_bench_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default="question:1,question:5,video:5",
                        help="SCOPE:QUESTIONS pairs, each run at every --frames")
    parser.add_argument("--frames", default="128", help="comma-separated MoRef frame counts")
    parser.add_argument("--steps", type=int, default=20, help="replayed steps timed per case")
    parser.add_argument("--profile-steps", type=int, default=3, help="steps profiled for the kernel tables")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type != "cuda" and not args.tiny:
        parser.error("the real shapes need a GPU: pass --tiny on CPU")
    cases = []
    for item in args.cases.split(","):
        scope, _, count = item.partition(":")
        if scope not in ("question", "video") or not count.isdigit():
            parser.error(f"--cases: expected SCOPE:QUESTIONS with SCOPE question or video, got {item!r}")
        cases.append((scope, int(count)))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    bench = BenchModel("llava_onevision", args.tiny, device, dtype)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    args.peak_bandwidth_gbs = args.peak_bandwidth_gbs or peak_bandwidth_gbs(device_name)
    report = {"device": device_name, "peak_bandwidth_gbs": args.peak_bandwidth_gbs, "torch": torch.__version__,
              "shapes": "tiny" if args.tiny else "LLaVA-Video-7B-Qwen2", "steps": args.steps, "cases": []}
    out_dir = Path(args.out) if args.out else None
    for frames in (int(f) for f in args.frames.split(",")):
        for scope, count in cases:
            row = run_case(bench, device, frames, scope, count, args)
            free(device)  # the case's caches and graph went with its frame
            report["cases"].append(row)
            print(f"{frames} frames {scope} x{count}: eager {row['eager_step_ms']:.1f} ms, capture "
                  f"{row.get('capture_ms', 0):.1f} ms, step {row['step_ms']:.2f} ms "
                  f"(median eager {statistics.median(row['eager_steps_ms']):.1f})", flush=True)
            if out_dir:
                out_dir.mkdir(parents=True, exist_ok=True)
                (out_dir / "decode_step.json").write_text(json.dumps(report, indent=2))
                (out_dir / "decode_step.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
