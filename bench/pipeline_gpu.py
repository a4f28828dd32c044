#!/usr/bin/env python3
"""The whole pipeline on GPUs: videos per GPU-hour, GPU busy time, per-stage times.

Builds random-weight checkpoints of the real shapes on the GPU (`--family`, bench/model_shapes.py:
LLaVA-Video-7B-Qwen2 in the HF LlavaOnevision layout with the llava_vid token layout, the default;
Qwen2.5-VL-7B; Qwen3-VL-8B; with open_clip ViT-L-14-336-quickgelu) into --work,
writes synthetic H.264 videos with PyAV and a questions file (5 questions per video, 6 to 60 words),
then per case (GPUs x frames) writes a job config and runs `moref-index run` (as
`python -m jobs.cli run`) in a child process while a thread samples `nvidia-smi` every 0.5 s.

Steady state: each video's answers file is renamed into place when the video is done, so file
mtimes are completion times. The first 20% of completions (at least one: it includes Ray start and
model loading) are warm-up; throughput and GPU busy fraction are measured from the last warm-up
completion to the last completion. End-to-end figures (wall clock, startup included) are recorded
too. Per-stage medians come from the answers Parquet (ok rows).

    python3 bench/pipeline_gpu.py --out DIR                       # every visible GPU, 128 and 512 frames
    python3 bench/pipeline_gpu.py --gpus 1,2 --frames 128 --out DIR
    python3 bench/pipeline_gpu.py --family qwen3_vl --frames 128 --out DIR
    python3 bench/pipeline_gpu.py --tiny [--family F] --out DIR   # CPU self-check, tiny models

A case that runs past its share of --budget-s is stopped; what it finished is still measured
(status "stopped"). No case starts past the budget. Writes DIR/pipeline_gpu_<device>_<date>.json
(rewritten after every case) and the same name with .md.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime as dt
import json
import math
import multiprocessing
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from model_shapes import FAMILIES, SHAPE_NAMES  # noqa: E402 - bench/ is on the path: this script's folder

GIB = 2**30
WARMUP_SHARE = 0.2  # share of completions counted as warm-up
SAMPLE_PERIOD_MS = 500
MIN_CASE_S = 60.0  # a case with less time left than this would measure only start-up: skip it
STOP_GRACE_S = 20.0  # after SIGINT, before SIGKILL
MIN_STEADY_VIDEOS, MIN_STEADY_WINDOW_S = 3, 5.0  # fewer, or faster: report end-to-end rates only
CLIP_MODEL = "ViT-L-14-336-quickgelu"

# Questions of many lengths, as real archives have (each new prompt length may cost a kernel warm-up).
QUESTION_STEMS = (
    "What happens?",
    "What is the person doing at the start?",
    "Describe the main moving object, its colour, its shape and where it goes during the clip.",
    "How many times does the bright square cross the middle of the frame, and in which direction does it "
    "move each time it does so?",
    "Summarise the whole video in three sentences: first what the scene looks like, then what changes over "
    "time, and finally how the video ends, mentioning any colours, objects or motion patterns you notice "
    "along the way.",
)
QUESTION_FILLERS = ("", " Be brief.", " Answer in one word if you can.", " Explain your reasoning step by step.")


# ------------------------------------------------------------------------------------------------
# Inputs: videos, questions, models


def write_video(args: tuple) -> str:
    """One synthetic H.264 (or MPEG-4 Part 2 where x264 is missing) video: a drifting colour
    gradient with a moving square, so every frame differs."""
    import av
    import numpy as np

    path, seconds, fps, width, height, seed = args
    rng = np.random.default_rng(seed)
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([(xx * 255 // width), (yy * 255 // height), ((xx + yy) * 255 // (width + height))], -1)
    base = ((base + rng.integers(0, 255, 3)) % 256).astype(np.uint8)
    side = max(8, height // 6)
    with av.open(path, "w") as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if codec == "libx264":
            stream.options = {"preset": "ultrafast", "tune": "zerolatency"}
        for i in range(int(seconds * fps)):
            frame = np.roll(base, shift=(i * 2) % width, axis=1)
            x = int((width - side) * (0.5 + 0.5 * math.sin(i / 17 + seed)))
            y = int((height - side) * (0.5 + 0.5 * math.cos(i / 23 + seed)))
            frame[y:y + side, x:x + side] = 255 - frame[y:y + side, x:x + side]
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return path


@dataclass(frozen=True)
class VideoSet:
    """The videos of a case. `archive`: real-archive-like H.264 (bench/archive_video.py: moving
    texture, ARCHIVE_BIT_RATE, a keyframe every ARCHIVE_KEYFRAME_S); else the synthetic gradient
    clips of `write_video`, `seconds` to `seconds` + 16 long."""

    name: str
    seconds: float
    fps: int
    width: int
    height: int
    archive: bool


ARCHIVE_BIT_RATE, ARCHIVE_KEYFRAME_S = 8_000_000, 8.0
# Real shapes: 24-40 s at 24 fps (576-960 frames, so 512 distinct frames exist), 640x360; and the
# archive sets, 1 and 10 minutes of 1920x1080 at 30 fps. --tiny: the same sets a few seconds long.
VIDEO_SETS = {s.name: s for s in (VideoSet("360p", 24, 24, 640, 360, False),
                                  VideoSet("1080p-1min", 60, 30, 1920, 1080, True),
                                  VideoSet("1080p-10min", 600, 30, 1920, 1080, True))}
TINY_VIDEO_SETS = {s.name: s for s in (VideoSet("360p", 3, 8, 96, 64, False),
                                       VideoSet("1080p-1min", 2, 8, 1920, 1080, True),
                                       VideoSet("1080p-10min", 3, 8, 1920, 1080, True))}
ARCHIVE_SETS = "360p,1080p-1min,1080p-10min"
# An archive video longer than this is its first REPEAT_SEGMENT_S (whole GOPs) encoded once and
# its packets repeated (remuxed, not re-encoded) to the length: every frame is still decoded, and
# writing 10-minute 1080p videos costs seconds instead of an encoder's minutes.
REPEAT_SEGMENT_S = 10 * ARCHIVE_KEYFRAME_S


def write_archive_job(args: tuple) -> str:
    """One archive video (bench/archive_video.py): (path, seconds, fps, width, height, seed)."""
    from archive_video import repeat_to_length, write_archive_video

    path, seconds, fps, width, height, seed = args
    if seconds <= REPEAT_SEGMENT_S:
        return write_archive_video(path, seconds, width, height, fps, ARCHIVE_BIT_RATE, ARCHIVE_KEYFRAME_S, seed)
    segment = f"{path}.segment.mp4"
    write_archive_video(segment, REPEAT_SEGMENT_S, width, height, fps, ARCHIVE_BIT_RATE, ARCHIVE_KEYFRAME_S, seed)
    repeat_to_length(segment, path, seconds)
    os.unlink(segment)
    return path


def make_videos(folder: Path, count: int, video_set: VideoSet, workers: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    longer = 0 if video_set.archive or video_set.seconds < 10 else 4  # 360p: 24, 28, ... 40 s
    jobs = [(str(folder / f"video-{i:03d}.mp4"), video_set.seconds + (i % 5) * longer, video_set.fps,
             video_set.width, video_set.height, i) for i in range(count)]
    # Archive sets: one distinct video per worker, the others hard links to them (decoding each
    # costs the same; encoding 48 of them at 1080p would take minutes of the GPU machine's time).
    distinct = jobs[: max(1, workers)] if video_set.archive else jobs
    todo = [j for j in distinct if not Path(j[0]).exists()]
    if todo:
        with multiprocessing.get_context("spawn").Pool(max(1, min(workers, len(todo)))) as pool:
            pool.map(write_archive_job if video_set.archive else write_video, todo)
    for i, job in enumerate(jobs[len(distinct):], start=len(distinct)):
        if not Path(job[0]).exists():
            os.link(distinct[i % len(distinct)][0], job[0])
    return [j[0] for j in jobs]


def write_questions(path: Path, videos: list[str], per_video: int) -> None:
    lines = []
    for v, video in enumerate(videos):
        for q in range(per_video):
            stem = QUESTION_STEMS[q % len(QUESTION_STEMS)]
            text = stem + QUESTION_FILLERS[(v + q) % len(QUESTION_FILLERS)]
            lines.append(json.dumps({"video_id": Path(video).name, "question_id": f"q{q}", "question": text}))
    path.write_text("\n".join(lines) + "\n")


def build_models(work: str, tiny: bool, family: str = "llava_onevision") -> dict:
    """Random checkpoints of `family`'s real shapes (bf16, built on the GPU; LlavaOnevision in the
    llava_vid layout) and of open_clip ViT-L-14-336, saved with safetensors; with `tiny`, the same
    code on the CPU with bench/model_shapes.py's tiny widths (depth kept) and the tiny CLIP. The
    model's processor wraps the tiny BPE tokenizer (with the family's special tokens). Runs in a
    child process so the benchmark's own process never holds GPU memory. Reuses a finished build."""
    import torch
    from model_shapes import build_model, model_config

    from freemoref.convert import IMAGE_TOKEN, VIDEO_TOKEN
    from freemoref.layouts import VIDEO_LAYOUT_KEY
    from freemoref.tiny import (
        QWEN_VL_SPECIAL_TOKENS,
        TinyModelShape,
        _grid_pinpoints,
        build_tiny_qwen_vl_tokenizer,
        build_tiny_tokenizer,
        qwen_vl_processor,
        tiny_processor,
    )
    from pipeline.stages.clip_models import build_random_clip, build_tiny_clip

    root = Path(work) / "models"
    llava, clip, done = root / f"{family}-random", root / "clip-vit-l-14-336-random", root / f"DONE-{family}"
    if done.exists():
        return json.loads(done.read_text())
    device, dtype = ("cpu", torch.float32) if tiny else ("cuda", torch.bfloat16)
    timings = {}
    t0 = time.perf_counter()
    from transformers import GenerationConfig

    if family == "llava_onevision":
        tokenizer = build_tiny_tokenizer()
        config = model_config(family, tiny)
        image_id, video_id = tokenizer.convert_tokens_to_ids([IMAGE_TOKEN, VIDEO_TOKEN])
        config.image_token_index, config.video_token_index = image_id, video_id
        config.image_grid_pinpoints = _grid_pinpoints(config.vision_config.image_size)
        setattr(config, VIDEO_LAYOUT_KEY, "llava_vid")
    else:
        tokenizer = build_tiny_qwen_vl_tokenizer()
        ids = dict(zip(QWEN_VL_SPECIAL_TOKENS, tokenizer.convert_tokens_to_ids(list(QWEN_VL_SPECIAL_TOKENS))))
        config = model_config(family, tiny, dict(
            image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"]))
    config.text_config.vocab_size = max(config.text_config.vocab_size, len(tokenizer))
    endoftext_id, im_end_id = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])
    config.text_config.eos_token_id, config.text_config.pad_token_id = im_end_id, endoftext_id
    model = build_model(config, device, dtype)
    # The tokenizer knows ~1k ids of the 152k vocabulary: keep random generation inside them, so
    # answers decode to text; EOS can never win, so every answer runs to max_new_tokens.
    with torch.no_grad():
        model.lm_head.weight[len(tokenizer):].zero_()
        model.lm_head.weight[[im_end_id, endoftext_id]] = 0
    model.generation_config = GenerationConfig(eos_token_id=im_end_id, pad_token_id=endoftext_id, do_sample=False)
    if device == "cuda":
        torch.cuda.synchronize()
    timings["llava_init_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    model.save_pretrained(str(llava), max_shard_size="4GB")
    if family == "llava_onevision":
        shape = TinyModelShape(image_size=config.vision_config.image_size, patch_size=config.vision_config.patch_size)
        processor = tiny_processor(tokenizer, shape)
    else:  # the processors' own pixel limits; tiny: frames of about 32 x 40
        options: dict[str, Any] = {"size": {"shortest_edge": 16 * 16, "longest_edge": 32 * 40 * 64}} if tiny else {}
        if tiny and family == "qwen3_vl":
            options["max_video_tokens"] = 20
        processor = qwen_vl_processor(family, tokenizer, config.vision_config.patch_size, **options)
    processor.save_pretrained(str(llava))
    timings["llava_save_s"] = time.perf_counter() - t0
    del model
    t0 = time.perf_counter()
    if tiny:
        build_tiny_clip(clip)
    else:
        torch.cuda.empty_cache()
        build_random_clip(clip, CLIP_MODEL, device=device, dtype=torch.float16)
    timings["clip_build_s"] = time.perf_counter() - t0
    result = {"llava": str(llava), "clip": str(clip), "timings": timings}
    done.write_text(json.dumps(result))
    return result


# ------------------------------------------------------------------------------------------------
# GPU sampling


class GpuSampler:
    """`nvidia-smi` every SAMPLE_PERIOD_MS in a reader thread: (time, gpu index, util %, MiB used)."""

    def __init__(self, gpus: list[str]):
        self.samples: list[tuple[float, str, float, float]] = []
        self.proc = None
        if not gpus or shutil.which("nvidia-smi") is None:
            return
        self.proc = subprocess.Popen(
            ["nvidia-smi", "--query-gpu=index,utilization.gpu,memory.used", "--format=csv,noheader,nounits",
             f"-lms={SAMPLE_PERIOD_MS}", f"--id={','.join(gpus)}"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        for line in self.proc.stdout:
            parts = [p.strip() for p in line.split(",")]
            try:
                self.samples.append((time.time(), parts[0], float(parts[1]), float(parts[2])))
            except (ValueError, IndexError):
                continue  # a header or a "[N/A]"

    def stop(self):
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)

    def busy_fraction(self, start: float, end: float) -> float | None:
        window = [s[2] for s in self.samples if start <= s[0] <= end]
        return statistics.fmean(window) / 100 if window else None

    def peak_gib(self) -> float | None:
        return max((s[3] for s in self.samples), default=0) * 2**20 / GIB if self.samples else None


# ------------------------------------------------------------------------------------------------
# One case


DEFAULT_VARIANT = "default"


def parse_variant(text: str) -> tuple[str, list[str]]:
    """'clip_in_vlm:guidance.placement=answer_actor,answer.num_gpus=1' -> (name, ['key=value', ...])."""
    name, _, overrides = text.partition(":")
    pairs = [o for o in overrides.split(",") if o]
    if not name or not pairs or any("=" not in o for o in pairs):
        raise ValueError(f"--variant {text!r}: expected NAME:KEY=VALUE[,KEY=VALUE]")
    return name, pairs


def ray_cpus(gpus: int, decode_cores: int | None) -> tuple[int, float]:
    """Ray's CPUs for a case and the decode cores per GPU they leave: with `decode_cores`, what the
    actors reserve (one CLIP actor, one Video-LLM actor per GPU, the sink) plus `decode_cores` decode
    tasks per GPU (one CPU each), so at most that many decode at once per GPU; else every CPU here."""
    from pipeline.run.resources import SINK_CPUS

    devices = max(gpus, 1)
    clip, answer, decode = (1, 1, 1) if gpus else (0.25, 0.5, 0.5)
    reserved = clip + answer * devices + SINK_CPUS
    if decode_cores is not None:
        total = math.ceil(reserved + devices * decode_cores * decode - 1e-9)
    else:
        total = max(4, os.cpu_count() or 4)
    return total, math.floor((total - reserved) / decode + 1e-9) / devices  # whole decode tasks fit


def job_config(args, models: dict, work: Path, frames: int, gpus: int, name: str, video_set: VideoSet,
               fusion_scope: str) -> dict:
    gpu = gpus > 0
    moref = {"fusion_scope": fusion_scope, **({"temporal_units": 4, "references": 2} if args.tiny else {})}
    return {
        "run_id": name,
        "input": {"videos": str(work / "videos" / video_set.name / "*.mp4"),
                  **({"limit": args.videos} if args.videos else {})},
        "questions": {"file": str(work / f"questions-{video_set.name}.jsonl")},
        "decode": {"num_frames": frames, "frame_size": 384 if not args.tiny else 64, "num_cpus": 1 if gpu else 0.5,
                   "timeout_s": 300},
        "guidance": {"model": models["clip"], "pretrained": None, "frames_per_question": frames,
                     "num_gpus": args.clip_gpu_fraction if gpu else 0, "num_cpus": 1 if gpu else 0.25,
                     "memory_gib": 1 if args.tiny else 4, "batch_size": 256 if gpu else 32},
        "answer": {"model": models["llava"], "max_new_tokens": args.new_tokens,
                   "num_gpus": (1 - args.clip_gpu_fraction) if gpu else 0, "num_cpus": 1 if gpu else 0.5,
                   "concurrency": "auto" if gpu else 1, "moref": moref, **({"memory_gib": 1} if args.tiny else {})},
        # a commit per video, so each answers file's mtime is its video's completion time (the
        # throughput timeline below); the commit itself is small next to a video's model time
        "output": {"path": str(work / "out" / name), "max_videos_per_file": 1},
        "ray": {"num_cpus": ray_cpus(gpus, args.decode_cores)[0]},
    }


def stop_process_group(proc: subprocess.Popen) -> None:
    """SIGINT first (the driver shuts its local Ray down), SIGKILL to the group after a grace period."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)


def end_process_group(proc: subprocess.Popen) -> None:
    """SIGKILL what is left of the driver's process group: the local Ray the driver started (GCS,
    raylet, workers holding GPU memory) lives in that group, so this frees the GPU for the next case
    and reaches no process the case did not start. A group already gone is fine."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def answers_stats(out: Path) -> dict:
    """Completion times (file mtimes: one video per file, `output.max_videos_per_file: 1`) and
    per-stage medians from the answers files."""
    import pyarrow.parquet as pq

    columns = ["video_id", "status", "error_reason", "frames_decoded", "output_tokens", "decode_s", "guidance_s",
               "prefill_s", "generate_s", "fusion_scope", "decode_backend"]
    files = [p for p in (out / "answers").glob("*.parquet") if not p.name.startswith(("_", "."))]
    completions = sorted(p.stat().st_mtime for p in files)
    rows = []
    for p in files:
        rows.extend(pq.read_table(p, columns=columns).to_pylist())  # roi_box left out: any pyarrow reads this
    ok = [r for r in rows if r["status"] == "ok"]

    def median(key, fn=None):
        values = [fn(r) if fn else r[key] for r in ok if r[key] is not None]
        values = [v for v in values if v is not None]
        return statistics.median(values) if values else None

    per_video: dict[str, dict] = {}
    for r in ok:
        per_video.setdefault(r["video_id"], r)
    clip_rates = [r["frames_decoded"] / r["guidance_s"] for r in per_video.values() if r["guidance_s"]]
    # One decoder thread per decode task (decode.num_cpus 1; 0.5 with --tiny): its seconds are CPU
    # seconds, for the videos a CPU backend decoded; nvdec's are the task's wall time, kept apart.
    decode_s: dict[bool, list[float]] = {True: [], False: []}  # on nvdec?
    for r in per_video.values():
        if r["decode_s"] is not None:
            decode_s[r["decode_backend"] == "nvdec"].append(r["decode_s"])
    backends = collections.Counter(r["decode_backend"] or "unknown" for r in per_video.values())
    errors: dict[str, int] = {}
    for r in rows:
        if r["status"] != "ok":
            reason = r["error_reason"] or "unknown"
            errors[reason] = errors.get(reason, 0) + 1
    return {
        "completions": completions, "pairs": len(rows), "ok_pairs": len(ok), "errors_by_reason": errors,
        "videos_done": len({r["video_id"] for r in rows}),
        "median_decode_s": median("decode_s"), "median_guidance_s": median("guidance_s"),
        "median_prefill_s": median("prefill_s"), "median_generate_s": median("generate_s"),
        "median_output_tokens": median("output_tokens"),
        "median_generate_ms_per_token": median(
            "generate_s", lambda r: 1000 * r["generate_s"] / max((r["output_tokens"] or 1) - 1, 1)),
        "clip_frames_per_s": statistics.median(clip_rates) if clip_rates else None,
        "decode_cpu_s_per_video": statistics.fmean(decode_s[False]) if decode_s[False] else None,
        "nvdec_s_per_video": statistics.fmean(decode_s[True]) if decode_s[True] else None,
        "videos_by_decode_backend": dict(backends),
        "median_frames_decoded": median("frames_decoded"),
        "fusion_scopes_recorded": sorted({r["fusion_scope"] for r in ok if r["fusion_scope"]}),
    }


def run_case(args, models: dict, work: Path, gpus: int, frames: int, variant: tuple[str, list[str]],
             limit_s: float, log_dir: Path, video_set: VideoSet, fusion_scope: str) -> dict:
    import yaml

    label, overrides = variant
    name = (f"{'tiny' if args.tiny else 'real'}-{video_set.name}-g{gpus}-f{frames}-{fusion_scope}"
            + ("" if label == DEFAULT_VARIANT else f"-{label}"))
    out = work / "out" / name
    shutil.rmtree(out, ignore_errors=True)
    cfg_path = work / f"{name}.yaml"
    cfg_path.write_text(yaml.safe_dump(job_config(args, models, work, frames, gpus, name, video_set, fusion_scope),
                                       sort_keys=False))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    visible = gpu_ids()[:gpus]
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(visible)
    command = [sys.executable, "-m", "jobs.cli", "run", str(cfg_path),
               "--summary-json", str(work / f"{name}.summary.json")]
    for override in [*args.set, *overrides]:
        command += ["--set", override]
    case = {"case": name, "variant": label, "video_set": video_set.name, "fusion_scope": fusion_scope,
            "width": video_set.width, "height": video_set.height, "video_seconds": video_set.seconds,
            "decode_cores_per_gpu": ray_cpus(gpus, args.decode_cores)[1],
            "gpus": gpus, "frames": frames, "questions_per_video": args.questions,
            "new_tokens": args.new_tokens, "limit_s": round(limit_s, 1), "config": str(cfg_path),
            "set": [*args.set, *overrides]}
    print(f"== {name}: up to {limit_s:.0f} s", flush=True)
    sampler = GpuSampler(visible)
    start = time.time()
    with open(log_dir / f"{name}.log", "w") as log:
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(limit_s)
            case["status"] = "ok" if rc == 0 else f"failed (rc {rc})"
        except subprocess.TimeoutExpired:
            case["status"] = "stopped (time limit)"
            stop_process_group(proc)
    end = time.time()
    sampler.stop()
    end_process_group(proc)
    case["wall_s"] = end - start
    no_answers = {"completions": [], "pairs": 0, "ok_pairs": 0}
    stats: dict[str, Any] = answers_stats(out) if (out / "answers").exists() else no_answers
    completions = stats.pop("completions")
    case.update(stats)
    videos = len(completions)
    devices = max(gpus, 1)
    case["videos"] = videos
    case["videos_planned"] = args.videos
    pairs_per_video = case["pairs"] / videos if videos else 0.0
    case["end_to_end_videos_per_gpu_hour"] = videos * 3600 / case["wall_s"] / devices
    case["startup_s"] = completions[0] - start if completions else None
    warm = max(1, math.ceil(WARMUP_SHARE * videos))
    if videos - warm >= MIN_STEADY_VIDEOS and completions[-1] - completions[warm - 1] >= MIN_STEADY_WINDOW_S:
        t_warm, t_last = completions[warm - 1], completions[-1]
        rate = (videos - warm) / max(t_last - t_warm, 1e-9)  # videos per second, steady state
        case["steady_videos"] = videos - warm
        case["steady_window_s"] = t_last - t_warm
        case["gpu_busy_fraction"] = sampler.busy_fraction(t_warm, t_last)
    else:  # too few completions for a steady state: fall back to end to end
        rate = videos / case["wall_s"]
        case["steady_videos"], case["gpu_busy_fraction"] = 0, sampler.busy_fraction(start, end)
    case["videos_per_gpu_hour"] = rate * 3600 / devices
    case["questions_per_gpu_hour"] = rate * pairs_per_video * 3600 / devices
    case["end_to_end_questions_per_gpu_hour"] = case["end_to_end_videos_per_gpu_hour"] * pairs_per_video
    if case.get("decode_cpu_s_per_video") is not None:
        # decode cores each GPU needs to keep up with the measured rate
        case["decode_cores_needed_per_gpu"] = case["decode_cpu_s_per_video"] * rate / devices
    case["peak_gib"] = sampler.peak_gib()
    if case["ok_pairs"] < case["pairs"]:  # error rows are not answers: never a throughput figure
        case["status"] += f"; {case['pairs'] - case['ok_pairs']} of {case['pairs']} pairs in error"
    # paths in tracebacks relative to the checkout: the JSON is committed, the machine is not its subject
    tail = [line.replace(f"{REPO}/", "") for line in
            (log_dir / f"{name}.log").read_text(errors="replace").splitlines()[-15:]]
    if case["status"] != "ok":
        case["log_tail"] = tail
    print(f"   {case['status']}: {videos} videos, {case['pairs']} pairs in {case['wall_s']:.0f} s; "
          f"{case['videos_per_gpu_hour']:.0f} videos/GPU-h steady, busy {_fmt(case['gpu_busy_fraction'], '.2f')}",
          flush=True)
    return case


# ------------------------------------------------------------------------------------------------
# Report


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown(report: dict) -> str:
    lines = [
        f"Pipeline benchmark on {report['device']} ({report['shapes']} shapes, random weights; "
        f"{report['questions_per_video']} questions per video, {report['new_tokens']} new tokens; "
        f"{report['date']}). Steady state after the first {int(WARMUP_SHARE * 100)}% of videos.",
        "",
        "| videos | scope | GPUs | frames | frames seen | videos | pairs | wall s | videos/GPU-h | questions/GPU-h "
        "| e2e videos/GPU-h | GPU busy | peak GiB | decode s | decode CPU s/video | decode cores/GPU (given, needed) "
        "| guidance s | CLIP frames/s | prefill s | generate s | ms/token | status |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for c in report["cases"]:
        busy = c.get("gpu_busy_fraction")
        variant = c.get("variant", DEFAULT_VARIANT)
        shape = f"{c.get('video_set', '-')} ({c['width']}x{c['height']}, {c['video_seconds']:g} s)" \
            if c.get("width") else c.get("video_set", "-")
        cores = f"{_fmt(c.get('decode_cores_per_gpu'), '.1f')}, {_fmt(c.get('decode_cores_needed_per_gpu'), '.1f')}"
        lines.append(
            f"| {shape} | {c.get('fusion_scope', '-')} "
            f"| {c['gpus']} | {c['frames']}{'' if variant == DEFAULT_VARIANT else f' ({variant})'} "
            f"| {_fmt(c.get('median_frames_decoded'), '.0f')} | {c.get('videos', '-')} | {c.get('pairs', '-')} "
            f"| {_fmt(c.get('wall_s'), '.0f')} | {_fmt(c.get('videos_per_gpu_hour'), '.0f')} "
            f"| {_fmt(c.get('questions_per_gpu_hour'), '.0f')} "
            f"| {_fmt(c.get('end_to_end_videos_per_gpu_hour'), '.0f')} "
            f"| {'-' if busy is None else f'{100 * busy:.0f}%'} | {_fmt(c.get('peak_gib'), '.1f')} "
            f"| {_fmt(c.get('median_decode_s'), '.2f')} | {_fmt(c.get('decode_cpu_s_per_video'), '.2f')} | {cores} "
            f"| {_fmt(c.get('median_guidance_s'), '.2f')} "
            f"| {_fmt(c.get('clip_frames_per_s'), '.0f')} | {_fmt(c.get('median_prefill_s'), '.2f')} "
            f"| {_fmt(c.get('median_generate_s'), '.2f')} | {_fmt(c.get('median_generate_ms_per_token'), '.1f')} "
            f"| {c['status']} |")
    for key, ratio in sorted(gpu_scaling(report["cases"]).items()):
        lines += ["", f"{key} frames: {ratio['gpus']} GPUs answer {ratio['questions_per_hour_ratio']:.2f}x the "
                      f"questions per hour of {ratio['baseline_gpus']} (steady state)."]
    lines += ["", "Stage columns are medians over ok answers rows (decode and guidance per video, prefill and "
              "generate per question); GPU busy is nvidia-smi utilization averaged over the steady window and the "
              "case's GPUs; peak GiB is the most memory any of them had in use. Decode CPU s/video is the mean "
              "decode_s (one decoder thread per decode task: CPU seconds unless cores are oversubscribed); "
              "decode cores needed per GPU = that x the videos per second per GPU measured; given = the decode "
              "tasks Ray's CPUs leave room for per GPU (--decode-cores)."]
    return "\n".join(lines) + "\n"


def _scaling_key(case: dict) -> str:
    variant = case.get("variant", DEFAULT_VARIANT)
    extra = [x for x in (case.get("video_set"), case.get("fusion_scope")) if x]
    extra += [] if variant == DEFAULT_VARIANT else [variant]
    return str(case["frames"]) + (f" ({', '.join(extra)})" if extra else "")


def gpu_scaling(cases: list[dict]) -> dict[str, dict]:
    """Per frame count (and variant) with cases on several GPU counts: the most GPUs' questions
    per hour (all GPUs together) over the fewest's."""
    out = {}
    for key in {_scaling_key(c) for c in cases}:
        measured = sorted((c for c in cases if _scaling_key(c) == key and c.get("questions_per_gpu_hour")),
                          key=lambda c: c["gpus"])
        if len(measured) >= 2 and measured[0]["gpus"] >= 1 and measured[-1]["gpus"] > measured[0]["gpus"]:
            low, high = measured[0], measured[-1]
            out[key] = {"gpus": high["gpus"], "baseline_gpus": low["gpus"],
                           "questions_per_hour_ratio": (high["questions_per_gpu_hour"] * high["gpus"])
                           / (low["questions_per_gpu_hour"] * low["gpus"])}
    return out


def device_name(tiny: bool) -> str:
    if tiny or shutil.which("nvidia-smi") is None:
        return "cpu"
    out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                         text=True, check=False).stdout.strip().splitlines()
    return out[0].strip() if out else "gpu"


def gpu_ids() -> list[str]:
    """The GPUs this process may use, as nvidia-smi and CUDA_VISIBLE_DEVICES name them: those
    CUDA_VISIBLE_DEVICES already lists, else every GPU nvidia-smi sees."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [g.strip() for g in listed.split(",") if g.strip() and g.strip() != "-1"]
    if shutil.which("nvidia-smi") is None:
        return []
    out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                         text=True, check=False).stdout
    return [line.strip() for line in out.splitlines() if line.strip()]


def versions() -> dict:
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("torch", "transformers", "ray", "pyarrow", "open_clip", "av"):
        try:
            found[name] = getattr(__import__(name), "__version__", "?")
        except ImportError:
            found[name] = None
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="CPU self-check with the tiny models")
    parser.add_argument("--family", default="llava_onevision", choices=FAMILIES,
                        help="model family whose real (or --tiny) shapes to build (bench/model_shapes.py)")
    parser.add_argument("--gpus", default=None, help="GPU counts to run, e.g. 1,2 (default: every visible GPU)")
    parser.add_argument("--frames", default=None, help="frame counts (default 128,512; --tiny: 8)")
    parser.add_argument("--videos", type=int, default=None, help="videos per case (default 60; --tiny: 3)")
    parser.add_argument("--questions", type=int, default=5, help="questions per video")
    parser.add_argument("--new-tokens", type=int, default=None, help="default 32 (--tiny: 4)")
    parser.add_argument("--clip-gpu-fraction", type=float, default=0.2,
                        help="GPU share of the CLIP actor; each Video-LLM actor takes the rest of one GPU")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra job-config override for every case (passed to moref-index run --set)")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE[,KEY=VALUE]",
                        help="run every case once per variant, with these overrides (default: one run as configured)")
    parser.add_argument("--video-sets", default="360p",
                        help=f"comma-separated, of {', '.join(VIDEO_SETS)}: the 360p synthetic clips, and 1- and "
                             "10-minute 1080p archive-like videos (H.264 ~8 Mbit/s, a keyframe every 8 s)")
    parser.add_argument("--archive", action="store_const", const=ARCHIVE_SETS, dest="video_sets",
                        help=f"every video set: --video-sets {ARCHIVE_SETS}")
    parser.add_argument("--fusion-scope", default="question",
                        help="answer.moref.fusion_scope values to run each case with, e.g. question,video")
    parser.add_argument("--decode-cores", type=int, default=None,
                        help="decode tasks (one CPU each) per GPU that Ray's CPUs leave room for (default: every CPU)")
    parser.add_argument("--budget-s", type=float, default=470.0, help="start no case after this; stop cases to fit")
    parser.add_argument("--work", default="/tmp/moref-pipeline-gpu", help="models, videos, job outputs")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "bench" / "results"))
    args = parser.parse_args(argv)
    start = time.time()
    for name, real, tiny in (("frames", "128,512", "8"), ("videos", 60, 3), ("new_tokens", 32, 4)):
        if getattr(args, name) is None:
            setattr(args, name, tiny if args.tiny else real)
    available = 0 if args.tiny else len(gpu_ids())
    gpu_counts = [0] if args.tiny else [int(g) for g in (args.gpus or str(available)).split(",") if g]
    if not args.tiny and (not gpu_counts or min(gpu_counts) < 1 or max(gpu_counts) > available):
        parser.error(f"{available} GPUs visible, cases ask for {gpu_counts}: run on a GPU machine with enough "
                     "GPUs, or pass --tiny for the CPU self-check")
    frame_counts = [int(f) for f in str(args.frames).split(",") if f]
    work, out_dir = Path(args.work) / ("tiny" if args.tiny else "real"), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = device_name(args.tiny)
    date = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")
    stem = f"pipeline_gpu_{re.sub(r'[^a-z0-9]+', '-', device.lower()).strip('-')}_{date}"
    sets = TINY_VIDEO_SETS if args.tiny else VIDEO_SETS
    unknown = [n for n in args.video_sets.split(",") if n and n not in sets]
    if unknown:
        parser.error(f"--video-sets: unknown {unknown}; expected some of {', '.join(sets)}")
    video_sets = [sets[n] for n in args.video_sets.split(",") if n]
    scopes = [x for x in args.fusion_scope.split(",") if x]
    if not scopes or any(x not in ("question", "video") for x in scopes):
        parser.error(f"--fusion-scope: expected question and/or video, got {args.fusion_scope!r}")
    report = {"device": device, "date": date, "family": args.family, "videos_s_by_set": {},
              "decode_cores_arg": args.decode_cores,
              "shapes": "tiny" if args.tiny else f"{SHAPE_NAMES[args.family]} + ViT-L-14-336",
              "questions_per_video": args.questions, "new_tokens": args.new_tokens, "versions": versions(),
              "argv": [a.replace(str(out_dir), "$OUT") for a in sys.argv[1:]], "cases": []}

    def save():
        report["elapsed_s"] = time.time() - start
        report["gpu_scaling"] = gpu_scaling(report["cases"])
        (out_dir / f"{stem}.json").write_text(json.dumps(report, indent=2, default=str))
        (out_dir / f"{stem}.md").write_text(markdown(report))

    # Models build on the GPU in a child process while the videos are written on the CPUs.
    spawn = multiprocessing.get_context("spawn")
    with spawn.Pool(1) as builder:
        pending = builder.apply_async(build_models, (str(work), args.tiny, args.family))
        t0 = time.time()
        for video_set in video_sets:
            t1 = time.time()
            videos = make_videos(work / "videos" / video_set.name, args.videos, video_set,
                                 max(1, (os.cpu_count() or 2) - 2))
            report["videos_s_by_set"][video_set.name] = time.time() - t1
            write_questions(work / f"questions-{video_set.name}.jsonl", videos, args.questions)
        report["videos_s"] = time.time() - t0
        models = pending.get()
    report["setup_s"] = time.time() - start
    report["model_timings"] = models.pop("timings")
    print(f"setup {report['setup_s']:.0f} s (videos {report['videos_s']:.0f} s, models {report['model_timings']})",
          flush=True)
    save()

    variants = [parse_variant(v) for v in args.variant] or [(DEFAULT_VARIANT, [])]
    cases = [(vs, g, f, v, scope) for vs in video_sets for g in gpu_counts for f in frame_counts for v in variants
             for scope in scopes]
    for i, (video_set, gpus, frames, variant, scope) in enumerate(cases):
        left = args.budget_s - (time.time() - start)
        brief = {"case": f"{video_set.name}-g{gpus}-f{frames}-{scope}-{variant[0]}", "variant": variant[0],
                 "video_set": video_set.name, "fusion_scope": scope, "gpus": gpus, "frames": frames}
        if left < MIN_CASE_S:
            report["cases"].append({**brief, "status": "skipped (time budget)"})
            continue
        # An equal share of what is left; time a case does not use passes to the next.
        limit = left / (len(cases) - i) - (5 if not args.tiny else 0)
        try:
            report["cases"].append(run_case(args, models, work, gpus, frames, variant, limit, out_dir, video_set,
                                            scope))
        except Exception as exc:  # noqa: BLE001 - record it and go on: the other cases still count
            report["cases"].append({**brief, "status": f"bench error: {type(exc).__name__}: {exc}"[:500]})
        save()
    save()
    print()
    print(markdown(report))
    print(f"wrote {out_dir / stem}.json and .md; total {time.time() - start:.0f} s")
    return 0 if all(c["status"] in ("ok", "stopped (time limit)") for c in report["cases"]) else 1


if __name__ == "__main__":
    sys.exit(main())
