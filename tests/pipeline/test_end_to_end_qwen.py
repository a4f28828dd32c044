"""The whole job with each tiny Qwen family (Qwen2.5-VL, Qwen3-VL; picked from its config.json):
prompt-guided frames, RoI, Free-MoRef over temporal patches; rows, stats and a resuming rerun."""

import json
import shutil

import pytest

from pipeline.config import parse_job_config
from pipeline.run.runner import run_job
from pipeline.store.output_store import OutputStore
from tests.paths import DEMO_VIDEOS

pytestmark = pytest.mark.slow

VIDEO = "kinetics_armwrestling.mp4"
NUM_FRAMES = 8


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_qwen_run_then_rerun_resumes(tmp_path, tiny_model_dir, ray_local, family):
    shutil.copy(DEMO_VIDEOS / VIDEO, tmp_path / VIDEO)
    (tmp_path / "questions.jsonl").write_text("\n".join(
        json.dumps({"video_id": VIDEO, "question_id": qid, "question": text})
        for qid, text in [("q-who", "Who is in the video?"), ("q-what", "What happens at the end?")]))
    cfg = parse_job_config({
        "run_id": "qwen",
        "input": {"videos": f"{tmp_path}/*.mp4"},
        "questions": {"file": str(tmp_path / "questions.jsonl")},
        "decode": {"num_frames": NUM_FRAMES, "frame_size": 64, "num_cpus": 0.5, "timeout_s": 120},
        "guidance": {"model": tiny_model_dir["clip"], "pretrained": None, "frames_per_question": 6,
                     "num_cpus": 0.25, "num_gpus": 0, "selection": "prompt", "roi_ratio": 0.5},
        "answer": {"model": tiny_model_dir[family], "max_new_tokens": 4, "num_cpus": 0.5, "num_gpus": 0,
                   "moref": {"enabled": True, "temporal_units": 4, "references": 2}},
        "output": {"path": str(tmp_path / "out")},
    })
    summary = run_job(cfg)
    assert (summary.processed, summary.ok, summary.errors) == (2, 2, 0)
    rows = OutputStore(cfg.output).read_answers().to_pylist()
    assert sorted(r["question_id"] for r in rows) == ["q-what", "q-who"]
    for r in rows:
        assert r["status"] == "ok" and r["model"] == f"tiny-{family}" and len(r["frame_indices"]) == 6
        assert r["references"] == 2 and r["roi_box"] is not None
        assert 0 < r["visual_tokens_used"] < r["visual_tokens_native"] < r["prompt_tokens"]
        assert 0 < r["total_flops"] < r["total_flops_native"] and 1 <= r["output_tokens"] <= 4
    again = run_job(cfg)
    assert (again.skipped_done, again.processed) == (2, 0)
    assert len(OutputStore(cfg.output).read_answers()) == 2


def test_video_fusion_scope_on_qwen_fails_before_any_work(tmp_path, tiny_model_dir):
    """Video scope shares a fused prefix with 1-D positions: on a Qwen checkpoint the job stops
    before any work, naming the key."""
    from pipeline.config import ConfigError
    from pipeline.run.preflight import check_before_work

    cfg = parse_job_config({
        "input": {"videos": f"{tmp_path}/*.mp4"}, "questions": {"prompts": ["Describe it."]},
        "answer": {"model": tiny_model_dir["qwen2_5_vl"], "moref": {"fusion_scope": "video"}},
        "guidance": {"model": tiny_model_dir["clip"], "pretrained": None},
        "output": {"path": str(tmp_path / "out")},
    })
    with pytest.raises(ConfigError, match=r"^answer\.moref\.fusion_scope: 'video' runs on LlavaOnevision .* is "
                                          r"qwen2_5_vl"):
        check_before_work(cfg, local=True)
    llava = cfg.model_copy(update={"answer": cfg.answer.model_copy(update={"model": tiny_model_dir["llava"]})})
    check_before_work(llava, local=True)
