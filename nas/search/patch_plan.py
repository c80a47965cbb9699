"""Plan the training patch and batch sizes a search space leaves to `auto`, as nnU-Net does.

The fingerprint is the median shape of the preprocessed (cropped, resampled) cases and their
spacing. A 2D patch starts as the median slice, a 3D patch as the median volume; while a
patch holds more voxels than a step's budget allows at the smallest batch, the axis that is
longest in millimetres shrinks, so patches tend towards a cube in mm, and the thick-slice
axis of an anisotropic scan gives way first. Every axis stays a multiple of the deepest
network's total stride (the sampler and the network pad what the case lacks). The batch then
fills the budget. The budget is per device type: a GPU affords far more voxels per step than
a CPU, and whether a given candidate fits in memory is checked per trial by `nas.network.memory`. On
a CPU a 2D patch is a crop of at most `CPU_MAX_SLICE_CROP` per axis with a larger batch,
rather than nnU-Net's whole slice.

Explicit values in the space win; a searched patch with an `auto` batch gets the batch of
its largest choice. Only study-level code calls this (before the study opens), so the
trainer only ever sees concrete sizes; `TrainConfig` refuses `auto`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from nas.core.errors import NasError
from nas.data import Dataset
from nas.search.space import SearchSpace, possible_values
from nas.search.space_spec import AUTO, CategoricalSpec, FloatSpec, IntSpec
from nas.training.train_config import MAX_PATCH_SIZE, TrainConfig

if TYPE_CHECKING:
    import torch

# Voxels per optimiser step (batch x patch voxels), by device type.
# cpu: what the hand-tuned sizes for the embedded dataset cost (16 slices of 64^2 in 2D,
#   2 patches of 32^3 in 3D), with which the default search was sized for 2 CPU cores.
# cuda: what nnU-Net's default plans settle on for an 8 GB GPU: 12 slices of 512^2 (2D),
#   2 patches of 128^3 (3D). A candidate wider than nnU-Net's U-Net may not fit; check_fits
#   then fails it as a trial, before it is built.
# mps: a quarter of cuda: Apple GPUs share the host's memory and have a fraction of the
#   throughput of a datacenter GPU.
STEP_VOXELS = {
    "cpu": {2: 16 * 64**2, 3: 2 * 32**3},
    "cuda": {2: 12 * 512**2, 3: 2 * 128**3},
    "mps": {2: 3 * 512**2, 3: 128**3 // 2},
}
# nnU-Net's smallest batch (batch statistics and gradient noise need more than one sample),
# and a ceiling past which a small patch gains nothing from a larger batch but time.
MIN_BATCH, MAX_BATCH = 2, 64
# On a CPU a 2D patch is at most this many voxels per axis (rounded down to the stride), and
# the batch fills the budget: on a real MRI task (median slice 160x160), 8 crops of 96x96
# learned faster per second of training than the 2 whole slices the budget allows. A CPU
# step is slow, so more, smaller samples per step see more of the data per second. A GPU
# keeps nnU-Net's whole slices.
CPU_MAX_SLICE_CROP = 96
AXIS_NAMES = "XYZ"  # RAS voxel axes of a preprocessed case
SPEC_TYPES = (IntSpec, FloatSpec, CategoricalSpec)


@dataclasses.dataclass(frozen=True)
class DimsPlan:
    """The patch and batch one kind of network (2D or 3D) trains with.

    patch_size: in-plane (the two axes other than the slice axis) for 2D, (X, Y, Z) for 3D.
    size_multiple: every planned patch axis is a multiple of this (the deepest planned
        network's total stride); None where the patch was given.
    planned: which of patch and batch were planned (the others were given or searched).
    searched: which of them each trial draws: a searched patch with an `auto` batch has the
        batch planned for its largest choice, which patch_size then holds.
    note: why the plan is for shallower networks than the space can draw, if it is.
    """

    spatial_dims: int
    patch_size: tuple[int, ...]
    batch_size: int
    size_multiple: int | None
    planned: tuple[str, ...]
    note: str | None = None
    searched: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class PatchPlan:
    """The fingerprint the sizes were planned from, and the sizes per kind of network."""

    device_type: str
    n_cases: int
    median_shape: tuple[int, int, int]  # voxels (X, Y, Z) after crop and resampling
    spacing_mm: tuple[float, float, float]
    slice_axis: int
    # 2D, then 3D; none for a kind whose batch is searched, or whose patch is searched with
    # a given batch: nothing is left to plan.
    dims: tuple[DimsPlan, ...]

    def apply(self, space: SearchSpace) -> SearchSpace:
        """`space` with the planned sizes in place of `auto` (the file's order kept)."""
        values = {}
        for plan in self.dims:
            values[f"patch_size_{plan.spatial_dims}d"] = plan.patch_size
            values[f"batch_size_{plan.spatial_dims}d"] = plan.batch_size
        train = {
            name: values[name] if entry == AUTO else entry for name, entry in space.train.items()
        }
        return space.model_copy(update={"train": train})

    def describe(self) -> str:
        """One line: 'patch plan for cpu from 24 cases of median 64x64x32 voxels at
        1.5x1.5x3 mm: 2D 16 x 64x64 (slices along Z), 3D 2 x 40x40x16'."""
        parts = []
        for plan in self.dims:
            kind = f"{plan.spatial_dims}D"
            text = f"{kind} {plan.batch_size} x {_x(plan.patch_size)}"
            if plan.spatial_dims == 2:
                text += f" (slices along {AXIS_NAMES[self.slice_axis]})"
            given = [
                what
                for what in ("batch", "patch")
                if what not in plan.planned and what not in plan.searched
            ]
            if given:
                text += f" ({' and '.join(given)} given)"
            if "patch" in plan.searched:
                text += " (patch searched: the batch fits its largest choice)"
            if plan.note:
                text += f" ({plan.note})"
            parts.append(text)
        return (
            f"patch plan for {self.device_type} from {self.n_cases} cases of median "
            f"{_x(self.median_shape)} voxels at {_x(self.spacing_mm)} mm: " + ", ".join(parts)
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable, for the study's user attrs."""
        return dataclasses.asdict(self)


def plan_patches(space: SearchSpace, dataset: Dataset, device: torch.device | str) -> PatchPlan:
    """Plan the patch and batch sizes `space` leaves to `auto`, for `dataset` on `device`.

    Sizes are planned for 2D and 3D alike (a TrainConfig holds both), but a dataset too
    small for the shallowest network the space draws is an error only for the kinds of
    network the space draws. NasError names the dataset, or the train entry, at fault.
    """
    device_type = str(device).partition(":")[0]  # cuda:1 -> cuda, as torch.device(...).type
    budget = STEP_VOXELS.get(device_type, STEP_VOXELS["cpu"])
    median_shape = tuple(
        math.floor(m + 0.5) for m in np.median([case.label.shape for case in dataset.cases], 0)
    )
    spacing_mm = tuple(float(s) for s in dataset.plan.target_spacing_mm)
    slice_axis = space.data.slice_axis
    drawn_dims = possible_values(space, "spatial_dims")
    largest_slice = CPU_MAX_SLICE_CROP if device_type == "cpu" else MAX_PATCH_SIZE[2]
    plans = []
    for spatial_dims in (2, 3):
        axes = [a for a in range(3) if a != slice_axis] if spatial_dims == 2 else [0, 1, 2]
        plan = _plan_dims(
            space,
            dataset,
            spatial_dims,
            axes,
            [median_shape[a] for a in axes],
            [spacing_mm[a] for a in axes],
            budget[spatial_dims],
            largest_slice if spatial_dims == 2 else MAX_PATCH_SIZE[3],
            spatial_dims in drawn_dims,
        )
        if plan is not None:
            plans.append(plan)
    return PatchPlan(device_type, len(dataset.cases), median_shape, spacing_mm, slice_axis,
                     tuple(plans))  # fmt: skip


def _plan_dims(
    space: SearchSpace,
    dataset: Dataset,
    spatial_dims: int,
    axes: Sequence[int],
    median: Sequence[int],
    spacing_mm: Sequence[float],
    step_voxels: int,
    max_size: int,
    drawn: bool,
) -> DimsPlan | None:
    """The plan for one kind of network (patches at most `max_size` per axis); None where
    nothing is left to plan."""
    patch_field, batch_field = f"patch_size_{spatial_dims}d", f"batch_size_{spatial_dims}d"
    defaults = TrainConfig()
    patch = space.train.get(patch_field, getattr(defaults, patch_field))
    batch = space.train.get(batch_field, getattr(defaults, batch_field))
    if _is_searched(batch):
        if patch == AUTO:
            raise NasError(
                f"train.{patch_field}",
                f"auto is planned from a fixed {batch_field}, which is searched here; "
                f"give {patch_field} a value too",
            )
        return None
    if _is_searched(patch):
        return _plan_batch_for_searched_patch(spatial_dims, patch, batch, step_voxels)
    planned = []
    multiple, note = None, None
    if patch == AUTO:
        depth, note = _deepest_fitting_depth(space, dataset, spatial_dims, axes, median, drawn)
        multiple = 2 ** (depth - 1)
        per_sample = step_voxels // (MIN_BATCH if batch == AUTO else batch)
        patch = _fit_patch(median, spacing_mm, multiple, per_sample, max_size)
        planned.append("patch")
    if batch == AUTO:
        batch = _filling_batch(patch, step_voxels)
        planned.append("batch")
    return DimsPlan(spatial_dims, tuple(patch), batch, multiple, tuple(planned), note)


def _plan_batch_for_searched_patch(
    spatial_dims: int, patch: tuple[CategoricalSpec, ...], batch: Any, step_voxels: int
) -> DimsPlan | None:
    """A searched patch with an `auto` batch: one batch for every choice, the one that fills
    the budget with the largest. A space cannot make the batch follow the patch drawn, and
    sized for the largest choice every candidate keeps within the step's budget (smaller
    patches train on fewer voxels per step). None where the batch is given."""
    if batch != AUTO:
        return None
    largest = max((choice for spec in patch for choice in spec.choices), key=math.prod)
    batch_size = _filling_batch(largest, step_voxels)
    return DimsPlan(spatial_dims, tuple(largest), batch_size, None, ("batch",), searched=("patch",))


def _filling_batch(patch: Sequence[int], step_voxels: int) -> int:
    """The batch of `patch` that fills a step's voxel budget, within MIN_BATCH..MAX_BATCH (a
    patch larger than the budget still trains with the smallest batch)."""
    return min(max(step_voxels // math.prod(patch), MIN_BATCH), MAX_BATCH)


def _deepest_fitting_depth(
    space: SearchSpace,
    dataset: Dataset,
    spatial_dims: int,
    axes: Sequence[int],
    median: Sequence[int],
    drawn: bool,
) -> tuple[int, str | None]:
    """The deepest network (of those the space draws) whose total stride, 2**(depth-1) per
    axis, leaves the median case at least one voxel on every axis; and a note if deeper
    ones are drawn. A network deeper than that pads the patch to its stride."""
    depths = possible_values(space, "depth", spatial_dims)
    smallest = min(median)
    axis = axes[list(median).index(smallest)]
    fitting = [d for d in depths if 2 ** (d - 1) <= smallest]
    if not fitting and drawn:
        shallowest = min(depths)
        raise NasError(
            dataset.root,
            f"the median case is {smallest} voxels along axis {axis} "
            f"({AXIS_NAMES[axis]}), but the shallowest {spatial_dims}D network the search "
            f"space draws (depth {shallowest}) downsamples it {2 ** (shallowest - 1)}-fold; "
            f"allow a smaller depth or give patch_size_{spatial_dims}d explicitly",
        )
    deepest = max(fitting, default=1)
    if deepest >= max(depths):
        return deepest, None
    return deepest, (
        f"planned for depth <= {deepest}: axis {AXIS_NAMES[axis]} is {smallest} voxels, "
        "too few for deeper networks, which pad it"
    )


def _fit_patch(
    median: Sequence[int],
    spacing_mm: Sequence[float],
    multiple: int,
    max_voxels: int,
    max_size: int,
) -> list[int]:
    """The median shape rounded up to `multiple` (each axis capped at `max_size`), shrunk
    one `multiple` at a time along the axis longest in mm (then the largest relative to the
    median) until it holds at most `max_voxels`, or every axis is down to `multiple`."""
    cap = max(multiple, max_size // multiple * multiple)
    patch = [min(-(-size // multiple) * multiple, cap) for size in median]
    while math.prod(patch) > max_voxels:
        shrinkable = [a for a in range(len(patch)) if patch[a] > multiple]
        if not shrinkable:
            break
        axis = max(shrinkable, key=lambda a: (patch[a] * spacing_mm[a], patch[a] / median[a]))
        patch[axis] -= multiple
    return patch


def _is_searched(entry: Any) -> bool:
    """A parsed entry drawn per trial (a tuple of specs), not a fixed value."""
    return isinstance(entry, tuple) and bool(entry) and isinstance(entry[0], SPEC_TYPES)


def _x(values: Sequence[float]) -> str:
    return "x".join(f"{v:g}" for v in values)
