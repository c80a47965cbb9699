"""Training-step time of nas against a bare PyTorch loop, for one 2D and one 3D candidate.

The project's side is `nas.training.fit.fit` (batch sampling, learning-rate schedule, loss tracking,
AMP and channels-last on CUDA), timed over its training steps only. The bare side is the
plainest loop over the same model (same initial weights), the same pre-drawn batches and the
same loss. The arms alternate in fresh processes, so each reports its own peak memory and
drift on the machine hits both alike; the median per-step time over rounds is compared.

    python benchmarks/train_step.py [--steps 30] [--rounds 5] [--device auto] [--verbose]

Target: ratio (nas / bare) <= 1.05.
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing as mp
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch

from nas import UNetConfig, build_unet
from nas.data import DataConfig, PatchSampler, SyntheticSpec, load_dataset
from nas.network.device import pick_device
from nas.training.fit import fit, make_optimizer
from nas.training.losses import make_loss
from nas.training.train_config import TrainConfig

CANDIDATES = {
    "2D": (
        UNetConfig(spatial_dims=2, depth=4, base_channels=16),
        TrainConfig(
            batch_size_2d=16, patch_size_2d=(64, 64), learning_rate=3e-3, foreground_fraction=0.5
        ),
    ),
    "3D": (
        UNetConfig(spatial_dims=3, depth=3, base_channels=8),
        TrainConfig(
            batch_size_3d=2, patch_size_3d=(32, 32, 32), learning_rate=3e-3, foreground_fraction=0.5
        ),
    ),
}


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _run_arm(arm: str, name: str, data_root: str, steps: int, device_name: str, queue) -> None:
    torch.manual_seed(0)
    # The arms' weights drift apart (the bare loop keeps a constant learning rate), and on a CPU
    # denormal floats in one of them can slow it by 20%: flush them in both, so the ratio
    # measures the loop, not the numbers.
    torch.set_flush_denormal(True)
    device = pick_device(device_name)
    unet_cfg, train_cfg = CANDIDATES[name]
    dataset = load_dataset(
        DataConfig(path=Path(data_root), cache_dir=Path(data_root).parent / "cache")
    )
    cases = dataset.cases
    model = build_unet(unet_cfg)
    if arm == "nas":
        cfg = dataclasses.replace(train_cfg, epochs=2, batches_per_epoch=steps, seed=0)
        # Epoch 1 warms up (allocator, kernels); epoch 2 is timed. Validation is not timed.
        history = fit(model, cases, cases[:1], dataset.scheme, cfg, device).history
        seconds = history[1].train_seconds
    else:
        patch = train_cfg.patch_size(unet_cfg.spatial_dims)
        batch = train_cfg.batch_size(unet_cfg.spatial_dims)
        sampler = PatchSampler(cases, patch, batch, train_cfg.foreground_fraction, True, seed=0)
        batches = [tuple(map(torch.from_numpy, sampler.sample())) for _ in range(steps)]
        model = model.to(device)
        optimizer = make_optimizer(model, train_cfg)
        loss_fn = make_loss(dataset.scheme)
        use_amp = device.type == "cuda"
        # One untimed pass over the batches first, as the nas arm's first epoch.
        for i in range(2 * steps):
            if i == steps:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
            images, labels = batches[i % steps]
            images, labels = images.to(device), labels.to(device)
            optimizer.zero_grad()
            with torch.autocast(device.type, enabled=use_amp):
                loss = loss_fn(model(images), labels)
            loss.backward()
            optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    queue.put((seconds / steps, _peak_memory_mb(device)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="timed steps per arm and round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--verbose", action="store_true", help="print every round's time")
    args = parser.parse_args()
    device = pick_device(args.device)
    context = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        data_root = Path(tmp) / "bench"
        load_dataset(
            DataConfig(
                path=data_root, synthetic=SyntheticSpec(n_cases=6), cache_dir=Path(tmp) / "cache"
            )
        )
        print(
            f"device: {device}, torch threads: {torch.get_num_threads()}, "
            f"{args.steps} steps x {args.rounds} rounds per arm"
        )
        print(
            f"{'candidate':<10}{'nas ms/step':>12}{'bare ms/step':>14}{'ratio':>8}"
            f"{'nas peak MB':>13}{'bare peak MB':>14}"
        )
        for name in CANDIDATES:
            times: dict[str, list[float]] = {"nas": [], "bare": []}
            peaks: dict[str, float] = {"nas": 0.0, "bare": 0.0}
            for round_index in range(args.rounds):
                # Alternate which arm goes first, so neither always runs on a warmer machine.
                order = ("nas", "bare") if round_index % 2 == 0 else ("bare", "nas")
                for arm in order:
                    queue = context.Queue()
                    process = context.Process(
                        target=_run_arm,
                        args=(arm, name, str(data_root), args.steps, args.device, queue),
                    )
                    process.start()
                    step_seconds, peak_mb = queue.get()
                    process.join()
                    times[arm].append(step_seconds)
                    peaks[arm] = max(peaks[arm], peak_mb)
            nas_ms = statistics.median(times["nas"]) * 1000
            bare_ms = statistics.median(times["bare"]) * 1000
            print(
                f"{name:<10}{nas_ms:>12.1f}{bare_ms:>14.1f}{nas_ms / bare_ms:>8.3f}"
                f"{peaks['nas']:>13.0f}{peaks['bare']:>14.0f}"
            )
            if args.verbose:
                for arm in ("nas", "bare"):
                    print(f"  {arm} ms/step per round:", [round(t * 1000, 1) for t in times[arm]])
    print(
        "target: ratio <= 1.05 (peak memory: CUDA allocator peak on GPU, process peak RSS on CPU)"
    )


if __name__ == "__main__":
    main()
