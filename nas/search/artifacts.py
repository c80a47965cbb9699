"""What a trial leaves for people to look at: an overlay PNG of a validation case, and its
weights, uploaded through `optuna.artifacts` to the study's artifact store (results/<study>/
artifacts, or the store the hosts of the study share) so that optuna-dashboard shows and
serves them beside the trial.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import optuna  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from nas.data import Case  # noqa: E402
from nas.data.labels import LabelScheme  # noqa: E402
from nas.network.windows import predict_logits  # noqa: E402
from nas.search.weights import trial_name  # noqa: E402

OVERLAYS_DIR = "overlays"


def overlay_path(study_dir: Path, trial_number: int) -> Path:
    return study_dir / OVERLAYS_DIR / f"{trial_name(trial_number)}.png"


def example_case(cases: Sequence[Case]) -> Case:
    """The validation case every trial's overlay shows: the one with most foreground."""
    return max(cases, key=lambda case: (int(np.count_nonzero(case.label)), case.name))


@torch.no_grad()
def _shown_prediction(
    model: nn.Module,
    case: Case,
    scheme: LabelScheme,
    patch_size: Sequence[int],
    device: torch.device,
    slice_axis: int,
    index: int,
) -> np.ndarray:
    """The class map of slice `index` alone: a 2D network predicts that slice, a 3D one the
    slab of its patch's depth around it. The whole case would cost a whole-volume prediction
    per trial for one slice shown (on whole brains, most of a trial's time outside training)."""
    depth = 1 if len(patch_size) == 2 else patch_size[slice_axis]
    size = case.label.shape[slice_axis]
    start = max(0, min(index - depth // 2, size - depth))
    stop = min(size, start + depth)
    slab = np.take(np.asarray(case.image), range(start, stop), axis=slice_axis + 1)
    was_training = model.training
    model.eval()
    logits = predict_logits(model, slab, patch_size, device, slice_axis)
    model.train(was_training)
    classes = scheme.classes_from_logits(logits).cpu().numpy()
    return np.take(classes, index - start, axis=slice_axis)


def write_overlay(
    model: nn.Module,
    case: Case,
    scheme: LabelScheme,
    patch_size: Sequence[int],
    device: torch.device,
    slice_axis: int,
    path: Path,
    title: str,
) -> Path:
    """Image, ground truth and prediction on the slice with most ground-truth foreground."""
    label = np.asarray(case.label)
    other = tuple(a for a in range(3) if a != slice_axis)
    index = int(np.argmax((label > 0).sum(axis=other)))

    def cut(volume: np.ndarray) -> np.ndarray:
        return np.take(volume, index, axis=slice_axis).T  # rows: second in-plane axis

    predicted = _shown_prediction(model, case, scheme, patch_size, device, slice_axis, index)
    image, truth, predicted = cut(np.asarray(case.image[0])), cut(label), predicted.T
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.3))
    for ax, (name, mask, colour) in zip(
        axes,
        (("image", None, None), ("ground truth", truth, "lime"), ("prediction", predicted, "red")),
        strict=True,
    ):
        ax.imshow(image, cmap="gray", origin="lower")
        if mask is not None:
            ax.imshow(np.ma.masked_where(mask == 0, mask), cmap=_solid(colour), alpha=0.6,
                      origin="lower", interpolation="nearest")  # fmt: skip
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.suptitle(f"{title} — {case.name}, slice {index} of axis {slice_axis}", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.92))  # room for the title above the panel titles
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def _solid(colour: str) -> matplotlib.colors.Colormap:
    return matplotlib.colors.ListedColormap([colour])


def upload(trial: optuna.Trial, store: Any, path: Path) -> str:
    """Attach `path` to the running trial through `store` (the study's artifact store,
    `TrialFiles.dashboard_store`); optuna-dashboard lists and serves it."""
    return optuna.artifacts.upload_artifact(
        artifact_store=store, file_path=str(path), study_or_trial=trial
    )
