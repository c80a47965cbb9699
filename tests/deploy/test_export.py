"""Export, load and predict: a 2D model (one channel, sigmoid) and a 3D model (two channels,
three label values), from real finished studies, through the command line."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import optuna
import pytest
import torch
import torch.nn.functional as F
import yaml
from monai.inferers import sliding_window_inference
from optuna.trial import TrialState, create_trial

import nas
from nas.core.errors import NasError
from nas.data import DataConfig, load_dataset
from nas.deploy.export import export
from nas.deploy.exported import load_predictor
from nas.network.model_card import read_card
from nas.search.choice import choose_trial
from nas.search.record import StudyRecord, TrialRecord
from nas.search.weights import checkpoint_path
from nas.training.fit import init_model
from tests.conftest import run_cli, tiny_space_yaml, user_error
from tests.datasets import write_nnunet

pytestmark = pytest.mark.slow

TWO_D = "  enqueue:\n    - {spatial_dims: 2, depth: 3}\n"
THREE_D = "  enqueue:\n    - {spatial_dims: 3, depth: 2, anisotropic_stages: 1}\n"


@pytest.fixture(scope="module")
def studies(tmp_path_factory, tiny_dataset) -> Path:
    """results/two_d (synthetic, 1 channel) and results/three_d (nnU-Net layout, T2 + ADC,
    labels core = 1 and penumbra = 2), one completed trial each."""
    root = tmp_path_factory.mktemp("studies")
    nnunet = write_nnunet(root / "Dataset002_TwoChannels")
    (root / "two_d.yaml").write_text(tiny_space_yaml(tiny_dataset, "two_d", 1, TWO_D))
    three_d = tiny_space_yaml(nnunet, "three_d", 1, THREE_D)
    three_d = "\n".join(line for line in three_d.splitlines() if "synthetic" not in line)
    (root / "three_d.yaml").write_text(three_d.replace("n_folds: 3", "n_folds: 2") + "\n")
    for name in ("two_d", "three_d"):
        result = run_cli("nas.run", f"{name}.yaml", cwd=root)
        assert result.returncode == 0, result.stderr
    return root


@pytest.fixture(scope="module")
def datasets(studies, tiny_dataset) -> dict[str, Path]:
    return {"two_d": tiny_dataset, "three_d": studies / "Dataset002_TwoChannels"}


@pytest.fixture(scope="module")
def exported(studies) -> dict[str, Path]:
    folders = {}
    for name in ("two_d", "three_d"):
        result = run_cli("nas.export", f"results/{name}", "--format", "pt2,onnx", cwd=studies)
        assert result.returncode == 0, result.stderr
        folders[name] = studies / "results" / name / "export" / "trial_0000"
    return folders


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _two_d_trial(studies: Path) -> tuple[optuna.Study, optuna.trial.FrozenTrial, Path]:
    """The two_d study, its trial 0 and that trial's weights, to call export() directly."""
    results = studies / "results" / "two_d"
    study = optuna.load_study(study_name="two_d", storage=f"sqlite:///{results / 'study.db'}")
    return study, choose_trial(study, 0, None), checkpoint_path(results, 0)


@pytest.mark.parametrize("name", ["two_d", "three_d"])
def test_export_writes_a_described_self_contained_folder(exported, studies, name):
    folder = exported[name]
    assert {p.name for p in folder.iterdir()} == {
        "architecture.yaml", "weights.pt", "model.pt2", "model.onnx", "README.md"
    }  # fmt: skip
    card = yaml.safe_load((folder / "architecture.yaml").read_text())
    assert card["architecture"]["spatial_dims"] == (2 if name == "two_d" else 3)
    assert card["source"]["trial"] == 0 and card["source"]["study"] == name
    if name == "three_d":
        assert card["preprocessing"]["input_channels"] == ["T2", "ADC"]
        assert card["labels"] == {"background": 0, "core": 1, "penumbra": 2}
        assert card["inference"]["output"] == "softmax"
    else:
        assert card["labels"] == {"background": 0, "lesion": 1}
        assert card["inference"]["output"] == "sigmoid"
    assert card["preprocessing"]["orientation"] == "RAS"
    assert len(card["preprocessing"]["target_spacing_mm"]) == 3
    readme = (folder / "README.md").read_text()
    assert f"{card['source']['n_params']:,}" in readme and "nas.predict" in readme
    # The whole-volume score the run took after the search, beside the patch score.
    storage = f"sqlite:///{studies / 'results' / name / 'study.db'}"
    study = optuna.load_study(study_name=name, storage=storage)
    volume = StudyRecord.of(study).volume_scores["0"]["iou"]
    assert card["source"]["volume_val_iou"] == pytest.approx(volume)
    assert f"; IoU {volume:.4f} on the whole validation volumes" in readme

    model = nas.load(folder)
    assert not model.training
    rebuilt = nas.build_unet(**card["architecture"])
    assert nas.count_parameters(rebuilt) == card["source"]["n_params"]
    checkpoint = studies / "results" / name / "checkpoints" / "trial_0000.pt"
    for key, value in torch.load(checkpoint, weights_only=True).items():
        assert torch.equal(model.state_dict()[key], value), key


FRESH_PROCESS = textwrap.dedent(
    """
    import sys
    import numpy as np
    import onnxruntime
    import torch

    folder, inputs = sys.argv[1], np.load(sys.argv[2])
    program = torch.export.load(f"{folder}/model.pt2").module()
    with torch.no_grad():
        np.save(sys.argv[3], program(torch.from_numpy(inputs)).numpy())
    session = onnxruntime.InferenceSession(f"{folder}/model.onnx")
    np.save(sys.argv[4], session.run(None, {session.get_inputs()[0].name: inputs})[0])
    assert not any(name == "nas" or name.startswith("nas.") for name in sys.modules)
    """
)


