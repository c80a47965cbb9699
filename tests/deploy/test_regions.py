"""Region-based training (nnU-Net's regions_class_order): three nested regions declared in
dataset.json train with a sigmoid per region, are scored per region, and come back from
predict as the dataset's label values, each region's value written where it is predicted."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import optuna
import pytest
import torch
import yaml

from nas.core.errors import NasError
from nas.data import DataConfig, load_dataset
from nas.data.labels import LabelScheme, Region
from nas.data.layouts import discover
from nas.network.model_card import read_card
from nas.search.record import StudyRecord, TrialRecord
from nas.training.losses import DiceCELoss, make_loss
from nas.validation.validate import PooledCounts
from tests.conftest import run_cli
from tests.datasets import REGIONS_CLASS_ORDER, make_region_case, save, write_nnunet_regions

NESTED = LabelScheme.build(
    {0: 0, 1: 1, 2: 2, 3: 3},
    ("label_1", "label_2", "label_3"),
    {"whole": [1, 2, 3], "core": [2, 3], "enhancing": [3]},
    [1, 2, 3],
)
# Class maps of one row each: background, then values 1, 2 and 3.
LABEL_MAP = torch.tensor([[0, 1, 2, 3, 3, 2, 1, 0]])


def test_dataset_json_regions_are_read_as_nnunet_declares_them(tmp_path):
    index = discover(write_nnunet_regions(tmp_path / "ds", n_cases=2))
    assert index.regions == {"whole": (1, 2, 3), "core": (2, 3), "enhancing": (3,)}
    assert index.regions_class_order == (1, 2, 3)
    # The distinct values of the regions are the classes a case's voxels are stored as.
    assert index.labels == {"background": 0, "label_1": 1, "label_2": 2, "label_3": 3}


def test_nested_regions_encode_to_overlapping_targets_and_decode_to_the_same_map():
    assert (NESTED.output, NESTED.out_channels) == ("regions", 3)
    targets = NESTED.encode(LABEL_MAP)  # (B, R, *spatial)
    assert targets.shape == (1, 3, 8)
    assert torch.equal(targets[0, 0], (LABEL_MAP[0] >= 1).float())  # whole: 1, 2, 3
    assert torch.equal(targets[0, 1], (LABEL_MAP[0] >= 2).float())  # core: 2, 3
    assert torch.equal(targets[0, 2], (LABEL_MAP[0] == 3).float())  # enhancing: 3
    logits = targets[0] * 4 - 2  # sigmoid > 0.5 exactly where each region is
    assert torch.equal(NESTED.classes_from_logits(logits).long(), LABEL_MAP[0])


def test_later_regions_overwrite_earlier_ones_in_regions_class_order():
    # Whole and enhancing predicted without core: enhancing, written last, wins; core alone
    # writes 2 even outside whole.
    on = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    decoded = NESTED.classes_from_logits(on.float() * 4 - 2)
    assert decoded.tolist() == [3, 1, 2, 0]
    # The class written is that of the region's value, not of its position.
    reordered = LabelScheme(
        NESTED.class_names,
        (0, 10, 20, 30),
        (Region("outer", (1, 2, 3), 20), Region("in", (3,), 30)),
    )
    assert reordered.classes_from_logits(torch.tensor([[2.0, 2.0], [-2.0, 2.0]])).tolist() == [2, 3]


def test_the_scheme_round_trips_through_its_nnunet_description():
    described = NESTED.describe()
    assert described == {
        "labels": {"background": 0, "label_1": 1, "label_2": 2, "label_3": 3},
        "regions": {"whole": [1, 2, 3], "core": [2, 3], "enhancing": [3]},
        "regions_class_order": [1, 2, 3],
    }
    assert LabelScheme.from_description(json.loads(json.dumps(described))) == NESTED
    # Plain classes describe themselves as before: labels alone; merged values write the least.
    plain = LabelScheme.build({0: 0, 1: 1, 4: 1, 2: 2}, ("lesion", "vessel"))
    assert plain.describe() == {"labels": {"background": 0, "lesion": 1, "vessel": 2}}
    assert (plain.output, plain.out_channels) == ("softmax", 3)
    binary = LabelScheme.build({0: 0, 1: 1}, ("lesion",))
    assert (binary.output, binary.out_channels) == ("sigmoid", 1)


def test_scores_are_pooled_per_region_on_the_class_maps():
    truth = np.array([0, 1, 2, 3, 3, 0])
    predicted = np.array([0, 1, 1, 3, 0, 0])
    counts = PooledCounts(NESTED)
    counts.add(predicted, truth)
    counts.add(truth, truth)  # a perfect second case pools in, not averaged per case
    scores = counts.scores()
    # Voxels in both over voxels in either, both cases together: whole 7 of 8 (a 3 missed),
    # core 4 of 6 (a 2 read as 1 too), enhancing 3 of 4.
    assert scores.iou_per_class == pytest.approx((7 / 8, 4 / 6, 3 / 4))
    assert scores.iou == pytest.approx(np.mean([7 / 8, 4 / 6, 3 / 4]))


def test_the_region_loss_trains_each_region_on_its_own_sigmoid():
    loss = make_loss(NESTED)
    assert isinstance(make_loss(LabelScheme.build({0: 0, 1: 1}, ("lesion",))).loss, DiceCELoss)
    target = LABEL_MAP.repeat(2, 1)  # (B, *spatial) class indices, as the sampler gives
    nested = NESTED.encode(target)
    assert float(loss(nested * 20 - 10, target)) < 0.01
    # Predicting only the innermost region of each voxel (one-hot, as a softmax would) is
    # wrong for regions: a 3 is inside whole and core too.
    innermost = torch.stack([target == 1, target == 2, target == 3], 1).float()
    assert float(loss(innermost * 20 - 10, target)) > 0.5
    logits = torch.zeros(2, 3, 8, requires_grad=True)
    loss(logits, target).backward()
    # The gradient raises every region where the voxel belongs to it: the centre in all three.
    assert bool((logits.grad[:, :, 3] < 0).all()) and bool((logits.grad[:, 2, 1] > 0).all())


def _meta(root: Path) -> dict:
    return json.loads((root / "dataset.json").read_text())


BAD_REGIONS = {
    "no_regions_class_order": (
        lambda m: m.pop("regions_class_order"),
        "label 'whole' lists several values (region-based training), so regions_class_order "
        "is required",
    ),
    "order_too_short": (
        lambda m: m.update(regions_class_order=[1, 2]),
        "regions_class_order has 2 values for 3 regions (whole, core, enhancing)",
    ),
    "empty_region": (
        lambda m: m["labels"].update(core=[]),
        "label 'core' lists no values",
    ),
    "non_integer_value": (
        lambda m: m["labels"].update(core=[2, "3"]),
        "label 'core' must be a non-negative integer or a list of them",
    ),
    "fractional_value": (
        lambda m: m["labels"].update(core=[2, 2.5]),
        "label 'core' must be a non-negative integer or a list of them",
    ),
    "region_with_background": (
        lambda m: m["labels"].update(whole=[0, 1, 2, 3]),
        "label 'whole' lists background (0)",
    ),
    "background_as_a_list": (
        lambda m: m["labels"].update(background=[0]),
        "label 'background' lists background (0)",
    ),
    "value_outside_its_region": (
        lambda m: m.update(regions_class_order=[1, 1, 3]),
        "regions_class_order gives 1 for region 'core', which is not one of its values [2, 3]",
    ),
    "order_not_a_list": (
        lambda m: m.update(regions_class_order=3),
        "regions_class_order must be a list of label values",
    ),
}


@pytest.mark.parametrize("name", sorted(BAD_REGIONS))
def test_bad_region_declarations_exit_2_with_one_line_naming_dataset_json(name, tmp_path):
    root = write_nnunet_regions(tmp_path / "ds", n_cases=2)
    change, message = BAD_REGIONS[name]
    meta = _meta(root)
    change(meta)
    (root / "dataset.json").write_text(json.dumps(meta))
    (tmp_path / "space.yaml").write_text(f"data:\n  path: {root}\n  n_folds: 2\n")
    result = run_cli("nas.run", "space.yaml", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: {root / 'dataset.json'}: {message}")
    assert not (tmp_path / "results").exists()


def test_data_foreground_cannot_regroup_regions(tmp_path):
    root = write_nnunet_regions(tmp_path / "ds", n_cases=2)
    cfg = DataConfig(path=root, foreground={"tumour": (1, 2, 3)}, cache_dir=tmp_path / "cache")
    with pytest.raises(NasError, match="which data.foreground cannot regroup") as info:
        load_dataset(cfg)
    assert info.value.source == str(root / "dataset.json")


SPACE = """\
data:
  path: {root}
  n_folds: 2
