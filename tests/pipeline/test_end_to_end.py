"""The whole job on a real local Ray, real videos, tiny real models: local disk and S3 (moto)."""

import json
import pathlib
import shutil

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.config import parse_job_config
from pipeline.run.runner import run_job
from pipeline.schema import ANSWERS_SCHEMA, Col
from pipeline.store.output_store import OutputStore
from tests.paths import DEMO_VIDEOS

pytestmark = pytest.mark.slow

GOOD = ["kinetics_armwrestling.mp4", "pancake_h264_opus.mkv"]
NUM_FRAMES = 8


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("archive")
    for name in GOOD:
        shutil.copy(DEMO_VIDEOS / name, root / name)
    (root / "broken.mp4").write_bytes(np.random.default_rng(0).bytes(4096))
    (root / "questions.jsonl").write_text(
        "\n".join(
            json.dumps({"video_id": vid, "question_id": qid, "question": text})
            for vid, qid, text in [
                (GOOD[0], "q-who", "Who is in the video?"),
                (GOOD[0], "q-what", "What happens at the end?"),
                ("broken.mp4", "q-who", "Who is in the video?"),
            ]
        )
    )
    return root


def job(videos: str, questions: str, output: str, moref: bool = True, storage: dict | None = None,
        scope: str = "question", in_flight: int = 2, placement: str = "separate"):
    storage = storage or {}
    return parse_job_config(
        {
            "run_id": "e2e",
            "input": {"videos": videos, "storage": storage},
            "questions": {"file": questions, "prompts": [{"question_id": "caption", "question": "Describe it."}]},
            "decode": {"num_frames": NUM_FRAMES, "frame_size": 64, "num_cpus": 0.5, "timeout_s": 120},
            "guidance": {"model": TINY["clip"], "pretrained": None, "frames_per_question": NUM_FRAMES,
                         "num_cpus": 0.25, "num_gpus": 0, "selection": "prompt", "selection_scope": scope,
                         "placement": placement},
            "answer": {"model": TINY["llava"], "max_new_tokens": 5, "num_cpus": 0.5, "num_gpus": 0,
                       "videos_in_flight": in_flight,
                       "moref": {"enabled": moref, "temporal_units": 4, "references": 2}},
            "output": {"path": output, "storage": storage},
        }
    )


TINY: dict[str, str] = {}


@pytest.fixture(scope="module", autouse=True)
def tiny_models(tiny_model_dir):
    TINY.update(tiny_model_dir)


def check_tables(store: OutputStore, expected_pairs: set, n_error_pairs: int):
    answers = store.read_answers()
    assert answers.schema.equals(ANSWERS_SCHEMA)
    pairs = list(zip(answers.column("video_id").to_pylist(), answers.column("question_id").to_pylist()))
    assert len(pairs) == len(set(pairs)) == len(expected_pairs)
    assert set(pairs) == expected_pairs
    rows = answers.to_pylist()
    errors = [r for r in rows if r["status"] == "error"]
    assert len(errors) == n_error_pairs
    assert all(r["video_id"] == "broken.mp4" and r[Col.ERROR_REASON] and r[Col.ERROR_DETAIL] and r["answer"] is None
               for r in errors)
    for r in (r for r in rows if r["status"] == "ok"):
        assert r["run_id"] == "e2e" and r["model"] == "tiny-llava-onevision"
        assert r["frames_decoded"] == NUM_FRAMES and len(r["frame_indices"]) == NUM_FRAMES
        times = r["frame_times_s"]
        assert all(b > a for a, b in zip(times, times[1:])) and 0 <= times[0] and times[-1] < 11
        assert r["prompt_tokens"] > r["visual_tokens_used"] > 0 and 1 <= r["output_tokens"] <= 5
        assert r["total_flops"] > 0 and r["total_flops_native"] > 0 and r["attn_flops_ratio"] > 0
        # Free-MoRef is on: 2 references over 4 temporal units, fused at the paper's L=3
        assert (r["references"], r["temporal_units"], r["fusion_layer"]) == (2, 4, 3)
        assert r["visual_tokens_used"] < r["visual_tokens_native"] and r["total_flops"] < r["total_flops_native"]
        assert r["decode_s"] > 0 and r["prefill_s"] > 0
    frames = store.read_frames()
    assert frames is not None and frames.num_rows == NUM_FRAMES * len(GOOD)
    assert set(frames.column("video_id").to_pylist()) == set(GOOD)
    emb = np.stack(frames.column("embedding").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-4)
    # the answers' frame times are the frames table's times for that video
    ok = next(r for r in rows if r["status"] == "ok" and r["video_id"] == GOOD[0])
    video_times = zip(frames.column("video_id").to_pylist(), frames.column("time_s").to_pylist())
    ftimes = sorted(t for v, t in video_times if v == GOOD[0])
    np.testing.assert_allclose(sorted(ok["frame_times_s"]), ftimes)


def expected(archive_ids):
    pairs = {(GOOD[0], "q-who"), (GOOD[0], "q-what"), ("broken.mp4", "q-who")}
    return pairs | {(v, "caption") for v in archive_ids}