@pytest.mark.parametrize("name", ["two_d", "three_d"])
def test_pt2_and_onnx_run_without_nas_and_match_the_eager_model(exported, tmp_path, name):
    folder = exported[name]
    card = read_card(folder)
    multiple = card.inference.size_multiple
    # A batch size and spatial sizes other than those the export was traced with.
    sizes = [m * k for m, k in zip(multiple, (5, 3, 2), strict=False)]
    channels = len(card.preprocessing.channels)
    inputs = np.random.default_rng(0).standard_normal((3, channels, *sizes)).astype(np.float32)
    np.save(tmp_path / "inputs.npy", inputs)
    script = tmp_path / "fresh.py"
    script.write_text(FRESH_PROCESS)
    outputs = [tmp_path / "pt2.npy", tmp_path / "onnx.npy"]
    # -I: isolated mode, so neither the working directory nor PYTHONPATH can supply nas.
    result = subprocess.run(
        [sys.executable, "-I", script, folder, tmp_path / "inputs.npy", *outputs],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    with torch.no_grad():
        eager = nas.load(folder)(torch.from_numpy(inputs)).numpy()
    for path in outputs:
        np.testing.assert_allclose(np.load(path), eager, rtol=1e-3, atol=1e-4)


def _ras_scan(dataset: Path) -> list[np.ndarray]:
    """A case's channels in RAS voxel order, shifted so that no voxel is zero (no crop)."""
    files = sorted((dataset / "imagesTr").glob("*.nii.gz"))
    case = files[0].name[: -len("_0000.nii.gz")]
    files = [f for f in files if f.name.startswith(case + "_")]
    return [
        nib.as_closest_canonical(nib.load(f)).get_fdata().astype(np.float32) + 10 for f in files
    ]


def _write_scan(channels: list[np.ndarray], affine: np.ndarray, folder: Path) -> list[Path]:
    paths = []
    for c, data in enumerate(channels):
        paths.append(folder / f"scan_{c:04d}.nii.gz")
        folder.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(data, affine), paths[-1])
    return paths


def _reoriented(channels, spacing):
    """The same voxels with axes stored as (S, L, P) instead of RAS, and the affine that puts
    them at the same world positions as the RAS array with `spacing`."""
    moved = [np.ascontiguousarray(np.flip(np.flip(c.transpose(2, 0, 1), 1), 2)) for c in channels]
    shape = channels[0].shape
    affine = np.zeros((4, 4))
    affine[2, 0] = spacing[2]  # stored axis 0 runs along S
    affine[0, 1] = -spacing[0]  # stored axis 1 runs along L (flipped R)
    affine[1, 2] = -spacing[1]  # stored axis 2 runs along P (flipped A)
    affine[:3, 3] = [spacing[0] * (shape[0] - 1), spacing[1] * (shape[1] - 1), 0.0]
    affine[3, 3] = 1
    return moved, affine


def _eager_logits(
    folder: Path, channels: list[np.ndarray], probabilities: bool = False
) -> torch.Tensor:
    """The logits (or probabilities: sigmoid or softmax per window, as predict blends them)
    the eager model gives on a RAS scan at the model's spacing, computed here from the card:
    z-score, slices (2D) or volume (3D) through MONAI's sliding window."""
    card = read_card(folder)
    network = nas.load(folder)
    softmax = card.inference.output == "softmax"

    def model(x: torch.Tensor) -> torch.Tensor:
        if not probabilities:
            return network(x)
        return torch.softmax(network(x), 1) if softmax else torch.sigmoid(network(x))

    chosen = np.stack([channels[c] for c in card.preprocessing.channels])
    mean = chosen.mean(axis=(1, 2, 3), keepdims=True, dtype=np.float64)
    std = chosen.std(axis=(1, 2, 3), keepdims=True, dtype=np.float64)
    image = torch.from_numpy(((chosen - mean) / std).astype(np.float32))
    patch = card.inference.patch_size
    with torch.no_grad():
        if card.inference.spatial_dims == 2:
            axis = card.inference.slice_axis + 1
            slices = image.movedim(axis, 0)
            logits = sliding_window_inference(slices, patch, 8, model, 0.25, "gaussian")
            return logits.movedim(0, axis)
        return sliding_window_inference(image[None], patch, 8, model, 0.25, "gaussian")[0]


def _labels(folder: Path, probs: torch.Tensor) -> np.ndarray:
    classes = (probs[0] > 0.5).long() if probs.shape[0] == 1 else probs.argmax(0)
    return np.array(list(read_card(folder).labels.values()), np.uint8)[classes.numpy()]


def _widest_gap_threshold(values: torch.Tensor, share: float) -> float:
    """A threshold near the `share` quantile of `values`, halfway across the widest gap
    between neighbouring values there, so that rounding cannot move a voxel across it."""
    ordered = values.flatten().sort().values.double()
    n = len(ordered)
    low, high = int(n * (share - 0.1)), int(n * (share + 0.1))
    gaps = ordered[low + 1 : high + 1] - ordered[low:high]
    i = low + int(gaps.argmax())
    return float((ordered[i] + ordered[i + 1]) / 2)


