"""Resume notices change: a pair whose row was produced by another question text, model or frame
setting is asked again, and its new row replaces the old one (one row per pair); a setting that
does not change answers redoes nothing; `output.redo_changed: false` keeps the old rows.

Real videos, a local Ray, the tiny models (a second Video-LLM built with another seed).
"""

from __future__ import annotations

import shutil

import pytest

from freemoref.tiny import build_tiny_llava_onevision
from pipeline.config import parse_job_config
from pipeline.run.runner import run_job
from pipeline.store.output_store import OutputStore
from tests.paths import DEMO_VIDEOS

pytestmark = pytest.mark.slow

VIDEOS = ["kinetics_armwrestling.mp4", "pancake_h264_opus.mkv"]


def _job(root, tiny, run_id, caption="Describe it.", model=None, num_frames=4, **output):
    return parse_job_config({
        "run_id": run_id,
        "input": {"videos": str(root / "videos" / "*")},
        "questions": {"prompts": [{"question_id": "caption", "question": caption},
                                  {"question_id": "who", "question": "Who is there?"}]},
        "decode": {"num_frames": num_frames, "frame_size": 64, "num_cpus": 0.5, "timeout_s": 120},
        "guidance": {"model": tiny["clip"], "pretrained": None, "frames_per_question": 4, "num_cpus": 0.25,
                     "num_gpus": 0},
        "answer": {"model": model or tiny["llava"], "max_new_tokens": 3, "num_cpus": 0.5, "num_gpus": 0},
        "output": {"path": str(root / "out"), "max_videos_per_file": 1, **output},
    })


def _rows(root, tiny) -> dict[tuple[str, str], dict]:
    rows = OutputStore(_job(root, tiny, "read").output).read_answers().to_pylist()
    pairs = [(r["video_id"], r["question_id"]) for r in rows]
    assert len(pairs) == len(set(pairs)) == 4  # one row per pair, always
    return dict(zip(pairs, rows))


def _redone(before: dict, after: dict) -> set[tuple[str, str]]:
    return {pair for pair in after if after[pair]["run_id"] != before[pair]["run_id"]}


def test_changed_question_model_and_frames_redo_exactly_their_pairs(tmp_path, tiny_model_dir, ray_local):
    (tmp_path / "videos").mkdir()
    for name in VIDEOS:
        shutil.copy(DEMO_VIDEOS / name, tmp_path / "videos" / name)
    first = run_job(_job(tmp_path, tiny_model_dir, "first"))
    assert (first.ok, first.changed) == (4, 0)
    rows = _rows(tmp_path, tiny_model_dir)
    # the question is in a row's fingerprint (the video is the row's key, not in it)
    assert {q: len({r["fingerprint"] for (_, qid), r in rows.items() if qid == q}) for q in ("caption", "who")} \
        == {"caption": 1, "who": 1}
    assert rows[(VIDEOS[0], "caption")]["fingerprint"] != rows[(VIDEOS[0], "who")]["fingerprint"]

    # the same job, and a change that does not alter answers: nothing to do
    same = run_job(_job(tmp_path, tiny_model_dir, "same", target_file_mb=64))
    assert (same.skipped_done, same.changed, same.processed) == (4, 0, 0)

    # a reworded question: its two pairs, and only those
    reworded = run_job(_job(tmp_path, tiny_model_dir, "reworded", caption="Describe it in one line."))
    assert (reworded.changed, reworded.processed, reworded.skipped_done) == (2, 2, 2)
    assert "redone (changed since written): 2" in reworded.render()  # what `moref-index run` prints
    after = _rows(tmp_path, tiny_model_dir)
    assert _redone(rows, after) == {(v, "caption") for v in VIDEOS}
    assert {after[(v, "caption")]["question"] for v in VIDEOS} == {"Describe it in one line."}
    rows = after

    # kept as written when asked to
    kept = run_job(_job(tmp_path, tiny_model_dir, "kept", caption="Caption it.", redo_changed=False))
    assert (kept.changed, kept.processed, kept.skipped_done) == (0, 0, 4)
    assert _redone(rows, _rows(tmp_path, tiny_model_dir)) == set()

    # another model (the same architecture, other weights): every pair
    other = build_tiny_llava_onevision(tmp_path / "other-llava", seed=1)
    changed_model = run_job(_job(tmp_path, tiny_model_dir, "model", caption="Describe it in one line.", model=other))
    assert (changed_model.changed, changed_model.processed) == (4, 4)
    after = _rows(tmp_path, tiny_model_dir)
    assert _redone(rows, after) == set(after) and {r["model"] for r in after.values()} == {"other-llava"}
    rows = after

    # more frames: every pair
    frames = run_job(_job(tmp_path, tiny_model_dir, "frames", caption="Describe it in one line.", model=other,
                          num_frames=6))
    assert (frames.changed, frames.processed) == (4, 4)
    after = _rows(tmp_path, tiny_model_dir)
    assert _redone(rows, after) == set(after) and {r["frames_decoded"] for r in after.values()} == {6}
