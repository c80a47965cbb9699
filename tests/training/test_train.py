"""Training one candidate: scores, time budget, failures, device choice, loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from nas import build_unet
from nas.data import Case
from nas.data.labels import LabelScheme
from nas.network.device import pick_device
from nas.training.fit import (
    CandidateFailed,
    TrainConfig,
    ValidationPlan,
    fit,
    init_model,
)
from nas.training.losses import DiceCELoss, TrainingLoss
from nas.validation.validate import ValidationPatches, evaluate, evaluate_patches

CPU = torch.device("cpu")
LESION = LabelScheme(("lesion",), (0, 1))  # the tiny dataset's one class
TINY_TRAIN = dict(epochs=2, batches_per_epoch=3, batch_size_2d=4, patch_size_2d=(32, 32))


def _case_from_label(label: np.ndarray) -> Case:
    # The image is +1 on foreground and -1 elsewhere: identity "logits" segment it perfectly.
    return Case("c", (label[None] * 2.0 - 1.0).astype(np.float32), label, (1.0, 1.0, 1.0))


@pytest.mark.parametrize("patch", [(16, 16), (16, 16, 8)])
def test_evaluate_pools_iou_over_whole_cases(patch):
    rng = np.random.default_rng(0)
    cases = [_case_from_label((rng.random((20, 18, 9)) > 0.9).astype(np.uint8)) for _ in range(2)]
    perfect = evaluate(nn.Identity(), cases, LESION, patch, CPU)
    assert perfect.iou == pytest.approx(1.0) and perfect.dice == pytest.approx(1.0)
    inverted = evaluate(_Negate(), cases, LESION, patch, CPU)
    assert inverted.iou == pytest.approx(0.0)


class _Negate(nn.Module):
    def forward(self, x):
        return -x


def test_initial_weights_depend_on_the_seed_alone():
    config = build_unet(spatial_dims=2, depth=2, base_channels=4).config
    first = init_model(config, 7).state_dict()
    torch.rand(100)  # whatever ran before in the process
    state = torch.get_rng_state()
    second = init_model(config, 7).state_dict()
    assert torch.equal(torch.get_rng_state(), state)  # the global generator is left alone
    other = init_model(config, 8).state_dict()
    for key, value in first.items():
        assert torch.equal(value, second[key]), key
    assert any(not torch.equal(value, other[key]) for key, value in first.items())


def test_fit_reports_every_epoch_and_trains(tiny_cases):
    train, val = tiny_cases[:4], tiny_cases[4:5]  # one validation case: it is scored 3 times
    model = build_unet(spatial_dims=2, depth=2, base_channels=4)
    before = [p.detach().clone() for p in model.parameters()]
    seen = []
    result = fit(model, train, val, LESION, TrainConfig(**TINY_TRAIN), CPU, seen.append)
    assert [e.epoch for e in seen] == [1, 2] and result.history == tuple(seen)
    assert all(e.train_seconds > 0 for e in seen)
    # The reported scores are the trained model's on the validation case.
    assert result.scores == seen[-1].scores == evaluate(model, val, LESION, (32, 32), CPU)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_a_background_worker_trains_the_network_the_training_thread_does(tiny_cases):
    """Batches built in a worker process are the ones the training thread would build, so
    the weights after training are the same."""
    trained = []
    for workers in (0, 1):
        model = init_model(build_unet(spatial_dims=2, depth=2, base_channels=4).config, 0)
        fit(model, tiny_cases[:4], (), LESION, TrainConfig(**TINY_TRAIN), CPU,
            data_workers=workers)  # fmt: skip
        trained.append(model.state_dict())
    for key, value in trained[0].items():
        assert torch.equal(value, trained[1][key]), key


def test_fit_validates_on_patches_only_after_the_epochs_asked_and_the_last(tiny_cases):
    train, val = tiny_cases[:4], tiny_cases[4:]
    model = build_unet(spatial_dims=2, depth=2, base_channels=4)
    patches = ValidationPatches(val, per_case=4, seed=0)
    cfg = TrainConfig(**{**TINY_TRAIN, "epochs": 4})
    result = fit(model, train, val, LESION, cfg, CPU, validation=ValidationPlan({2}, patches))
    validated = [e.epoch for e in result.history if e.scores is not None]
    assert validated == [2, 4]  # 2 as asked, 4 as the segment's last
    assert result.scores == evaluate_patches(model, patches, LESION, (32, 32), CPU)
    assert len(result.scores.case_counts) == len(val)  # per case, for the bootstrap


def test_time_budget_stops_training_and_still_validates(tiny_cases):
    cases = tiny_cases
    model = build_unet(spatial_dims=3, depth=2, base_channels=4)
    cfg = TrainConfig(epochs=50, batches_per_epoch=2, patch_size_3d=(16, 16, 16), max_seconds=0.5)
    result = fit(model, cases[:4], cases[4:], LESION, cfg, CPU, validation=ValidationPlan(()))
    assert result.stopped_by_time
    assert 1 <= len(result.history) < 50
    assert result.history[-1].scores is not None  # asked for none: the last is validated


def test_divergence_raises_candidate_failed(tiny_cases):
    cases = tiny_cases
    model = build_unet(spatial_dims=2, depth=2, base_channels=4, norm="none")
    cfg = TrainConfig(**TINY_TRAIN, learning_rate=1e30, optimizer="sgd")
    with pytest.raises(CandidateFailed, match="non-finite"):
        fit(model, cases[:4], cases[4:], LESION, cfg, CPU)


@pytest.mark.parametrize(
    ("cuda", "mps", "chosen"), [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")]
)
def test_auto_prefers_cuda_then_mps_then_cpu(monkeypatch, cuda, mps, chosen):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    assert pick_device("auto") == torch.device(chosen)
    assert pick_device(chosen) == torch.device(chosen)
    assert pick_device("cpu") == CPU


def test_an_unavailable_device_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    for name in ("cuda", "mps"):
        with pytest.raises(ValueError, match=f"device '{name}' is not available"):
            pick_device(name)


@pytest.mark.parametrize("classes", [1, 3])
def test_loss_is_low_for_confident_correct_logits_and_high_otherwise(classes):
    target = torch.zeros(2, 8, 8, dtype=torch.long)
    target[:, 2:5, 2:5] = classes if classes > 1 else 1
    channels = 1 if classes == 1 else classes + 1
    if channels == 1:
        good = (target.float() * 20 - 10).unsqueeze(1)
    else:
        good = torch.nn.functional.one_hot(target, channels).movedim(-1, 1).float() * 20 - 10
    loss = TrainingLoss(DiceCELoss())
    assert loss(good, target) < 0.05  # absent classes cost a little through the smoothing
    assert loss(-good, target) > 1.0


class _OutOfMemory(nn.Module):
    """A network whose forward fails the way the allocator does when memory runs out."""

    def __init__(self, error: Exception) -> None:
        super().__init__()
        self.inner = build_unet(spatial_dims=2, depth=2, base_channels=4)
        self.config = self.inner.config
        self.error = error

    def forward(self, x):
        raise self.error


@pytest.mark.parametrize(
    "error",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
        RuntimeError(
            "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"
        ),
    ],
)
def test_out_of_memory_becomes_candidate_failed(tiny_cases, error):
    cases = tiny_cases
    with pytest.raises(CandidateFailed, match="out of memory"):
        fit(_OutOfMemory(error), cases[:4], cases[4:], LESION, TrainConfig(**TINY_TRAIN), CPU)


def test_other_errors_are_not_hidden(tiny_cases):
    cases = tiny_cases
    with pytest.raises(RuntimeError, match="a bug"):
        fit(
            _OutOfMemory(RuntimeError("a bug")),
            cases[:4],
            cases[4:],
            LESION,
            TrainConfig(**TINY_TRAIN),
            CPU,
        )


def test_the_cpu_trains_with_denormal_floats_flushed_to_zero():
    """Picking the CPU flushes denormals (a network without normalisation otherwise trains
    five times slower); in a fresh process, so that the flag is not already set."""
    import subprocess
    import sys

    probe = (
        "import torch; from nas.network.device import pick_device; t = torch.tensor([1e-40]); "
        "before = (t * 1.0).item(); pick_device('cpu'); print(before, (t * 1.0).item())"
    )
    shown = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    before, after = map(float, shown.stdout.split())
    assert before > 0.0 and after == 0.0
