"""A network run over a whole volume window by window: MONAI's sliding-window inference.

2D networks predict each slice along the slice axis, 3D networks the volume; both with the
training patch size as the window and Gaussian blending, so the network sees at test time
the field of view it was trained on (as nnU-Net does). The volume stays on the device,
windows go through the network several at a time (`windows_per_batch`; a 2D network's from
several slices at once), as many as the memory available holds (`windows_that_fit`), under
mixed precision on CUDA, and a prediction that takes a while shows a progress bar on a
terminal. Validation, cross-validation, held-out tests and nas.predict all predict a whole
case through here. Knows nothing of scores or of training.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import numpy as np
import torch
from monai.data.utils import dense_patch_slices
from monai.inferers import sliding_window_inference
from torch import nn
from tqdm import tqdm

from nas.data import Case
from nas.data.labels import LabelScheme
from nas.network.precision import autocast

# Of a sliding window, the share its neighbours overlap: validation always, predict by default.
DEFAULT_OVERLAP = 0.25
# Windows per forward pass of a whole-case prediction (nas.predict takes 8), but for 3D
# windows on a CPU (`windows_per_batch`).
WINDOWS_PER_BATCH = 16
# On a CPU, 3D windows go through 4 at a time: a batch's activations then stay in the cache.
# On 2 cores, a 32^3 window took 12-24 ms in batches of 2 to 4 and 21-40 ms in batches of 16
# (two 3D U-Nets of 37k and 369k parameters); 2D windows cost the same from 4 to 32.
CPU_3D_WINDOWS_PER_BATCH = 4


def windows_per_batch(spatial_dims: int, device: torch.device) -> int:
    """Windows per forward pass of a whole-case prediction on `device`."""
    if device.type == "cpu" and spatial_dims == 3:
        return CPU_3D_WINDOWS_PER_BATCH
    return WINDOWS_PER_BATCH


def windows_that_fit(wanted: int, window_bytes: int, device: torch.device) -> int:
    """Windows per forward pass: `wanted`, fewer where that many windows of `window_bytes`
    each (nas.network.memory.estimate_inference_bytes) would not fit in what `device` has available;
    at least one (a model whose one window does not fit is refused when its card is read)."""
    from nas.core.resources import available_host_bytes, default_memory_limit_bytes

    if device.type == "cpu":
        available = available_host_bytes()
    else:
        available = default_memory_limit_bytes(device)
    return max(1, min(wanted, available // max(window_bytes, 1)))


# A prediction shows its progress bar once it has taken this long (on a terminal only).
PROGRESS_AFTER_S = 2.0


def window_count(
    shape: Sequence[int],
    patch_size: Sequence[int],
    slice_axis: int = 2,
    overlap: float = DEFAULT_OVERLAP,
) -> int:
    """How many windows `predict_logits` runs over a volume of `shape` (X, Y, Z): for a 2D
    `patch_size`, those of every slice along `slice_axis`."""
    if len(patch_size) == 2:
        plane = [n for axis, n in enumerate(shape) if axis != slice_axis]
        return shape[slice_axis] * _windows(plane, patch_size, overlap)
    return _windows(shape, patch_size, overlap)


def _windows(shape: Sequence[int], patch_size: Sequence[int], overlap: float) -> int:
    """Windows of MONAI's sliding-window inference over one image of `shape`."""
    size = [max(n, p) for n, p in zip(shape, patch_size, strict=True)]  # padded up to a window
    # MONAI's scan interval: a window's length less the overlap, or the whole axis.
    interval = [
        p if p == n else max(int(p * (1 - overlap)), 1)
        for n, p in zip(size, patch_size, strict=True)
    ]
    return len(dense_patch_slices(size, patch_size, interval))


@torch.no_grad()
def predict_logits(
    model: Callable[[torch.Tensor], torch.Tensor],
    image: np.ndarray,
    patch_size: Sequence[int],
    device: torch.device,
    slice_axis: int = 2,
    batch: int | None = None,
    overlap: float = DEFAULT_OVERLAP,
) -> torch.Tensor:
    """Logits (K, X, Y, Z) on `device` for one preprocessed image (C, X, Y, Z); what `model`
    returns per window, so probabilities for a nas.network.inference.Predictor.

    patch_size: in-plane size for a 2D network (which sees slices along `slice_axis`),
    (X, Y, Z) for a 3D one. overlap: the share of a window its neighbours cover, in [0, 1).
    batch: windows per call of `model` (None: `windows_per_batch`); for a 2D network, from
    several slices.
    """
    # A copy: cached arrays are read-only memory maps.
    inputs = torch.from_numpy(np.array(image, dtype=np.float32)).to(device)
    two_d = len(patch_size) == 2
    batch = batch or windows_per_batch(len(patch_size), device)
    # 2D: the slices are the batch, (S, C, a, b), and MONAI batches windows across them;
    # 3D: one volume, (1, C, X, Y, Z).
    inputs = inputs.movedim(slice_axis + 1, 0) if two_d else inputs.unsqueeze(0)
    total = window_count(image.shape[1:], patch_size, slice_axis, overlap)
    # disable=None: on a terminal only, not in logs or captured output.
    progress = tqdm(total=total, desc="sliding windows", unit="window", leave=False,
                    delay=PROGRESS_AFTER_S, disable=None)  # fmt: skip

    def counted(windows: torch.Tensor) -> torch.Tensor:
        logits = model(windows)
        progress.update(len(windows))
        return logits

    with contextlib.closing(progress), autocast(device):
        logits = sliding_window_inference(
            inputs, tuple(patch_size), batch, counted, overlap=overlap, mode="gaussian"
        )
    return logits.movedim(0, slice_axis + 1) if two_d else logits[0]


def predict_case(
    model: nn.Module,
    case: Case,
    scheme: LabelScheme,
    patch_size: Sequence[int],
    device: torch.device,
    slice_axis: int = 2,
) -> np.ndarray:
    """Class-index map (X, Y, Z) for one preprocessed case."""
    logits = predict_logits(model, case.image, patch_size, device, slice_axis)
    return scheme.classes_from_logits(logits).cpu().numpy()
