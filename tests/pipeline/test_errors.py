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
        "out_of_memory",
    }  # fmt: skip
    # permanent: the same input fails the same way (a changed question is asked again by resume)
    assert not ErrorReason.QUESTION_TOO_LONG.transient and not ErrorReason.UNRESOLVABLE_PATH.transient
    assert OutputConfig(path="o", retry_errors=True).retry_reasons() == TRANSIENT_REASONS
    assert OutputConfig(path="o", retry_errors=["truncated"]).retry_reasons() == {ErrorReason.TRUNCATED}
    assert OutputConfig(path="o").retry_reasons() == frozenset()


def test_reasons_every_backend_would_repeat_are_the_storage_and_probe_ones():
    repeated = {r for r in ErrorReason if r.same_for_every_backend}
    assert repeated == {
        "not_found", "permission_denied", "read_failed", "empty_file", "too_large", "too_long", "not_a_video",
        "unreadable_container", "no_video_stream", "truncated", "unresolvable_path",
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


def test_readme_lists_every_reason_with_whether_retry_errors_redoes_it():
    """The README's failure-handling table: every reason, once, its `retry_errors: true` column
    saying exactly whether it is transient."""
    from tests.paths import REPO

    text = (REPO / "README.md").read_text()
    table = text[text.index("| reason | meaning | retried in the run | `retry_errors: true` |"):]
    table = table[:table.index("\n\n")]
    listed: dict[str, str] = {}
    for line in table.splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        for name in cells[0].split(","):
            listed[name.strip().strip("`")] = cells[3]
    assert sorted(listed) == sorted(r.value for r in ErrorReason)
    assert {r: listed[r.value] for r in ErrorReason} == {r: "yes" if r.transient else "no" for r in ErrorReason}
