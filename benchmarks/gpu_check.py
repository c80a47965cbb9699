"""The CUDA path in a few minutes: step time, data wait, validation time, a whole-volume pass
and peak memory, for the default space and the 3D whole-volume space.

For each space: its data (the embedded dataset for the default space; `--data-3d` for the
whole-volume space, e.g. what benchmarks/make_whole_brains.py writes), its patch plan for the
device, and the first candidate the space samples (the one `--dry-run` describes). Then, as
a search trains it (nas.training.batches, nas.training.fit.train_step: autocast, bfloat16 where
supported, channels-last, cudnn.benchmark), `--steps` timed steps with batches from the default
number
of background workers, the wait for each batch measured apart; one validation on the
search's fixed patches; one whole-volume sliding-window pass of a validation case; and the
CUDA allocator's peak. Runs on a CPU too (slowly), so the script itself is checked there.

    python benchmarks/gpu_check.py --data-3d data/Dataset903_WholeBrainLesion [--steps 50]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

# Run as a script, this folder is on the path: the step timing is data_loading.py's.
from data_loading import data_wait

from nas.data import load_dataset, split_dataset
from nas.network.builder import count_parameters
from nas.network.device import pick_device, prepare_model
from nas.network.precision import amp_dtype
from nas.network.windows import predict_logits
from nas.search.dry_run import sample_candidate
from nas.search.patch_plan import plan_patches
from nas.search.space_file import load_space
from nas.training.batches import default_workers, training_batches
from nas.training.fit import init_model
from nas.training.losses import make_loss
from nas.validation.validate import ValidationPatches, evaluate_patches

SPACES = Path(__file__).resolve().parents[1] / "search_spaces"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def check_space(space_file: Path, data: Path | None, steps: int, device: torch.device) -> None:
    space = load_space(space_file, data=data)
    dataset = load_dataset(space.data)
    space = plan_patches(space, dataset, device).apply(space)
    train_cases, val_cases = split_dataset(dataset, space.data)
    candidate = sample_candidate(space, dataset.in_channels, dataset.scheme.out_channels)
    unet, train = candidate.unet, candidate.train
    dims = unet.spatial_dims
    model = prepare_model(init_model(unet, train.seed), dims, device)
    workers = default_workers(device)
    batches = training_batches(train_cases, train, dims, train.seed, space.data.slicing,
                               device, workers)  # fmt: skip
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    # 3 warm-up steps: workers, cudnn.benchmark, the allocator.
    wait, step = data_wait(model, batches, make_loss(dataset.scheme), train, steps, device, 3)
    del batches
    cfg = space.study.validation
    patches = ValidationPatches(val_cases, cfg.patches_per_case, space.study.seed,
                                space.data.slicing.axis, cfg.foreground_fraction)  # fmt: skip
    window = train.patch_size(dims)
    evaluate_patches(model, patches, dataset.scheme, window, device)  # warm-up
    start = time.perf_counter()
    evaluate_patches(model, patches, dataset.scheme, window, device)
    synchronize(device)
    validation = time.perf_counter() - start
    case = val_cases[0]
    model.eval()
    start = time.perf_counter()
    predict_logits(model, case.image, window, device, space.data.slicing.axis)
    synchronize(device)
    whole = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    print(f"{space_file.name}: {dims}D {count_parameters(model):,} params, batch "
          f"{train.batch_size(dims)} x {'x'.join(map(str, window))}, {workers} data workers, "
          f"precision {amp_dtype(device) or torch.float32}")  # fmt: skip
    print(f"  step {step * 1000:.1f} ms (data wait {wait * 1000:.1f} ms, "
          f"{wait / (wait + step):.1%} of a step); validation on {len(patches)} patches "
          f"{validation:.2f} s; whole volume {'x'.join(map(str, case.label.shape))} "
          f"{whole:.2f} s; peak GPU memory "
          f"{'n/a (cpu)' if peak is None else f'{peak:.2f} GiB'}", flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-3d", type=Path, help="a whole-volume dataset for the 3D space")
    parser.add_argument("--steps", type=int, default=50, help="timed training steps per space")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = pick_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device: {name}; torch {torch.__version__}", flush=True)
    check_space(SPACES / "unet.yaml", None, args.steps, device)
    check_space(SPACES / "unet3d_whole_volumes.yaml", args.data_3d, args.steps, device)


if __name__ == "__main__":
    main()
