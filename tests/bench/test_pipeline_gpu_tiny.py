"""The pipeline GPU benchmark's CPU self-check (`--tiny`): the same model builder, video writer,
job config, pipeline run and report as on the GPU, with tiny shapes, so it never rots unnoticed."""

import json
import subprocess
import sys

import pytest

from tests.paths import REPO

pytestmark = pytest.mark.slow


def test_pipeline_gpu_tiny_archive_set_in_video_scope_with_a_variant(tmp_path):
    """A small 1080p archive case (2 s videos) in video fusion scope, under a named variant and a
    decode-core budget: the case row names its variant, overrides, scope, video shape and decode
    cost; the answers rows carry the scope (question scope: the Qwen case below)."""
    out, work = tmp_path / "out", tmp_path / "work"
    subprocess.run([sys.executable, str(REPO / "bench" / "pipeline_gpu.py"), "--tiny", "--videos", "2",
                    "--frames", "8", "--video-sets", "1080p-1min", "--fusion-scope", "video",
                    "--variant", "clip_in_vlm:guidance.placement=answer_actor",
                    "--decode-cores", "2", "--budget-s", "900", "--work", str(work), "--out", str(out)],
                   check=True, capture_output=True, timeout=1200)  # a loose budget: a loaded CI box never stops a case
    (report,) = out.glob("pipeline_gpu_cpu_*.json")
    cases = json.loads(report.read_text())["cases"]
    assert [c["fusion_scope"] for c in cases] == ["video"]
    for case in cases:
        assert case["variant"] == "clip_in_vlm" and case["set"][-1] == "guidance.placement=answer_actor"
        assert case["status"] == "ok" and case["errors_by_reason"] == {}
        assert (case["gpus"], case["frames"], case["questions_per_video"]) == (0, 8, 5)
        assert (case["videos"], case["pairs"], case["ok_pairs"]) == (2, 10, 10)
        assert case["fusion_scopes_recorded"] == [case["fusion_scope"]]  # the answers rows carry it
        assert (case["video_set"], case["width"], case["height"], case["video_seconds"]) == ("1080p-1min", 1920,
                                                                                           1080, 2)
        assert case["decode_cores_per_gpu"] == 2 and case["decode_cpu_s_per_video"] > 0
        assert case["videos_by_decode_backend"] == {"pyav": 2} and case["nvdec_s_per_video"] is None
        assert case["median_frames_decoded"] == 8
        assert case["decode_cores_needed_per_gpu"] > 0
        assert case["videos_per_gpu_hour"] > 0 and case["questions_per_gpu_hour"] == pytest.approx(
            5 * case["videos_per_gpu_hour"])
        assert case["end_to_end_videos_per_gpu_hour"] > 0
        assert case["end_to_end_questions_per_gpu_hour"] == pytest.approx(5 * case["end_to_end_videos_per_gpu_hour"])
        for stage in ("decode", "guidance", "prefill", "generate"):
            assert case[f"median_{stage}_s"] > 0
        assert case["median_output_tokens"] == 4  # EOS can never win: every answer runs to max_new_tokens
    (video, *_) = sorted((work / "tiny" / "videos" / "1080p-1min").glob("*.mp4"))
    import av

    with av.open(str(video)) as container:
        stream = container.streams.video[0]
        assert (stream.width, stream.height, stream.codec_context.name) == (1920, 1080, "h264")
    markdown = report.with_suffix(".md").read_text()
    assert markdown.startswith("Pipeline benchmark on cpu")
    assert "| 1080p-1min (1920x1080, 2 s) | video |" in markdown and "| 0 | 8 (clip_in_vlm) | 8 |" in markdown


def test_pipeline_gpu_tiny_runs_a_qwen_family(tmp_path):
    """`--family`: the Qwen3-VL checkpoint builder (processor included) and a whole run, kept short,
    in question fusion scope (the default) on the 360p clips."""
    out = tmp_path / "out"
    subprocess.run([sys.executable, str(REPO / "bench" / "pipeline_gpu.py"), "--tiny", "--family", "qwen3_vl",
                    "--videos", "2", "--frames", "8", "--work", str(tmp_path / "work"), "--out", str(out)],
                   check=True, capture_output=True, timeout=600)
    (report,) = out.glob("pipeline_gpu_cpu_*.json")
    result = json.loads(report.read_text())
    (case,) = result["cases"]
    assert result["family"] == "qwen3_vl" and case["status"] == "ok" and case["errors_by_reason"] == {}
    assert case["fusion_scope"] == "question" and case["fusion_scopes_recorded"] == ["question"]
    assert (case["video_set"], case["width"], case["height"]) == ("360p", 96, 64)
    assert (case["videos"], case["pairs"], case["ok_pairs"]) == (2, 10, 10)
    assert json.loads((tmp_path / "work" / "tiny" / "models" / "qwen3_vl-random" / "config.json").read_text())[
        "architectures"] == ["Qwen3VLForConditionalGeneration"]
