"""Multi-reference partition of a video's frames (docs/DESIGN.md section 3, "Partition")."""

from __future__ import annotations


def _even_sizes(total: int, parts: int) -> list[int]:
    """`parts` sizes summing to `total`, differing by at most one, larger ones spread evenly."""
    return [(i + 1) * total // parts - i * total // parts for i in range(parts)]


def partition_frames(num_frames: int, temporal_units: int, references: int) -> list[list[int]]:
    """Split frames 0..F-1 into N references, each a list of frame indices in time order.

    The frames form min(M, F) consecutive temporal units (sizes differ by at most one); each unit is
    split into N consecutive fragments (sizes differ by at most one) and reference i is fragment i
    of every unit, concatenated in time order. With F = M * N every fragment is one frame and
    reference i holds frames i, i + N, i + 2N, ...

    Where a unit does not split evenly, which fragments get the extra frame rotates from unit to
    unit, so reference lengths also differ by at most one frame overall (always giving it to the
    first fragments would starve the last references, e.g. F=130, M=64, N=3 -> 64, 64, 2 frames).
    """
    if num_frames < 1 or temporal_units < 1 or references < 1:
        raise ValueError(
            f"num_frames, temporal_units and references must be >= 1, got {num_frames}, {temporal_units}, {references}"
        )
    if references > num_frames:
        raise ValueError(f"{references} references need at least as many frames, got {num_frames}")
    out: list[list[int]] = [[] for _ in range(references)]
    start, rotation = 0, 0
    for unit in _even_sizes(num_frames, min(temporal_units, num_frames)):
        base, extra = divmod(unit, references)
        for i in range(references):
            size = base + ((i - rotation) % references < extra)
            out[i].extend(range(start, start + size))
            start += size
        rotation = (rotation + extra) % references
    return out
