"""Deep supervision: extra outputs in training only, nnU-Net's loss weights, the search's
`params` without the extra heads, and an export that holds only the full-resolution network."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from optuna.trial import create_trial

import nas
from nas.data.labels import LabelScheme
from nas.deploy.export import export
from nas.network.builder import UNetConfig, build_unet, count_parameters, deployed
from nas.network.describe import summary
from nas.network.memory import estimate_inference_bytes, parameter_count
from nas.network.model_card import WEIGHTS_FILE
from nas.search.candidate import Candidate
from nas.search.draw import sample
from nas.search.measure import measure_candidate
from nas.search.space import StudySection
from nas.search.space_file import load_space
from nas.training.fit import TrainConfig, fit, init_model
from nas.training.losses import DiceCELoss, TrainingLoss, deep_supervision_weights
from nas.training.memory import estimate_training_bytes

LESION = LabelScheme(("lesion",), (0, 1))  # the tiny dataset's one class
CPU = torch.device("cpu")
TINY_TRAIN = dict(epochs=2, batches_per_epoch=3, batch_size_2d=4, patch_size_2d=(32, 32))


@pytest.mark.parametrize(
    ("options", "spatial", "sizes"),
    [
        (dict(spatial_dims=2, depth=4), (32, 24), [(32, 24), (16, 12), (8, 6)]),
        (dict(spatial_dims=3, depth=3), (16, 16, 8), [(16, 16, 8), (8, 8, 4)]),
        # The slice axis keeps its size through the first two stages; sizes that are no
        # multiple of the total stride are padded, and each output cropped to what covers them.
        (
            dict(spatial_dims=3, depth=4, anisotropic_stages=2),
            (33, 30, 13),
            [(33, 30, 13), (17, 15, 13), (9, 8, 13)],
        ),
        (dict(spatial_dims=2, depth=2), (16, 16), [(16, 16)]),  # no stage below full resolution
        (dict(spatial_dims=2, depth=1), (16, 16), [(16, 16)]),
    ],
)
def test_training_returns_each_decoder_stage_full_resolution_first(options, spatial, sizes):
    model = build_unet(**options, base_channels=4, out_channels=3, deep_supervision=True)
    outputs = model.train()(torch.randn(2, 1, *spatial))
    assert isinstance(outputs, list)
    assert [tuple(o.shape) for o in outputs] == [(2, 3, *size) for size in sizes]
    assert len(model.aux_heads) == len(sizes) - 1
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 1, *spatial)).shape == (2, 3, *spatial)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_the_full_resolution_output_is_the_network_without_deep_supervision(spatial_dims):
    """The heads are built last: one seed gives both networks the same other weights, so the
    eval output (and the first training output) is exactly the plain network's."""
    plain = UNetConfig(spatial_dims=spatial_dims, depth=4, base_channels=4, norm="batch")
    supervised = init_model(dataclasses.replace(plain, deep_supervision=True), 0)
    plain_model = init_model(plain, 0)
    x = torch.randn(2, 1, *((16, 16) if spatial_dims == 2 else (16, 16, 8)))
    assert torch.equal(supervised(x)[0], plain_model(x))  # batch statistics: training mode
    supervised.eval()
    plain_model.eval()
    with torch.no_grad():
        assert torch.equal(supervised(x), plain_model(x))


def test_loss_weights_halve_per_level_the_lowest_is_zero_and_they_sum_to_one():
    assert deep_supervision_weights(1) == (1.0,)
    assert deep_supervision_weights(2) == (1.0, 0.0)
    assert deep_supervision_weights(3) == pytest.approx((2 / 3, 1 / 3, 0.0))
    assert deep_supervision_weights(5) == pytest.approx((8 / 15, 4 / 15, 2 / 15, 1 / 15, 0.0))


