"""Single model vs fold ensemble vs ensemble with mirroring, on held-out cases.

    python benchmarks/ensemble.py --results results/<study> [--members 2] [--folds 0,1,2,3]
        [--epochs 40]

Takes the best `--members` front members of a finished search (on a dataset with held-out
imagesTs/ + labelsTs/), cross-validates them with `python -m nas.retrain --folds` (fold runs
already recorded are not trained again), and prints, per member, the held-out Dice, HD95 and
inference seconds per case of one fold's model, the ensemble of the folds, and the ensemble
with mirroring, with each time as a ratio to the single model's. It then exports each
member's ensemble with ONNX and times `nas.predict` on the held-out scans with the eager and
the ONNX engine (ratio to eager), checking that both write the same masks.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from nas.commands import export, predict, retrain
from nas.search.study import load_results_study


def _predict_seconds(model: Path, images: Path, out: Path, engine: str) -> float:
    start = time.perf_counter()
    code = predict.main([str(model), str(images), str(out), "--engine", engine])
    if code != 0:
        sys.exit(f"nas.predict --engine {engine} failed")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", type=Path, required=True)
    parser.add_argument("--members", type=int, default=2)
    parser.add_argument("--folds", default="0,1,2,3")
    parser.add_argument("--epochs", type=int, default=40)
    args = parser.parse_args()
    code = retrain.main(
        [str(args.results), "--top", str(args.members), "--folds", args.folds,
         "--epochs", str(args.epochs)]
    )  # fmt: skip
    if code != 0:
        sys.exit("nas.retrain failed")
    table = pd.read_csv(args.results / "ensemble.csv")
    single = table[table.variant == "single"].set_index("trial").seconds_per_case
    table["time_vs_single"] = table.seconds_per_case / table.trial.map(single)
    crossval = pd.read_csv(args.results / "crossval.csv").set_index("trial")
    table["n_params"] = table.trial.map(crossval.n_params)
    columns = ["trial", "n_params", "variant", "members", "passes_per_window", "test_dice",
               "test_iou", "test_hd95_mm", "seconds_per_case", "time_vs_single"]  # fmt: skip
    print("\nheld-out cases, eager engine:")
    print(table[columns].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print("\ncross-validation:")
    print(crossval.to_string(float_format=lambda v: f"{v:.3f}"))

    images = _heldout_images(args.results)
    rows = []
    for trial in crossval.index:
        folder = args.results / "benchmark_export" / f"trial_{trial:04d}"
        export.main(
            [str(args.results), "--trial", str(trial), "--ensemble", "folds", "--tta", "mirror",
             "--format", "onnx", "--out", str(folder), "--force"]
        )  # fmt: skip
        seconds = {}
        for engine in ("eager", "onnx"):
            seconds[engine] = _predict_seconds(
                folder, images, args.results / f"benchmark_masks_{engine}", engine
            )
        same = all(
            np.array_equal(
                np.asarray(nib.load(path).dataobj),
                np.asarray(nib.load(args.results / "benchmark_masks_onnx" / path.name).dataobj),
            )
            for path in sorted((args.results / "benchmark_masks_eager").glob("*.nii.gz"))
        )
        rows.append(
            {
                "trial": trial,
                "eager_s": seconds["eager"],
                "onnx_s": seconds["onnx"],
                "onnx_vs_eager": seconds["onnx"] / seconds["eager"],
                "same_masks": same,
            }
        )
    print("\nnas.predict of the ensemble with mirroring on the held-out scans (whole command):")
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.3f}"))


def _heldout_images(results: Path) -> Path:
    data = load_results_study(results).user_attrs["data_config"]
    return Path(data["path"]) / "imagesTs"


if __name__ == "__main__":
    main()
