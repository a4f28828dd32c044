"""The job's stages, in order, as `StageSpec`s: what each runs, reads, writes and asks Ray for.

decode (CPU tasks) -> guidance (CLIP actors; they also stage the frames table) -> answer
(Video-LLM actors) -> answers rows (tasks), which the driver commits in files of many videos.
With `guidance.placement: answer_actor` guidance and answer are one actor stage. The runner
(the only module that drives Ray) builds the pipeline from this list; `stage_contract.check_chain` checks it first.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any, ClassVar

from pipeline.config import AnswerConfig, GuidanceConfig, JobConfig, OutputConfig
from pipeline.fingerprint import config_fingerprint
from pipeline.run.resources import (
    SINK_REQUEST,
    ClusterGPUs,
    StageRequest,
    answer_request,
    decode_request,
    guidance_request,
)
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

    def __init__(self, guidance: GuidanceConfig, output: OutputConfig, answer: AnswerConfig, run_id: str,
                 config_fingerprint: str | None = None):
        self.answer = AnswerStage(answer, run_id, config_fingerprint)
        self.guide = GuidanceStage(guidance)
        self.frames = FramesWriter(output)

    def __call__(self, rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        with self.answer.device_lock:
            guided = self.guide(rows)
        return self.answer(self.frames(guided))


def job_stages(cfg: JobConfig, run_id: str, gpus: ClusterGPUs) -> list[StageSpec]:
    """The stages of `cfg`'s job, each with its typed config bound and the resources it asks for,
    built from its own config section. `guidance.placement` is decided here and nowhere else."""
    fingerprint = config_fingerprint(cfg)  # the answer stage stamps every row with its pair's (resume compares)
    decode = StageSpec("decode", partial(DecodeStage, cfg.decode, storage=cfg.input.storage),
                       decode_request(cfg.decode, gpus))
    # answers rows stream to the driver, whose OutputCommitter writes them in files of many videos
    sink = StageSpec("answers_rows", partial(AnswersRows), SINK_REQUEST, batch_size=None, batch_format="pyarrow")
    in_flight = cfg.answer.videos_in_flight
    if cfg.guidance.placement == "answer_actor":
        # CLIP lives in each Video-LLM actor: no CLIP actors, the whole GPU share goes to the answer actors
        answer = StageSpec("guidance_and_answer",
                           partial(GuideThenAnswer, cfg.guidance, cfg.output, cfg.answer, run_id, fingerprint),
                           answer_request(cfg.answer, gpus, clip_inside=cfg.guidance), concurrent_calls=in_flight)
        return [decode, answer, sink]
    clip = guidance_request(cfg.guidance, gpus)
    guidance = StageSpec("guidance", partial(GuideThenWriteFrames, cfg.guidance, cfg.output), clip,
                         batch_size=cfg.guidance.videos_per_batch)
    answer = StageSpec("answer", partial(AnswerStage, cfg.answer, run_id, fingerprint),
                       answer_request(cfg.answer, gpus, beside=clip), concurrent_calls=in_flight)
    return [decode, guidance, answer, sink]


def stage_requests(cfg: JobConfig, gpus: ClusterGPUs) -> dict[str, StageRequest]:
    """Each stage's request by the name of the resource user (decode, guidance, answer, sink), as
    the placement check and the resource log see them."""
    return {spec.request.stage: spec.request for spec in job_stages(cfg, "placement-check", gpus)}
