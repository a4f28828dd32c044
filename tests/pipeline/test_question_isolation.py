"""One question never sinks the other questions of its video.

An oversized question (200 KB of text) beside two normal ones on a real video, through the whole
job on a local Ray with the tiny models: two ok rows, one `question_too_long` row naming its token
count and the limit, and no model work for it (the two others share the video's prefill as a batch
of two; the oversized row has no timings). `retry_errors: true` never asks it again: the reason is
permanent. A question under the token limit whose prompt with the frames passes the model's
context is caught the same way, and a batch that runs out of memory is halved down to single
questions (the CPU allocator's real error).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from freemoref.config import MoRefConfig
from pipeline.config import AnswerConfig, parse_job_config
from pipeline.errors import ErrorReason
from pipeline.run.runner import run_job
from pipeline.stages.answer import AnswerStage
from pipeline.stages.question_isolation import answer_halving_on_oom
from pipeline.store.output_store import OutputStore
from tests.paths import DEMO_VIDEOS

VIDEO = "kinetics_armwrestling.mp4"
HUGE = "Describe every detail of this. " * 6600  # ~200 KB


def _job(root, tiny, **output):
    return parse_job_config({
        "run_id": "isolation",
        "input": {"videos": str(root / "*.mp4")},
        "questions": {"file": str(root / "questions.jsonl")},
        "decode": {"num_frames": 4, "frame_size": 64, "num_cpus": 0.5, "timeout_s": 120},
        "guidance": {"model": tiny["clip"], "pretrained": None, "frames_per_question": 4, "num_cpus": 0.25,
                     "num_gpus": 0},
        "answer": {"model": tiny["llava"], "max_new_tokens": 3, "num_cpus": 0.5, "num_gpus": 0,
                   "moref": {"enabled": False}},
        "output": {"path": str(root / "out"), **output},
    })


def test_an_oversized_question_is_its_own_error_row(tmp_path, tiny_model_dir, ray_local):
    shutil.copy(DEMO_VIDEOS / VIDEO, tmp_path / VIDEO)
    questions = [("q-who", "Who is in the video?"), ("q-huge", HUGE), ("q-what", "What happens?")]
    (tmp_path / "questions.jsonl").write_text("".join(
        json.dumps({"video_id": VIDEO, "question_id": q, "question": text}) + "\n" for q, text in questions))
    summary = run_job(_job(tmp_path, tiny_model_dir))
    assert (summary.ok, summary.errors, summary.errors_by_reason) == (2, 1, {"question_too_long": 1})
    rows = {r["question_id"]: r for r in OutputStore(_job(tmp_path, tiny_model_dir).output).read_answers().to_pylist()}
    assert [rows[q]["status"] for q in ("q-who", "q-huge", "q-what")] == ["ok", "error", "ok"]
    huge = rows["q-huge"]
    tokens = AnswerStage(AnswerConfig(model=tiny_model_dir["llava"]), "count").llm.text_tokens(huge["question"], None)
    assert huge["error_reason"] == "question_too_long"
    assert huge["error_detail"] == f"the question is {tokens[1]} tokens, over answer.max_question_tokens (4096)"
    # no model work for it: the two others were answered as one batch, and it has no timings
    assert rows["q-who"]["prefix_shared_with"] == rows["q-what"]["prefix_shared_with"] == 2
    assert huge["prefill_s"] is None and huge["generate_s"] is None and huge["answer"] is None

    again = run_job(_job(tmp_path, tiny_model_dir, retry_errors=True))
    assert (again.skipped_done, again.retried_errors, again.processed) == (3, 0, 0)
    assert not ErrorReason.QUESTION_TOO_LONG.transient


def test_a_prompt_over_the_context_is_too_long(tiny_model_dir):
    cfg = AnswerConfig(model=tiny_model_dir["llava"], max_new_tokens=4, max_question_tokens=100_000,
                       moref=MoRefConfig(enabled=False))
    stage = AnswerStage(cfg, run_id="r")
    long = "word " * stage.llm.context_tokens  # under max_question_tokens, over the context with the frames
    frames = np.random.default_rng(0).integers(0, 256, size=(4, 32, 32, 3), dtype=np.uint8)
    rows = stage.answer_video({
        "video_id": "v", "video_uri": "/v.mp4", "question_ids": ["short", "long"], "questions": ["Who?", long],
        "status": "ok", "frames": frames, "frame_times_s": np.arange(4) * 0.5, "frame_indices": np.arange(4),
        "selected_positions": np.asarray([[0, 1, 2, 3], [0, 1, 2, 3]]), "decode_s": 0.1, "guidance_s": 0.1})
    assert rows[0]["status"] == "ok" and rows[0]["prefix_shared_with"] == 1
    assert rows[1]["error_reason"] == "question_too_long"
    assert rows[1]["prompt_tokens"] > stage.llm.context_tokens
    assert rows[1]["error_detail"] == (
        f"the prompt is {rows[1]['prompt_tokens']} tokens in its longest reference (frames included), which with "
        f"answer.max_new_tokens (4) is over the model's context of {stage.llm.context_tokens} tokens")


def test_moref_references_let_a_video_longer_than_the_context_be_answered(tiny_model_dir):
    """The context bounds the longest sequence, one reference's frames with the text: a video whose
    frames alone pass the context is answered with MoRef, and is question_too_long without it."""
    frames = np.random.default_rng(0).integers(0, 256, size=(320, 32, 32, 3), dtype=np.uint8)
    video = {"video_id": "v", "video_uri": "/v.mp4", "question_ids": ["q"], "questions": ["Who?"], "status": "ok",
             "frames": frames, "frame_times_s": np.arange(320) * 0.1, "frame_indices": np.arange(320),
             "selected_positions": np.arange(320)[None], "decode_s": 0.1, "guidance_s": 0.1}
    rows = {}
    for name, moref in (("moref", MoRefConfig()), ("native", MoRefConfig(enabled=False))):
        stage = AnswerStage(AnswerConfig(model=tiny_model_dir["llava"], max_new_tokens=2, moref=moref), run_id="r")
        (rows[name],) = stage.answer_video(dict(video))
    context = stage.llm.context_tokens
    assert rows["moref"]["status"] == "ok" and rows["moref"]["references"] > 1
    assert rows["moref"]["prompt_tokens"] > context  # the whole prompt passes the context; each reference fits
    assert rows["native"]["error_reason"] == "question_too_long" and rows["native"]["prompt_tokens"] > context


def test_a_batch_out_of_memory_is_halved_down_to_single_questions():
    """Each call allocates (its questions - 1) x 10 TB on the CPU: a real allocator failure for any
    batch of two or more, nothing for a single question; question 3 fails alone as well."""
    calls = []

    def answer(batch):
        calls.append(list(batch))
        torch.empty((len(batch) - 1) * 10**13 + (10**13 if 3 in batch else 0), dtype=torch.uint8)
        return [f"answer {q}" for q in batch]

    results, failed = answer_halving_on_oom(answer, [0, 1, 2, 3, 4])
    assert results == {q: f"answer {q}" for q in (0, 1, 2, 4)}
    assert list(failed) == [3] and "can't allocate memory" in str(failed[3])
    # halves of what failed, until one question: never a single question twice
    assert calls == [[0, 1, 2, 3, 4], [0, 1], [0], [1], [2, 3, 4], [2], [3, 4], [3], [4]]

    with pytest.raises(ValueError, match="not memory"):  # any other error is the batch's, not split
        answer_halving_on_oom(lambda batch: (_ for _ in ()).throw(ValueError("not memory")), [0, 1])
