"""The nvdec backend on the GPU against the PyAV backend, on clips whose grey level encodes each
frame's index (tests/media.py): the same frames at the same times and sizes, upright, for H.264
with B-frames, variable frame rate, rotation, HEVC and VP9, in both seek modes; archive-like texture
within a few grey levels; the stage's isolated children decoding on the GPU, and a whole pipeline
run whose decode tasks hold a GPU share. Needs av and PyNvVideoCodec (the carried tarballs)."""

from __future__ import annotations

import shutil
import sys

import numpy as np
import pytest

pytest.importorskip("av", reason="av is not installed (unpack .gpu/pkgs.tar.xz)")
pytest.importorskip("PyNvVideoCodec", reason="PyNvVideoCodec is not installed (unpack .gpu/nvdec.tar.xz)")

from pipeline.config import DecodeConfig  # noqa: E402 - after the skips
from pipeline.schema import STATUS_OK, Col  # noqa: E402
from pipeline.stages.decode import DecodeStage, decode_video  # noqa: E402
from tests.media import grey_level, make_clip  # noqa: E402
from tests.paths import DEMO_VIDEOS, REPO, REPO_VIDEOS  # noqa: E402

sys.path.insert(0, str(REPO / "bench"))

S = 64
CLIPS = {
    # at most 30 frames: grey levels >= 7 apart, so the two YUV->RGB conversions cannot flip a level
    "bframes.mp4": {"n": 30, "size": (160, 160), "options": {"bf": "3", "crf": "8"}, "gop": 10},
    "vfr.mp4": {"n": 30, "size": (160, 160), "pts_ms": [i * 40 + (i % 3) * 7 for i in range(30)]},
    "rot90.mp4": {"n": 30, "size": (160, 96), "rotation": 90, "marker": True},
    "hevc.mp4": {"n": 30, "size": (192, 192), "codec": "libx265", "gop": 10},
    "vp9.webm": {"n": 30, "size": (160, 160), "codec": "libvpx-vp9", "gop": 10},
}


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("nvdec")
    return {name: make_clip(root / name, **kw) for name, kw in CLIPS.items()}


