"""The error reasons: one typed set, which of them a rerun retries, and reading rows of older files."""

from __future__ import annotations

import pytest

from pipeline.config import OutputConfig
from pipeline.errors import TRANSIENT_REASONS, ErrorReason, reason_from_old_error_column


def test_reasons_are_distinct_lowercase_words():
    values = [r.value for r in ErrorReason]
    assert len(set(values)) == len(values)
    assert all(v.replace("_", "").isalpha() and v.islower() for v in values)
    # a member is its string: rows, Arrow columns and config lists hold plain strings
    assert ErrorReason("read_failed") is ErrorReason.READ_FAILED and ErrorReason.READ_FAILED == "read_failed"
    assert f"{ErrorReason.NO_VIDEO_STREAM}: x" == "no_video_stream: x"


def test_transient_reasons_are_the_failures_of_storage_processes_and_models():
    assert TRANSIENT_REASONS == {
        "timeout", "crashed", "read_failed", "internal_error", "guidance_failed", "vision_failed", "answer_failed",
    }  # fmt: skip
    assert OutputConfig(path="o", retry_errors=True).retry_reasons() == TRANSIENT_REASONS
    assert OutputConfig(path="o", retry_errors=["truncated"]).retry_reasons() == {ErrorReason.TRUNCATED}
    assert OutputConfig(path="o").retry_reasons() == frozenset()


def test_reasons_every_backend_would_repeat_are_the_storage_and_probe_ones():
    repeated = {r for r in ErrorReason if r.same_for_every_backend}
    assert repeated == {
        "not_found", "permission_denied", "read_failed", "empty_file", "too_large", "too_long", "not_a_video",
        "unreadable_container", "no_video_stream", "truncated",
    }  # fmt: skip


def test_unknown_retry_reasons_are_refused():
    with pytest.raises(ValueError, match="unknown reasons \\['timed_out'\\]"):
        OutputConfig(path="o", retry_errors=["timed_out"])


@pytest.mark.parametrize(
    "error, reason",
    [
        ("no_video_stream: no video stream (streams: audio)", ErrorReason.NO_VIDEO_STREAM),
        ("timeout: no result after 300 s; child killed [pyav] | pyav: timeout: ... (x2)", ErrorReason.TIMEOUT),
        ("guidance_failed: ValueError: frames must be uint8", ErrorReason.GUIDANCE_FAILED),
        ("failed before the answer stage", ErrorReason.FAILED_BEFORE_ANSWER),
        ("listing: not a reason", None),
        ("", None),
        (None, None),
    ],
)
def test_old_error_column_gives_the_reason_prefix(error, reason):
    assert reason_from_old_error_column(error) == reason