def _with_split_output(folder: Path, channels: list[np.ndarray], dest: Path) -> Path:
    """A copy of the exported model whose output biases put a clear share of this scan in
    each outcome: the two tiny trained models are too weak to rely on (on another CPU one
    gave all foreground), and an all-background or all-foreground mask proves little."""
    shutil.copytree(folder, dest)
    for program in ("model.pt2", "model.onnx"):  # they hold the weights before the change
        (dest / program).unlink()
    logits = _eager_logits(dest, channels)
    state = torch.load(dest / "weights.pt", weights_only=True)
    if logits.shape[0] == 1:  # sigmoid: half the voxels on each side of zero
        state["head.bias"][0] -= _widest_gap_threshold(logits[0], 0.5)
    else:  # softmax with K outputs: each label beats background on 1/K of the voxels
        share = 1 - 1 / logits.shape[0]
        for c in range(1, logits.shape[0]):
            state["head.bias"][c] -= _widest_gap_threshold(logits[c] - logits[0], share)
    torch.save(state, dest / "weights.pt")
    return dest


@pytest.mark.parametrize("name", ["two_d", "three_d"])
def test_predict_keeps_shape_and_affine_and_matches_the_eager_model(
    exported, datasets, tmp_path, name
):
    spacing = read_card(exported[name]).preprocessing.target_spacing_mm
    channels = _ras_scan(datasets[name])
    ras_affine = np.diag([*spacing, 1.0])
    folder = _with_split_output(exported[name], channels, tmp_path / "model")
    probs = _eager_logits(folder, channels, probabilities=True)
    expected = _labels(folder, probs)
    assert 0.1 < (expected > 0).mean() < 0.9

    _write_scan(channels, ras_affine, tmp_path / "ras")
    moved, moved_affine = _reoriented(channels, spacing)
    (moved_input,) = {p.parent for p in _write_scan(moved, moved_affine, tmp_path / "moved")}
    # The same image sampled twice as finely: fine voxels 2i and 2i+1 straddle voxel i, so
    # resampling to the model's spacing gives back the RAS image, and the logits come back
    # to the fine grid by linear interpolation, as nnU-Net does.
    fine = [np.repeat(np.repeat(np.repeat(c, 2, 0), 2, 1), 2, 2) for c in channels]
    fine_affine = np.diag([*(np.array(spacing) / 2), 1.0])
    fine_affine[:3, 3] = -np.array(spacing) / 4
    _write_scan(fine, fine_affine, tmp_path / "fine")
    fine_probs = F.interpolate(probs[None], size=fine[0].shape, mode="trilinear")[0]
    expected_fine = _labels(folder, fine_probs)

    for scan in ("ras", "moved", "fine"):
        result = run_cli("nas.predict", str(folder), scan, f"masks_{scan}", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        out = nib.load(tmp_path / f"masks_{scan}" / "scan.nii.gz")
        source = nib.load(next((tmp_path / scan).glob("scan_0000.nii.gz")))
        assert out.shape == source.shape[:3]
        np.testing.assert_allclose(out.affine, source.affine, atol=1e-5)
        assert out.get_data_dtype() == np.uint8
        mask = np.asarray(out.dataobj)
        assert set(np.unique(mask)) <= set(read_card(folder).labels.values())
        if scan == "ras":
            np.testing.assert_array_equal(mask, expected)
        if scan == "moved":  # back in RAS order it is the same mask, voxel for voxel
            np.testing.assert_array_equal(
                np.asarray(nib.as_closest_canonical(out).dataobj), expected
            )
        if scan == "fine":  # rounding may flip a voxel whose interpolated logits tie
            assert (mask == expected_fine).mean() > 0.99


def test_predict_takes_an_overlap_and_a_device(exported, datasets, tmp_path):
    channels = _ras_scan(datasets["three_d"])
    (t2, _) = _write_scan(channels, np.diag([0.8, 0.8, 2.4, 1.0]), tmp_path / "scans")
    model = str(exported["three_d"])
    result = run_cli("nas.predict", model, "scans", "masks", "--overlap", "0.5", "--device", "cpu",
                     cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    mask, image = nib.load(tmp_path / "masks" / "scan.nii.gz"), nib.load(t2)
    assert mask.shape == image.shape
    np.testing.assert_allclose(mask.affine, image.affine, atol=1e-5)
    for bad in ("1", "-0.1", "nan"):
        message = user_error(
            run_cli("nas.predict", model, "scans", "out", "--overlap", bad, cwd=tmp_path)
        )
        assert message.startswith("error: --overlap: must be at least 0 and below 1"), message
    assert not (tmp_path / "out").exists()


def test_the_overlap_decides_how_many_windows_are_run():
    """64 voxels in windows of 32: 2 windows along the axis without overlap, 3 at half."""
    from nas.network.windows import predict_logits

    def windows(overlap: float) -> int:
        calls = []

        def model(x: torch.Tensor) -> torch.Tensor:
            calls.append(x.shape[0])
            return torch.ones(x.shape[0], 1, *x.shape[2:])

        image = np.zeros((1, 64, 32, 16), np.float32)
        logits = predict_logits(model, image, (32, 32, 16), torch.device("cpu"), 2, 1, overlap)
        assert logits.shape == (1, 64, 32, 16)
        torch.testing.assert_close(logits, torch.ones_like(logits))
        return sum(calls)

    assert windows(0.0) == 2 and windows(0.5) == 3


def test_onnx_runs_on_cuda_where_onnxruntime_can_and_says_when_it_cannot():
    import onnxruntime

    from nas.network.inference import onnx_fallback, onnx_providers

    cuda = torch.device("cuda")  # a device name: no GPU is needed to ask
    has_cuda = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    assert onnx_providers(torch.device("cpu")) == ["CPUExecutionProvider"]
    assert onnx_providers(cuda)[0] == (
        "CUDAExecutionProvider" if has_cuda else "CPUExecutionProvider"
    )
    assert onnx_fallback(torch.device("cpu")) is None
    if has_cuda:
        assert onnx_fallback(cuda) is None
    else:
        assert onnx_fallback(cuda) == (
            "onnxruntime has no cuda provider here (pip install onnxruntime-gpu); running "
            "model.onnx on the CPU"
        )


def test_predict_reads_a_single_file_and_writes_a_single_file(exported, datasets, tmp_path):
    channels = _ras_scan(datasets["two_d"])
    (path,) = _write_scan(channels, np.diag([1.5, 1.5, 3.0, 1.0]), tmp_path)
    result = run_cli("nas.predict", str(exported["two_d"]), str(path), "out.nii", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert nib.load(tmp_path / "out.nii").shape == channels[0].shape


@pytest.mark.parametrize("name", ["two_d", "three_d"])
def test_every_engine_gives_the_eager_models_probabilities(exported, name):
    folder = exported[name]
    card = read_card(folder)
    # A window whose size is no multiple of the total stride: the programs are padded.
    size = [p + 3 for p in card.inference.patch_size]
    x = torch.randn(2, len(card.preprocessing.channels), *size)
    eager = load_predictor(folder, engine="eager", tta="mirror")(x)
    for engine in ("pt2", "onnx"):
        program = load_predictor(folder, engine=engine, tta="mirror")(x)
        torch.testing.assert_close(program, eager, rtol=1e-3, atol=1e-4)


def test_best_and_a_size_budget_pick_from_the_front(studies):
    study = optuna.create_study(directions=["maximize", "minimize"])
    for iou, n_params in ((0.5, 1_000), (0.7, 5_000), (0.8, 20_000), (0.6, 30_000)):
        attrs = {"val_iou": iou, "n_params": n_params}  # as the objective records them
        study.add_trial(create_trial(values=[iou, n_params], user_attrs=attrs))
    assert choose_trial(study, None, None).values == [0.8, 20_000]
    assert choose_trial(study, None, 6_000).values == [0.7, 5_000]
    assert choose_trial(study, None, 1_000).values == [0.5, 1_000]
    assert choose_trial(study, 3, None).values == [0.6, 30_000]  # off the front, if asked
    result = run_cli("nas.export", "results/two_d", "--max-params", "10", cwd=studies)
    assert "no front member has at most 10 parameters" in user_error(result)


def test_by_cv_picks_the_best_cross_validated_mean_not_the_search_score(tmp_path):
    from nas.search.companions import open_crossval_study
    from nas.search.rerun import rerun_trial

    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(
        study_name="s", storage=storage, directions=["maximize", "minimize"]
    )
    for iou, n_params in ((0.6, 1_000), (0.8, 5_000), (0.9, 20_000)):
        attrs = {"val_iou": iou, "n_params": n_params}
        study.add_trial(create_trial(values=[iou, n_params], user_attrs=attrs))
    crossval = open_crossval_study(storage, "s", ["iou", "params"])
    # Across two folds trial 1 is better than trial 2, though one fold ranked them the other way.
    for number, fold_ious in ((1, (0.78, 0.80)), (2, (0.70, 0.74)), (0, (0.6, 0.6))):
        for fold, iou in enumerate(fold_ious):
            case = {"case": f"c{fold}", "dice": [iou], "dice_largest": [iou]}
            attrs = {"source_trial": number, "fold": fold, "train_config": {"epochs": 3},
                     "out_of_fold": [case]}  # fmt: skip
            scores = {"iou": iou, "dice": iou, "params": study.trials[number].values[1]}
            crossval.add_trial(
                rerun_trial(study.trials[number], scores, ["iou", "params"], attrs, {})
            )
    assert choose_trial(study, None, None).number == 2
    assert choose_trial(study, None, None, by="cv").number == 1
    assert choose_trial(study, None, 2_000, by="cv").number == 0
    with pytest.raises(NasError, match="no cross-validated member has at most 10"):
        choose_trial(study, None, 10, by="cv")
    with pytest.raises(NasError, match="--trial names the trial"):
        choose_trial(study, 1, None, by="cv")
    # The report says that the two choices differ.
    from nas.search.report import _choices

    assert "the search's best is trial 2, the cross-validation's trial 1" in _choices(study)
    optuna.delete_study(study_name="s-crossval", storage=storage)
    with pytest.raises(NasError, match="has no cross-validation: run nas retrain"):
        choose_trial(study, None, None, by="cv")


def test_export_refuses_to_overwrite_another_model_without_force(exported, studies):
    other = str(exported["two_d"].relative_to(studies))
    result = run_cli(
        "nas.export", "results/three_d", "--out", other, "--format", "none", cwd=studies
    )
    assert "a different model" in user_error(result)
    assert read_card(exported["two_d"]).source["study"] == "two_d"  # untouched
    # The same model again is fine; another with --force replaces it.
    again = run_cli("nas.export", "results/two_d", "--format", "pt2,onnx", cwd=studies)
    assert again.returncode == 0, again.stderr
    copy = studies / "copy"
    shutil.copytree(exported["two_d"], copy)
    forced = run_cli(
        "nas.export", "results/three_d", "--out", "copy", "--force", "--format", "none",
        cwd=studies,
    )  # fmt: skip
    assert forced.returncode == 0, forced.stderr
    assert read_card(copy).source["study"] == "three_d"
    assert not (copy / "model.onnx").exists() and not (copy / "model.pt2").exists()
    # Readable by colleagues where the umask allows, not owner-only like a temporary folder.
    assert stat.S_IMODE(copy.stat().st_mode) == 0o777 & ~_umask()


def test_force_never_replaces_the_study_or_a_folder_an_export_did_not_write(studies, exported):
    results = studies / "results" / "two_d"
    checkpoint = results / "checkpoints" / "trial_0000.pt"
    weights = checkpoint.read_bytes()
    for out in ("results/two_d", "results"):
        result = run_cli("nas.export", "results/two_d", "--out", out, "--force", cwd=studies)
        message = user_error(result)
        assert "the study's results folder" in message and "--force" not in message
    assert (results / "study.db").is_file() and checkpoint.read_bytes() == weights
    assert read_card(exported["two_d"]).source["study"] == "two_d"
    # An earlier export with a file of the user's own added to it.
    mine = studies / "mine"
    shutil.copytree(exported["two_d"], mine)
    (mine / "notes.txt").write_text("my notes")
    result = run_cli("nas.export", "results/three_d", "--out", "mine", "--force", cwd=studies)
    message = user_error(result)
    assert "notes.txt" in message and "--force" not in message
    assert (mine / "notes.txt").read_text() == "my notes"
    assert read_card(mine).source["study"] == "two_d"


def test_force_refuses_a_file_a_link_and_a_folder_that_is_not_an_export(
    studies, exported, tmp_path
):
    study, trial, weights = _two_d_trial(studies)
    storage = f"sqlite:///{studies / 'results' / 'two_d' / 'study.db'}"
    a_file = tmp_path / "model"
    a_file.write_text("a file of mine")
    link = tmp_path / "link"
    link.symlink_to(exported["two_d"], target_is_directory=True)
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "weights.pt").write_bytes(b"my weights")
    cases = {
        a_file: "is a file",
        link: "is a symbolic link",
        partial: "has no architecture.yaml",
        weights.parent: "holds the study's weights",
    }
    for out, reason in cases.items():
        with pytest.raises(nas.NasError, match=reason) as raised:
            export(study, trial, weights, out, (), storage, force=True)
        assert "--force" not in str(raised.value)
    assert a_file.read_text() == "a file of mine" and link.is_symlink()
    assert (partial / "weights.pt").read_bytes() == b"my weights" and weights.is_file()
    assert read_card(exported["two_d"]).source["study"] == "two_d"


# What an export killed mid-way leaves: its staging folder beside the destination.
KILLED_EXPORT = textwrap.dedent(
    """
    import os
    import sys
    from pathlib import Path
    from nas.core.staging import staging_folder

    with staging_folder(Path(sys.argv[1])) as staging:
        (staging / "weights.pt").write_bytes(b"half written")
        os._exit(9)
    """
)


def test_export_records_no_password_and_clears_a_killed_exports_leftovers(studies, tmp_path):
    study, trial, weights = _two_d_trial(studies)
    out = tmp_path / "models" / "stroke"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_EXPORT, out], env=env, capture_output=True, timeout=300
    )
    assert killed.returncode == 9, killed.stderr
    assert len(list(out.parent.iterdir())) == 1  # the leftover
    export(study, trial, weights, out, ("pt2",), "postgresql+psycopg://nas:hunter2@db/nas")
    assert [p.name for p in out.parent.iterdir()] == ["stroke"]
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~_umask()
    for path in out.iterdir():
        assert b"hunter2" not in path.read_bytes(), path.name
    assert read_card(out).source["storage"] == "postgresql+psycopg://nas:***@db/nas"
    assert "postgresql+psycopg://nas:***@db/nas" in (out / "README.md").read_text()


