"""Allocations the input decides are bounded before they are made, and saved probabilities are
distrusted on the way back in: a scan whose spacing makes a huge resampled grid, a saved
probability file whose array header claims more than the file or the machine holds, and a
thread or process count beyond the machine's cores are each one line naming the file (or
option) and the size, exit code 2, with nothing written and the inputs unchanged; a tampered
probability file (strings for numbers, a list for the label map, a grid that disagrees with its
header, NaN) is one line naming the file and the field, and no mask is made from it."""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from nas.commands.cli import POOL_PER_CORE, pool_option
from nas.core.errors import NasError
from nas.core.resources import available_cores
from nas.deploy.probabilities import label_description, load, save
from nas.network.builder import build_unet
from nas.network.model_card import (
    WEIGHTS_FILE,
    Inference,
    ModelCard,
    Normalization,
    Preprocessing,
    write_card,
)
from nas.network.unet_config import UNetConfig
from nas.network.windows import windows_that_fit
from tests import datasets
from tests.conftest import run_cli, tiny_space_yaml, user_error

SHAPE = (16, 16, 16)


def hashes(*folders: Path) -> dict[str, str]:
    """sha256 of every file under `folders`, by path."""
    return {
        str(path): hashlib.sha256(path.read_bytes()).hexdigest()
        for folder in folders
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def write_scan(path: Path, spacing_mm: float | tuple[float, float, float]) -> Path:
    """A 16^3 float32 scan with this voxel spacing (in its affine and pixdim)."""
    spacing = (spacing_mm,) * 3 if isinstance(spacing_mm, float) else spacing_mm
    voxels = np.random.default_rng(0).random(SHAPE).astype(np.float32) + 0.5
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(voxels, np.diag([*spacing, 1.0])), path)
    return path


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A model folder as nas export writes one: a 3D network of one stage (background and two
    classes, a softmax) trained at 1 mm, with its (untrained) weights."""
    folder = tmp_path_factory.mktemp("model")
    unet = UNetConfig(spatial_dims=3, in_channels=1, out_channels=3, depth=1, base_channels=2)
    card = ModelCard(
        architecture=unet.to_dict(),
        preprocessing=Preprocessing(
            input_channels=("MRI",), channels=(0,), target_spacing_mm=(1.0, 1.0, 1.0),
            normalization=(Normalization(),),
        ),
        inference=Inference(
            spatial_dims=3, slice_axis=2, patch_size=SHAPE, size_multiple=unet.size_multiple,
            output="softmax",
        ),
        labels={"background": 0, "core": 1, "edge": 2},
        source={"made_by": "tests/core/test_allocation.py"},
    )  # fmt: skip
    write_card(folder, card)
    torch.manual_seed(0)
    torch.save(build_unet(unet).state_dict(), folder / WEIGHTS_FILE)
    return folder


# --- a resampled grid the spacing makes huge -----------------------------------------------


def test_a_scan_on_the_models_spacing_is_segmented(model, tmp_path):
    scan = write_scan(tmp_path / "scans" / "fine.nii.gz", 1.0)
    result = run_cli("nas.predict", str(model), str(scan), "out/fine.nii.gz", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert nib.load(tmp_path / "out" / "fine.nii.gz").shape == SHAPE


@pytest.mark.parametrize("spacing", [1000.0, (1.0, 1.0, 1e9)], ids=["1000mm", "1e9mm_slices"])
def test_predicting_a_scan_whose_spacing_makes_a_huge_grid_is_refused(model, tmp_path, spacing):
    scan = write_scan(tmp_path / "scans" / "coarse.nii.gz", spacing)
    before = hashes(tmp_path, model)
    result = run_cli("nas.predict", str(model), str(scan), "out/coarse.nii.gz",
                     "--save-probabilities", cwd=tmp_path)  # fmt: skip
    line = user_error(result)
    assert line.startswith(f"error: {scan}: resampling its {SHAPE} voxels")
    assert "would need" in line and "GB, more than the" in line and "available" in line
    assert not (tmp_path / "out").exists()
    assert hashes(tmp_path, model) == before


def _rewrite_with_spacing(paths: list[Path], spacing: tuple[float, float, float]) -> None:
    for path in paths:
        datasets.save(np.asarray(nib.load(path).dataobj), path, spacing)


def test_a_case_whose_spacing_makes_a_huge_grid_is_refused_before_the_cache(tmp_path):
    """Three cases at 0.8 x 0.8 x 2.4 mm set the median target; the fourth claims 800 mm."""
    root = datasets.write_nnunet(tmp_path / "Dataset001_Huge")
    culprit = root / "imagesTr" / "case_002_0000.nii.gz"
    case = [
        culprit,
        root / "imagesTr" / "case_002_0001.nii.gz",
        root / "labelsTr" / "case_002.nii.gz",
    ]
    _rewrite_with_spacing(case, (800.0, 800.0, 2400.0))
    space = tiny_space_yaml(root).splitlines()
    (tmp_path / "space.yaml").write_text("\n".join(x for x in space if "synthetic" not in x))
    cache = tmp_path / "cache"
    before = hashes(root)
    result = run_cli("nas.run", "space.yaml", "--dry-run", "--set", f"data.cache_dir={cache}",
                     cwd=tmp_path)  # fmt: skip
    line = user_error(result)
    assert line.startswith(f"error: {culprit}: resampling its (22, 24, 11) voxels of 800 x ")
    assert "to the target spacing of 0.8 x 0.8 x 2.4 mm" in line and "would need" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Dataset001_Huge", "cache", "space.yaml"]
    assert [p.suffix for p in cache.iterdir()] == [".lock"]  # no case preprocessed, no staging
    assert hashes(root) == before


def test_a_target_spacing_far_finer_than_the_scans_is_refused_before_the_cache(
    tmp_path, tiny_dataset
):
    (tmp_path / "space.yaml").write_text(tiny_space_yaml(tiny_dataset))
    before = hashes(tiny_dataset)
    cache = tmp_path / "cache"
    result = run_cli("nas.run", "space.yaml", "--dry-run",
                     "--set", "data.target_spacing_mm=[0.001, 0.001, 0.001]",
                     "--set", f"data.cache_dir={cache}", cwd=tmp_path)  # fmt: skip
    line = user_error(result)
    assert line.startswith(f"error: {tiny_dataset}") and ".nii.gz: resampling its" in line
    assert "a grid of (48000, 48000, 48000)" in line and "would need" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "space.yaml"]
    assert [p.suffix for p in cache.iterdir()] == [".lock"]
    assert hashes(tiny_dataset) == before


# --- thread and process counts -------------------------------------------------------------


def test_counts_up_to_the_bound_are_taken_and_one_more_is_refused():
    most = POOL_PER_CORE * available_cores()
    assert pool_option("--threads", most) == most
    assert pool_option("--threads", None) is None  # the command's default
    assert pool_option("--data-workers", 0, minimum=0) == 0
    with pytest.raises(NasError, match=f"asks for {most + 1:,}, more than this machine can run"):
        pool_option("--threads", most + 1)
    with pytest.raises(NasError, match="must be at least 1, not 0"):
        pool_option("--workers", 0)


@pytest.mark.parametrize(
    "argv",
    [
        ["run", "space.yaml", "--dry-run", "--threads", "100000"],
        ["run", "space.yaml", "--dry-run", "--workers", "100000"],
        ["run", "space.yaml", "--dry-run", "--processes", "100000"],
        ["run", "space.yaml", "--dry-run", "--data-workers", "ONE_TOO_MANY"],
        ["retrain", "results/tiny", "--folds", "all", "--workers", "100000"],
    ],
    ids=["run-threads", "run-workers", "run-processes", "run-data-workers", "retrain-workers"],
)
def test_thread_and_process_counts_beyond_the_machine_are_refused(argv, tmp_path, tiny_dataset):
    (tmp_path / "space.yaml").write_text(tiny_space_yaml(tiny_dataset))
    cores = available_cores()
    option, value = argv[-2], argv[-1].replace("ONE_TOO_MANY", str(POOL_PER_CORE * cores + 1))
    result = run_cli(f"nas.{argv[0]}", *argv[:-1][1:], value, cwd=tmp_path)
    assert user_error(result) == (
        f"error: {option}: asks for {int(value):,}, more than this machine can run: at "
        f"most {POOL_PER_CORE} per core, {POOL_PER_CORE * cores} on its {cores} "
        f"core{'s' if cores > 1 else ''}"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["space.yaml"]  # nothing written


# --- a batch of sliding windows ------------------------------------------------------------


def test_a_batch_of_windows_shrinks_to_what_the_memory_holds():
    cpu = torch.device("cpu")
    assert windows_that_fit(8, 10**6, cpu) == 8  # 8 MB: fits anywhere
    assert windows_that_fit(8, 10**15, cpu) == 1  # a PB per window: one at a time (the card
    # check refuses a model whose one window does not fit)


# --- saved probabilities -------------------------------------------------------------------


@pytest.fixture
def saved(model, tmp_path) -> tuple[Path, Path]:
    """Two folders of one case each, written by nas's own save: a model's probabilities (a
    softmax over three classes) on a scan's grid."""
    from nas.network.model_card import read_card

    scan = write_scan(tmp_path / "scans" / "case.nii.gz", (1.0, 1.0, 2.0))
    image = nib.load(scan)
    labels = label_description(read_card(model))
    folders = []
    for seed, name in ((1, "first"), (2, "second")):
        logits = torch.from_numpy(np.random.default_rng(seed).normal(size=(3, *SHAPE)))
        (tmp_path / name).mkdir()
        save(tmp_path / name / "case.npz", torch.softmax(logits, 0).numpy(), image, labels)
        folders.append(tmp_path / name)
    return folders[0], folders[1]