def levels(frames: np.ndarray, n: int) -> list[int]:
    """The frame index each frame's mean grey encodes (the marker corner excluded)."""
    table = np.array([grey_level(i, n) for i in range(n)])
    grey = frames[:, frames.shape[1] // 2 :, frames.shape[2] // 2 :].reshape(len(frames), -1).mean(axis=1)
    return [int(np.argmin(np.abs(table - g))) for g in grey]


@pytest.mark.parametrize("seek", ["exact", "keyframe"])
@pytest.mark.parametrize("name", sorted(CLIPS))
def test_nvdec_returns_the_frames_pyav_returns(clips, name, seek):
    cfg = DecodeConfig(frame_size=S, num_frames=12, seek=seek, backend="nvdec", num_gpus=0.1)
    gpu = decode_video(str(clips[name]), cfg)
    cpu = decode_video(str(clips[name]), cfg, backend="pyav")
    assert gpu.backend == "nvdec"
    np.testing.assert_allclose(gpu.times_s, cpu.times_s, atol=1e-6)
    if seek == "exact":
        np.testing.assert_array_equal(gpu.indices, cpu.indices)
    assert gpu.frames.shape == cpu.frames.shape and gpu.frames.dtype == np.uint8
    assert (gpu.width, gpu.height, gpu.rotation) == (cpu.width, cpu.height, cpu.rotation)
    n = CLIPS[name]["n"]
    assert levels(gpu.frames, n) == levels(cpu.frames, n)
    assert np.abs(gpu.frames.astype(int) - cpu.frames.astype(int)).mean() < 3
    if CLIPS[name].get("marker"):  # the stored top-left red third, turned upright in both
        red_gpu, red_cpu = ((f[..., 0].astype(int) - f[..., 1]) > 100 for f in (gpu.frames, cpu.frames))
        assert red_gpu.mean() > 0.05 and (red_gpu != red_cpu).mean() < 0.02  # chroma edges may differ


REAL_VIDEOS = sorted([*DEMO_VIDEOS.glob("*.m*"), *DEMO_VIDEOS.glob("*.avi"), *REPO_VIDEOS.glob("*.m*"),
                      *REPO_VIDEOS.glob("*.webm")])


@pytest.mark.parametrize("path", REAL_VIDEOS, ids=lambda p: p.name)
def test_real_videos_decode_as_pyav_decodes_them_or_fall_back(path):
    """The repository's real videos: where NVDEC decodes, the same times, ordinals and sizes as
    PyAV and pictures within a few grey levels; where it cannot (MPEG-4 part 2, a second video
    stream it would pick), the stage's fallback gives PyAV's own result."""
    cfg = DecodeConfig(frame_size=S, num_frames=16, backend="nvdec", num_gpus=0.1)
    cpu = decode_video(str(path), cfg, backend="pyav")
    try:
        gpu = decode_video(str(path), cfg)
    except Exception as exc:  # noqa: BLE001 - only `unsupported` may stop nvdec
        assert getattr(exc, "reason", None) == "unsupported", exc
        return
    assert gpu.backend == "nvdec"
    np.testing.assert_allclose(gpu.times_s, cpu.times_s, atol=1e-6)
    # PyAV estimates ordinals after a seek in MKV/WebM (from the time and the rate); nvdec counts them
    assert np.abs(gpu.indices - cpu.indices).max() <= 1
    assert gpu.frames.shape == cpu.frames.shape and (gpu.width, gpu.height) == (cpu.width, cpu.height)
    assert np.abs(gpu.frames.astype(int) - cpu.frames.astype(int)).mean() < 8


def test_archive_texture_is_within_a_few_grey_levels(tmp_path):
    """Moving texture (bench/archive_video.py): NVDEC's YUV->RGB and torch's antialiased scaling
    against swscale's, at 384 px from 640x360."""
    from archive_video import write_archive_video

    path = write_archive_video(tmp_path / "texture.mp4", 4, width=640, height=360, keyframe_s=2)
    cfg = DecodeConfig(frame_size=384, num_frames=16, backend="nvdec", num_gpus=0.1)
    gpu, cpu = decode_video(path, cfg), decode_video(path, cfg, backend="pyav")
    np.testing.assert_allclose(gpu.times_s, cpu.times_s, atol=1e-6)
    diff = np.abs(gpu.frames.astype(int) - cpu.frames.astype(int))
    print(f"texture: mean |nvdec - pyav| {diff.mean():.2f} grey levels, 99th percentile {np.percentile(diff, 99):.0f}")
    assert diff.mean() < 6


def test_stage_decodes_in_isolated_children_on_the_gpu(clips):
    stage = DecodeStage(DecodeConfig(frame_size=S, num_frames=8, backend="nvdec", num_gpus=0.1), None)
    row = stage.decode_row({Col.VIDEO_URI: str(clips["bframes.mp4"])})
    assert row[Col.STATUS] == STATUS_OK, row[Col.ERROR_DETAIL]
    assert row[Col.DECODE_BACKEND] == "nvdec" and row[Col.FRAMES].shape == (8, S, S, 3)
    # MPEG-4 part 2 is left to the CPU
    row = stage.decode_row({Col.VIDEO_URI: str(DEMO_VIDEOS / "mpeg4_mp3.avi")})
    assert row[Col.STATUS] == STATUS_OK and row[Col.DECODE_BACKEND] == "pyav"


def test_pipeline_with_gpu_decoding_records_the_backend(tmp_path, tiny_model_dir):
    """Ray gives the decode tasks a GPU share beside the CLIP and Video-LLM actors."""
    for module in ("ray", "open_clip", "pydantic", "yaml"):
        pytest.importorskip(module)
    import ray

    from pipeline.config import parse_job_config
    from pipeline.run.runner import run_job
    from pipeline.store.output_store import OutputStore

    for name in ("kinetics_armwrestling.mp4", "pancake_h264_opus.mkv", "mpeg4_mp3.avi"):
        shutil.copy(DEMO_VIDEOS / name, tmp_path / name)
    cfg = parse_job_config({
        "run_id": "nvdec", "input": {"videos": str(tmp_path / "*.*")}, "questions": {"prompts": ["What happens?"]},
        "decode": {"num_frames": 16, "frame_size": 64, "num_cpus": 0.5, "timeout_s": 120, "backend": "nvdec",
                   "num_gpus": 0.05},
        "guidance": {"model": tiny_model_dir["clip"], "pretrained": None, "frames_per_question": 8,
                     "num_gpus": 0.2, "num_cpus": 0.5, "memory_gib": 1},
        "answer": {"model": tiny_model_dir["llava"], "max_new_tokens": 4, "num_cpus": 0.5, "num_gpus": 0.7,
                   "moref": {"temporal_units": 4, "references": 2}},
        "output": {"path": str(tmp_path / "out")}, "ray": {"num_cpus": 4},
    })
    try:
        summary = run_job(cfg)
    finally:
        ray.shutdown()
    assert (summary.status, summary.ok, summary.errors) == ("complete", 3, 0)
    backends = {r["video_id"]: r["decode_backend"] for r in OutputStore(cfg.output).read_answers().to_pylist()}
    assert backends == {"kinetics_armwrestling.mp4": "nvdec", "pancake_h264_opus.mkv": "nvdec",
                        "mpeg4_mp3.avi": "pyav"}