def test_bad_export_requests_are_one_line_errors(studies, tmp_path):
    assert "has no trial 99" in user_error(
        run_cli("nas.export", "results/two_d", "--trial", "99", cwd=studies)
    )
    assert "not a results folder" in user_error(run_cli("nas.export", str(tmp_path), cwd=studies))
    assert "unknown format 'tflite'" in user_error(
        run_cli("nas.export", "results/two_d", "--format", "tflite", cwd=studies)
    )
    # A study with no completed trial, then a pruned one and one whose weights were not kept.
    results = tmp_path / "results" / "empty"
    results.mkdir(parents=True)
    storage = f"sqlite:///{results / 'study.db'}"
    study = optuna.create_study(
        study_name="empty", storage=storage, directions=["maximize", "minimize"]
    )
    assert "has no completed trial" in user_error(run_cli("nas.export", str(results), cwd=tmp_path))
    study.add_trial(create_trial(state=TrialState.PRUNED, intermediate_values={1: 0.1}))
    study.add_trial(create_trial(values=[0.5, 1000], user_attrs={"n_params": 1000}))
    assert "is PRUNED, not COMPLETE" in user_error(
        run_cli("nas.export", str(results), "--trial", "0", cwd=tmp_path)
    )
    # Trial 1 was never trained by nas: no weights anywhere, and nothing is written.
    assert user_error(run_cli("nas.export", str(results), "--trial", "1", cwd=tmp_path)) == (
        f"error: {results}: trial 1 has no weights (the search keeps only its front's, and "
        "neither nas retrain nor nas retrain --folds trained it); train them with nas retrain "
        f"{results} --trials 1, or cross-validate it with nas retrain {results} --trials 1 "
        "--folds all"
    )
    assert [p.name for p in results.iterdir() if p.is_dir()] == []