search:
  spatial_dims: 3
  depth: 2
  base_channels: 4
train:
  epochs: 2
  batches_per_epoch: 2
  batch_size_3d: 2
  patch_size_3d: [16, 16, 8]
study:
  name: regions
  n_trials: 1
  sampler: random
  pruner: {{type: none}}
"""


def _write_scan(folder: Path, channels: list[np.ndarray], spacing) -> Path:
    """A scan in RAS at `spacing`, every voxel nonzero: preprocessing neither reorients,
    crops nor resamples it, so the network's grid is the scan's own."""
    for c, channel in enumerate(channels):
        path = folder / f"scan_{c:04d}.nii.gz"
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(channel + 10.0, np.diag([*spacing, 1.0])), path)
    return folder


@pytest.mark.slow
def test_a_region_dataset_searches_exports_and_predicts_its_label_values(tmp_path, monkeypatch):
    root = write_nnunet_regions(tmp_path / "ds", n_cases=4)
    channels, label = make_region_case(9, (20, 20, 10))  # one held-out case
    for c, channel in enumerate(channels):
        save(channel, root / "imagesTs" / f"test_009_{c:04d}.nii.gz")
    save(label, root / "labelsTs" / "test_009.nii.gz")
    (tmp_path / "space.yaml").write_text(SPACE.format(root=root))
    result = run_cli("nas.run", "space.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stderr

    # One sigmoid per region, scored per region, and the study records the regions.
    study = optuna.load_study(
        study_name="regions", storage=f"sqlite:///{tmp_path / 'results/regions/study.db'}"
    )
    (trial,) = study.trials
    assert TrialRecord.of(trial).unet_config["out_channels"] == 3
    assert len(TrialRecord.of(trial).val_iou_per_class) == 3
    described = StudyRecord.of(study).data_description
    assert described["regions"] == {"whole": [1, 2, 3], "core": [2, 3], "enhancing": [3]}
    assert described["regions_class_order"] == REGIONS_CLASS_ORDER
    assert len(StudyRecord.of(study).test_scores["0"]["test_iou_per_class"]) == 3
    # The cached dataset reopens with its regions.
    dataset = load_dataset(DataConfig(path=root, n_folds=2))
    assert dataset.scheme == NESTED

    exported = run_cli("nas.export", "results/regions", "--format", "none", cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr
    folder = tmp_path / "results/regions/export/trial_0000"
    card = yaml.safe_load((folder / "architecture.yaml").read_text())
    assert card["inference"]["output"] == "regions"
    assert card["regions"] == described["regions"]
    assert card["regions_class_order"] == REGIONS_CLASS_ORDER
    assert "regions whole = [1, 2, 3]" in (folder / "README.md").read_text()
    spacing = card["preprocessing"]["target_spacing_mm"]

    # The trained model's own mask: the scan's grid, and only the dataset's label values.
    channels, truth = make_region_case(5, (20, 22, 10))
    _write_scan(tmp_path / "scan", channels, spacing)
    result = run_cli("nas.predict", str(folder), "scan", "masks", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    written = nib.load(tmp_path / "masks" / "scan.nii.gz")
    assert written.shape == truth.shape and written.get_data_dtype() == np.uint8
    assert set(np.unique(np.asarray(written.dataobj))) <= {0, 1, 2, 3}

    # With probabilities we control: the nested regions of `truth`, plus enhancing alone in a
    # corner where no other region is, the mask holds each region's value where it says.
    regions = np.stack([truth >= 1, truth >= 2, truth == 3])
    regions[2, :3, :3, :3] = True

    def region_probabilities(predictor, image, *args, **kwargs):
        assert image.shape[1:] == truth.shape  # no crop, no resampling
        return torch.from_numpy(np.where(regions, 0.9, 0.1).astype(np.float32))

    monkeypatch.setattr("nas.network.windows.predict_logits", region_probabilities)
    result = run_cli("nas.predict", str(folder), "scan", "controlled", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    mask = np.asarray(nib.load(tmp_path / "controlled" / "scan.nii.gz").dataobj)
    expected = truth.copy()
    expected[:3, :3, :3] = 3
    np.testing.assert_array_equal(mask, expected)
    assert set(np.unique(mask)) == {0, 1, 2, 3}

    # A card whose regions disagree with its labels is refused on reading, in one line.
    card["regions_class_order"] = [1, 2]
    (folder / "architecture.yaml").write_text(yaml.safe_dump(card, sort_keys=False))
    with pytest.raises(NasError, match="regions_class_order has 2 values for 3 regions"):
        read_card(folder)
