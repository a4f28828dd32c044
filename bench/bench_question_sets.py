#!/usr/bin/env python3
"""Question sets on one video: what the marginal question costs when a video's questions share
its prefill (freemoref.engine.generate_answers), against answering them one at a time.

Same model and prompt shapes as bench/bench_moref.py (LLaVA-Video-7B-Qwen2, random bf16 weights,
llava_vid layout, 20 system tokens), one video, questions of varied lengths (10-60 tokens), a
fixed number of greedy tokens each with EOS disabled. Cases: MoRef at `--frames` (paper defaults)
with 1, 5, 10 and 50 questions sharing the prefill (once per `--fusion-scope`), and 10 questions answered one by one (no
sharing); native 64 frames with 1 and 10 questions shared. Each case: total seconds (median of
`--repeats` after one warm-up), peak GPU memory, the ratio to one question, and for a shared set
its prefill seconds and one decoding step of the whole set (ms).

    python3 bench/bench_question_sets.py --out DIR           # GPU, real shapes (~2 min on an H200)
    python3 bench/bench_question_sets.py --tiny --device cpu  # a self-check of the script

Writes DIR/bench_question_sets.json and DIR/bench_question_sets.md.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
import transformers
from bench_moref import GIB, BenchModel, Prompt, free, sync, timed

from freemoref.config import GenerationOptions, MoRefConfig, ResolvedMoRef
from freemoref.engine import MoRefEngine, generate_answers
from freemoref.flops import TextShape


def question_embeddings(lm, count: int, seed: int = 1):
    """`count` random questions of 10-60 tokens (varied, so batches are padded)."""
    emb = lm.get_input_embeddings()
    gen = torch.Generator(device=emb.weight.device).manual_seed(seed)
    lengths = torch.randint(10, 61, (count,), generator=gen, device=emb.weight.device).tolist()
    with torch.no_grad():
        return [emb(torch.randint(0, emb.weight.shape[0], (n,), device=emb.weight.device, generator=gen))
                for n in lengths]


# Vendor peak memory bandwidth (GB/s) by a name in torch.cuda.get_device_name: H100 SXM (HBM3) and
# H200 (HBM3e). Another card: pass --peak-bandwidth-gbs.
PEAK_BANDWIDTH_GBS = {"H100 80GB HBM3": 3350.0, "H200": 4800.0}


def peak_bandwidth_gbs(device_name: str) -> float | None:
    return next((gbs for name, gbs in PEAK_BANDWIDTH_GBS.items() if name in device_name), None)


def step_bytes(lm, cfg: ResolvedMoRef, prefix_tokens: int, reference_tokens: list[int], question_tokens: list[int],
               new_tokens: int, scope: str) -> int:
    """The least one decoding step of the whole question set must read from memory: the weights once
    (the input embeddings only by row) and each KV cache it attends over once. Below the fusion layer
    L the step reads the N reference rows (shared by the set); from L on, question scope reads each
    question's own fused cache (the system prefix and one reference's worth of kept visual tokens)
    and video scope one shared fused prefix; every question also reads its own tokens and answer
    (half of the new tokens on average). One reference (native) shares its whole video prefix."""
    shape = TextShape.from_config(lm.config)
    kv_per_token_layer = 2 * shape.kv_heads * shape.head_dim * next(lm.parameters()).element_size()
    weights = sum(p.numel() * p.element_size() for p in lm.parameters())
    embeddings = lm.get_input_embeddings().weight
    if embeddings is not lm.get_output_embeddings().weight:  # untied: the input table is read by row
        weights -= embeddings.numel() * embeddings.element_size()
    layers, count = shape.layers, len(question_tokens)
    if cfg.references == 1:
        below, shared, own_fused = 0, prefix_tokens + sum(reference_tokens), 0
    else:
        kept = sum(round(n * cfg.keep_ratio) for n in reference_tokens)
        below = cfg.fusion_layer * (prefix_tokens + sum(reference_tokens))
        shared, own_fused = (prefix_tokens + kept, 0) if scope == "video" else (0, prefix_tokens + kept)
    above = (layers - cfg.fusion_layer) * (shared + count * own_fused)
    own = layers * (sum(question_tokens) + count * new_tokens // 2)
    return weights + kv_per_token_layer * (below + above + own)


def answer_questions(engine, prefix, refs, pos, questions, gen, shared: bool) -> list:
    """The questions answered together (sharing the video prefill) or one by one."""
    if shared:
        return generate_answers(engine, prefix, refs, pos, questions, gen)
    return [generate_answers(engine, prefix, refs, pos, [q], gen)[0] for q in questions]


def run_case(case: dict, bench: BenchModel, device, args) -> dict:
    frames, count, shared = case["frames"], case["questions"], case["shared_prefix"]
    lm, layers = bench.lm, bench.config.text_config.num_hidden_layers
    scope = case.get("fusion_scope", "question")
    cfg = MoRefConfig(fusion_scope=scope).resolve(frames, layers) if case["moref"] else ResolvedMoRef(1, 64, 0, 1.0)
    row = {**case, "fusion_scope": scope if case["moref"] else None, "references": cfg.references,
           "fusion_layer": cfg.fusion_layer, "new_tokens": args.new_tokens}
    prompt = Prompt(bench, frames)  # LLaVA-Video's llava_vid layout (bench_moref.LAYOUT)
    laid_out = prompt.layout(cfg)
    refs, pos = laid_out.references, laid_out.order
    questions = question_embeddings(lm, count)
    gen = GenerationOptions(max_new_tokens=args.new_tokens)
    engine = MoRefEngine(lm, cfg)

    # partial, not a closure: the `del` below must drop the last references to free the GPU memory
    answer = functools.partial(answer_questions, engine, prompt.prefix, refs, pos, questions, gen, shared)

    try:
        free(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        median, runs, outs = timed(answer, device, args.repeats)
        # Shared: one batch decodes all questions together, so its decoding seconds over its steps
        # is one generation step for the whole question set.
        step_ms = (1000 * sum(o.generate_s for o in outs) / (args.new_tokens - 1)
                   if shared and args.new_tokens > 1 else None)
        if step_ms:
            moved = step_bytes(lm, cfg, len(prompt.prefix), [len(r) for r in refs], [len(q) for q in questions],
                               args.new_tokens, scope)
            row.update(step_bytes=moved, achieved_gbs=moved / step_ms / 1e6,
                       floor_ms=moved / args.peak_bandwidth_gbs / 1e6 if args.peak_bandwidth_gbs else None)
        row.update(total_s=median, runs_s=runs, per_question_s=median / count, status="ok",
                   generated=sum(len(o.tokens) for o in outs), decode_step_ms=step_ms,
                   prefill_s=sum(o.prefill_s for o in outs),
                   peak_gib=torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None)
        if any(len(o.tokens) != args.new_tokens for o in outs):
            row["status"] = "short answers"
    except torch.OutOfMemoryError as exc:
        row.update(status="OOM", error=str(exc).splitlines()[0][:300])
    finally:
        del prompt, questions, answer
        free(device)
    return row


def cases(args) -> list[dict]:
    out = []
    for count in (1, 5, 10, 50):  # scopes side by side at each count, so a tight budget still compares them
        for scope in args.fusion_scope.split(","):
            out.append({"name": f"moref-{args.frames}-q{count}-shared" + ("" if scope == "question" else f"-{scope}"),
                        "moref": True, "frames": args.frames, "questions": count, "shared_prefix": True,
                        "fusion_scope": scope})
    out.append({"name": f"moref-{args.frames}-q10-alone", "moref": True, "frames": args.frames, "questions": 10,
                "shared_prefix": False})
    for count in (1, 10):
        out.append({"name": f"native-64-q{count}-shared", "moref": False, "frames": 64, "questions": count,
                    "shared_prefix": True})
    return out


def markdown(report: dict) -> str:
    rows = report["cases"]
    one = {(r["moref"], r["frames"], r.get("fusion_scope")): r.get("total_s") for r in rows
           if r["questions"] == 1 and r.get("total_s")}
    lines = [
        f"Question sets on one video, {report['device']} ({report['dtype']}, {report['shapes']} shapes, random "
        f"weights; {report['new_tokens']} greedy tokens per question; median of {report['repeats']} after 1 warm-up).",
        "",
        "| case | frames | N | L | scope | questions | shared prefix | total s | per question s | vs 1 question "
        "| prefill s | decode step ms | step GB read | achieved GB/s | floor ms | peak GiB | status |",
        "|---|---:|---:|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        base = one.get((r["moref"], r["frames"], r.get("fusion_scope")))
        ratio = f"{r['total_s'] / base:.2f}x" if base and r.get("total_s") else "-"
        fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731 - a one-line formatter beside its use
        lines.append(f"| {r['name']} | {r['frames']} | {r['references']} | {r['fusion_layer']} "
                     f"| {r.get('fusion_scope') or '-'} | {r['questions']} "
                     f"| {'yes' if r['shared_prefix'] else 'no'} | {fmt(r.get('total_s'), '.3f')} "
                     f"| {fmt(r.get('per_question_s'), '.3f')} | {ratio} | {fmt(r.get('prefill_s'), '.3f')} "
                     f"| {fmt(r.get('decode_step_ms'), '.1f')} "
                     f"| {fmt(r['step_bytes'] / 1e9 if r.get('step_bytes') else None, '.2f')} "
                     f"| {fmt(r.get('achieved_gbs'), '.0f')} | {fmt(r.get('floor_ms'), '.2f')} "
                     f"| {fmt(r.get('peak_gib'), '.1f')} "
                     f"| {r['status']} |")
    lines += ["", "step GB read: the least a decoding step of the whole set reads (weights once, each KV cache it "
              "attends over once; `step_bytes`); achieved GB/s: that over the measured step; floor ms: that at the "
              f"peak bandwidth ({report.get('peak_bandwidth_gbs') or '-'} GB/s)."]
    return "\n".join(lines) + "\n"


def engine_bench_parser(description: str) -> argparse.ArgumentParser:
    """The options this benchmark and bench/decode_step.py share: model size, device, output, bandwidth."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--tiny", action="store_true", help="small widths (28 layers kept): a quick self-check")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None)
    parser.add_argument("--peak-bandwidth-gbs", type=float, default=None,
                        help="the GPU's peak memory bandwidth for the floor column (default: known H100/H200 figures)")
    return parser