def test_probabilities_saved_by_nas_are_read_back_and_ensembled(saved, tmp_path):
    first, second = saved
    back = load(first / "case.npz")
    assert back.shape == (3, *SHAPE) and back.probabilities.dtype == np.float32
    assert back.labels["labels"] == {"background": 0, "core": 1, "edge": 2}
    result = run_cli("nas.ensemble", str(first), str(second), "out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert nib.load(tmp_path / "out" / "case.nii.gz").shape == SHAPE


def _fields(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as saved:
        return {name: saved[name] for name in saved.files}


def _with_labels(change):
    def tamper(fields: dict[str, np.ndarray]) -> None:
        labels = json.loads(str(fields["labels"]))
        change(labels)
        fields["labels"] = np.array(json.dumps(labels))

    return tamper


def _numbers_as_strings(labels: dict) -> None:
    labels["labels"] = {name: str(value) for name, value in labels["labels"].items()}


def _label_map_as_list(labels: dict) -> None:
    labels["labels"] = list(labels["labels"])


def _unknown_component(labels: dict) -> None:
    labels["largest_component"] = ["liver"]


def _header_grid(fields: dict[str, np.ndarray]) -> None:
    header = nib.Nifti1Header(binaryblock=fields["header"].tobytes())
    header.set_data_shape((16, 16, 15))
    fields["header"] = np.frombuffer(header.binaryblock, np.uint8)


def _cut_grid(fields: dict[str, np.ndarray]) -> None:
    fields["probabilities"] = np.ascontiguousarray(fields["probabilities"][:, :, :, :-1])


def _nan(fields: dict[str, np.ndarray]) -> None:
    fields["probabilities"][1, 3, 4, 5] = np.nan


def _above_one(fields: dict[str, np.ndarray]) -> None:
    fields["probabilities"][0] *= 2.0


def _float64(fields: dict[str, np.ndarray]) -> None:
    fields["probabilities"] = fields["probabilities"].astype(np.float64)


def _shifted_affine(fields: dict[str, np.ndarray]) -> None:
    fields["affine"][0, 3] += 50.0


def _affine_as_strings(fields: dict[str, np.ndarray]) -> None:
    fields["affine"] = fields["affine"].astype(str)


TAMPERED = {
    "strings for numbers": (_with_labels(_numbers_as_strings), "labels: labels.background:"),
    "a list label map": (_with_labels(_label_map_as_list), "labels: labels: Input should be"),
    "an unknown component": (_with_labels(_unknown_component), "labels: Value error, largest"),
    "a header of another grid": (_header_grid, "probabilities: shape (3, 16, 16, 16) is not"),
    "a cut grid": (_cut_grid, "probabilities: shape (3, 16, 16, 15) is not (K, *(16, 16, 16))"),
    "NaN": (_nan, "probabilities: values from nan"),
    "values above 1": (_above_one, "probabilities: values from"),
    "float64": (_float64, "probabilities: holds float64 (3, 16, 16, 16), not float32"),
    "a shifted affine": (_shifted_affine, "affine: disagrees with the affine its header holds"),
    "strings for the affine": (_affine_as_strings, "affine: holds <U"),
}


@pytest.mark.parametrize("name", list(TAMPERED))
def test_a_tampered_probability_file_is_refused_naming_the_field(name, saved, tmp_path):
    tamper, expected = TAMPERED[name]
    first, second = saved
    path = second / "case.npz"
    fields = _fields(path)
    tamper(fields)
    np.savez_compressed(path, **fields)
    before = hashes(first, second)
    line = user_error(run_cli("nas.ensemble", str(first), str(second), "out", cwd=tmp_path))
    assert line.startswith(f"error: {path}: is not a probability map written by nas predict")
    assert f"({expected}" in line, line
    assert not (tmp_path / "out").exists()  # no mask, from NaN or anything else
    assert hashes(first, second) == before


def _lying_header(path: Path, member: str, shape: tuple[int, ...]) -> None:
    """Rewrite `member` of the .npz at `path` with an .npy header claiming `shape`, its
    bytes left as they were: the header lies about what follows."""
    with zipfile.ZipFile(path) as archive:
        contents = {name: archive.read(name) for name in archive.namelist()}
    stream = io.BytesIO(contents[member])
    assert np.lib.format.read_magic(stream) == (1, 0)  # as numpy writes a small header
    _, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
    data = stream.read()
    lie = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        lie,
        {
            "descr": np.lib.format.dtype_to_descr(dtype),
            "fortran_order": fortran,
            "shape": shape,
        },  # fmt: skip
    )
    contents[member] = lie.getvalue() + data
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, content in contents.items():
            archive.writestr(name, content)


@pytest.mark.parametrize(
    ("member", "shape", "field"),
    [
        ("probabilities.npy", (3, 40000, 40000, 40000), "probabilities"),
        ("header.npy", (10**14,), "header"),
    ],
)
def test_a_probability_file_whose_array_header_lies_is_refused_unread(
    member, shape, field, saved, tmp_path
):
    first, second = saved
    path = second / "case.npz"
    _lying_header(path, member, shape)
    before = hashes(first, second)
    line = user_error(run_cli("nas.ensemble", str(first), str(second), "out", cwd=tmp_path))
    assert line.startswith(f"error: {path}: is not a probability map written by nas predict")
    assert f"({field}: its header claims {shape}" in line
    assert "more than the" in line and "bytes stored can hold" in line
    assert not (tmp_path / "out").exists()
    assert hashes(first, second) == before


def test_a_probability_file_larger_than_the_memory_is_refused_unread(saved, tmp_path, monkeypatch):
    """An honest header, but more than this machine has available: here the machine is told
    it has 40 kB (the file holds 3 x 16^3 float32, 49 kB, besides its header and labels)."""
    monkeypatch.setattr("nas.core.resources.available_host_bytes", lambda: 40_000)
    path = saved[0] / "case.npz"
    with pytest.raises(NasError, match=r"reading its arrays would need 0\.0 GB, more than") as info:
        load(path)
    assert info.value.source == str(path)
