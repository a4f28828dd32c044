import itertools

import pytest

from freemoref.partition import partition_frames

CASES = [(1, 1, 1), (7, 3, 2), (10, 4, 3), (128, 64, 2), (130, 64, 3), (200, 64, 4), (5, 64, 2), (512, 64, 8),
         (33, 8, 5), (9, 2, 9)]


@pytest.mark.parametrize("frames,units,refs", CASES)
def test_every_frame_exactly_once_in_time_order(frames, units, refs):
    parts = partition_frames(frames, units, refs)
    assert len(parts) == refs
    assert sorted(itertools.chain(*parts)) == list(range(frames))
    for p in parts:
        assert p == sorted(p) and len(p) >= 1


def _units(frames, units):
    """Unit boundaries: M' = min(M, F) consecutive units at floor(i * F / M'), sizes differing by <= 1."""
    m = min(units, frames)
    edges = [i * frames // m for i in range(m + 1)]
    return [range(a, b) for a, b in zip(edges, edges[1:])]


@pytest.mark.parametrize("frames,units,refs", CASES)
def test_fragments_consecutive_and_balanced(frames, units, refs):
    parts = partition_frames(frames, units, refs)
    owner = {f: i for i, p in enumerate(parts) for f in p}
    for unit in _units(frames, units):
        sizes = [list(owner[f] for f in unit).count(i) for i in range(refs)]
        # within a unit: fragment i goes to reference i, consecutive, in reference order
        assert [owner[f] for f in unit] == sorted(owner[f] for f in unit)
        assert max(sizes) - min(sizes) <= 1
    lengths = [len(p) for p in parts]
    assert max(lengths) - min(lengths) <= 1  # remainders rotate, so no reference starves


def test_stride_pattern_m64():
    for n in (1, 2, 4, 8):
        parts = partition_frames(64 * n, 64, n)
        assert parts == [list(range(i, 64 * n, n)) for i in range(n)]


def test_more_units_than_frames_and_unbalanced_case():
    assert partition_frames(5, 64, 1) == [[0, 1, 2, 3, 4]]
    assert partition_frames(5, 64, 2) == [[0, 2, 4], [1, 3]]  # 5 one-frame units: one fragment of each is empty
    parts = partition_frames(130, 64, 3)
    assert sorted(len(p) for p in parts) == [43, 43, 44]


def test_invalid_arguments():
    with pytest.raises(ValueError, match="references need"):
        partition_frames(3, 64, 4)
    with pytest.raises(ValueError):
        partition_frames(0, 64, 1)
    with pytest.raises(ValueError):
        partition_frames(8, 0, 1)
