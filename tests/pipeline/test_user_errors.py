"""Every user mistake is one `error:` line naming the key, exit status 2, before any work; readers
pointed at a path without an output say so and create nothing.

The command line runs in this process (`jobs.cli.main`) on real files: configs written as YAML,
questions files and manifests on disk, the tiny models. None of these runs reaches Ray.
"""

from __future__ import annotations

import json
import pathlib
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from jobs.cli import main
from tests.paths import DEMO_VIDEOS


def _videos(tmp_path: pathlib.Path) -> pathlib.Path:
    folder = tmp_path / "videos"
    folder.mkdir()
    for name in ("kinetics_armwrestling.mp4", "pancake_h264_opus.mkv"):
        shutil.copy(DEMO_VIDEOS / name, folder / name)
    return folder


def _config(tmp_path: pathlib.Path, models: dict, **sections) -> pathlib.Path:
    cfg: dict[str, dict] = {
        "input": {"videos": str(tmp_path / "videos" / "*.m*")},
        "questions": {"prompts": ["Describe the video."]},
        "guidance": {"model": models["clip"], "pretrained": None, "num_gpus": 0},
        "answer": {"model": models["llava"], "num_gpus": 0},
        "output": {"path": str(tmp_path / "out")},
    }
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _error(capsys, argv: list[str]) -> str:
    """The command's one error line (exit status 2 asserted)."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def _jsonl(path: pathlib.Path, rows: list[dict]) -> pathlib.Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_glob_matching_nothing(tmp_path, tiny_model_dir, capsys):
    _videos(tmp_path)
    pattern = str(tmp_path / "videos" / "*.webm")
    config = _config(tmp_path, tiny_model_dir, input={"videos": pattern})
    assert _error(capsys, ["run", str(config)]) == f"error: input.videos: no files match ['{pattern}']"


@pytest.mark.parametrize("key", ["questions.file", "input.manifest"])
def test_missing_questions_file_or_manifest(tmp_path, tiny_model_dir, capsys, key):
    _videos(tmp_path)
    missing = tmp_path / "nowhere.jsonl"
    section, name = key.split(".")
    extra = {"input": {"videos": None, "manifest": str(missing)}} if key == "input.manifest" else \
        {"questions": {"file": str(missing)}}
    config = _config(tmp_path, tiny_model_dir, **extra)
    assert _error(capsys, ["run", str(config)]) == f"error: {key}: file not found: {missing}"
    assert not (tmp_path / "out").exists()  # found before the run takes the output's lease


def test_empty_question(tmp_path, tiny_model_dir, capsys):
    _videos(tmp_path)
    questions = _jsonl(tmp_path / "q.jsonl", [
        {"video_id": "kinetics_armwrestling.mp4", "question_id": "q1", "question": "What happens?"},
        {"video_id": "kinetics_armwrestling.mp4", "question_id": "q2", "question": "  "}])
    config = _config(tmp_path, tiny_model_dir, questions={"file": str(questions)})
    assert _error(capsys, ["run", str(config)]) == (
        "error: questions.file: empty question for video_id='kinetics_armwrestling.mp4' question_id='q2'")


def test_duplicate_question_ids(tmp_path, tiny_model_dir, capsys):
    _videos(tmp_path)
    row = {"video_id": "kinetics_armwrestling.mp4", "question_id": "q1", "question": "What happens?"}
    questions = _jsonl(tmp_path / "q.jsonl", [row, {**row, "question": "Who wins?"}])
    config = _config(tmp_path, tiny_model_dir, questions={"file": str(questions)})
    assert _error(capsys, ["run", str(config)]) == (
        "error: questions.file: duplicate (video_id, question_id) = ('kinetics_armwrestling.mp4', 'q1')")


@pytest.mark.parametrize("column", ["video_id", "question_id"])
def test_null_ids_are_errors_not_the_string_none(tmp_path, tiny_model_dir, capsys, column):
    _videos(tmp_path)
    rows = [{"video_id": "kinetics_armwrestling.mp4", "question_id": "q1", "question": "What happens?"},
            {"video_id": "pancake_h264_opus.mkv", "question_id": "q2", "question": "What is cooked?"}]
    rows[1][column] = None
    questions = _jsonl(tmp_path / "q.jsonl", rows)
    config = _config(tmp_path, tiny_model_dir, questions={"file": str(questions)})
    assert _error(capsys, ["run", str(config)]) == f"error: questions.file: row 2 has no {column}"


def test_options_given_as_one_string(tmp_path, tiny_model_dir, capsys):
    _videos(tmp_path)
    questions = tmp_path / "q.parquet"
    pq.write_table(pa.table({"video_id": ["kinetics_armwrestling.mp4"], "question_id": ["q1"],
                             "question": ["Who wins?"], "options": ["left, right"]}), questions)
    config = _config(tmp_path, tiny_model_dir, questions={"file": str(questions)})
    assert _error(capsys, ["run", str(config)]) == (
        "error: questions.file: options of video_id='kinetics_armwrestling.mp4' question_id='q1' must be a list "
        "of choices, got str 'left, right'")


def test_two_files_with_the_same_video_id(tmp_path, tiny_model_dir, capsys):
    folder = _videos(tmp_path)
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(f"video_id,video_uri\nclip,{folder / 'kinetics_armwrestling.mp4'}\n"
                        f"clip,{folder / 'pancake_h264_opus.mkv'}\n")
    config = _config(tmp_path, tiny_model_dir, input={"videos": None, "manifest": str(manifest)})
    assert _error(capsys, ["run", str(config)]) == (
        f"error: input: video_id 'clip' names two videos ({folder / 'kinetics_armwrestling.mp4'} and "
        f"{folder / 'pancake_h264_opus.mkv'})")


def test_output_path_that_is_a_file(tmp_path, tiny_model_dir, capsys):
    _videos(tmp_path)
    out = tmp_path / "out"
    out.write_text("not a folder")
    config = _config(tmp_path, tiny_model_dir)
    assert _error(capsys, ["run", str(config)]) == (
        f"error: output.path: {out} is a file; give a folder (new or a job's output)")


@pytest.mark.parametrize("key", ["answer.model", "guidance.model"])
def test_missing_local_model_is_never_a_hub_id(tmp_path, tiny_model_dir, capsys, key):
    _videos(tmp_path)
    missing = tmp_path / "models" / "not-there"
    config = _config(tmp_path, tiny_model_dir)
    assert _error(capsys, ["run", str(config), "--set", f"{key}={missing}"]) == (
        f"error: {key}: {missing} does not exist (a path is never looked up on the model hub)")
    assert not (tmp_path / "out").exists()


def test_gpu_decoding_without_its_package_on_a_local_run(tmp_path, tiny_model_dir, capsys):
    """PyNvVideoCodec is not installed in the CPU environment: nvdec would fall back to PyAV for every
    video, so a local run says so before any work."""
    _videos(tmp_path)
    config = _config(tmp_path, tiny_model_dir, decode={"backend": "nvdec", "num_gpus": 0.05})
    assert _error(capsys, ["run", str(config)]) == (
        "error: decode.backend: nvdec needs PyNvVideoCodec, which is not installed here "
        "(pip install 'moref-index[nvdec]'), or choose pyav")
    assert not (tmp_path / "out").exists()
    config = _config(tmp_path, tiny_model_dir, decode={"backend": "nvdec"})  # and without a GPU share
    assert "decode.num_gpus" in _error(capsys, ["run", str(config)])


# ---- readers on a path without an output


@pytest.mark.parametrize("command", ["score", "report", "index", "compact"])
def test_readers_on_a_missing_output(tmp_path, capsys, command):
    missing = tmp_path / "no-output"
    argv = [command, str(missing)]
    if command == "score":
        argv += ["--questions", str(_jsonl(tmp_path / "set.jsonl", [
            {"video_id": "a.mp4", "question_id": "q1", "question": "Which?", "options": ["x", "y"], "answer": "A"}]))]
    if command == "report":
        argv += ["--out", str(tmp_path / "report.html")]
    needs = "answers/" if command == "score" else "frames/" if command == "index" else "answers/ or frames/"
    assert _error(capsys, argv) == f"error: no job output at {missing}: it holds no {needs}"
    assert sorted(p.name for p in tmp_path.iterdir()) == (["set.jsonl"] if command == "score" else [])


def test_score_reads_an_object_store_output_through_endpoint_url(s3_bucket, tmp_path, capsys):
    from pipeline.config import OutputConfig, StorageConfig
    from pipeline.schema import ANSWERS_SCHEMA, empty_answer_row
    from pipeline.store.output_store import ANSWERS_DIR, OutputStore

    _, bucket, storage = s3_bucket
    endpoint = storage["client_kwargs"]["endpoint_url"]
    output = f"s3://{bucket}/out"
    answers = [{**empty_answer_row(), "video_id": "a.mp4", "question_id": f"q{i}", "status": "ok", "answer": letter}
               for i, letter in enumerate(["A", "B"])]
    OutputStore(OutputConfig(path=output, storage=StorageConfig(endpoint_url=endpoint))).write_table(
        pa.Table.from_pylist(answers, schema=ANSWERS_SCHEMA), ANSWERS_DIR, "part-1.parquet")
    questions = _jsonl(tmp_path / "set.jsonl", [
        {"video_id": "a.mp4", "question_id": f"q{i}", "question": "Which?", "options": ["x", "y"], "answer": "A"}
        for i in range(2)])
    assert main(["score", output, "--questions", str(questions), "--json", "--endpoint-url", endpoint]) == 0
    overall = json.loads(capsys.readouterr().out)["overall"]
    assert (overall["correct"], overall["n"]) == (1, 2)
