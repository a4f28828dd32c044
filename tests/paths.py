"""Where the tests find their real videos.

The core tests use only what the repository holds: DEMO_VIDEOS (the Apache-2.0 samples bundled with
the project) and REPO_VIDEOS (a few more licence-compatible clips, see its NOTICE.md), described by
REPO_VIDEOS/manifest.json, plus clips the tests encode themselves (tests/media.py).

EXTRA_VIDEOS is an optional larger corpus with the same manifest.json format: the directory named by
MOREF_TEST_VIDEOS, or, when that variable is unset, a `shared/testdata/videos` directory beside the
checkout. When it is present its files join the parametrised real-video cases; when it is absent
those extra cases are simply not generated, so no core test ever skips for want of it. A
MOREF_TEST_VIDEOS naming a missing directory means "no extra corpus" (no fallback).
"""

from __future__ import annotations

import functools
import json
import os
import pathlib

REPO = pathlib.Path(__file__).resolve().parents[1]
DEMO_VIDEOS = REPO / "jobs" / "demo" / "videos"
REPO_VIDEOS = REPO / "tests" / "data" / "videos"

_env = os.environ.get("MOREF_TEST_VIDEOS")
_extra = pathlib.Path(_env) if _env else REPO.parent / "shared" / "testdata" / "videos"
EXTRA_VIDEOS: pathlib.Path | None = _extra if (_extra / "manifest.json").is_file() else None


def _entries(directory: pathlib.Path) -> dict[str, dict]:
    return {m["file"]: m for m in json.loads((directory / "manifest.json").read_text())["files"]}


@functools.cache
def manifest() -> dict[str, dict]:
    """file name -> manifest entry: the in-repo videos (a missing one fails its tests), then the extra corpus's."""
    out = _entries(REPO_VIDEOS)
    if EXTRA_VIDEOS is not None:
        out.update({name: m for name, m in _entries(EXTRA_VIDEOS).items() if name not in out})
    return out


def video_or_none(name: str) -> pathlib.Path | None:
    for directory in (REPO_VIDEOS, DEMO_VIDEOS, EXTRA_VIDEOS):
        if directory is not None and (directory / name).is_file():
            return directory / name
    return None


def video(name: str) -> pathlib.Path:
    """The path of an in-repo (or extra-corpus) video; a missing in-repo file is an error, not a skip."""
    path = video_or_none(name)
    if path is None:
        raise FileNotFoundError(f"test video {name} is neither in {REPO_VIDEOS} nor in {DEMO_VIDEOS}")
    return path


def available(*names: str) -> list[str]:
    """Those of `names` the tests can read: for parametrising cases on files only the extra corpus has."""
    return [n for n in names if video_or_none(n) is not None]
