"""Security basics: YAML is loaded safely, remote code runs only when the config says so (checked by
loading a checkpoint that carries code), nothing is written outside the output prefix."""

from __future__ import annotations

import json
import shutil

import pytest

from pipeline.config import ConfigError, load_job_config
from pipeline.store.output_store import OutputStore, video_key
from tests.reliability.helpers import TINY, job, job_dict


def test_yaml_is_loaded_safely(tmp_path):
    marker = tmp_path / "pwned"
    config = tmp_path / "job.yaml"
    config.write_text(f"run_id: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_job_config(config)
    from jobs.cli import _parse_overrides

    with pytest.raises(Exception):  # noqa: B017 - any refusal will do, as long as nothing runs
        _parse_overrides([f"run_id=!!python/object/apply:os.system ['touch {marker}']"])
    assert not marker.exists()


@pytest.mark.parametrize("run_id", ["../../x", "a/b", ".hidden", "x\\y", ""])
def test_run_id_cannot_be_a_path(tmp_path, run_id):
    data = job_dict(str(tmp_path / "out"), videos=str(tmp_path / "*.mp4"), run_id=run_id)
    config = tmp_path / "job.yaml"
    config.write_text(json.dumps(data))  # JSON is YAML
    with pytest.raises(ConfigError, match="run_id"):
        load_job_config(config)


def test_outputs_stay_under_the_prefix(tmp_path):
    store = OutputStore(job(str(tmp_path / "out"), videos=str(tmp_path / "*.mp4")).output)
    for bad in ("..", "../x.json", "a/../../b", "", "."):
        with pytest.raises(ValueError, match="unsafe output path"):
            store.path("runs", bad)
    for vid in ("../../etc/passwd", "/abs/x.mp4", "..", "a\\..\\b", "\x00", "é/ü.mp4", "x" * 500):
        key = video_key(vid)
        assert "/" not in key and not key.startswith(".") and len(key) <= 73 and store.path("answers", f"{key}.parquet")
    assert video_key("a/b.mp4") != video_key("a_b.mp4")  # sanitising never merges two videos


def test_remote_code_runs_only_when_the_config_says_so(tmp_path, monkeypatch):
    """A checkpoint whose config names custom code (auto_map): loading it with the default config
    must not execute that code; with answer.trust_remote_code: true it does (so the flag reaches
    transformers' from_pretrained)."""
    import transformers.dynamic_module_utils as dmu

    from pipeline.stages.answer import AnswerStage

    ckpt = tmp_path / "ckpt"
    shutil.copytree(TINY["llava"], ckpt)
    marker = tmp_path / "remote-code-ran"
    (ckpt / "evil_config.py").write_text(
        "import pathlib\n"
        f"pathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import LlavaOnevisionConfig\n\n\n"
        "class EvilConfig(LlavaOnevisionConfig):\n    pass\n"
    )
    config = json.loads((ckpt / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil_config.EvilConfig"}
    (ckpt / "config.json").write_text(json.dumps(config))
    monkeypatch.setattr(dmu, "HF_MODULES_CACHE", str(tmp_path / "hf_modules"))

    cfg = job(str(tmp_path / "out"), videos=str(tmp_path / "*.mp4"), answer={"model": str(ckpt)})
    assert cfg.answer.trust_remote_code is False
    stage = AnswerStage(cfg.answer, run_id="sec")
    assert stage.llm is not None and not marker.exists()

    trusting = job(str(tmp_path / "out"), videos=str(tmp_path / "*.mp4"),
                   answer={"model": str(ckpt), "trust_remote_code": True})
    AnswerStage(trusting.answer, run_id="sec")
    assert marker.read_text() == "ran"
