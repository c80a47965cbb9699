"""Input that is valid but wrong, and what nas wrote but someone changed since, is refused in
one line naming the file (or the trial, the study) and what is wrong, with exit code 2 and
nothing written: NIfTI files nibabel reads but nas would misread, YAML naming a key twice,
splits files that contradict themselves or the dataset, weights holding NaN, and study and
trial attrs, recorded configs and model cards that no longer hold what nas wrote."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import optuna
import pytest
import torch
import yaml
from optuna.trial import create_trial

from nas.search.weights import checkpoint_path
from tests import datasets
from tests.conftest import run_cli, tiny_space_yaml, user_error

ENQUEUE_2D = "  enqueue:\n    - {spatial_dims: 2, depth: 1}\n"


def _hashes(root: Path) -> dict[str, str]:
    """Every file under `root`, by its path, as its SHA-256; SQLite's shared-memory index
    (study.db-shm) aside, which every reader of a WAL database writes."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.endswith("-shm"))
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture(scope="module")
def made(tmp_path_factory, tiny_dataset) -> Path:
    """A folder holding results/tiny (a study nas ran: one 2D trial) and its export in
    model/ (eager only)."""
    root = tmp_path_factory.mktemp("made")
    (root / "space.yaml").write_text(tiny_space_yaml(tiny_dataset, "tiny", 1, ENQUEUE_2D))
    result = run_cli("nas.run", "space.yaml", cwd=root)
    assert result.returncode == 0, result.stderr
    result = run_cli("nas.export", "results/tiny", "--format", "none", "--out", "model", cwd=root)
    assert result.returncode == 0, result.stderr
    return root


@pytest.fixture
def work(made, tmp_path) -> Path:
    """A copy of `made` to change: its study and its model."""
    shutil.copytree(made / "results", tmp_path / "results")
    shutil.copytree(made / "model", tmp_path / "model")
    return tmp_path


def _scan(tiny_dataset: Path) -> Path:
    return sorted((tiny_dataset / "imagesTr").glob("*.nii.gz"))[0]


def _refused(module: str, *args: str, cwd: Path, watched: Path) -> str:
    """The one line `module args` refuses with (exit code 2, no traceback), checking that no
    file under `watched` was written, changed or removed. A progress bar it drew and erased
    (carriage returns) is left out, as a terminal shows it."""
    before = _hashes(watched)
    result = run_cli(module, *args, cwd=cwd)
    result.stderr = "\n".join(line.rsplit("\r", 1)[-1] for line in result.stderr.split("\n"))
    line = user_error(result)
    assert _hashes(watched) == before
    return line


# --- NIfTI files nibabel reads but nas would misread ------------------------------------------


def _rewrite_header(path: Path, **fields) -> None:
    """Set raw header fields of a .nii or .nii.gz as another program might have written them
    (nibabel's own writer keeps the affine consistent; this does not)."""
    compressed = path.name.endswith(".gz")
    raw = path.read_bytes()
    if compressed:
        raw = gzip.decompress(raw)
    header = nib.Nifti1Header.from_fileobj(io.BytesIO(raw[:348]), check=False)
    for name, value in fields.items():
        header[name] = value
    raw = header.binaryblock + raw[348:]
    if compressed:
        raw = gzip.compress(raw)
    path.write_bytes(raw)


def _complex(path: Path) -> None:
    image = nib.load(path)
    data = np.asarray(image.dataobj, np.float32)
    nib.save(nib.Nifti1Image((data + 1j * data).astype(np.complex64), image.affine), path)


