"""Inference speed of exported models on CPU: eager PyTorch vs torch.export (.pt2) vs ONNX Runtime.

A 2D and a 3D U-Net (the default space's nnU-Net-like 2D reference, and a 3D net of the
space's 3D range) are exported with the same code as `python -m nas.export`, then each
engine runs in its own fresh process (so peak memory is its own): load the model, warm up,
and time forward passes over a batch the size predict feeds it (16 slices of 192 x 160 in
2D, one 96 x 96 x 64 window in 3D). Prints voxels per second, the ratio to eager in the same
run, and peak resident memory.

    python benchmarks/predict.py [--rounds 5]

Target: the exported paths are no slower than eager (ratio >= 1.0 within noise).
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import statistics
import tempfile
import time
from pathlib import Path

MODELS = {
    "2D": (
        dict(spatial_dims=2, depth=4, base_channels=16, convs_per_stage=2, norm="instance"),
        (16, 1, 192, 160),
    ),
    "3D": (
        dict(spatial_dims=3, depth=3, base_channels=8, convs_per_stage=2, norm="instance",
             anisotropic_stages=1),
        (1, 1, 96, 96, 64),
    ),
}  # fmt: skip
ENGINES = ("eager", "pt2", "onnx")


def _peak_rss_mib() -> float:
    """This process's peak resident memory. VmHWM starts afresh at exec, where ru_maxrss
    would carry over the parent's peak into a spawned child."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux: KiB


def _measure(engine: str, folder: str, shape: tuple[int, ...], rounds: int, queue) -> None:
    """In a fresh process: load one engine, run `rounds` timed passes, report back."""
    import numpy as np
    import torch

    inputs = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    if engine == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(f"{folder}/model.onnx")

        def forward():
            return session.run(None, {"image": inputs})[0]
    else:
        if engine == "eager":
            import nas

            model = nas.load(folder)
        else:
            model = torch.export.load(f"{folder}/model.pt2").module()
        tensor = torch.from_numpy(inputs)

        def forward():
            with torch.no_grad():
                return model(tensor)

    forward()  # warm-up: allocations, kernel choice
    seconds = []
    for _ in range(rounds):
        start = time.perf_counter()
        forward()
        seconds.append(time.perf_counter() - start)
    queue.put((float(np.prod(shape)) / statistics.median(seconds), _peak_rss_mib()))


def export_models(root: Path) -> dict[str, Path]:
    import torch

    from nas import build_unet
    from nas.deploy.programs import export_onnx, export_pt2
    from nas.network.model_card import WEIGHTS_FILE, Inference, ModelCard, write_card

    folders = {}
    for name, (fields, shape) in MODELS.items():
        torch.manual_seed(0)
        model = build_unet(**fields).eval()
        folder = root / name
        folder.mkdir()
        torch.save(model.state_dict(), folder / WEIGHTS_FILE)
        example = torch.randn(2, *shape[1:])
        export_pt2(model, example, folder / "model.pt2")
        export_onnx(model, example, folder / "model.onnx")
        card = ModelCard(
            architecture=model.config.to_dict(),
            preprocessing={
                "input_channels": ["MRI"],
                "channels": [0],
                "target_spacing_mm": [1.0, 1.0, 1.0],
                "normalization": [{}],
            },
            inference=Inference(
                spatial_dims=fields["spatial_dims"],
                slice_axis=2,
                patch_size=shape[2:],
                size_multiple=model.size_multiple,
                output="sigmoid",
            ),
            labels={"background": 0, "lesion": 1},
            source={"benchmark": True},
        )
        write_card(folder, card)
        folders[name] = folder
    return folders


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    context = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        folders = export_models(Path(tmp))
        print(f"{'model':<6}{'engine':<8}{'Mvoxel/s':>10}{'vs eager':>10}{'peak MiB':>10}")
        for name, folder in folders.items():
            shape = MODELS[name][1]
            eager = None
            for engine in ENGINES:
                queue = context.Queue()
                child = context.Process(
                    target=_measure, args=(engine, str(folder), shape, args.rounds, queue)
                )
                child.start()
                speed, peak = queue.get()
                child.join()
                eager = eager or speed
                ratio = speed / eager
                print(f"{name:<6}{engine:<8}{speed / 1e6:>10.2f}{ratio:>10.2f}{peak:>10.0f}")
    print("target: pt2 and onnx no slower than eager (ratio >= 1.0 within noise)")


if __name__ == "__main__":
    main()
