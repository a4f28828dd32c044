"""Where a model runs: one rule for the Video-LLM and the CLIP stage, without importing either."""

from __future__ import annotations

import torch


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """"auto": CUDA when this process sees a GPU, else the CPU; asking for CUDA without one fails."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but no CUDA device is visible to this process")
    return device
