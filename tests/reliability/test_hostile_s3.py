"""The hostile corpus on a real local S3 server (moto), with an object the job's credentials may not
read (an IAM policy moto enforces). Then the scheduled rerun over the same glob: the permission is
fixed, the archive grew, and `output.retry_errors: [permission_denied]` redoes exactly the refused
pairs, replacing their error rows, plus the new video. Credentials appear in no output. (A missing
object is in tests/reliability/test_driver_killed.py, via a manifest.)"""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import requests

from pipeline.run.runner import run_job
from tests.paths import video
from tests.reliability.helpers import (
    OK,
    PROMPTS,
    assert_exactly_once,
    check_rows,
    expected_reasons,
    job,
    make_faststart,
    rows_of,
)

pytestmark = pytest.mark.slow


def iam_user_denied(endpoint: str, bucket: str, denied_key: str) -> tuple[str, str]:
    """An IAM user that may do anything in S3 except read one object; returns (key id, secret)."""
    import boto3

    iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1")
    name = f"pipeline-{bucket}"
    iam.create_user(UserName=name)
    policy = {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "s3:*", "Resource": "*"},
        {"Effect": "Deny", "Action": "s3:GetObject", "Resource": f"arn:aws:s3:::{bucket}/{denied_key}"},
    ]}
    iam.put_user_policy(UserName=name, PolicyName="all-but-one", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName=name)["AccessKey"]
    return key["AccessKeyId"], key["SecretAccessKey"]


def set_moto_auth(endpoint: str, on: bool) -> None:
    """moto checks signatures and IAM policies only when told to (process-wide, so switched back)."""
    requests.post(f"{endpoint}/moto-api/reset-auth", data=b"0" if on else b"inf", timeout=10).raise_for_status()


def test_hostile_corpus_s3_then_fixed_permissions_and_a_grown_archive(tmp_path, s3_bucket, ray_local):
    fs, bucket, options = s3_bucket
    endpoint = options["client_kwargs"]["endpoint_url"]
    faststart = make_faststart(tmp_path / "faststart.mp4").read_bytes()
    objects = {
        "kinetics_armwrestling.mp4": (video("kinetics_armwrestling.mp4").read_bytes(), OK),
        "webm_noduration_vp9_opus.webm": (video("webm_noduration_vp9_opus.webm").read_bytes(), OK),
        "iphone4s_rot90.mov": (video("iphone4s_rot90.mov").read_bytes(), OK),
        "empty.mp4": (b"", "empty_file"),
        "notes.mp4": (b"not a video\n" * 50, "not_a_video"),
        "cut.mp4": (faststart[: len(faststart) // 3], "truncated"),
        "locked.mp4": (video("mpeg4_mp3.avi").read_bytes(), "permission_denied"),
    }
    for name, (data, _) in objects.items():
        fs.pipe(f"{bucket}/in/{name}", data)
    expected_status = {name: want for name, (_, want) in objects.items()}
    names = list(expected_status)
    videos = f"s3://{bucket}/in/*"

    key, secret = iam_user_denied(endpoint, bucket, "in/locked.mp4")
    storage = {"endpoint_url": endpoint, "key": key, "secret": secret}
    cfg = job(f"s3://{bucket}/out", videos=videos, storage=storage, run_id="s3-first")
    expected = {(v, p["question_id"]) for v in names for p in PROMPTS}
    set_moto_auth(endpoint, True)
    try:
        summary = run_job(cfg)
        rows = rows_of(cfg)
    finally:
        set_moto_auth(endpoint, False)

    assert_exactly_once(rows, expected)
    check_rows(rows, expected_status)
    assert summary.errors_by_reason == expected_reasons(rows)
    assert summary.errors_by_reason == {"empty_file": 2, "not_a_video": 2, "truncated": 2, "permission_denied": 2}
    assert (summary.processed, summary.ok) == (len(expected), 6)

    # the permission is fixed and the archive grew: the rerun does the new video and the refused one
    fs.pipe(f"{bucket}/in/new.mkv", video("pancake_h264_opus.mkv").read_bytes())
    cfg2 = job(f"s3://{bucket}/out", videos=videos, storage=storage, run_id="s3-second",
               output_opts={"retry_errors": ["permission_denied"]})
    again = run_job(cfg2)

    expected |= {("new.mkv", p["question_id"]) for p in PROMPTS}
    rows = rows_of(cfg2)
    assert_exactly_once(rows, expected)
    check_rows(rows, expected_status | {"locked.mp4": OK, "new.mkv": OK})
    assert (again.inputs, again.skipped_done, again.retried_errors, again.processed, again.ok) == (
        len(expected), len(expected) - 4, 2, 4, 4)
    by_run = {r["run_id"] for r in rows if r["video_id"] in ("locked.mp4", "new.mkv")}
    assert by_run == {"s3-second"} and {r["run_id"] for r in rows if r["video_id"] == "cut.mp4"} == {"s3-first"}
    # the refused video's old error rows are gone from storage, not shadowed: every answers file
    # read on its own holds the video's rows once, all of the second run
    locked = []
    for path in fs.ls(f"{bucket}/out/answers", refresh=True):
        if path.endswith(".parquet") and not path.rsplit("/", 1)[-1].startswith(("_", ".")):
            table = pq.read_table(path, filesystem=fs, columns=["video_id", "run_id", "status"])
            locked += [r for r in table.to_pylist() if r["video_id"] == "locked.mp4"]
    assert sorted((r["run_id"], r["status"]) for r in locked) == [("s3-second", "ok")] * len(PROMPTS)
    # the run summaries record both runs; no output holds the credentials
    runs = {p.rsplit("/", 1)[-1]: json.loads(fs.cat(p)) for p in fs.ls(f"{bucket}/out/runs", refresh=True)}
    assert runs["s3-second.json"]["retried_errors"] == 2 and runs["s3-first.json"]["errors"] == 8
    for path in fs.find(f"{bucket}/out"):
        blob = fs.cat(path)
        assert secret.encode() not in blob and key.encode() not in blob, path