def test_local_run_then_rerun_resumes(archive, tmp_path, ray_local):
    out = tmp_path / "out"
    cfg = job(f"{archive}/*.m*", str(archive / "questions.jsonl"), str(out))
    summary = run_job(cfg)
    pairs = expected(GOOD + ["broken.mp4"])
    assert (summary.inputs, summary.processed, summary.skipped_done) == (len(pairs), len(pairs), 0)
    assert summary.errors == 2 and summary.ok == len(pairs) - 2
    assert sum(summary.errors_by_reason.values()) == 2
    store = OutputStore(cfg.output)
    check_tables(store, pairs, n_error_pairs=2)
    assert json.loads((out / "runs" / "e2e.json").read_text())["ok"] == summary.ok

    files = sorted(p.name for p in (out / "answers").iterdir())
    again = run_job(cfg)
    assert (again.skipped_done, again.processed) == (len(pairs), 0)
    assert sorted(p.name for p in (out / "answers").iterdir()) == files
    check_tables(store, pairs, n_error_pairs=2)
    n = duckdb.sql(f"SELECT count(*) FROM '{out}/answers/*.parquet' WHERE status = 'ok'").fetchall()[0][0]
    assert n == len(pairs) - 2


def test_s3_run_writes_back_to_the_bucket(archive, s3_bucket, ray_local):
    fs, bucket, storage_options = s3_bucket
    for name in GOOD + ["broken.mp4", "questions.jsonl"]:
        fs.put(str(archive / name), f"{bucket}/in/{name}")
    # Explicit credentials (Ray workers started earlier do not see the fixture's environment);
    # they must never reach the outputs.
    storage = {"endpoint_url": storage_options["client_kwargs"]["endpoint_url"],
               "key": "testing", "secret": "moto-secret-never-in-outputs"}
    cfg = job(f"s3://{bucket}/in/*.m*", f"s3://{bucket}/in/questions.jsonl", f"s3://{bucket}/out", storage=storage)
    summary = run_job(cfg)
    pairs = expected(GOOD + ["broken.mp4"])
    assert summary.processed == len(pairs) and summary.errors == 2
    assert all(uri.startswith(f"{bucket}/out/answers/") for uri in fs.ls(f"{bucket}/out/answers"))
    check_tables(OutputStore(cfg.output), pairs, n_error_pairs=2)
    with fs.open(fs.ls(f"{bucket}/out/answers")[0], "rb") as f:
        assert pq.read_table(f).schema.equals(ANSWERS_SCHEMA)
    assert run_job(cfg).skipped_done == len(pairs)
    for path in fs.find(f"{bucket}/out"):
        assert b"moto-secret-never-in-outputs" not in fs.cat(path)


def test_video_scope_shares_each_video_prefill(archive, tmp_path, ray_local):
    """selection_scope: video: one frame pick per video, and its questions answered together."""
    out = tmp_path / "out"
    cfg = job(f"{archive}/{GOOD[0]}", str(archive / "questions.jsonl"), str(out), scope="video")
    cfg = cfg.model_copy(update={"guidance": cfg.guidance.model_copy(update={"frames_per_question": NUM_FRAMES // 2})})
    summary = run_job(cfg)
    assert (summary.processed, summary.ok) == (3, 3) and summary.questions_per_s > 0
    rows = OutputStore(cfg.output).read_answers().to_pylist()
    assert sorted(r["question_id"] for r in rows) == ["caption", "q-what", "q-who"]
    assert len({tuple(r["frame_indices"]) for r in rows}) == 1 and len(rows[0]["frame_indices"]) == NUM_FRAMES // 2
    assert all(r["prefix_shared_with"] == 3 for r in rows)


# Columns that depend on timing or the run, not on what was answered.
_TIMING = {"decode_s", "guidance_s", "prefill_s", "generate_s", "written_at"}


def _answers_by_pair(out: pathlib.Path) -> dict:
    rows = OutputStore(job("", "", str(out)).output).read_answers().to_pylist()
    return {(r["video_id"], r["question_id"]): {k: v for k, v in r.items() if k not in _TIMING} for r in rows}


def _frames(out: pathlib.Path) -> tuple[list[dict], np.ndarray]:
    table = pq.read_table(out / "frames").sort_by([("video_id", "ascending"), ("frame_index", "ascending")])
    embeddings = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
    return table.select(["video_id", "frame_index", "time_s"]).to_pylist(), embeddings


def test_videos_in_flight_and_clip_in_the_answer_actor_give_the_same_rows(archive, tmp_path, ray_local):
    """Three videos through one answer actor one at a time, three at once (threads sharing the
    model under its device lock), and with CLIP inside the answer actor: the same answers, the
    same statistics, the same frames table."""
    runs = {}
    for name, in_flight, placement in [("serial", 1, "separate"), ("in_flight", 3, "separate"),
                                       ("clip_in_answer_actor", 3, "answer_actor")]:
        out = tmp_path / name
        summary = run_job(job(f"{archive}/*.m*", str(archive / "questions.jsonl"), str(out),
                              in_flight=in_flight, placement=placement))
        assert summary.processed == summary.inputs == 6 and summary.errors == 2, name
        runs[name] = out
    serial = _answers_by_pair(runs["serial"])
    assert sum(r["status"] == "ok" for r in serial.values()) == 4
    # the decoder of each video; none where decoding failed (never a NaN turned into text)
    assert {r["decode_backend"] for r in serial.values() if r["status"] == "ok"} == {"pyav"}
    assert {r["decode_backend"] for r in serial.values() if r["status"] == "error"} == {None}
    serial_frames, serial_embeddings = _frames(runs["serial"])
    for name in ("in_flight", "clip_in_answer_actor"):
        assert _answers_by_pair(runs[name]) == serial, name
        frames, embeddings = _frames(runs[name])
        assert frames == serial_frames, name
        np.testing.assert_allclose(embeddings, serial_embeddings, atol=1e-5)