class _Recording(torch.nn.Module):
    """Any loss(logits, target): records the shapes it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.inner, self.seen = DiceCELoss(), []

    def forward(self, logits, target):
        self.seen.append((tuple(logits.shape), tuple(target.shape)))
        return self.inner(logits, target)


def test_the_wrapper_is_the_weighted_sum_against_the_target_at_each_size():
    torch.manual_seed(0)
    outputs = [torch.randn(2, 3, 16 // 2**i, 12 // 2**i) for i in range(3)]
    target = torch.randint(0, 3, (2, 16, 12))
    base = _Recording()
    loss = TrainingLoss(base)(outputs, target)
    # MONAI shrinks the target by nearest neighbour ("nearest-exact": voxel i of a half-size
    # output reads target voxel 2i + 1), which keeps class indices as they are.
    channel = target[:, None].float()
    by_hand = 2 / 3 * DiceCELoss()(outputs[0], channel)
    by_hand += 1 / 3 * DiceCELoss()(outputs[1], channel[:, :, 1::2, 1::2])
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-6)
    # The lowest output, weighted 0, is not scored at all.
    assert base.seen == [((2, 3, 16, 12), (2, 1, 16, 12)), ((2, 3, 8, 6), (2, 1, 8, 6))]
    # A plain tensor is the only output.
    single = TrainingLoss(DiceCELoss())(outputs[0], target)
    assert single.item() == pytest.approx(DiceCELoss()(outputs[0], channel).item())


def test_fit_trains_the_weighted_heads_and_leaves_the_zero_weighted_one(tiny_cases):
    model = build_unet(spatial_dims=2, depth=4, base_channels=4, deep_supervision=True)
    half, lowest = (head.weight.detach().clone() for head in model.aux_heads)
    cases = tiny_cases
    result = fit(model, cases[:4], cases[4:], LESION, TrainConfig(**TINY_TRAIN), CPU)
    assert len(result.history) == 2
    for epoch in result.history:
        assert torch.isfinite(torch.tensor(epoch.train_loss))
        assert 0.0 <= epoch.scores.iou <= 1.0
    assert not torch.equal(model.aux_heads[0].weight, half)  # the 1/2 output's loss, weight 1/3
    assert torch.equal(model.aux_heads[1].weight, lowest)  # weight 0: no gradient at all


def test_params_and_macs_count_the_deployed_network(tmp_path):
    plain = UNetConfig(spatial_dims=2, depth=4, base_channels=4)
    supervised = dataclasses.replace(plain, deep_supervision=True)
    model = build_unet(supervised)
    heads = sum(p.numel() for p in model.aux_heads.parameters())
    assert heads == 8 * 1 + 1 + 16 * 1 + 1  # 1x1 heads at the 1/2 and 1/4 stages
    assert count_parameters(model) == count_parameters(build_unet(plain))
    assert count_parameters(model) == sum(p.numel() for p in model.parameters()) - heads
    assert parameter_count(supervised, 1) == count_parameters(model)
    train = TrainConfig(**TINY_TRAIN)
    costs = [
        measure_candidate(Candidate(unet, train), (32, 32), 1, CPU, StudySection())
        for unet in (plain, supervised)
    ]
    assert costs[0] == costs[1]  # params and MACs
    # Training holds the heads and their outputs; inference does not.
    assert estimate_training_bytes(supervised, train, 1) > estimate_training_bytes(plain, train, 1)
    assert estimate_inference_bytes(supervised, (32, 32), 1) == estimate_inference_bytes(
        plain, (32, 32), 1
    )
    assert "deep supervision" in summary(supervised, 1) and "deep" not in summary(plain, 1)


def test_deployed_drops_the_heads_and_keeps_every_other_weight():
    model = build_unet(spatial_dims=3, depth=4, base_channels=4, deep_supervision=True)
    cfg, state = deployed(model.config, model.state_dict())
    assert cfg == dataclasses.replace(model.config, deep_supervision=False)
    assert set(state) == {k for k in model.state_dict() if not k.startswith("aux_heads.")}
    build_unet(cfg).load_state_dict(state)  # strict: exactly the deployed network's weights


def test_export_writes_the_network_without_its_heads(tmp_path: Path):
    unet = UNetConfig(spatial_dims=2, depth=4, base_channels=4, deep_supervision=True)
    train = TrainConfig(**TINY_TRAIN)
    model = init_model(unet, 0)
    with torch.no_grad():  # weights unlike any fresh network's
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    weights = tmp_path / "trial_0000.pt"
    torch.save(model.state_dict(), weights)
    study = optuna.create_study(directions=["maximize", "minimize"])
    study.set_user_attr("data_description", _DATA_DESCRIPTION)
    attrs = {
        "unet_config": unet.to_dict(),
        "train_config": dataclasses.asdict(train),
        "val_iou": 0.5,
        "val_dice": 0.6,
        "n_params": count_parameters(model),
    }
    study.add_trial(create_trial(values=[0.5, count_parameters(model)], user_attrs=attrs))
    out = tmp_path / "export"
    export(study, study.trials[0], weights, out, (), "sqlite:///:memory:")

    card = yaml.safe_load((out / "architecture.yaml").read_text())
    assert card["architecture"]["deep_supervision"] is False
    saved = torch.load(out / WEIGHTS_FILE, weights_only=True)
    assert not any(k.startswith("aux_heads") for k in saved) and saved
    exported = nas.load(out)
    assert len(exported.aux_heads) == 0
    assert card["source"]["n_params"] == count_parameters(exported) == count_parameters(model)
    x = torch.randn(2, 1, 32, 24)
    with torch.no_grad():
        assert torch.equal(exported(x), model.eval()(x))


_DATA_DESCRIPTION = {
    "preprocessing": {
        "input_channels": ["image"],
        "channels": [0],
        "target_spacing_mm": [1.0, 1.0, 1.0],
        "normalization": [{}],
    },
    "labels": {"background": 0, "lesion": 1},
}


def test_a_space_may_search_deep_supervision_and_the_default_does_not(tmp_path):
    default = Path("search_spaces/unet.yaml").read_text()
    assert "deep_supervision" not in load_space("search_spaces/unet.yaml").search
    # The option documented there, uncommented, searches both values.
    path = tmp_path / "space.yaml"
    path.write_text(default.replace("  # deep_supervision:", "  deep_supervision:"))
    planned = {"batch_size_2d": 4, "patch_size_2d": (32, 32), "batch_size_3d": 1,
               "patch_size_3d": (32, 32, 16)}  # fmt: skip  # what `auto` plans from data
    space = load_space(path)
    space = space.model_copy(update={"train": {**space.train, **planned}})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    drawn = set()
    for _ in range(12):
        trial = study.ask()
        candidate = sample(space, trial, in_channels=1, out_channels=1, seed=0)
        assert candidate.unet.deep_supervision is trial.params["deep_supervision"]
        drawn.add(candidate.unet.deep_supervision)
        study.tell(trial, 0.0)
    assert drawn == {False, True}