def test_a_missing_or_broken_description_is_named(tmp_path):
    with pytest.raises(nas.NasError, match="architecture.yaml: not found: not a folder"):
        read_card(tmp_path)
    (tmp_path / "architecture.yaml").write_text("architecture: [spatial_dims\n")
    with pytest.raises(nas.NasError, match="architecture.yaml: not valid YAML"):
        read_card(tmp_path)
    (tmp_path / "architecture.yaml").write_text("architecture: {depth: 0}\n")
    with pytest.raises(nas.NasError, match="architecture.yaml: not a valid model description"):
        read_card(tmp_path)


def test_bad_predict_inputs_are_one_line_errors(exported, datasets, tmp_path):
    two_d, three_d = str(exported["two_d"]), str(exported["three_d"])
    channels = _ras_scan(datasets["three_d"])
    (t2, _) = _write_scan(channels, np.diag([0.8, 0.8, 2.4, 1.0]), tmp_path / "scans")
    # Only one of the model's two channel files.
    (tmp_path / "scans" / "scan_0001.nii.gz").unlink()
    assert "the model takes 2 (_0000, _0001)" in user_error(
        run_cli("nas.predict", three_d, "scans", "out", cwd=tmp_path)
    )
    # A 3D file for a model that takes two channels in one (4D) image.
    assert "expected a 4D image with 2 channels" in user_error(
        run_cli("nas.predict", three_d, str(t2), "out.nii.gz", cwd=tmp_path)
    )
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"\x1f\x8b not really gzip")
    assert "cannot be read as NIfTI" in user_error(
        run_cli("nas.predict", two_d, str(broken), "out.nii.gz", cwd=tmp_path)
    )
    assert "not found" in user_error(
        run_cli("nas.predict", str(tmp_path / "nope"), str(t2), "o", cwd=tmp_path)
    )
    # Weights of another architecture in the model's folder.
    mismatched = tmp_path / "mismatched"
    shutil.copytree(exported["two_d"], mismatched)
    shutil.copy(exported["three_d"] / "weights.pt", mismatched / "weights.pt")
    message = user_error(
        run_cli("nas.predict", str(mismatched), str(t2), "out.nii.gz", cwd=tmp_path)
    )
    assert "weights.pt" in message and "does not match the architecture" in message
    with pytest.raises(nas.NasError, match="does not match the architecture"):
        nas.load(mismatched)
    (mismatched / "weights.pt").unlink()
    assert "weights.pt: not found" in user_error(
        run_cli("nas.predict", str(mismatched), str(t2), "out.nii.gz", cwd=tmp_path)
    )
    assert not (tmp_path / "out.nii.gz").exists() and not (tmp_path / "out").exists()


