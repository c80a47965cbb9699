"""Training epochs on the CPU with denormal floats flushed to zero (what `nas.training.fit` does)
against the same training with them kept (PyTorch's default), for a network without
normalisation and one with instance normalisation.

Each arm trains with `nas.training.fit.fit` in a fresh process on the embedded synthetic dataset:
the same network, the same initial weights and the same batches. The kept arm only turns
`torch.set_flush_denormal` into a no-op. The script prints the median seconds of an epoch's
training steps for each arm, their ratio, and the validation IoU each arm reaches. The IoU
shows that flushing numbers below 1e-38 changes the time, not what the network learns.

    python benchmarks/denormals.py [--epochs 15]

Target: for the network without normalisation, ratio (flushed / kept) <= 0.5.
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing as mp
import statistics
import tempfile
from pathlib import Path

import torch

from nas.data import DataConfig, SyntheticSpec, load_dataset, split_dataset
from nas.network.unet_config import UNetConfig
from nas.training.fit import fit, initial_model
from nas.training.train_config import TrainConfig

# The 46k-parameter member of the default run's front, and the same network normalised.
NO_NORM = UNetConfig(
    spatial_dims=2, depth=2, base_channels=16, channel_growth=1.25, kernel_size=5,
    norm="none", activation="leaky_relu", residual=True, upsampling="transposed", dropout=0.06,
)  # fmt: skip
CANDIDATES = {
    "no normalisation": NO_NORM,
    "instance norm": dataclasses.replace(NO_NORM, norm="instance"),
}
TRAIN = TrainConfig(
    batch_size_2d=16, patch_size_2d=(64, 64), batches_per_epoch=10, learning_rate=5e-3, seed=0
)


def _run_arm(flush: bool, unet: UNetConfig, data_root: str, epochs: int, queue) -> None:
    if not flush:  # PyTorch's default: keep denormals, whatever nas.training.fit asks for
        torch.set_flush_denormal(False)
        torch.set_flush_denormal = lambda mode: False
    data = DataConfig(path=Path(data_root), cache_dir=Path(data_root).parent / "cache")
    dataset = load_dataset(data)
    train_cases, val_cases = split_dataset(dataset, data)
    cfg = dataclasses.replace(TRAIN, epochs=epochs)
    model = initial_model(unet, cfg)
    result = fit(model, train_cases, val_cases, dataset.scheme, cfg, torch.device("cpu"))
    seconds = [epoch.train_seconds for epoch in result.history]
    queue.put((statistics.median(seconds), result.scores.iou))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15, help="epochs per arm")
    args = parser.parse_args()
    context = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        data_root = Path(tmp) / "bench"
        spec = SyntheticSpec(n_cases=12)
        load_dataset(DataConfig(path=data_root, synthetic=spec, cache_dir=Path(tmp) / "cache"))
        print(f"CPU, torch threads: {torch.get_num_threads()}, {args.epochs} epochs per arm")
        print(
            f"{'network':<18}{'flushed s/epoch':>16}{'kept s/epoch':>14}{'ratio':>8}"
            f"{'flushed IoU':>13}{'kept IoU':>10}"
        )
        for name, unet in CANDIDATES.items():
            arms = {}
            for flush in (True, False):
                queue = context.Queue()
                process = context.Process(
                    target=_run_arm, args=(flush, unet, str(data_root), args.epochs, queue)
                )
                process.start()
                arms[flush] = queue.get()
                process.join()
            (flushed, flushed_iou), (kept, kept_iou) = arms[True], arms[False]
            print(
                f"{name:<18}{flushed:>16.2f}{kept:>14.2f}{flushed / kept:>8.2f}"
                f"{flushed_iou:>13.3f}{kept_iou:>10.3f}"
            )


if __name__ == "__main__":
    main()
