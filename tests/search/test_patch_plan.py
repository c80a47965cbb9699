"""`patch_size: auto` / `batch_size: auto`: sizes planned from the dataset and the device."""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import numpy as np
import optuna
import pytest

from nas.core.errors import NasError
from nas.data import load_dataset
from nas.search.draw import sample
from nas.search.patch_plan import CPU_MAX_SLICE_CROP, STEP_VOXELS, plan_patches
from nas.search.space_file import load_space
from nas.training.train_config import TrainConfig
from tests.datasets import save

CPU_2D, CPU_3D = STEP_VOXELS["cpu"][2], STEP_VOXELS["cpu"][3]
AUTO_TRAIN = """\
  batch_size_2d: auto
  patch_size_2d: auto
  batch_size_3d: auto
  patch_size_3d: auto
"""


def write_dataset(root: Path, shapes, spacing_mm) -> Path:
    """An nnU-Net raw dataset of one channel, a case per shape; every voxel is nonzero, so
    the crop keeps whole volumes, and the median spacing is theirs, so none is resampled."""
    for i, shape in enumerate(shapes):
        image = (1.0 + np.random.default_rng(i).random(shape)).astype(np.float32)
        label = np.zeros(shape, np.uint8)
        label[tuple(n // 2 for n in shape)] = 1
        save(image, root / "imagesTr" / f"case_{i:03d}_0000.nii.gz", spacing_mm)
        save(label, root / "labelsTr" / f"case_{i:03d}.nii.gz", spacing_mm)
    meta = {
        "channel_names": {"0": "MRI"},
        "labels": {"background": 0, "lesion": 1},
        "numTraining": len(shapes),
        "file_ending": ".nii.gz",
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def load(tmp_path: Path, data: Path, search: str, train: str = AUTO_TRAIN, slice_axis: int = 2):
    path = tmp_path / "space.yaml"
    path.write_text(
        f"data:\n  path: {data}\n  slice_axis: {slice_axis}\n"
        + f"search:\n{textwrap.indent(search, '  ')}\ntrain:\n{train}"
    )
    space = load_space(path)
    return space, load_dataset(space.data)


def by_dims(plan):
    return {d.spatial_dims: d for d in plan.dims}


def test_2d_takes_the_whole_median_slice_and_the_batch_fills_the_budget(tmp_path):
    data = write_dataset(tmp_path / "d", [(40, 48, 8), (48, 48, 8), (56, 48, 8)], (1, 1, 1))
    space, dataset = load(tmp_path, data, "spatial_dims: 2\ndepth: 3")

    plan = plan_patches(space, dataset, "cpu")

    two_d = by_dims(plan)[2]
    assert two_d.patch_size == (48, 48)  # the median slice, already a multiple of 4
    slice_voxels = 48 * 48
    assert two_d.batch_size * slice_voxels <= CPU_2D < (two_d.batch_size + 1) * slice_voxels
    line = plan.describe()
    assert "\n" not in line
    assert "median 48x48x8 voxels at 1x1x1 mm" in line and "2D 28 x 48x48" in line


def test_a_thick_slice_axis_is_the_first_to_shrink(tmp_path):
    """The same voxel shape shrinks along Z when Z is 3 mm thick, and keeps Z whole when
    voxels are isotropic: patches tend towards a cube in millimetres."""
    shape = (48, 48, 24)  # 55k voxels: more than the CPU budget of a 3D sample at batch 2
    thick = write_dataset(tmp_path / "thick", [shape] * 2, (1, 1, 3))
    iso = write_dataset(tmp_path / "iso", [shape] * 2, (1, 1, 1))
    search = "spatial_dims: 3\ndepth: 4"

    thick_patch = by_dims(plan_patches(*load(tmp_path, thick, search), "cpu"))[3].patch_size
    iso_patch = by_dims(plan_patches(*load(tmp_path, iso, search), "cpu"))[3].patch_size

    assert thick_patch[2] < 24 and thick_patch[2] * 3 <= max(thick_patch[:2])
    assert iso_patch[2] == 24 and max(iso_patch[:2]) < 48
    for patch in (thick_patch, iso_patch):
        assert math.prod(patch) <= CPU_3D // 2


def test_every_planned_axis_is_a_multiple_of_the_deepest_networks_stride(tmp_path):
    data = write_dataset(tmp_path / "d", [(45, 37, 21), (47, 39, 19), (45, 35, 21)], (1, 1, 2))
    space, dataset = load(tmp_path, data, "spatial_dims: {type: categorical, choices: [2, 3]}\n"
                          "depth: {type: int, low: 2, high: 4}")  # fmt: skip

    plan = plan_patches(space, dataset, "cpu")

    for dims in plan.dims:
        assert dims.size_multiple == 8 and dims.note is None
        assert all(size % 8 == 0 for size in dims.patch_size), dims
    assert by_dims(plan)[2].patch_size == (48, 40)  # the median slice, rounded up: padded
    # The planned space samples concrete sizes, and every trial records them.
    planned = plan.apply(space)
    trial = optuna.create_study().ask()
    candidate = sample(planned, trial, in_channels=1, out_channels=1, seed=0)
    assert candidate.train.patch_size_2d == (48, 40)
    assert candidate.train.patch_size_3d == by_dims(plan)[3].patch_size


def test_given_sizes_are_kept_and_the_rest_planned_around_them(tmp_path):
    data = write_dataset(tmp_path / "d", [(64, 64, 32)] * 2, (1, 1, 1))
    train = "  patch_size_2d: [32, 32]\n  batch_size_2d: auto\n  batch_size_3d: 4\n"
    train += "  patch_size_3d: auto\n  epochs: 3\n"
    space, dataset = load(tmp_path, data, "depth: 3", train)

    plan = plan_patches(space, dataset, "cpu")
    planned = plan.apply(space).train

    assert planned["patch_size_2d"] == (32, 32)
    assert planned["batch_size_2d"] == CPU_2D // (32 * 32)
    assert planned["batch_size_3d"] == 4 and planned["epochs"] == 3
    assert math.prod(planned["patch_size_3d"]) <= CPU_3D // 4
    assert "(patch given)" in plan.describe() and "(batch given)" in plan.describe()


def test_a_gpu_gets_larger_steps_than_a_cpu(tmp_path):
    data = write_dataset(tmp_path / "d", [(96, 96, 48)] * 2, (1, 1, 1))
    space, dataset = load(tmp_path, data, "spatial_dims: 3\ndepth: 4")

    cpu, cuda = (by_dims(plan_patches(space, dataset, d))[3] for d in ("cpu", "cuda"))

    assert cuda.patch_size == (96, 96, 48)  # the whole median volume
    assert cuda.batch_size * math.prod(cuda.patch_size) > cpu.batch_size * math.prod(cpu.patch_size)


def test_cases_too_thin_for_the_shallowest_network_are_refused_naming_the_dataset(tmp_path):
    data = write_dataset(tmp_path / "d", [(32, 32, 4)] * 3, (1, 1, 1))
    space, dataset = load(tmp_path, data, "spatial_dims: 3\ndepth: {type: int, low: 4, high: 5}")

    with pytest.raises(NasError) as err:
        plan_patches(space, dataset, "cpu")

    assert err.value.source == str(data)
    assert "4 voxels along axis 2 (Z)" in err.value.reason
    assert "depth 4" in err.value.reason and "8-fold" in err.value.reason
    assert "smaller depth" in err.value.reason and "patch_size_3d" in err.value.reason


def test_only_the_deeper_networks_too_deep_plans_for_the_deepest_that_fits(tmp_path):
    data = write_dataset(tmp_path / "d", [(32, 32, 4)] * 3, (1, 1, 1))
    space, dataset = load(tmp_path, data, "spatial_dims: 3\ndepth: {type: int, low: 2, high: 4}")

    plan = plan_patches(space, dataset, "cpu")

    three_d = by_dims(plan)[3]
    assert three_d.size_multiple == 4 and three_d.patch_size == (32, 32, 4)
    assert "depth <= 3" in plan.describe()


def test_a_space_that_draws_no_3d_network_is_not_refused_for_thin_cases(tmp_path):
    data = write_dataset(tmp_path / "d", [(32, 32, 2)] * 3, (1, 1, 1))
    space, dataset = load(tmp_path, data, "spatial_dims: 2\ndepth: 4")  # slices along Z

    plan = plan_patches(space, dataset, "cpu")

    assert by_dims(plan)[2].patch_size == (32, 32)


def test_auto_loads_and_a_wrong_word_is_refused_naming_the_key(tmp_path):
    data = write_dataset(tmp_path / "d", [(16, 16, 8)] * 2, (1, 1, 1))
    space, _ = load(tmp_path, data, "depth: 2")
    assert space.train["patch_size_2d"] == "auto"

    path = tmp_path / "banana.yaml"
    path.write_text(f"data:\n  path: {data}\ntrain:\n  patch_size_2d: banana\n")
    with pytest.raises(NasError) as err:
        load_space(path)
    assert err.value.source == str(path)
    assert "train.patch_size_2d: invalid value 'banana'" in err.value.reason
    assert "auto" in err.value.reason


def test_the_trainer_never_sees_auto():
    with pytest.raises(ValueError, match="patch_size_3d is 'auto': plan it"):
        TrainConfig(patch_size_3d="auto")


def test_a_cpu_crops_large_slices_and_fills_the_budget_with_batch(tmp_path):
    """Median slices of 160x160 (a real MRI task's, after preprocessing): on a CPU, batches of
    96x96 crops rather than 2 whole slices; a GPU keeps nnU-Net's whole slice."""
    data = write_dataset(tmp_path / "d", [(160, 160, 4)] * 2, (1, 1, 1))
    space, dataset = load(tmp_path, data, "spatial_dims: 2\ndepth: 4")

    cpu, cuda = (by_dims(plan_patches(space, dataset, d))[2] for d in ("cpu", "cuda"))

    assert cpu.patch_size == (CPU_MAX_SLICE_CROP, CPU_MAX_SLICE_CROP) == (96, 96)
    assert cpu.batch_size == CPU_2D // (96 * 96) == 7
    assert cuda.patch_size == (160, 160)


def test_the_embedded_datasets_cpu_plan_is_unchanged(tmp_path):
    """The default space on the embedded dataset plans what earlier runs trained with."""
    data = tmp_path / "Dataset001_SyntheticLesions"
    space = load_space("search_spaces/unet.yaml", settings=[f"data.path={data}"])
    plan = plan_patches(space, load_dataset(space.data), "cpu")
    assert plan.describe().endswith("2D 16 x 64x64 (slices along Z), 3D 2 x 40x40x16")


def test_a_searched_patch_gets_the_batch_of_its_largest_choice(tmp_path):
    data = write_dataset(tmp_path / "d", [(64, 64, 8)] * 2, (1, 1, 1))
    train = (
        "  patch_size_2d: {type: categorical, choices: [[32, 32], [64, 32], [48, 48]]}\n"
        "  batch_size_2d: auto\n"
    )
    space, dataset = load(tmp_path, data, "spatial_dims: 2\ndepth: 3", train)

    plan = plan_patches(space, dataset, "cpu")
    planned = plan.apply(space)

    two_d = by_dims(plan)[2]
    assert two_d.patch_size == (48, 48) and two_d.batch_size == CPU_2D // (48 * 48)
    assert planned.train["batch_size_2d"] == CPU_2D // (48 * 48)
    assert "2D 28 x 48x48 (slices along Z) (patch searched: the batch fits its largest" in (
        plan.describe()
    )
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    patches = {sample(planned, study.ask(), 1, 1, 0).train.patch_size_2d for _ in range(20)}
    assert patches == {(32, 32), (64, 32), (48, 48)}


def test_a_searched_batch_cannot_leave_its_patch_to_auto(tmp_path):
    data = write_dataset(tmp_path / "d", [(64, 64, 8)] * 2, (1, 1, 1))
    train = "  patch_size_2d: auto\n  batch_size_2d: {type: int, low: 4, high: 8}\n"
    space, dataset = load(tmp_path, data, "spatial_dims: 2\ndepth: 3", train)

    with pytest.raises(NasError) as err:
        plan_patches(space, dataset, "cpu")

    assert err.value.source == "train.patch_size_2d"
    assert "batch_size_2d, which is searched here" in err.value.reason
