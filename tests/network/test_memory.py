"""Bounded resources: schema limits, the memory estimate (checked against measured peaks),
out-of-memory and non-finite weights in training, and oversized exported models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from pydantic import ValidationError
from torch import nn

import nas
from nas.core import resources
from nas.core.errors import NasError
from nas.core.resources import default_memory_limit_bytes
from nas.data import SyntheticSpec
from nas.data.labels import LabelScheme
from nas.network import memory
from nas.network.builder import UNetConfig, build_unet, count_parameters
from nas.network.memory import estimate_inference_bytes, parameter_count
from nas.network.model_card import CARD_FILE, WEIGHTS_FILE, read_card
from nas.search.space_file import load_space
from nas.training.fit import (
    CandidateFailed,
    TrainConfig,
    fit,
    init_model,
    make_optimizer,
    train_step,
)
from nas.training.losses import DiceCELoss, TrainingLoss
from nas.training.memory import check_fits, estimate_training_bytes
from tests.conftest import tiny_space_yaml

CPU = torch.device("cpu")
LESION = LabelScheme(("lesion",), (0, 1))  # the tiny dataset's one class
TINY_TRAIN = dict(epochs=2, batches_per_epoch=3, batch_size_2d=4, patch_size_2d=(32, 32))
REPO = Path(__file__).parents[2]


# --- upper bounds in the schemas -------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [
        ("depth", 11),
        ("base_channels", 4097),
        ("max_channels", 4097),
        ("kernel_size", 17),
        ("kernel_size", (3, 17)),
        ("convs_per_stage", 9),
    ],
)
def test_unet_config_refuses_values_above_its_bounds(field, value):
    values = {"depth": 2, field: value}
    with pytest.raises(ValidationError, match=f"{field} must be at most"):
        UNetConfig(**values)


def test_unet_config_accepts_its_bounds_without_building_anything():
    cfg = UNetConfig(depth=10, base_channels=4096, max_channels=4096, kernel_size=15)
    assert UNetConfig(convs_per_stage=8).convs_per_stage == 8
    assert cfg.features_per_stage == (4096,) * 10


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("patch_size_2d", (1025, 64), "patch_size_2d must be between 1 and 1024"),
        ("patch_size_2d", (0, 64), "patch_size_2d must be between 1 and 1024"),
        ("patch_size_3d", (64, 64, 513), "patch_size_3d must be between 1 and 512"),
        ("batch_size_2d", 1025, "less than or equal to 1024"),
        ("batch_size_3d", 1025, "less than or equal to 1024"),
        ("epochs", 100_001, "less than or equal to 100000"),
        ("batches_per_epoch", 100_001, "less than or equal to 100000"),
    ],
)
def test_train_config_refuses_values_above_its_bounds(field, value, message):
    with pytest.raises(ValidationError, match=message) as err:
        TrainConfig(**{field: value})
    assert field in str(err.value)


@pytest.mark.parametrize(
    "values, message",
    [
        (dict(n_cases=1001), "less than or equal to 1000"),
        (dict(n_cases=0), "greater than or equal to 1"),
        (dict(shape=(64, 64, 257)), "shape must be between 8 and 256 per axis"),
        (dict(shape=(4, 64, 32)), "shape must be between 8 and 256 per axis"),
        (dict(spacing_mm=(1.5, 0.0, 3.0)), "spacing_mm must be positive"),
        (dict(spacing_mm=(1.5, -1.0, 3.0)), "spacing_mm must be positive"),
    ],
)
def test_synthetic_spec_refuses_values_out_of_its_bounds(values, message):
    with pytest.raises(ValidationError, match=message):
        SyntheticSpec(**values)


@pytest.mark.parametrize(
    "old, new, message",
    [
        ("depth: {type: int, low: 1, high: 3}", "depth: 40", "depth must be at most 10"),
        ("base_channels: 4", "base_channels: 100000", "base_channels must be at most 4096"),
        (
            "patch_size_3d: [32, 32, 16]",
            "patch_size_3d: [4096, 4096, 4096]",
            "patch_size_3d must be between 1 and 512",
        ),
        ("shape: [32, 32, 16]", "shape: [4096, 4096, 4096]", "shape must be between 8 and 256"),
    ],
)
def test_a_search_space_asking_for_too_much_is_refused_by_load_space(tmp_path, old, new, message):
    text = tiny_space_yaml(tmp_path / "data")
    assert old in text
    path = tmp_path / "space.yaml"
    path.write_text(text.replace(old, new))
    with pytest.raises(NasError, match=message) as err:
        load_space(path)
    assert err.value.source == str(path)


def test_the_default_search_space_is_within_the_bounds():
    load_space(REPO / "search_spaces" / "unet.yaml")


# --- the estimate -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "values",
    [
        dict(spatial_dims=2, depth=4, base_channels=16),
        dict(spatial_dims=3, depth=3, base_channels=8, anisotropic_stages=1, kernel_size=(3, 5, 3)),
        dict(spatial_dims=2, depth=3, residual=True, norm="none", upsampling="interpolate"),
        dict(spatial_dims=3, depth=4, skip_mode="add", skips=(True, False, True), norm="group"),
        dict(spatial_dims=2, depth=5, channel_growth=1.5, max_channels=50, convs_per_stage=3),
        dict(spatial_dims=2, depth=1, in_channels=3, out_channels=4, norm="batch"),
    ],
)
def test_parameter_count_from_the_config_is_exact(values):
    cfg = UNetConfig(**values)
    assert parameter_count(cfg, cfg.in_channels) == count_parameters(build_unet(cfg))
    # The data's channel count replaces the config's.
    assert parameter_count(cfg, 5) == count_parameters(build_unet(cfg, in_channels=5))


def test_the_estimate_grows_with_batch_patch_and_optimizer_state():
    cfg = UNetConfig(spatial_dims=3, depth=3, base_channels=8)
    base = TrainConfig(batch_size_3d=2, patch_size_3d=(32, 32, 32))
    needed = estimate_training_bytes(cfg, base, 1)
    bigger = [
        TrainConfig(batch_size_3d=4, patch_size_3d=(32, 32, 32)),
        TrainConfig(batch_size_3d=2, patch_size_3d=(64, 64, 32)),
    ]
    for train in bigger:
        assert estimate_training_bytes(cfg, train, 1) > 1.8 * needed
    sgd = TrainConfig(batch_size_3d=2, patch_size_3d=(32, 32, 32), optimizer="sgd")
    weights = parameter_count(cfg, 1) * memory.BYTES_PER_VALUE * memory.SAFETY_FACTOR
    assert needed - estimate_training_bytes(cfg, sgd, 1) == pytest.approx(weights, abs=1)
    one = TrainConfig(batch_size_3d=1, patch_size_3d=(32, 32, 32))
    assert estimate_inference_bytes(cfg, (32, 32, 32), 1) < estimate_training_bytes(cfg, one, 1)


def test_check_fits_gives_a_one_line_reason_only_above_the_limit():
    small = UNetConfig(spatial_dims=2, depth=2, base_channels=4)
    assert check_fits(small, TrainConfig(**TINY_TRAIN), 1, 12 * 10**9) is None
    huge = UNetConfig(spatial_dims=3, depth=5, base_channels=64, max_channels=512)
    train = TrainConfig(batch_size_3d=16, patch_size_3d=(256, 256, 256))
    reason = check_fits(huge, train, 1, 12 * 10**9)
    assert reason is not None and "\n" not in reason
    needed = estimate_training_bytes(huge, train, 1)
    assert reason == (
        f"needs about {needed / 1e9:.1f} GB to train, more than the 12.0 GB limit (max_memory_gb)"
    )


def test_default_limit_is_half_the_ram_on_cpu_and_mps():
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit = default_memory_limit_bytes(CPU)
    assert 0 < limit <= ram // 2
    assert default_memory_limit_bytes(torch.device("mps")) == limit


def test_default_limit_follows_a_container_memory_limit(tmp_path, monkeypatch):
    limit_file = tmp_path / "memory.max"
    limit_file.write_text("2000000000\n")
    limit_files = (str(tmp_path / "absent"), str(limit_file))
    monkeypatch.setattr(resources, "CGROUP_LIMIT_FILES", limit_files)
    assert default_memory_limit_bytes(CPU) == 1_000_000_000
    limit_file.write_text("max\n")  # cgroup v2: no limit
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert default_memory_limit_bytes(CPU) == int(0.5 * ram)


def test_default_limit_on_cuda_is_most_of_the_gpu(monkeypatch):
    gpu = SimpleNamespace(total_memory=80 * 2**30)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: gpu)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert default_memory_limit_bytes(torch.device("cuda")) == int(0.9 * 80 * 2**30)
    assert default_memory_limit_bytes(torch.device("cuda", 1)) == int(0.9 * 80 * 2**30)


# Small candidates whose measured peak is tens of MB: large enough that the process's own
# noise is small, small enough to train two steps in seconds. They cover 2D and 3D, every
# upsampling and skip mode, GELU, dropout, residual blocks, deep supervision, SGD, several
# classes, and a 3D batch of one (which PyTorch's CPU convolutions unfold).
TRAINING_CASES = [
    (
        dict(spatial_dims=2, depth=4, base_channels=16, deep_supervision=True),
        dict(batch_size_2d=16, patch_size_2d=(64, 64)),
    ),
    (
        dict(
            spatial_dims=2,
            depth=3,
            base_channels=8,
            norm="none",
            activation="gelu",
            residual=True,
            upsampling="interpolate",
            dropout=0.1,
        ),
        dict(batch_size_2d=8, patch_size_2d=(96, 96), optimizer="sgd"),
    ),
    (
        dict(spatial_dims=3, depth=3, base_channels=8, anisotropic_stages=1),
        dict(batch_size_3d=2, patch_size_3d=(32, 32, 32)),
    ),
    (
        dict(
            spatial_dims=3, depth=3, base_channels=8, skip_mode="add", norm="batch", out_channels=3
        ),
        dict(batch_size_3d=1, patch_size_3d=(48, 48, 32)),
    ),
]
INFERENCE_CASES = [
    (dict(spatial_dims=3, depth=3, base_channels=8, upsampling="interpolate"), (64, 64, 48)),
]


def _peak_rss_growth_in_child(cases: list[dict]) -> list[int]:
    """Run `measure_peaks` in a fresh interpreter and return its measured peaks."""
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        # Every allocation above 64 KB gets its own mapping and is returned when freed, so one
        # case never reuses memory an earlier one freed without it showing in the RSS.
        "MALLOC_MMAP_THRESHOLD_": "65536",
        "MALLOC_TRIM_THRESHOLD_": "0",
    }
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "from tests.network.test_memory import measure_peaks; measure_peaks()",
        ],
        input="".join(json.dumps(case) + "\n" for case in cases),
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    return [json.loads(line)["peak_bytes"] for line in result.stdout.splitlines()]


MEASURE_PEAKS = "from tests.network.test_memory import measure_peaks; measure_peaks()"


def measure_peaks() -> None:
    """In a child process: for each JSON case on stdin, the growth of the peak resident set
    while building the candidate and training it two steps (or applying it to one window).

    The peak RSS is what the operating system sees, whatever else runs on the machine; it is
    reset between cases through /proc/self/clear_refs. One thread keeps it reproducible.
    """
    torch.set_num_threads(1)
    # Load the code (and first-call state) of both kinds of network before measuring.
    warm_up = dict(patch_size_2d=(16, 16), patch_size_3d=(16, 16, 16), batch_size_3d=1)
    for dims in (2, 3):
        _train_two_steps(UNetConfig(spatial_dims=dims, depth=2, base_channels=2), warm_up)
    for line in sys.stdin:
        case = json.loads(line)
        before = _status_bytes("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        if "train" in case:
            _train_two_steps(UNetConfig.from_dict(case["unet"]), case["train"])
        else:
            _infer_one_window(UNetConfig.from_dict(case["unet"]), case["patch"])
        print(json.dumps({"peak_bytes": _status_bytes("VmHWM") - before}), flush=True)


def _train_two_steps(unet: UNetConfig, train_values: dict) -> None:
    train = TrainConfig(**train_values)
    model = init_model(unet, 0)
    optimizer = make_optimizer(model, train)
    two_d = unet.spatial_dims == 2
    batch = train.batch_size_2d if two_d else train.batch_size_3d
    patch = train.patch_size_2d if two_d else train.patch_size_3d
    images = torch.randn(batch, unet.in_channels, *patch)
    labels = torch.randint(0, max(2, unet.out_channels), (batch, *patch))
    loss = TrainingLoss(DiceCELoss())  # on every output of a deeply supervised network
    for _ in range(2):  # the second backward also holds the optimizer's state
        train_step(model, optimizer, loss, images, labels)


@torch.no_grad()
def _infer_one_window(unet: UNetConfig, patch: list[int]) -> None:
    build_unet(unet).eval()(torch.randn(1, unet.in_channels, *patch))


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024  # kB
    raise KeyError(field)


@pytest.mark.skipif(
    not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux's /proc peak-RSS reset"
)
def test_the_estimate_bounds_the_measured_peak_within_a_factor_of_four():
    cases = [{"unet": unet, "train": train} for unet, train in TRAINING_CASES]
    cases += [{"unet": unet, "patch": patch} for unet, patch in INFERENCE_CASES]
    peaks = _peak_rss_growth_in_child(cases)
    estimates = [
        estimate_training_bytes(UNetConfig(**unet), TrainConfig(**train), 1)
        for unet, train in TRAINING_CASES
    ] + [estimate_inference_bytes(UNetConfig(**unet), patch, 1) for unet, patch in INFERENCE_CASES]
    report = [
        f"estimate {est / 1e6:.1f} MB, measured {peak / 1e6:.1f} MB ({est / peak:.2f}x) for {case}"
        for est, peak, case in zip(estimates, peaks, cases, strict=True)
    ]
    print("\n".join(report))  # shown with pytest -s, and on failure
    for est, peak in zip(estimates, peaks, strict=True):
        assert peak <= est <= 4 * peak, "\n".join(report)


# --- training: out of memory and non-finite weights --------------------------------------------


class _RaisesMemoryError(nn.Module):
    """A network whose forward fails the way a host allocation outside torch does."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = build_unet(spatial_dims=2, depth=2, base_channels=4)
        self.config = self.inner.config

    def forward(self, x):
        raise MemoryError()


