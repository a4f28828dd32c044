"""The job's stages, in order, as `StageSpec`s: what each runs, reads, writes and asks Ray for.

decode (CPU tasks) -> guidance (CLIP actors; they also stage the frames table) -> answer
(Video-LLM actors) -> answers rows (tasks), which the driver commits in files of many videos.
With `guidance.placement: answer_actor` guidance and answer are one actor stage. The runner
(the only module that drives Ray) builds the pipeline from this list; `stage_contract.check_chain` checks it first.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from pipeline.config import AnswerConfig, GuidanceConfig, JobConfig, OutputConfig
from pipeline.run.resources import StageRequest
from pipeline.run.stage_contract import StageSpec
from pipeline.schema import Col
from pipeline.stages.answer import AnswerStage
from pipeline.stages.decode import DecodeStage
from pipeline.stages.guidance import GuidanceStage
from pipeline.stages.output_rows import AnswersRows, FramesWriter


class GuideThenWriteFrames:
    """The guidance actor: several videos per call (`guidance.videos_per_batch`), so the image
    tower runs over all their frames in large batches; it also writes each video's frames table.
    As a stage of its own the writer would start worker processes that import torch (for
    `frames_table`) only to write a Parquet file, and move every video's embeddings once more."""

    reads: ClassVar[Mapping[str, str]] = GuidanceStage.reads
    keeps_input_columns = True
    # FRAME_EMBEDDINGS is written to frames/ and dropped
    writes: ClassVar[Sequence[str]] = tuple(c for c in GuidanceStage.writes if c != Col.FRAME_EMBEDDINGS)

    def __init__(self, cfg: GuidanceConfig, output: OutputConfig):
        self.guide = GuidanceStage(cfg)
        self.frames = FramesWriter(output)

    def __call__(self, rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        return self.frames(self.guide(rows))


class GuideThenAnswer:
    """`guidance.placement: answer_actor`: one actor per GPU runs CLIP and the Video-LLM. CLIP
    takes the answer stage's device lock, so it never competes with the Video-LLM for the GPU;
    with several videos in flight one video's CLIP pass waits while another is answered."""

    reads: ClassVar[Mapping[str, str]] = {
        **GuidanceStage.reads,
        **{c: why for c, why in AnswerStage.reads.items() if c not in GuidanceStage.writes},
    }
    keeps_input_columns = False
    writes: ClassVar[Sequence[str]] = AnswerStage.writes

    def __init__(self, guidance: GuidanceConfig, output: OutputConfig, answer: AnswerConfig, run_id: str):
        self.answer = AnswerStage(answer, run_id)
        self.guide = GuidanceStage(guidance)
        self.frames = FramesWriter(output)

    def __call__(self, rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        with self.answer.device_lock:
            guided = self.guide(rows)
        return self.answer(self.frames(guided))


def job_stages(cfg: JobConfig, run_id: str, requests: dict[str, StageRequest]) -> list[StageSpec]:
    """The stages of `cfg`'s job with the resources in `requests` (pipeline.run.resources.stage_requests)."""
    in_flight = cfg.answer.videos_in_flight
    decode = StageSpec("decode", DecodeStage, {"cfg": cfg.decode, "storage": cfg.input.storage}, requests["decode"])
    # answers rows stream to the driver, whose OutputCommitter writes them in files of many videos
    sink = StageSpec("answers_rows", AnswersRows, {}, requests["sink"], batch_size=None, batch_format="pyarrow")
    if cfg.guidance.placement == "answer_actor":
        answer = StageSpec("guidance_and_answer", GuideThenAnswer,
                           {"guidance": cfg.guidance, "output": cfg.output, "answer": cfg.answer, "run_id": run_id},
                           requests["answer"], concurrent_calls=in_flight)
        return [decode, answer, sink]
    guidance = StageSpec("guidance", GuideThenWriteFrames, {"cfg": cfg.guidance, "output": cfg.output},
                         requests["guidance"], batch_size=cfg.guidance.videos_per_batch)
    answer = StageSpec("answer", AnswerStage, {"cfg": cfg.answer, "run_id": run_id}, requests["answer"],
                       concurrent_calls=in_flight)
    return [decode, guidance, answer, sink]
