"""`moref-index plan`: what a run would do, with nothing run or written: pairs pending, skipped as
done and redone because they changed, the models as resolved, the resource check, and the estimate
from the last recorded run. Real videos, a local Ray, the tiny models."""

from __future__ import annotations

import shutil

import pytest

from pipeline.config import parse_job_config
from pipeline.run.preview import preview_job
from pipeline.run.runner import run_job
from tests.paths import DEMO_VIDEOS

pytestmark = pytest.mark.slow

VIDEOS = ["kinetics_armwrestling.mp4", "pancake_h264_opus.mkv"]


def _job(root, tiny, caption="Describe it.", **answer):
    return parse_job_config({
        "input": {"videos": str(root / "videos" / "*")},
        "questions": {"prompts": [{"question_id": "caption", "question": caption},
                                  {"question_id": "who", "question": "Who is there?"}]},
        "decode": {"num_frames": 4, "frame_size": 64, "num_cpus": 0.5, "timeout_s": 120},
        "guidance": {"model": tiny["clip"], "pretrained": None, "frames_per_question": 4, "num_cpus": 0.25,
                     "num_gpus": 0},
        "answer": {"model": tiny["llava"], "max_new_tokens": 3, "num_cpus": 0.5, "num_gpus": 0, **answer},
        "output": {"path": str(root / "out")},
    })


def test_plan_counts_pending_done_and_changed_pairs_without_writing(tmp_path, tiny_model_dir, ray_local):
    (tmp_path / "videos").mkdir()
    for name in VIDEOS:
        shutil.copy(DEMO_VIDEOS / name, tmp_path / "videos" / name)
    fresh = preview_job(_job(tmp_path, tiny_model_dir))
    assert (fresh.videos, fresh.pairs, fresh.pending_pairs, fresh.skipped_done) == (2, 4, 4, 0)
    assert fresh.placeable and fresh.estimate == "no earlier run to take a throughput from"
    assert not (tmp_path / "out").exists()  # a plan writes nothing, not even the output folder
    assert fresh.models[0].resolved == f"local folder {tiny_model_dir['llava']} (llava_onevision)"
    assert "frames: 4 decoded per video, 4 per question" in fresh.render()

    run_job(_job(tmp_path, tiny_model_dir))
    done = preview_job(_job(tmp_path, tiny_model_dir))
    assert (done.pending_pairs, done.skipped_done, done.changed_pairs) == (0, 4, 0)
    assert done.estimate == "nothing to do"
    changed = preview_job(_job(tmp_path, tiny_model_dir, caption="Describe it in one word."))
    assert (changed.pending_pairs, changed.changed_pairs, changed.skipped_done) == (2, 2, 2)
    assert "pairs/s: on CPUs" in changed.estimate  # from the run just recorded
    runs_before = sorted(p.name for p in (tmp_path / "out" / "runs").iterdir())
    assert sorted(p.name for p in (tmp_path / "out" / "runs").iterdir()) == runs_before

    too_big = preview_job(_job(tmp_path, tiny_model_dir, num_cpus=64))
    assert not too_big.placeable and too_big.resources[0].startswith("answer: ")
    assert "CANNOT BE PLACED" in too_big.render()
