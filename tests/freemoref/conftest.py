"""Loaded tiny models and frames for the freemoref tests (the checkpoints come from tests/conftest.py)."""

import numpy as np
import pytest


@pytest.fixture(scope="session")
def tiny_video_llm(tiny_onevision_dir):
    from freemoref.loading import load_video_llm

    return load_video_llm(tiny_onevision_dir)


@pytest.fixture(scope="session")
def tiny_video_llm_llava_vid(tiny_llava_vid_dir):
    from freemoref.loading import load_video_llm

    return load_video_llm(tiny_llava_vid_dir)


@pytest.fixture
def random_frames():
    """Six uint8 RGB frames of a non-square size, so the processor must resize them."""
    return np.random.default_rng(0).integers(0, 256, size=(6, 40, 52, 3), dtype=np.uint8)
