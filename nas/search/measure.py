"""What a built network costs to run: latency and peak memory of one inference window.

Measured on the built (untrained) network, before a candidate trains: its weights do not
change what a forward pass costs. Latency is the median wall-clock of one forward pass in
eval mode without autograd, after warm-up, repeated until the spread is small (the
interquartile range within SPREAD of the median, at most MAX_REPEATS passes or MAX_SECONDS)
on `study.latency`'s device and thread count. Peak memory is the CUDA allocator's peak over
one pass on a GPU; on a CPU, where no allocator reports a peak, the estimate of
nas.network.memory.estimate_inference_bytes (weights, the activations a pass keeps, x1.5).
Knows nothing of Optuna.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from nas.network.builder import count_parameters
from nas.network.describe import count_macs
from nas.network.memory import BYTES_PER_VALUE, SAFETY_FACTOR, estimate_inference_bytes
from nas.training.fit import init_model

if TYPE_CHECKING:
    from nas.search.candidate import Candidate
    from nas.search.space import StudySection

WARMUP = 3
MIN_REPEATS = 10
MAX_REPEATS = 50
SPREAD = 0.05  # interquartile range / median at which the repeats stop
# A slow network (a 3D one on a CPU: 0.3 s a pass) stops after this long, with at least
# FEW_REPEATS passes: the measurement is part of every candidate's cost to the search.
MAX_SECONDS = 3.0
FEW_REPEATS = 5
MB = 1e6


@dataclass(frozen=True)
class Latency:
    median_ms: float
    iqr_ms: float
    repeats: int


@contextlib.contextmanager
def _threads(threads: int | None) -> Iterator[None]:
    if threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def synchronise(device: torch.device) -> None:
    """Wait for the work queued on `device`, so that a clock read after it counts it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


@torch.inference_mode()
def measure_latency(
    model: nn.Module,
    window: Sequence[int],
    in_channels: int,
    device: torch.device,
    threads: int | None = None,
    batch: int = 1,
) -> Latency:
    """Median and interquartile range (ms) of one forward pass over `batch` windows."""
    was_training = model.training
    model.eval()
    x = torch.zeros(batch, in_channels, *window, device=device)
    times: list[float] = []
    try:
        with _threads(threads):
            for _ in range(WARMUP):
                model(x)
            synchronise(device)
            while len(times) < MAX_REPEATS:
                start = time.perf_counter()
                model(x)
                synchronise(device)
                times.append((time.perf_counter() - start) * 1000)
                if len(times) >= MIN_REPEATS and _spread(times) <= SPREAD:
                    break
                if len(times) >= FEW_REPEATS and sum(times) > 1000 * MAX_SECONDS:
                    break
    finally:
        model.train(was_training)
    q1, median, q3 = np.percentile(times, [25, 50, 75])
    return Latency(float(median), float(q3 - q1), len(times))


def _spread(times: list[float]) -> float:
    q1, median, q3 = np.percentile(times, [25, 50, 75])
    return float((q3 - q1) / median) if median > 0 else 0.0


@torch.inference_mode()
def cuda_peak_mb(model: nn.Module, window: Sequence[int], in_channels: int, batch: int) -> float:
    """The CUDA allocator's peak over one forward pass, above what was allocated before."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        x = torch.zeros(batch, in_channels, *window, device=device)
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        model(x)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
    finally:
        model.train(was_training)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return (peak + weights) / MB


def measure_candidate(
    candidate: Candidate,
    window: Sequence[int],
    in_channels: int,
    device: torch.device,
    cfg: StudySection,
) -> dict[str, float | None]:
    """What `candidate`'s built network costs, before it trains: parameters and MACs always;
    latency and peak memory when an objective or a constraint of `cfg` names them."""
    model = init_model(candidate.unet, candidate.train.seed)
    quantities: dict[str, float | None] = {
        "params": count_parameters(model),
        "macs": count_macs(model, in_channels, window),
    }
    needed = {*cfg.objectives, *cfg.constraints}
    where = torch.device(cfg.latency.device) if cfg.latency.device else device
    batch = cfg.latency.batch
    if "latency_ms" in needed:
        latency = measure_latency(model.to(where), window, in_channels, where,
                                  cfg.latency.threads, batch)  # fmt: skip
        quantities["latency_ms"] = round(latency.median_ms, 4)
        quantities["latency_iqr_ms"] = round(latency.iqr_ms, 4)
    if "memory_mb" in needed:
        if where.type == "cuda":
            quantities["memory_mb"] = cuda_peak_mb(model.to(where), window, in_channels, batch)
        else:  # no allocator peak on a CPU: the estimate, for `batch` windows
            one = estimate_inference_bytes(candidate.unet, window, in_channels)
            weights = quantities["params"] * BYTES_PER_VALUE * SAFETY_FACTOR  # as in `one`
            quantities["memory_mb"] = (weights + batch * (one - weights)) / MB
    del model
    return quantities
