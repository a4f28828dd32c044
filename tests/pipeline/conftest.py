"""Fixtures for the pipeline tests live in tests/conftest.py (`tiny_model_dir`, `ray_local`), shared
with tests/reliability."""

import pathlib
import shutil

import numpy as np
import pytest

from tests.paths import DEMO_VIDEOS


@pytest.fixture(scope="session")
def small_run_output(tmp_path_factory, tiny_model_dir, ray_local) -> pathlib.Path:
    """A real run's output: two demo videos and a broken file, prompt selection with RoI boxes,
    tiny models; for the report and the README's DuckDB recipes."""
    from pipeline.config import parse_job_config
    from pipeline.run.runner import run_job

    root = tmp_path_factory.mktemp("small_run")
    for name in ("kinetics_armwrestling.mp4", "pancake_h264_opus.mkv"):
        shutil.copy(DEMO_VIDEOS / name, root / name)
    (root / "broken.mp4").write_bytes(np.random.default_rng(0).bytes(4096))
    cfg = parse_job_config({
        "run_id": "report-run",
        "input": {"videos": f"{root}/*.m*"},
        "questions": {"prompts": [{"question_id": "who", "question": "Who is in the video?"},
                                  {"question_id": "cooking", "question": "Is someone cooking?"}]},
        "decode": {"num_frames": 8, "frame_size": 64, "num_cpus": 0.5, "timeout_s": 120},
        "guidance": {"model": tiny_model_dir["clip"], "pretrained": None, "frames_per_question": 4,
                     "selection": "prompt", "roi_ratio": 0.8, "num_cpus": 0.25, "num_gpus": 0},
        "answer": {"model": tiny_model_dir["llava"], "max_new_tokens": 3, "num_cpus": 0.5, "num_gpus": 0,
                   "moref": {"enabled": True, "temporal_units": 2, "references": 2}},
        "output": {"path": str(root / "out")},
    })
    run_job(cfg)
    return root / "out"
