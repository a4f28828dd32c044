"""The one exception every decode step raises: a reason from the shared set and a message."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.errors import ErrorReason

if TYPE_CHECKING:
    from pipeline.stages.decode.backend import VideoInfo


class DecodeError(Exception):
    """A video that cannot be decoded. `info` carries the probe result when the failure came after
    it (too long, truncated, ...)."""

    def __init__(self, reason: ErrorReason, detail: str, info: VideoInfo | None = None):
        super().__init__(reason, detail, info)
        self.reason = ErrorReason(reason)
        self.detail = detail
        self.info = info

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"