def _off_the_front(study: optuna.Study) -> optuna.trial.FrozenTrial:
    """A completed trial the front does not hold: the search's trial 0 recorded again with a
    lower IoU, as a dominated candidate would be (a tiny search cannot be relied on to leave
    one), so the search kept no weights of it."""
    (source,) = study.trials
    iou = source.values[0] - 0.5
    study.add_trial(
        create_trial(
            values=[iou, source.values[1]],
            params=source.params,
            distributions=source.distributions,
            user_attrs={**source.user_attrs, "val_iou": iou},
        )
    )
    return study.trials[-1]


def _same_state(path: Path, folder: Path) -> bool:
    exported = torch.load(folder / "weights.pt", weights_only=True)
    return all(torch.equal(exported[k], v) for k, v in torch.load(path, weights_only=True).items()
               if k in exported)  # fmt: skip


def test_a_retrained_trial_off_the_front_exports_and_segments(tmp_path, tiny_dataset):
    """search -> retrain a trial off the front -> export it -> predict: nas.export finds the
    weights wherever nas put them, prefers the retrained ones and records which it took."""
    (tmp_path / "space.yaml").write_text(tiny_space_yaml(tiny_dataset, "tiny", 1, TWO_D))
    assert run_cli("nas.run", "space.yaml", cwd=tmp_path).returncode == 0
    results = tmp_path / "results" / "tiny"
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{results / 'study.db'}")
    off = _off_the_front(study).number
    assert not checkpoint_path(results, off).exists()
    # Before the retrain: one line naming the command that trains the weights.
    message = user_error(run_cli("nas.export", "results/tiny", "--trial", str(off), cwd=tmp_path))
    assert f"train them with nas retrain results/tiny --trials {off}," in message
    assert not (results / "export").exists()

    retrained = run_cli(
        "nas.retrain",
        "results/tiny",
        "--trials",
        f"0,{off}",
        "--epochs",
        "1",
        cwd=tmp_path,
    )
    assert retrained.returncode == 0, retrained.stderr
    exported = run_cli(
        "nas.export",
        "results/tiny",
        "--trial",
        str(off),
        "--out",
        "models/off",
        cwd=tmp_path,
    )
    assert exported.returncode == 0, exported.stderr
    assert "with its retrained weights" in exported.stdout
    folder = tmp_path / "models" / "off"
    card = read_card(folder)
    path = f"retrained/checkpoints/trial_{off:04d}.pt"
    assert card.source["trial"] == off
    assert card.source["weights"]["kind"] == "retrained"
    assert card.source["weights"]["path"] == path
    assert card.source["weights"]["epochs_run"] == 1
    assert _same_state(results / path, folder)
    assert f"Weights: retrained (`{path}`): 1 epochs" in (folder / "README.md").read_text()

    # Trial 0 has both: the retrained weights unless the search's are asked for.
    for wanted, path in (
        ("auto", "retrained/checkpoints/trial_0000.pt"),
        ("search", "checkpoints/trial_0000.pt"),
    ):
        out = f"models/zero_{wanted}"
        result = run_cli("nas.export", "results/tiny", "--trial", "0", "--weights", wanted,
                         "--format", "none", "--out", out, cwd=tmp_path)  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert read_card(tmp_path / out).source["weights"]["path"] == path
        assert _same_state(results / path, tmp_path / out)
    # The search kept none of the trial off the front, and it has no folds.
    for wanted, reason in (("search", "the search kept no weights"), ("folds", "--folds all")):
        message = user_error(run_cli("nas.export", "results/tiny", "--trial", str(off),
                                     "--weights", wanted, "--out", "x", cwd=tmp_path))  # fmt: skip
        assert message.startswith("error: --weights: ") and reason in message
    assert not (tmp_path / "x").exists()

    images = tiny_dataset / "imagesTr"
    predicted = run_cli("nas.predict", "models/off", str(images), "masks", cwd=tmp_path)
    assert predicted.returncode == 0, predicted.stderr
    scans = sorted(images.glob("*_0000.nii.gz"))
    assert len(scans) == len(list((tmp_path / "masks").iterdir())) == 6
    for scan in scans:
        image = nib.load(scan)
        mask = nib.load(tmp_path / "masks" / scan.name.replace("_0000", ""))
        assert mask.shape == image.shape
        np.testing.assert_allclose(mask.affine, image.affine, atol=1e-5)
        assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1}


