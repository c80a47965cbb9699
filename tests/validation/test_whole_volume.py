"""Whole volumes: sliding windows counted as MONAI runs them, batched across a 2D network's
slices, in float32 on a CPU, a progress bar on a terminal only; and the dry run's projection
of what predicting whole cases costs."""

from __future__ import annotations

import io
import re
import shutil

import numpy as np
import pytest
import torch

from nas.network.precision import autocast
from nas.network.windows import predict_logits, window_count
from tests.conftest import run_cli, tiny_space_yaml


class Recording:
    """A stand-in network: one logit channel, the windows of each call recorded."""

    def __init__(self) -> None:
        self.batches: list[int] = []
        self.autocast: list[bool] = []

    def __call__(self, windows: torch.Tensor) -> torch.Tensor:
        self.batches.append(len(windows))
        self.autocast.append(torch.is_autocast_enabled(windows.device.type))
        return windows[:, :1] * 2.0


@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5])
@pytest.mark.parametrize(
    "shape, patch",
    [
        ((37, 29, 11), (16, 16, 8)),
        ((20, 9, 6), (16, 16, 8)),  # smaller than a window along two axes: padded
        ((37, 29, 11), (16, 16)),
        ((10, 12, 7), (16, 16)),
    ],
)
def test_the_windows_counted_are_those_the_network_sees(shape, patch, overlap):
    image = np.random.default_rng(0).standard_normal((2, *shape)).astype(np.float32)
    network = Recording()
    logits = predict_logits(network, image, patch, torch.device("cpu"), 2, 8, overlap)
    assert logits.shape == (1, *shape) and logits.dtype == torch.float32
    assert sum(network.batches) == window_count(shape, patch, 2, overlap)
    assert not any(network.autocast)  # mixed precision on CUDA only
    assert max(network.batches) == min(8, sum(network.batches))  # windows go in batches


def test_a_2d_network_sees_windows_of_several_slices_at_once():
    shape, patch = (16, 16, 20), (16, 16)  # one window a slice, 20 slices along Z
    network = Recording()
    predict_logits(network, np.ones((1, *shape), np.float32), patch, torch.device("cpu"), 2, 8)
    assert network.batches == [8, 8, 4]


def test_3d_windows_go_four_at_a_time_on_a_cpu_and_2d_ones_sixteen():
    cpu = torch.device("cpu")
    three_d, two_d = Recording(), Recording()
    predict_logits(three_d, np.ones((1, 40, 40, 40), np.float32), (16, 16, 16), cpu)
    predict_logits(two_d, np.ones((1, 16, 16, 40), np.float32), (16, 16), cpu)
    assert max(three_d.batches) == 4 and sum(three_d.batches) > 4
    assert max(two_d.batches) == 16 and sum(two_d.batches) == 40


def test_no_autocast_off_cuda():
    with autocast(torch.device("cpu")):
        assert not torch.is_autocast_enabled("cpu")
        assert torch.ones(2, 2).matmul(torch.ones(2, 2)).dtype == torch.float32


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("stream", [Terminal, io.StringIO])
def test_a_long_prediction_shows_progress_on_a_terminal_only(stream, monkeypatch):
    monkeypatch.setattr("nas.network.windows.PROGRESS_AFTER_S", 0.0)  # every prediction is long
    err = stream()
    monkeypatch.setattr("sys.stderr", err)
    image = np.ones((1, 40, 40, 12), np.float32)
    predict_logits(Recording(), image, (16, 16, 8), torch.device("cpu"), 2, 4)
    shown = "sliding windows" in err.getvalue()
    assert shown == (stream is Terminal), err.getvalue()


def _seconds(text: str) -> float:
    return float(text.replace(",", ""))  # 1,234 or 0.0043 or 4.2e-05


def test_the_dry_run_projects_whole_volume_and_held_out_scoring(tmp_path, tiny_dataset):
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    for name in ("lesion_000", "lesion_001"):  # a held-out test split of two cases
        for folder, file in (("images", f"{name}_0000.nii.gz"), ("labels", f"{name}.nii.gz")):
            (data / f"{folder}Ts").mkdir(exist_ok=True)
            shutil.copy(data / f"{folder}Tr" / file, data / f"{folder}Ts" / file)
    (tmp_path / "space.yaml").write_text(tiny_space_yaml(data))
    result = run_cli("nas.run", "space.yaml", "--dry-run", "--processes", "2",
                     "--set", f"data.cache_dir={tmp_path / 'cache'}", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert re.search(r"^preprocessed 6 cases in [\d.]+ s with 2 processes, peak memory", out, re.M)
    windows = re.search(
        r"^whole cases: 2D (\d+) windows of 32x32, 3D (\d+) windows? of 32x32x16 "
        r"\(overlap 0.25; mean of the 2 validation cases\)$",
        out,
        re.M,
    )
    assert windows, out
    n_2d, n_3d = int(windows[1]), int(windows[2])
    assert n_2d >= 8 and n_3d >= 1  # 2D: a window for every one of a case's 8+ slices
    line = re.search(
        r"^whole-volume pass of the first candidate: ~([\d.,e-]+) s a case \((\d)D, (\d+) "
        r"windows? of [\dx]+ on cpu\); front scoring ~([\d.,e-]+) s per member over 2 validation "
        r"cases; held-out scoring ~([\d.,e-]+) s per member over 2 cases$",
        out,
        re.M,
    )
    assert line, out
    per_case, front, held_out = (_seconds(line[i]) for i in (1, 4, 5))
    assert int(line[3]) == {"2": n_2d, "3": n_3d}[line[2]]
    assert per_case > 0 and front == pytest.approx(2 * per_case, rel=0.1)
    assert held_out == pytest.approx(2 * per_case, rel=0.1)
