"""The stage contract: the job's stage lists check out for both CLIP placements, a chain whose
stage reads a column nobody wrote fails naming the stage and the column, and stages write the
columns they declare."""

import dataclasses
import shutil
from functools import partial

import pytest

from pipeline.config import DecodeConfig, parse_job_config
from pipeline.run.job_stages import job_stages
from pipeline.run.resources import ClusterGPUs
from pipeline.run.stage_contract import StageContractError, StageSpec, check_chain
from pipeline.schema import ANSWER_COLUMNS, SOURCE_COLUMNS, Col
from pipeline.stages.decode import DecodeStage
from tests.paths import DEMO_VIDEOS


def specs(tmp_path, placement="separate"):
    cfg = parse_job_config({"input": {"videos": str(tmp_path / "*.mp4")}, "questions": {"prompts": ["Describe it."]},
                            "guidance": {"placement": placement}, "output": {"path": str(tmp_path / "out")}})
    return cfg, job_stages(cfg, "r", ClusterGPUs(usable=False, total=0))


@pytest.mark.parametrize("placement", ["separate", "answer_actor"])
def test_the_job_stages_chain_up(tmp_path, placement):
    cfg, chain = specs(tmp_path, placement)
    check_chain(SOURCE_COLUMNS, chain)
    names = [s.name for s in chain]
    assert names == (["decode", "guidance", "answer", "answers_rows"] if placement == "separate"
                     else ["decode", "guidance_and_answer", "answers_rows"])
    answer = chain[-2]
    assert answer.is_actor and answer.concurrent_calls == cfg.answer.videos_in_flight
    assert set(answer.writes) == set(ANSWER_COLUMNS) and not answer.keeps_input_columns
    assert not chain[0].is_actor
    assert chain[-1].batch_format == "pyarrow"


def test_a_stage_reading_an_unwritten_column_fails_naming_both(tmp_path):
    _, chain = specs(tmp_path)
    decode, guidance, answer, sink = chain
    with pytest.raises(StageContractError, match=r"stage 'answer' reads column 'selected_positions' \(each "
                                                 r"question's frames \(guidance\)\), which neither the source nor "
                                                 r"an earlier stage \(decode\) writes"):
        check_chain(SOURCE_COLUMNS, [decode, answer, sink])
    with pytest.raises(StageContractError, match=r"stage 'decode' reads column 'video_uri'"):
        check_chain((Col.VIDEO_ID,), chain)
    # the answer stage's output rows are answers rows: its input columns are gone after it
    with pytest.raises(StageContractError,
                       match=r"stage 'guidance_again' reads column 'frames'.*\(decode, guidance, answer\)"):
        check_chain(SOURCE_COLUMNS, [decode, guidance, answer, dataclasses.replace(guidance, name="guidance_again")])
    with pytest.raises(StageContractError, match="unique"):
        check_chain(SOURCE_COLUMNS, [decode, dataclasses.replace(guidance, name="decode")])


def test_decode_writes_what_it_declares(tmp_path):
    video = tmp_path / "v.mp4"
    shutil.copy(DEMO_VIDEOS / "kinetics_armwrestling.mp4", video)
    stage = DecodeStage(DecodeConfig(num_frames=4, frame_size=32), storage=None)
    ok, missing = stage([{Col.VIDEO_ID: "v", Col.VIDEO_URI: str(video)},
                         {Col.VIDEO_ID: "gone", Col.VIDEO_URI: str(tmp_path / "gone.mp4")}])
    for row in (ok, missing):
        assert set(DecodeStage.writes) <= set(row)
        assert row[Col.VIDEO_ID] in ("v", "gone")  # input columns kept (keeps_input_columns)
    assert ok[Col.STATUS] == "ok" and ok[Col.FRAMES].shape == (4, 32, 32, 3)
    assert (missing[Col.STATUS], missing[Col.ERROR_REASON]) == ("error", "not_found")
    spec = StageSpec("decode", partial(DecodeStage, DecodeConfig()), specs(tmp_path)[1][0].request)
    assert isinstance(spec.reads, dict)


def test_cpu_stages_never_import_torch():
    """The decode and writing stages run in CPU workers of their own: importing their modules (what a
    Ray worker does to build the actor) must not pull in torch or transformers, seconds per worker."""
    import subprocess
    import sys

    code = ("import sys, pipeline.stages.decode, pipeline.stages.output_rows; "
            "print(sorted(m for m in ('torch', 'transformers', 'open_clip') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "[]", done.stdout
