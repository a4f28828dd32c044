"""The answer stage without Ray: one row per question, frames chosen per question, errors as rows."""

import numpy as np

from freemoref.config import GenerationOptions, MoRefConfig
from pipeline.config import AnswerConfig
from pipeline.run.runner import plan_work
from pipeline.schema import ANSWER_COLUMNS, Col
from pipeline.stages.answer import AnswerStage
from pipeline.store.output_store import OutputStore


def _video(frames, selected, status="ok", reason=None, detail=None):
    t = len(frames)
    return {
        Col.VIDEO_ID: "v", Col.VIDEO_URI: "/v.mp4", Col.QUESTION_IDS: ["q0", "q1"],
        Col.QUESTIONS: ["Who?", "Where?"], Col.STATUS: status, Col.ERROR_REASON: reason,
        Col.ERROR_DETAIL: detail, Col.FRAMES: frames,
        Col.FRAME_TIMES_S: np.arange(t) * 0.5, Col.FRAME_INDICES: np.arange(t) * 15,
        Col.SELECTED_POSITIONS: np.asarray(selected), Col.DECODE_S: 0.1, Col.GUIDANCE_S: 0.2,
    }


def test_each_question_sees_its_own_frames(tiny_model_dir):
    cfg = AnswerConfig(model=tiny_model_dir["llava"], max_new_tokens=4, moref=MoRefConfig(enabled=False))
    stage = AnswerStage(cfg, run_id="r")
    frames = np.random.default_rng(0).integers(0, 256, size=(6, 32, 32, 3), dtype=np.uint8)
    rows = stage.answer_video(_video(frames, [[0, 2, 4], [3, 4, 5]]))
    assert [r["question_id"] for r in rows] == ["q0", "q1"] and set(rows[0]) == set(ANSWER_COLUMNS)
    assert rows[1]["frame_times_s"] == [1.5, 2.0, 2.5] and rows[1]["frame_indices"] == [45, 60, 75]
    # the same answer as encoding just that question's frames directly
    llm = stage.llm
    direct = llm.answer(llm.encode_frames(frames[[3, 4, 5]]), "Where?", system_prompt=cfg.system_prompt,
                        generation=GenerationOptions(max_new_tokens=4))
    assert rows[1]["answer"] == direct.text and rows[1]["status"] == "ok"
    assert rows[0]["frames_decoded"] == 6 and rows[0]["decode_s"] == 0.1
    assert rows[0]["fusion_scope"] is None and rows[0]["fusion_layer"] is None  # no MoRef, nothing fused


def test_questions_with_the_same_frames_share_the_prefill(tiny_model_dir):
    cfg = AnswerConfig(model=tiny_model_dir["llava"], max_new_tokens=4,
                       moref=MoRefConfig(temporal_units=2, references=2))
    stage = AnswerStage(cfg, run_id="r")
    frames = np.random.default_rng(0).integers(0, 256, size=(6, 32, 32, 3), dtype=np.uint8)
    shared = stage.answer_video(_video(frames, [[1, 2, 3, 5], [1, 2, 3, 5]]))
    apart = stage.answer_video(_video(frames, [[1, 2, 3, 5], [0, 2, 3, 5]]))
    assert [r["prefix_shared_with"] for r in shared] == [2, 2] and [r["prefix_shared_with"] for r in apart] == [1, 1]
    assert all(r["status"] == "ok" and r["references"] == 2 for r in shared + apart)
    llm = stage.llm
    for row, question in zip(shared, ["Who?", "Where?"]):  # each answer equals its question alone
        alone = llm.answer(llm.encode_frames(frames[[1, 2, 3, 5]]), question, system_prompt=cfg.system_prompt,
                           generation=stage.generation, moref=stage.moref)
        assert row["answer"] == alone.text and row["output_tokens"] == alone.output_tokens
    assert shared[0]["answer"] == apart[0]["answer"]


def test_answers_rows_carry_the_fusion_scope(tiny_model_dir):
    """Both scopes through the stage: each row names its scope, and video scope's rows count the
    shared fused prefix once for the two questions (less than question scope, the same native)."""
    frames = np.random.default_rng(0).integers(0, 256, size=(6, 32, 32, 3), dtype=np.uint8)
    rows = {}
    for scope in ("question", "video"):
        cfg = AnswerConfig(model=tiny_model_dir["llava"], max_new_tokens=4,
                           moref=MoRefConfig(temporal_units=2, references=2, fusion_scope=scope))
        rows[scope] = AnswerStage(cfg, run_id="r").answer_video(_video(frames, [[1, 2, 3, 5], [1, 2, 3, 5]]))
    for scope, answered in rows.items():
        assert [(r["status"], r["fusion_scope"], r["prefix_shared_with"]) for r in answered] == [("ok", scope, 2)] * 2
        assert all(r["fusion_layer"] is not None and r["fusion_layer"] < 4 for r in answered)  # of 4: fused
    for q, v in zip(rows["question"], rows["video"]):
        assert v["total_flops"] < q["total_flops"] and v["total_flops_native"] == q["total_flops_native"]
        assert v["visual_tokens_used"] == q["visual_tokens_used"]  # the same budget of kept tokens


def test_upstream_errors_become_one_row_per_question(tiny_model_dir):
    stage = AnswerStage(AnswerConfig(model=tiny_model_dir["llava"]), run_id="r")
    empty = np.zeros((0, 32, 32, 3), np.uint8)
    rows = stage.answer_video(_video(empty, np.zeros((2, 0), np.int64), status="error", reason="truncated",
                                     detail="cut"))
    assert [(r[Col.STATUS], r[Col.ERROR_REASON], r[Col.ERROR_DETAIL], r["answer"]) for r in rows] == [
        ("error", "truncated", "cut", None)] * 2
    # a failed row that arrives without a reason still gets one
    rows = stage.answer_video(_video(empty, np.zeros((2, 0), np.int64), status="error"))
    assert [(r[Col.ERROR_REASON], r[Col.ERROR_DETAIL]) for r in rows] == [
        ("failed_before_answer", "failed before the answer stage")] * 2


def test_questions_for_unlisted_videos_are_counted(tmp_path, ray_local):
    from pipeline.config import parse_job_config

    (tmp_path / "a.mp4").write_bytes(b"x")
    (tmp_path / "q.jsonl").write_text('{"video_id": "a.mp4", "question_id": "1", "question": "?"}\n'
                                      '{"video_id": "gone.mp4", "question_id": "1", "question": "?"}\n')
    cfg = parse_job_config({"input": {"videos": f"{tmp_path}/*.mp4"}, "questions": {"file": str(tmp_path / "q.jsonl")},
                            "output": {"path": str(tmp_path / "out")}})
    plan, summary = plan_work(cfg, OutputStore(cfg.output))
    assert len(plan.rows()) == 1 and summary.inputs == 1 and summary.unmatched_questions == 1
    assert "questions naming no listed video (not run): 1" in summary.render()


def test_prompt_template_comes_from_the_config(tiny_model_dir):
    stage = AnswerStage(AnswerConfig(model=tiny_model_dir["llava"], prompt_template="hf"), run_id="r")
    prefix, _ = stage.llm.build_prompt("Who?", stage.cfg.system_prompt)
    assert stage.llm.tokenizer.decode(prefix) == "<|im_start|>user\n"  # hf: no system turn by default
