"""A short whole-pipeline run on the GPU: a few real videos, tiny models, a real local Ray; CLIP in
half precision on the GPU beside the Video-LLM. Needs ray, av, open_clip, pydantic and yaml, which
the GPU image lacks: they come from the carried tarball (bench/pipeline_gpu.sh). Without them, or
without CUDA, the test is skipped."""

import shutil

import numpy as np
import pytest

for _module in ("ray", "av", "open_clip", "pydantic", "yaml"):
    pytest.importorskip(_module, reason=f"{_module} is not installed (unpack .gpu/pkgs.tar.xz)")

from pipeline.config import parse_job_config
from pipeline.run.runner import run_job
from pipeline.store.output_store import OutputStore
from tests.paths import DEMO_VIDEOS

VIDEOS = ["kinetics_armwrestling.mp4", "pancake_h264_opus.mkv", "mpeg4_mp3.avi"]
QUESTIONS = ["What happens?", "Who is in the video and what are they doing at the very end of it?"]


@pytest.mark.parametrize("placement", ["separate", "answer_actor"])
def test_pipeline_on_gpu_answers_every_pair(tmp_path, tiny_model_dir, placement):
    """Two videos in flight per Video-LLM actor; CLIP as its own 0.2-GPU actor, or inside the
    Video-LLM actor (which then takes the whole GPU)."""
    import ray

    for name in VIDEOS:
        shutil.copy(DEMO_VIDEOS / name, tmp_path / name)
    (tmp_path / "broken.mp4").write_bytes(np.random.default_rng(0).bytes(4096))
    cfg = parse_job_config({
        "run_id": "gpu-test",
        "input": {"videos": str(tmp_path / "*.*")},
        "questions": {"prompts": QUESTIONS},
        "decode": {"num_frames": 16, "frame_size": 64, "num_cpus": 0.5, "timeout_s": 120},
        "guidance": {"model": tiny_model_dir["clip"], "pretrained": None, "frames_per_question": 16,
                     "num_gpus": 0.2, "num_cpus": 0.5, "memory_gib": 1, "videos_per_batch": 2, "roi_ratio": 0.8,
                     "placement": placement},
        "answer": {"model": tiny_model_dir["llava"], "max_new_tokens": 6, "num_cpus": 0.5,
                   "num_gpus": 0.8 if placement == "separate" else 1.0, "videos_in_flight": 2,
                   "concurrency": "auto", "moref": {"temporal_units": 8, "references": 2}},
        "output": {"path": str(tmp_path / "out")},
        "ray": {"num_cpus": 4},
    })
    try:
        summary = run_job(cfg)
    finally:
        ray.shutdown()
    pairs = (len(VIDEOS) + 1) * len(QUESTIONS)
    assert (summary.status, summary.inputs, summary.processed) == ("complete", pairs, pairs)
    assert (summary.ok, summary.errors) == (len(VIDEOS) * len(QUESTIONS), len(QUESTIONS))
    rows = OutputStore(cfg.output).read_answers().to_pylist()
    assert len({(r["video_id"], r["question_id"]) for r in rows}) == pairs
    for r in rows:
        if r["video_id"] == "broken.mp4":
            assert r["status"] == "error" and r["error_reason"] in ("not_a_video", "unreadable_container")
            continue
        assert r["status"] == "ok" and r["answer"] is not None and 1 <= r["output_tokens"] <= 6
        assert len(r["frame_indices"]) == 16 and len(r["roi_box"]) == 4
        assert r["references"] == 2 and r["prefill_s"] > 0 and r["guidance_s"] > 0
    frames = OutputStore(cfg.output).read_frames()
    assert frames.num_rows == 16 * len(VIDEOS)
    norms = np.linalg.norm(np.stack(frames.column("embedding").to_numpy(zero_copy_only=False)), axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-2)  # float16 CLIP on the GPU
