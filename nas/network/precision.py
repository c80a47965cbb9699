"""Mixed precision where a GPU is present, and only there: which dtype, and the autocast
context that training, validation and prediction run their forward passes under.

bfloat16 where the GPU supports it (Ampere and later): its float32 range needs no loss
scaling; float16 with a gradient scaler elsewhere. The CPU and MPS run in float32.
"""

from __future__ import annotations

import contextlib

import torch


def amp_dtype(device: torch.device) -> torch.dtype | None:
    """The reduced precision forward passes use on `device` (None: full float32)."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast to `amp_dtype(device)` on CUDA; nothing elsewhere."""
    dtype = amp_dtype(device)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=dtype)


def gradient_scaler(device: torch.device) -> torch.amp.GradScaler | None:
    """A loss scaler where float16 needs one (its range underflows small gradients)."""
    return torch.amp.GradScaler("cuda") if amp_dtype(device) == torch.float16 else None
