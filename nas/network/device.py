"""The device a network runs on, and how it is readied there: cuda, then mps, then cpu,
chosen once per process (`pick_device`); the CPU flushing denormal floats; channels-last on
CUDA. Every command, training or predicting, chooses its device here. Mixed precision is
nas/network/precision.py's.
"""

from __future__ import annotations

import torch
from torch import nn


def pick_device(requested: str = "auto") -> torch.device:
    """cuda, then mps, then cpu for "auto"; an explicit choice must be available. The CPU
    is readied for training (`flush_denormals`) before anything runs on it."""
    available = {
        "cuda": torch.cuda.is_available(),
        "mps": getattr(torch.backends, "mps", None) is not None
        and torch.backends.mps.is_available(),
        "cpu": True,
    }
    if requested == "auto":
        requested = next(name for name, ok in available.items() if ok)
    if not available.get(requested, False):
        raise ValueError(f"device {requested!r} is not available on this machine")
    device = torch.device(requested)
    flush_denormals(device)
    if device.type == "cuda":  # pick the fastest convolution for each shape, as nnU-Net does
        torch.backends.cudnn.benchmark = True
    return device


def flush_denormals(device: torch.device) -> None:
    """On the CPU, flush denormal floats to zero, as TensorFlow does by default: a network
    without normalisation otherwise fills with them as it trains, and its epochs slowed
    fivefold on the default run (benchmarks/denormals.py). The setting is per thread and
    threads inherit it when they start, so it must come before the first parallel operation
    of the process starts PyTorch's CPU threads: `pick_device` makes it, and `fit` again for
    callers that did not pick a device."""
    if device.type == "cpu":
        torch.set_flush_denormal(True)


def memory_format(spatial_dims: int, device: torch.device) -> torch.memory_format:
    """Channels-last on CUDA, where it speeds up convolutions; the default elsewhere."""
    if device.type != "cuda":
        return torch.contiguous_format
    return torch.channels_last if spatial_dims == 2 else torch.channels_last_3d


def prepare_model(model: nn.Module, spatial_dims: int, device: torch.device) -> nn.Module:
    """Move to `device`, in the memory format its batches will have there."""
    flush_denormals(device)
    return model.to(device, memory_format=memory_format(spatial_dims, device))