def test_saved_probabilities_average_into_masks_on_the_scans_grid(exported, studies, tmp_path):
    """nas predict --save-probabilities, then nas ensemble over two models' folders."""
    images = studies / "Dataset002_TwoChannels" / "imagesTr"
    mirroring = tmp_path / "mirroring_model"
    result = run_cli("nas.export", "results/three_d", "--tta", "mirror", "--format", "none",
                     "--out", str(mirroring), cwd=studies)  # fmt: skip
    assert result.returncode == 0, result.stderr
    mirrored = tmp_path / "mirrored"
    for name, model in (("plain", exported["three_d"]), ("mirrored", mirroring)):
        result = run_cli("nas.predict", str(model), str(images), str(tmp_path / name),
                         "--save-probabilities", cwd=tmp_path)  # fmt: skip
        assert result.returncode == 0, result.stderr
    cases = sorted(p.name[: -len(".nii.gz")] for p in (tmp_path / "plain").glob("*.nii.gz"))
    assert cases and cases == sorted(p.stem for p in (tmp_path / "plain").glob("*.npz"))
    saved = np.load(tmp_path / "plain" / f"{cases[0]}.npz", allow_pickle=False)
    image = nib.load(images / f"{cases[0]}_0000.nii.gz")
    assert saved["probabilities"].shape == (3, *image.shape)  # softmax over 3 classes
    np.testing.assert_allclose(saved["probabilities"].sum(0), 1.0, atol=1e-4)
    np.testing.assert_allclose(saved["affine"], image.affine)

    # One model's probabilities, ensembled with themselves, give exactly its masks.
    alone = tmp_path / "alone"
    plain = str(tmp_path / "plain")
    assert run_cli("nas.ensemble", plain, plain, str(alone), cwd=tmp_path).returncode == 0
    for case in cases:
        ensembled, predicted = (
            nib.load(alone / f"{case}.nii.gz"),
            nib.load(f"{plain}/{case}.nii.gz"),
        )
        np.testing.assert_array_equal(np.asarray(ensembled.dataobj), np.asarray(predicted.dataobj))
        np.testing.assert_allclose(ensembled.affine, predicted.affine)
    # Two models: their mean probabilities, turned into labels by argmax.
    both = tmp_path / "both"
    result = run_cli("nas.ensemble", plain, str(mirrored), str(both), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for case in cases:
        mean = sum(np.load(f / f"{case}.npz")["probabilities"] for f in (tmp_path / "plain",
                   mirrored)) / 2  # fmt: skip
        mask = np.asarray(nib.load(both / f"{case}.nii.gz").dataobj)
        np.testing.assert_array_equal(mask, mean.argmax(0))  # labels 0, 1, 2 are the classes
        assert mask.shape == nib.load(images / f"{case}_0000.nii.gz").shape
    labels = studies / "Dataset002_TwoChannels" / "labelsTr"
    result = run_cli("nas.evaluate", str(both), str(labels), cwd=tmp_path)
    assert result.returncode == 0, result.stderr


def test_ensembles_of_mismatched_probabilities_are_refused(exported, studies, tmp_path):
    images = studies / "Dataset002_TwoChannels" / "imagesTr"
    plain = tmp_path / "plain"
    result = run_cli("nas.predict", str(exported["three_d"]), str(images), str(plain),
                     "--save-probabilities", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    cases = sorted(p.stem for p in plain.glob("*.npz"))

    def variant(name: str, change) -> Path:
        folder = tmp_path / name
        shutil.copytree(plain, folder)
        change(folder)
        return folder

    fewer = variant("fewer", lambda f: (f / f"{cases[0]}.npz").unlink())

    # The same case on another grid, and from a model with other labels.
    def reshape(folder: Path) -> None:
        saved = dict(np.load(folder / f"{cases[0]}.npz"))
        np.savez_compressed(folder / f"{cases[0]}.npz", **saved | {
            "probabilities": saved["probabilities"][:, :-1]})  # fmt: skip

    def relabel(folder: Path) -> None:
        saved = dict(np.load(folder / f"{cases[0]}.npz"))
        labels = json.loads(str(saved["labels"])) | {"labels": {"background": 0, "x": 1, "y": 2}}
        np.savez_compressed(folder / f"{cases[0]}.npz", **saved | {
            "labels": np.array(json.dumps(labels))})  # fmt: skip

    def corrupt(folder: Path) -> None:
        (folder / f"{cases[0]}.npz").write_bytes(b"not a zip")

    out = tmp_path / "out"
    errors = {
        name: user_error(run_cli("nas.ensemble", str(plain), str(folder), str(out), cwd=tmp_path))
        for name, folder in (
            ("fewer", fewer),
            ("shape", variant("shape", reshape)),
            ("labels", variant("labels", relabel)),
            ("corrupt", variant("corrupt", corrupt)),
        )
    }
    assert f"holds other cases than {plain}: it lacks {cases[0]}" in errors["fewer"]
    assert "(probabilities: shape" in errors["shape"]  # not the grid of its NIfTI header
    assert "comes from a model with other labels" in errors["labels"]
    assert "is not a probability map written by nas predict" in errors["corrupt"]
    assert "give at least two folders" in user_error(
        run_cli("nas.ensemble", str(plain), str(out), cwd=tmp_path)
    )
    assert not out.exists()  # nothing written by any of them


def _fine_tuning_space(data: Path, card: dict, init_weights: str, name: str = "tuned") -> str:
    """A space fixed to an exported model's architecture, on another dataset, starting from
    `init_weights` with a learning rate too small to move the weights far."""
    fixed = {
        k: v for k, v in card["architecture"].items() if k not in ("in_channels", "out_channels")
    }
    space = {
        "data": {"path": str(data), "n_folds": 3, "synthetic": {
            "n_cases": 6, "shape": [32, 32, 16], "spacing_mm": [1.5, 1.5, 3.0], "seed": 11}},
        "search": fixed,
        "train": {"epochs": 2, "batches_per_epoch": 3, "batch_size_2d": 4,
                  "patch_size_2d": list(card["inference"]["patch_size"]), "learning_rate": 1e-7,
                  "weight_decay": 0.0, "init_weights": init_weights},
        # Another seed than the export's, so that the network's own start differs from it.
        "study": {"name": name, "sampler": "random", "n_trials": 1, "seed": 5},
    }  # fmt: skip
    return yaml.safe_dump(space, sort_keys=False)


def test_a_candidate_fine_tunes_an_exported_model_on_another_dataset(exported, tmp_path):
    folder = exported["two_d"]
    card = yaml.safe_load((folder / "architecture.yaml").read_text())
    (tmp_path / "space.yaml").write_text(_fine_tuning_space(tmp_path / "other", card, str(folder)))
    result = run_cli("nas.run", "space.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    study = optuna.load_study(
        study_name="tuned", storage=f"sqlite:///{tmp_path / 'results/tuned/study.db'}"
    )
    trial = study.trials[0]
    assert trial.state == TrialState.COMPLETE
    assert TrialRecord.of(trial).train_config["init_weights"] == str(folder)
    start = torch.load(folder / "weights.pt", weights_only=True)
    tuned = torch.load(checkpoint_path(tmp_path / "results/tuned", 0), weights_only=True)
    unet = nas.UNetConfig.from_dict(card["architecture"])
    own_start = init_model(unet, seed=5).state_dict()  # where the trial starts without them
    parameters = [k for k, _ in init_model(unet, seed=5).named_parameters()]
    assert parameters and all(k in start for k in parameters)
    # The tuned weights start from the export's: a learning rate of 1e-7 leaves them there.
    for k in parameters:
        torch.testing.assert_close(tuned[k], start[k], rtol=0, atol=1e-4)
    assert max(float((own_start[k] - start[k]).abs().max()) for k in parameters) > 0.1


def test_init_weights_that_do_not_fit_are_refused_before_the_study_opens(exported, tmp_path):
    card = yaml.safe_load((exported["two_d"] / "architecture.yaml").read_text())
    other = exported["three_d"] / "weights.pt"
    space = _fine_tuning_space(tmp_path / "other", card, str(other))
    load_dataset(DataConfig(**yaml.safe_load(space)["data"]))  # generated and cached first
    (tmp_path / "space.yaml").write_text(space)
    message = user_error(run_cli("nas.run", "space.yaml", cwd=tmp_path))
    assert message.startswith(f"error: {other}: does not fit the space's architecture")
    assert "encoder" in message or "is (" in message  # names the first tensor and its shapes
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    (tmp_path / "space.yaml").write_text(_fine_tuning_space(tmp_path / "other", card, str(text)))
    message = user_error(run_cli("nas.run", "space.yaml", cwd=tmp_path))
    assert f"{text}: cannot be read as PyTorch weights" in message
    assert not (tmp_path / "results").exists()


def test_export_says_how_it_chose_and_best_score_with_by_cv_is_refused(studies):
    best = run_cli("nas.export", "results/two_d", "--format", "none", "--out", "by_rule",
                   cwd=studies)  # fmt: skip
    assert best.returncode == 0, best.stderr
    assert "  chosen" in best.stdout  # by the one-standard-error rule, or the best itself
    top = run_cli("nas.export", "results/two_d", "--best-score", "--format", "none", "--out",
                  "by_score", cwd=studies)  # fmt: skip
    assert top.returncode == 0, top.stderr
    assert "chosen by the highest score: trial" in top.stdout
    before = sorted(p.name for p in (studies / "results" / "two_d").rglob("*"))
    refused = run_cli("nas.export", "results/two_d", "--best-score", "--by", "cv", cwd=studies)
    assert "--best-score: ranks the search's front; with --by cv use --best" in user_error(refused)
    assert sorted(p.name for p in (studies / "results" / "two_d").rglob("*")) == before