def _nan_voxel(path: Path) -> None:
    image = nib.load(path)
    data = np.asarray(image.dataobj, np.float32).copy()
    data[(*(n // 2 for n in data.shape),)] = np.nan
    nib.save(nib.Nifti1Image(data, image.affine), path)


def _infinite_voxel(path: Path) -> None:  # 1e300 overflows float32: infinite once read
    image = nib.load(path)
    data = np.asarray(image.dataobj, np.float64).copy()
    data[0, 0, 0] = 1e300
    nib.save(nib.Nifti1Image(data, image.affine), path)


def _zero_length_axis(path: Path) -> None:
    image = nib.load(path)
    empty = np.zeros((image.shape[0], 0, image.shape[2]), np.float32)
    nib.save(nib.Nifti1Image(empty, image.affine), path)


def _zero_column(path: Path) -> None:
    _rewrite_header(path, sform_code=1, srow_y=[0.0, 0.0, 0.0, 4.0])


def _parallel_axes(path: Path) -> None:
    _rewrite_header(path, sform_code=1, srow_x=[1.5, 1.5, 0, 0], srow_y=[1.5, 1.5, 0, 0])


NIFTI_CASES = {
    "complex voxels": (_complex, "holds complex voxels (complex64)"),
    "a NaN voxel": (_nan_voxel, "holds NaN or infinite voxels"),
    "a voxel too large for float32": (_infinite_voxel, "holds NaN or infinite voxels"),
    "a NaN sform": (
        lambda p: _rewrite_header(p, sform_code=1, srow_x=[np.nan, 0, 0, 0]),
        "its sform holds NaN or infinite values",
    ),
    "an infinite qform offset": (
        lambda p: _rewrite_header(p, qform_code=1, qoffset_z=np.inf),
        "its qform holds NaN or infinite values",
    ),
    "a zero sform column": (_zero_column, "its sform is singular"),
    "parallel voxel axes": (_parallel_axes, "its sform is singular"),
    "a zero-length axis": (_zero_length_axis, "has an axis of length 0 (shape (32, 0, 16))"),
}


@pytest.mark.parametrize("case", NIFTI_CASES)
def test_a_scan_nas_would_misread_is_refused_by_predict(work, tiny_dataset, case):
    change, reason = NIFTI_CASES[case]
    scan = work / "scan_0000.nii.gz"
    shutil.copy(_scan(tiny_dataset), scan)
    change(scan)
    line = _refused("nas.predict", "model", str(scan), "mask.nii.gz", cwd=work, watched=work)
    assert line.startswith(f"error: {scan}: {reason}")
    assert not (work / "mask.nii.gz").exists()


@pytest.fixture(scope="module")
def nnunet(tmp_path_factory) -> Path:
    """A valid nnU-Net dataset (4 cases, 2 channels) to copy and break."""
    return datasets.write_nnunet(tmp_path_factory.mktemp("nnunet") / "Dataset002_Two")


def _space(data: dict, name: str = "wrong", train: dict | None = None) -> str:
    """A tiny space for `data` (a data section), its train section updated with `train`."""
    space = yaml.safe_load(tiny_space_yaml(Path("unused"), name, 1, ENQUEUE_2D))
    space["data"] = data
    space["train"].update(train or {})
    return yaml.safe_dump(space, sort_keys=False)


@pytest.mark.parametrize(
    ("case", "file"),
    [
        ("complex voxels", "imagesTr/case_001_0001.nii.gz"),
        ("a NaN voxel", "imagesTr/case_002_0000.nii.gz"),
        ("a NaN sform", "labelsTr/case_001.nii.gz"),
        ("parallel voxel axes", "imagesTr/case_003_0000.nii.gz"),
        ("a zero-length axis", "labelsTr/case_000.nii.gz"),
    ],
)
def test_training_data_nas_would_misread_is_refused_before_anything_is_written(
    nnunet, tmp_path, case, file
):
    change, reason = NIFTI_CASES[case]
    root = tmp_path / "data"
    shutil.copytree(nnunet, root)
    change(root / file)
    space = _space({"path": str(root), "n_folds": 2, "cache_dir": str(tmp_path / "cache")})
    (tmp_path / "space.yaml").write_text(space)
    line = _refused("nas.run", "space.yaml", cwd=tmp_path, watched=root)
    assert line.startswith(f"error: {root / file}: {reason.split(' (shape')[0]}")
    assert not (tmp_path / "results").exists()
    assert not list((tmp_path / "cache").glob("*/manifest.json"))


# --- YAML naming a key twice ------------------------------------------------------------------


def test_a_space_naming_a_key_twice_is_refused_with_both_lines(tiny_dataset, tmp_path):
    text = tiny_space_yaml(tiny_dataset, "twice", 1)
    top = text.replace("study:\n", "train:\n  epochs: 5\nstudy:\n")  # a second train section
    nested = text.replace("  epochs: 2\n", "  epochs: 2\n  epochs: 20\n")
    for changed, key in ((top, "train"), (nested, "epochs")):
        (tmp_path / "space.yaml").write_text(changed)
        lines = changed.splitlines()
        first, second = [i + 1 for i, line in enumerate(lines) if line.strip().startswith(key)]
        line = _refused("nas.run", "space.yaml", cwd=tmp_path, watched=tmp_path)
        reason = f"duplicate key '{key}' on line {second} (first on line {first})"
        assert line == f"error: space.yaml: {reason}"
        assert not (tmp_path / "results").exists()


def test_an_architecture_yaml_naming_a_key_twice_is_refused(work, tiny_dataset):
    card = work / "model" / "architecture.yaml"
    text = card.read_text()
    card.write_text(text + "format_version: 1\n")
    line = _refused(
        "nas.predict",
        "model",
        str(_scan(tiny_dataset)),
        "mask.nii.gz",
        cwd=work,
        watched=work,
    )
    assert line.startswith(f"error: {Path('model') / 'architecture.yaml'}: duplicate key")
    assert "'format_version'" in line
    card.write_text(text.replace("  output: sigmoid\n", "  output: sigmoid\n  output: softmax\n"))
    line = _refused(
        "nas.predict",
        "model",
        str(_scan(tiny_dataset)),
        "mask.nii.gz",
        cwd=work,
        watched=work,
    )
    assert "duplicate key 'output'" in line
    assert not (work / "mask.nii.gz").exists()


# --- splits files that contradict themselves or the dataset -----------------------------------

CASES = ["case_000", "case_001", "case_002", "case_003"]
SPLITS = {
    "a case in two folds' val": (
        [
            {"train": CASES[2:], "val": CASES[:2]},
            {"train": CASES[1:3], "val": [CASES[0], CASES[3]]},
        ],
        "fold 1: 'case_000' is validated on in fold 0 too",
    ),
    "a case in train and val of one fold": (
        [{"train": CASES[1:], "val": CASES[:2]}, {"train": CASES[:2], "val": CASES[2:]}],
        "fold 0: 'case_001' is in both its train and its val cases",
    ),
    "a case not in the dataset": (
        [
            {"train": CASES[2:], "val": CASES[:2]},
            {"train": CASES[:2], "val": [*CASES[2:], "case_009"]},
        ],
        "fold 1 val: 'case_009' is not a case of the dataset",
    ),
    "a case in neither train nor val": (
        [{"train": CASES[2:], "val": CASES[:2]}, {"train": CASES[:2], "val": CASES[2:3]}],
        "fold 1: 'case_003' is in neither its train nor its val cases",
    ),
}


@pytest.mark.parametrize("case", SPLITS)
def test_a_splits_file_that_contradicts_itself_or_the_dataset_is_refused(nnunet, tmp_path, case):
    splits, reason = SPLITS[case]
    path = tmp_path / "splits_final.json"
    path.write_text(json.dumps(splits))
    data = {"path": str(nnunet), "splits_file": str(path), "cache_dir": str(tmp_path / "cache")}
    (tmp_path / "space.yaml").write_text(_space(data))
    line = _refused("nas.run", "space.yaml", cwd=tmp_path, watched=nnunet)
    assert line == f"error: {path}: {reason}" + (
        " (folds validate on disjoint cases)" if "too" in reason else ""
    )
    assert not (tmp_path / "results").exists()


# --- weights holding NaN ----------------------------------------------------------------------


def test_init_weights_holding_nan_are_refused_before_the_study_opens(made, tiny_dataset, tmp_path):
    state = torch.load(made / "model" / "weights.pt", weights_only=True)
    name = next(k for k, v in state.items() if v.is_floating_point() and v.numel() > 1)
    state[name].view(-1)[1] = float("nan")
    torch.save(state, tmp_path / "start.pt")
    model = tmp_path / "model"  # an exported folder standing for its weights.pt, +inf in it
    shutil.copytree(made / "model", model)
    state[name].view(-1)[1] = float("inf")
    torch.save(state, model / "weights.pt")
    for weights in (tmp_path / "start.pt", model):
        data = yaml.safe_load(tiny_space_yaml(tiny_dataset))["data"]
        (tmp_path / "space.yaml").write_text(_space(data, train={"init_weights": str(weights)}))
        line = _refused("nas.run", "space.yaml", cwd=tmp_path, watched=tmp_path)
        file = weights if weights.is_file() else weights / "weights.pt"
        assert line == f"error: {file}: tensor {name} holds NaN or infinite values"
        assert not (tmp_path / "results").exists()
    # An exported model holding them is refused too, before any mask is written.
    scan = _scan(tiny_dataset)
    line = _refused("nas.predict", str(model), str(scan), "mask.nii", cwd=tmp_path, watched=model)
    assert line == f"error: {model / 'weights.pt'}: tensor {name} holds NaN or infinite values"


# --- study and trial attrs, recorded configs --------------------------------------------------


def _study(work: Path) -> optuna.Study:
    return optuna.load_study(
        study_name="tiny", storage=f"sqlite:///{work / 'results' / 'tiny' / 'study.db'}"
    )


def _done(study: optuna.Study) -> None:
    """Close the test's own connection after it tampered, as another program would end: its
    write leaves the -wal file for study.db, not for the command to fold in when it closes."""
    study._storage._backend.engine.dispose()  # behind Optuna's trial cache


def _add_tampered_trial(work: Path, **attrs) -> int:
    """Add to the study a copy of its trial 0 with `attrs` changed (Optuna refuses to change a
    finished trial's attrs; another program may add a trial); its number."""
    study = _study(work)
    source = study.trials[0]
    study.add_trial(
        create_trial(
            state=source.state,
            values=source.values,
            params=source.params,
            distributions=source.distributions,
            user_attrs={**source.user_attrs, **attrs},
            intermediate_values=source.intermediate_values,
        )
    )
    number = len(study.trials) - 1
    _done(study)
    return number


@pytest.mark.parametrize(
    ("attrs", "reason"),
    [
        ({"val_iou": "abc"}, "attr val_iou is 'abc', not a number"),
        ({"n_params": True}, "attr n_params is True, not a number"),
        ({"rungs": [1, "two"]}, "attr rungs is [1, 'two'], not a list of whole numbers"),
        ({"train_loss": "low"}, "attr train_loss is 'low', not a list of numbers"),
        ({"unet_config": ["depth", 1]}, "attr unet_config is ['depth', 1], not a mapping"),
    ],
)
def test_a_tampered_trial_attr_is_refused_naming_the_trial(work, attrs, reason):
    number = _add_tampered_trial(work, **attrs)
    for command in (
        ("nas.report", "results/tiny"),
        ("nas.export", "results/tiny"),
    ):
        line = _refused(*command, cwd=work, watched=work)
        assert line == f"error: trial {number}: {reason}"


def test_a_recorded_trial_config_with_an_unknown_key_is_refused(work):
    results = work / "results" / "tiny"
    source = _study(work).trials[0]
    unet = {**source.user_attrs["unet_config"], "depht": 3}
    number = _add_tampered_trial(work, unet_config=unet)
    shutil.copy(checkpoint_path(results, 0), checkpoint_path(results, number))  # its weights
    line = _refused("nas.export", "results/tiny", "--trial", str(number), cwd=work, watched=work)
    assert line.startswith(f"error: trial {number}: attr unet_config does not hold valid settings")
    assert "depht" in line
    train = {**source.user_attrs["train_config"], "epochs": -1}
    number = _add_tampered_trial(work, train_config=train)
    shutil.copy(checkpoint_path(results, 0), checkpoint_path(results, number))
    line = _refused("nas.export", "results/tiny", "--trial", str(number), cwd=work, watched=work)
    assert line.startswith(f"error: trial {number}: attr train_config does not hold valid")
    assert "epochs" in line


@pytest.mark.parametrize(
    ("attr", "value", "reason"),
    [
        ("objectives", "iou", "attr objectives is 'iou', not a list of texts"),
        ("objectives", ["iou", 7], "attr objectives is ['iou', 7], not a list of texts"),
        ("test_scores", [0.5], "attr test_scores is [0.5], not a mapping"),
        ("artifacts", 5, "attr artifacts is 5, not text"),
    ],
)
def test_a_tampered_study_attr_is_refused_naming_the_study(work, attr, value, reason):
    study = _study(work)
    study.set_user_attr(attr, value)
    _done(study)
    for command in (
        ("nas.report", "results/tiny"),
        ("nas.export", "results/tiny"),
    ):
        line = _refused(*command, cwd=work, watched=work)
        assert line == f"error: study 'tiny': {reason}"


@pytest.mark.parametrize(
    ("change", "field"),
    [({"slices_per_case": 0}, "slices_per_case"), ({"shuffle": True}, "shuffle")],
)
def test_a_recorded_data_config_that_datacfg_refuses_is_named(work, change, field):
    study = _study(work)
    study.set_user_attr("data_config", {**study.user_attrs["data_config"], **change})
    _done(study)
    for command in (
        ("nas.report", "results/tiny"),
        ("nas.export", "results/tiny"),
        ("nas.retrain", "results/tiny", "--trials", "0"),
    ):
        line = _refused(*command, cwd=work, watched=work)
        assert line.startswith("error: study 'tiny': attr data_config does not hold valid settings")
        assert field in line


# --- model cards ------------------------------------------------------------------------------


def _edit_card(card: dict, path: str, value) -> None:
    *parents, last = path.split(".")
    for key in parents:
        card = card[key]
    card[last] = value


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("preprocessing.target_spacing_mm", [1.5, -1.5, 3.0], "target_spacing_mm.1"),
        ("preprocessing.target_spacing_mm", [1.5, float("nan"), 3.0], "target_spacing_mm.1"),
        ("preprocessing.channels", [3], "channels [3] must name some of the 1 input channels"),
        ("preprocessing.normalization", [{}, {}], "normalization has 2 entries for 1 channels"),
        ("labels.lesion", -1, "labels.lesion"),
        ("inference.size_multiple", [0, 0], "size_multiple.0"),
        ("architecture.in_channels", 2, "architecture.in_channels is 2"),
        ("postprocessing.largest_component", ["tumour"], "classes not among the labels"),
    ],
)
def test_a_tampered_model_card_is_refused_before_any_mask_is_written(
    work, tiny_dataset, field, value, reason
):
    path = work / "model" / "architecture.yaml"
    card = yaml.safe_load(path.read_text())
    _edit_card(card, field, value)
    path.write_text(yaml.safe_dump(card, sort_keys=False))
    scan = str(_scan(tiny_dataset))
    line = _refused("nas.predict", "model", scan, "mask.nii.gz", cwd=work, watched=work)
    assert line.startswith(f"error: {Path('model') / 'architecture.yaml'}: not a valid model")
    assert reason in line
    assert not (work / "mask.nii.gz").exists()
