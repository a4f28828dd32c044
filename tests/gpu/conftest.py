"""CUDA tests (tests/gpu): skipped where torch sees no CUDA device, so CI and CPU runs collect
them without running them. On a GPU machine: `python3 -m pytest -q tests/gpu` (see
bench/gpu_run.sh). Nothing here may import ray, av, decord, open_clip or pydantic at module level:
the GPU image lacks them. test_pipeline_gpu.py needs them (from the carried tarball, see
bench/pipeline_gpu.sh) and skips itself where they are missing."""

from pathlib import Path

import numpy as np
import pytest
import torch

_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    skip = None if torch.cuda.is_available() else pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if _HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.gpu)
            if skip is not None:
                item.add_marker(skip)


@pytest.fixture(autouse=True)
def exact_fp32():
    """No TF32 in fp32 matmuls and convolutions (the SigLIP patch embedding is a conv), so CUDA fp32
    matches CPU fp32 to ~1e-6."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved




@pytest.fixture
def frames():
    """Eight uint8 RGB frames of a non-square size."""
    return np.random.default_rng(1).integers(0, 256, size=(8, 40, 52, 3), dtype=np.uint8)
