"""Why a (video, question) pair failed: the one set of error reasons every stage writes.

An error row carries `error_reason` (an `ErrorReason` value) and `error_detail` (a message for
people). Each reason says whether it is worth another run (`transient`: the storage or a process
failed, not the input; `output.retry_errors: true` redoes these) and whether it is decided before
any backend decodes (`same_for_every_backend`: the decode stage does not try its fallback backend).
"""

from __future__ import annotations

from enum import StrEnum


class ErrorReason(StrEnum):
    """`StrEnum`: a member is its value string, so it compares, hashes and serialises as one."""

    # per-member attributes set by __new__ (annotations without a value are not enum members)
    transient: bool
    same_for_every_backend: bool

    def __new__(cls, value: str, transient: bool = False, same_for_every_backend: bool = False) -> ErrorReason:
        member = str.__new__(cls, value)
        member._value_ = value
        member.transient = transient
        member.same_for_every_backend = same_for_every_backend
        return member

    # storage (decided before decoding)
    NOT_FOUND = "not_found", False, True  # no such file or object
    PERMISSION_DENIED = "permission_denied", False, True  # storage refused to read it
    # other storage I/O failure; the fallback backend reads the same storage, so it is not tried
    READ_FAILED = "read_failed", True, True
    EMPTY_FILE = "empty_file", False, True  # zero bytes
    # the path cannot be resolved: a symlink loop, a name too long, a file where a folder should be
    UNRESOLVABLE_PATH = "unresolvable_path", False, True
    # the input, as the shared probe sees it
    TOO_LARGE = "too_large", False, True  # file bytes or frame pixels beyond the configured limits
    TOO_LONG = "too_long", False, True  # duration beyond max_duration_s
    # bytes no demuxer recognises, or text: a playlist, an FFmpeg concat list, any non-media text
    NOT_A_VIDEO = "not_a_video", False, True
    UNREADABLE_CONTAINER = "unreadable_container", False, True  # a known container that cannot be parsed
    NO_VIDEO_STREAM = "no_video_stream", False, True  # a media file without a video stream
    TRUNCATED = "truncated", False, True  # the file ends before the data its header describes
    # one decode backend (the other may succeed)
    DECODE_FAILED = "decode_failed"  # the decoder rejected the data
    NO_FRAMES = "no_frames"  # a video stream without a single decodable frame
    UNSUPPORTED = "unsupported"  # this backend cannot read this file
    # the isolated decode process
    TIMEOUT = "timeout", True  # it ran past decode.timeout_s
    CRASHED = "crashed", True  # it died (e.g. SIGSEGV)
    INTERNAL_ERROR = "internal_error", True  # a bug: an unexpected exception
    # the models
    GUIDANCE_FAILED = "guidance_failed", True  # the CLIP guidance stage raised
    VISION_FAILED = "vision_failed", True  # the Video-LLM's vision tower raised
    ANSWER_FAILED = "answer_failed", True  # the Video-LLM's generation raised
    # the question alone ran out of GPU memory (a batch that does is split down to single questions first)
    OUT_OF_MEMORY = "out_of_memory", True
    # more tokens than answer.max_question_tokens, or a prompt beyond the model's context; found before
    # any model work; a changed question or config is asked again by resume (its fingerprint changed)
    QUESTION_TOO_LONG = "question_too_long"
    # a row that reached the answer stage in error without a reason (no stage writes one today)
    FAILED_BEFORE_ANSWER = "failed_before_answer"


TRANSIENT_REASONS = frozenset(r for r in ErrorReason if r.transient)

# What the answer stage wrote as the whole error of a reasonless failed row before reasons had a column
_OLD_FAILED_BEFORE_ANSWER = "failed before the answer stage"


def reason_from_old_error_column(error: str | None) -> ErrorReason | None:
    """The reason of a row written before `error_reason` existed, whose single `error` column held
    "reason: detail" (answers files of older runs, read again to resume). None when unrecognised."""
    if not error:
        return None
    if error.strip() == _OLD_FAILED_BEFORE_ANSWER:
        return ErrorReason.FAILED_BEFORE_ANSWER
    prefix = error.split(":", 1)[0].strip()
    return ErrorReason(prefix) if prefix in ErrorReason._value2member_map_ else None
