"""Training batches built in background worker processes, as nnU-Net and MONAI build them.

A `PatchSampler` (cropping with foreground oversampling, nnU-Net's augmentation) runs in each
of `workers` processes of a PyTorch `DataLoader`, which hands whole batches to the training
loop, in pinned memory on CUDA so that their copy to the device overlaps the step. With no
workers the sampler runs on the training thread, as it always did.

Reproducible per seed: worker k draws from its own generator, spawned from the seed and k
(`numpy.random.SeedSequence`), and the loader takes one batch from each worker in turn, so
the same seed and worker count give the same batches. One worker draws what no worker draws.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from nas.core.resources import available_cores
from nas.data import Case, PatchSampler, Slicing
from nas.training.train_config import TrainConfig

# Batches each worker keeps ready ahead of the training loop (PyTorch's default).
PREFETCH_PER_WORKER = 2
# nnU-Net's default for its augmentation workers on a GPU machine (nnUNet_n_proc_DA).
MAX_AUTO_WORKERS = 12


def default_workers(device: torch.device, processes_sharing: int = 1) -> int:
    """How many batch workers a training run gets when not told: on a GPU, every core its
    share of the machine leaves after the training thread's (up to MAX_AUTO_WORKERS); on a
    CPU, one where its share is at least 2 cores, else none. On 2 idle cores the default
    space's first candidate waited 12 % of its step for batches built on the training thread
    and 1.7 % with a worker, whose step was no slower in all (163 ms against 168 ms;
    benchmarks/data_loading.py); on cores other processes keep busy, a worker only competes
    with the step."""
    cores = max(1, available_cores() // max(1, processes_sharing))
    if device.type == "cuda":
        return max(1, min(cores - 1, MAX_AUTO_WORKERS))
    return 1 if cores >= 2 else 0


class _Batches(IterableDataset):
    """An endless stream of (images, labels) batches as tensors, one sampler per worker."""

    def __init__(
        self, cases: Sequence[Case], cfg: TrainConfig, spatial_dims: int, seed: int,
        slicing: Slicing,
    ) -> None:  # fmt: skip
        super().__init__()
        self.cases, self.cfg, self.spatial_dims = cases, cfg, spatial_dims
        self.seed, self.slicing = seed, slicing

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        sampler = training_sampler(self.cases, self.cfg, self.spatial_dims,
                                   worker_seed(self.seed, worker), self.slicing)  # fmt: skip
        while True:
            images, labels = sampler.sample()
            yield torch.from_numpy(images), torch.from_numpy(labels)


def worker_seed(seed: int, worker: int) -> int:
    """Worker `worker`'s sampler seed: independent streams for every (seed, worker) pair;
    worker 0's is the seed itself, so that 0 and 1 workers draw the same batches."""
    if worker == 0:
        return seed
    child = np.random.SeedSequence(seed, spawn_key=(worker,))
    return int(child.generate_state(1, dtype=np.uint64)[0] % 2**63)


def training_sampler(
    cases: Sequence[Case], cfg: TrainConfig, spatial_dims: int, seed: int, slicing: Slicing
) -> PatchSampler:
    """The batches `cfg` trains a 2D or 3D network on: its patch, batch and augmentation."""
    return PatchSampler(
        cases,
        cfg.patch_size(spatial_dims),
        cfg.batch_size(spatial_dims),
        cfg.foreground_fraction,
        cfg.augment,
        seed,
        slicing,
        cfg.rotation_deg,
        cfg.intensity_scale,
        cfg.augment_probability,
    )


def training_batches(
    cases: Sequence[Case],
    cfg: TrainConfig,
    spatial_dims: int,
    seed: int,
    slicing: Slicing,
    device: torch.device,
    workers: int,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless training batches (images (B, C, *patch) float32, labels (B, *patch) int64)
    on the host, built by `workers` background processes (0: on this thread). Closing the
    iterator (or dropping it) stops the workers."""
    dataset = _Batches(cases, cfg, spatial_dims, seed, slicing)
    if workers == 0:
        return iter(dataset)
    loader = DataLoader(
        dataset,
        batch_size=None,  # the sampler makes whole batches
        num_workers=workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=PREFETCH_PER_WORKER,
        # Workers fork from the training process and so share its cases (memory-mapped or
        # in memory) without copying them.
        multiprocessing_context="fork" if sys.platform.startswith("linux") else None,
    )
    return iter(loader)
