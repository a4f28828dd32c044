"""Frame selection and RoI: positions from CLIP scores, boxes from patch scores (pure numpy)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.stages.frame_selection import (
    mix_positions,
    prompt_positions,
    question_roi_boxes,
    roi_box,
    select_frames,
    uniform_positions,
)


def test_uniform_positions_spread_evenly():
    assert uniform_positions(10, 4).tolist() == [1, 3, 6, 8]
    assert uniform_positions(5, 9).tolist() == [0, 1, 2, 3, 4]  # K = min(k, T)
    assert uniform_positions(9, 1).tolist() == [4]
    assert uniform_positions(0, 4).tolist() == []
    pos = uniform_positions(1000, 32)
    gaps = np.diff(pos)
    assert len(set(pos)) == 32 and gaps.max() - gaps.min() <= 1
    assert pos[0] >= 0 and pos[-1] < 1000


def test_prompt_positions_are_top_k_sorted_by_time():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=50)
    assert prompt_positions(scores, 7).tolist() == sorted(np.argsort(-scores)[:7].tolist())
    assert prompt_positions(np.array([0.1, 0.9, 0.1, 0.9]), 1).tolist() == [1]  # ties: earlier frame
    assert prompt_positions(scores, 80).tolist() == list(range(50))


def test_mix_positions_combine_prompt_and_uniform():
    rng = np.random.default_rng(1)
    scores = rng.normal(size=40)
    mixed = mix_positions(scores, 10, prompt_fraction=0.3)
    assert len(mixed) == 10 and len(set(mixed.tolist())) == 10
    assert mixed.tolist() == sorted(mixed.tolist())
    assert set(prompt_positions(scores, 3).tolist()) <= set(mixed.tolist())
    assert mix_positions(scores, 10, 0.0).tolist() == uniform_positions(40, 10).tolist()
    assert mix_positions(scores, 10, 1.0).tolist() == prompt_positions(scores, 10).tolist()
    assert mix_positions(scores[:6], 10, 0.5).tolist() == list(range(6))  # K = T: every frame once
    with pytest.raises(ValueError):
        mix_positions(scores, 10, 1.5)


def test_select_frames_shapes_and_errors():
    uni = select_frames("uniform", 4, 10, 3)
    assert uni.shape == (3, 4) and uni.dtype == np.int64
    assert (uni == uniform_positions(10, 4)).all()
    assert select_frames("uniform", 4, 10, 0).shape == (0, 4)
    assert select_frames("prompt", 4, 0, 2).shape == (2, 0)  # no frames: nothing to score
    mixed = select_frames("mix", 4, 10, 2, scores=np.zeros((2, 10)), prompt_fraction=0.5)
    assert mixed.shape == (2, 4)
    with pytest.raises(ValueError, match="scores"):
        select_frames("prompt", 4, 10, 2)
    with pytest.raises(ValueError, match="unknown"):
        select_frames("random", 4, 10, 2)


# ---------------------------------------------------------------- RoI


def test_roi_box_centres_on_the_top_patches():
    grid = np.zeros((10, 10))
    grid[4:6, 4:6] = 1.0  # the centre of the grid
    x0, y0, x1, y1 = roi_box(grid, ratio=0.04)  # K = 4 patches: exactly the hot block
    assert (x0 + x1) / 2 == pytest.approx(0.5) and (y0 + y1) / 2 == pytest.approx(0.5)
    grid = np.zeros((10, 10))
    grid[2, 7] = 1.0
    x0, y0, x1, y1 = roi_box(grid, ratio=0.01)  # K = 1: the box is that patch
    assert (x0, y0, x1, y1) == pytest.approx((0.7, 0.2, 0.8, 0.3))


def test_roi_box_area_and_aspect():
    rng = np.random.default_rng(2)
    for ratio in (0.1, 0.25, 0.5, 0.8, 1.0):
        x0, y0, x1, y1 = roi_box(rng.normal(size=(12, 20)), ratio)
        assert (x1 - x0) * (y1 - y0) == pytest.approx(ratio)
        assert (x1 - x0) == pytest.approx(y1 - y0)  # in grid-relative units: the grid's aspect
        assert 0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0
    assert roi_box(rng.normal(size=(6, 6)), 1.0) == pytest.approx((0.0, 0.0, 1.0, 1.0))


def test_roi_box_is_shifted_not_shrunk_at_borders():
    grid = np.zeros((8, 8))
    grid[:2] = 1.0  # the top two rows: centre (0.5, 0.125), the box would stick out at the top
    x0, y0, x1, y1 = roi_box(grid, ratio=0.25)
    assert (x0, y0, x1, y1) == pytest.approx((0.25, 0.0, 0.75, 0.5))
    grid = np.zeros((8, 8))
    grid[7] = 1.0  # the bottom row: K = 8 patches, centre (0.5, 0.9375)
    x0, y0, x1, y1 = roi_box(grid, ratio=0.125)
    side = 0.125**0.5
    assert (x0, y0, x1, y1) == pytest.approx((0.5 - side / 2, 1.0 - side, 0.5 + side / 2, 1.0))
    # Paper setting: 80% of patches; the mean of the top 51 of 64 lies near the centre, box inside.
    x0, y0, x1, y1 = roi_box(np.arange(64.0).reshape(8, 8), 0.8)
    assert 0.0 <= x0 and x1 <= 1.0 and 0.0 <= y0 and y1 <= 1.0
    assert y1 == pytest.approx(1.0)  # highest scores at the bottom rows pull the box down


def test_roi_box_rejects_bad_input():
    with pytest.raises(ValueError):
        roi_box(np.zeros((4, 4)), 0.0)
    with pytest.raises(ValueError):
        roi_box(np.zeros((4, 4)), 1.2)
    with pytest.raises(ValueError):
        roi_box(np.zeros(16), 0.5)


def test_question_roi_boxes_use_selected_frames():
    scores = np.zeros((2, 3, 4, 4), np.float32)
    scores[0, 1, 0, 0] = 5.0  # question 0: top-left, on frame 1
    scores[1, 2, 3, 3] = 5.0  # question 1: bottom-right, on frame 2
    boxes = question_roi_boxes(scores, np.array([[1, 2], [0, 2]]), ratio=1 / 16)  # K = 1 patch
    assert boxes.shape == (2, 4) and boxes.dtype == np.float32
    np.testing.assert_allclose(boxes[0], [0.0, 0.0, 0.25, 0.25], atol=1e-6)
    np.testing.assert_allclose(boxes[1], [0.75, 0.75, 1.0, 1.0], atol=1e-6)
    # Frames not selected for a question do not count: question 1 ignores frame 1's hot corner.
    scores[1, 1, 0, 0] = 50.0
    np.testing.assert_allclose(question_roi_boxes(scores, np.array([[1], [2]]), 1 / 16)[1], boxes[1])