def test_python_memory_error_becomes_candidate_failed(tiny_cases):
    cases = tiny_cases
    with pytest.raises(CandidateFailed, match="out of memory"):
        fit(_RaisesMemoryError(), cases[:4], cases[4:], LESION, TrainConfig(**TINY_TRAIN), CPU)


class _NanGradient(torch.autograd.Function):
    """The identity forward; NaN gradients backward."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("nan"))


class _DivergesOnLastStep(nn.Module):
    """Trains normally until its last training step, whose gradients are NaN: every loss the
    trainer sees is finite, yet the weights end non-finite."""

    def __init__(self, steps: int) -> None:
        super().__init__()
        self.inner = build_unet(spatial_dims=2, depth=2, base_channels=4)
        self.config = self.inner.config
        self.steps_left = steps

    def forward(self, x):
        out = self.inner(x)
        if self.training and torch.is_grad_enabled():
            self.steps_left -= 1
            if self.steps_left == 0:
                out = _NanGradient.apply(out)
        return out


def test_non_finite_weights_after_the_last_step_fail_the_candidate(tiny_cases):
    cases = tiny_cases
    train = TrainConfig(**TINY_TRAIN)
    model = _DivergesOnLastStep(train.epochs * train.batches_per_epoch)
    with pytest.raises(CandidateFailed, match="non-finite weights after training"):
        fit(model, cases[:4], cases[4:], LESION, train, CPU)
    assert model.steps_left == 0


# --- exported models --------------------------------------------------------------------------


def _write_export(folder: Path, architecture: dict, patch_size: list[int]) -> Path:
    """An export folder holding only its architecture.yaml."""
    folder.mkdir()
    dims = architecture["spatial_dims"]
    card = {
        "format_version": 1,
        "architecture": architecture,
        "preprocessing": {
            "input_channels": ["MRI"],
            "channels": [0],
            "target_spacing_mm": [1.0, 1.0, 1.0],
            "normalization": [{}],
        },
        "inference": {
            "spatial_dims": dims,
            "slice_axis": 2,
            "patch_size": patch_size,
            "size_multiple": [1] * dims,
            "output": "sigmoid",
        },
        "labels": {"background": 0, "lesion": 1},
        "source": {},
    }
    (folder / CARD_FILE).write_text(yaml.safe_dump(card, sort_keys=False))
    return folder


SMALL_3D = {"spatial_dims": 3, "in_channels": 1, "out_channels": 1, "depth": 2, "base_channels": 4}


def test_an_exported_model_that_fits_still_loads(tmp_path):
    folder = _write_export(tmp_path / "model", SMALL_3D, [32, 32, 16])
    torch.save(build_unet(**SMALL_3D).state_dict(), folder / WEIGHTS_FILE)
    model = nas.load(folder)
    assert count_parameters(model) == parameter_count(UNetConfig(**SMALL_3D), 1)


@pytest.mark.parametrize(
    "architecture, patch_size",
    [
        # Within every schema bound, but terabytes of weights.
        (
            {
                **SMALL_3D,
                "depth": 10,
                "base_channels": 4096,
                "max_channels": 4096,
                "kernel_size": 15,
            },
            [512, 512, 512],
        ),
        # Small weights, but a window of 4096^3 voxels.
        (SMALL_3D, [4096, 4096, 4096]),
    ],
)
def test_an_exported_model_too_large_for_memory_is_refused_before_building(
    tmp_path, monkeypatch, architecture, patch_size
):
    folder = _write_export(tmp_path / "model", architecture, patch_size)

    def no_build(*args, **kwargs):
        raise AssertionError("the network must not be built")

    monkeypatch.setattr("nas.deploy.exported.build_unet", no_build)
    for read in (read_card, nas.load):
        with pytest.raises(NasError, match="needs about .* for its weights and one inference"):
            read(folder)
    with pytest.raises(NasError) as err:
        read_card(folder)
    assert err.value.source == str(folder / CARD_FILE)


def test_an_exported_window_of_the_wrong_dimension_is_refused(tmp_path):
    folder = _write_export(tmp_path / "model", SMALL_3D, [32, 32])
    with pytest.raises(NasError, match="inference.patch_size has 2 values for a 3D network"):
        read_card(folder)