def main(argv=None) -> int:
    parser = engine_bench_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=512, help="MoRef frames (default 512; --tiny: 128)")
    parser.add_argument("--new-tokens", type=int, default=None, help="default 16 (--tiny: 4)")
    parser.add_argument("--repeats", type=int, default=None, help="default 2 (--tiny: 1)")
    parser.add_argument("--budget-s", type=float, default=240.0, help="start no new case after this many seconds")
    parser.add_argument("--fusion-scope", default="question",
                        help="answer.moref.fusion_scope values for the shared MoRef cases, e.g. question,video")
    args = parser.parse_args(argv)
    if any(x not in ("question", "video") for x in args.fusion_scope.split(",")):
        parser.error(f"--fusion-scope: expected question and/or video, got {args.fusion_scope!r}")
    if args.tiny and args.frames == 512:
        args.frames = 128
    args.new_tokens = args.new_tokens or (4 if args.tiny else 16)
    args.repeats = args.repeats or (1 if args.tiny else 2)
    device = torch.device(args.device)
    if device.type != "cuda" and not args.tiny:
        parser.error("the real shapes need a GPU: pass --tiny on CPU")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    start = time.perf_counter()
    torch.manual_seed(0)
    bench = BenchModel("llava_onevision", args.tiny, device, dtype)
    sync(device)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    args.peak_bandwidth_gbs = args.peak_bandwidth_gbs or peak_bandwidth_gbs(device_name)
    report = {"device": device_name, "peak_bandwidth_gbs": args.peak_bandwidth_gbs,
              "dtype": str(dtype).removeprefix("torch."), "shapes": "tiny" if args.tiny else "LLaVA-Video-7B-Qwen2",
              "torch": torch.__version__, "transformers": transformers.__version__, "new_tokens": args.new_tokens,
              "repeats": args.repeats, "cases": []}
    out_dir = Path(args.out) if args.out else None
    for case in cases(args):
        if time.perf_counter() - start > args.budget_s:
            report["cases"].append({**case, "references": "-", "fusion_layer": "-", "status": "skipped (time budget)"})
            continue
        row = run_case(case, bench, device, args)
        report["cases"].append(row)
        print(f"{row['name']}: {row['status']} {row.get('total_s', 0):.3f} s, peak {row.get('peak_gib')}", flush=True)
        if out_dir:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "bench_question_sets.json").write_text(json.dumps(report, indent=2, default=str))
            (out_dir / "bench_question_sets.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
