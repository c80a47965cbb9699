"""`python -m nas.predict MODEL INPUT OUTPUT`: segment NIfTI scans with an exported model.

INPUT is a .nii/.nii.gz file or a folder of them: nnU-Net style channel files
(`case_0000.nii.gz`, `case_0001.nii.gz`, ...) or one file per case (4D when the model takes
several channels). Each scan goes through the preprocessing the model was trained with
(RAS, nonzero crop, resampling, normalisation, all recorded in architecture.yaml), then 2D
slice-wise or 3D sliding-window inference (windows overlapping by --overlap). An ensemble
averages its members' probabilities, those of mirrored passes too with `--tta mirror`;
`--engine` runs the members on ONNX Runtime (its CUDA provider on a CUDA device where the
onnxruntime-gpu build is installed) or the exported program (auto: ONNX on a CPU when the
export wrote it). The probabilities are resampled back to the cropped box (linear, as
nnU-Net does), turned into labels (argmax, or for region-based training each region's
regions_class_order value where its sigmoid > 0.5, in order), postprocessed as the card
records (largest connected component of the classes where cross-validation showed it helps),
placed in the full volume and reoriented to the scan's own orientation; with
--save-probabilities the probabilities too, as `<case>.npz` beside the mask (see
nas/deploy/probabilities.py), for `nas ensemble`. Each mask is a
NIfTI with exactly the scan's shape and affine, holding the dataset's label values (uint8,
or uint16/uint32 where a value needs it). OUTPUT is a file for a single-file INPUT (or a
folder to write `<case>.nii.gz` into); for a folder INPUT, a folder.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from nas.commands.cli import add_device_option, command_parser, device_option, exit_code
from nas.core.errors import NasError
from nas.deploy import predict
from nas.deploy.predict import DEFAULT_OVERLAP, ENGINES


def make_parser() -> argparse.ArgumentParser:
    parser = command_parser("predict", __doc__.split("\n")[0])
    parser.add_argument("model", type=Path, help="a folder written by nas.export")
    parser.add_argument("input", type=Path, help="a .nii/.nii.gz file or a folder of them")
    parser.add_argument("output", type=Path, help="mask file, or folder for <case>.nii.gz")
    add_device_option(parser)
    parser.add_argument(
        "--engine", choices=ENGINES, default="auto",
        help="eager PyTorch, the exported program, or ONNX Runtime (auto: ONNX on a CPU when "
        "the export wrote model.onnx, else eager)",
    )  # fmt: skip
    parser.add_argument(
        "--tta", choices=["none", "mirror"], help="test-time mirroring (default: as exported)"
    )
    parser.add_argument(
        "--overlap", type=float, default=DEFAULT_OVERLAP, metavar="F",
        help="share of each sliding window its neighbours overlap, in [0, 1) (default: "
        f"{DEFAULT_OVERLAP}); more is smoother and slower",
    )  # fmt: skip
    parser.add_argument(
        "--save-probabilities", action="store_true",
        help="also write each scan's probabilities as <case>.npz beside its mask, for nas "
        "ensemble",
    )  # fmt: skip
    return parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    return make_parser().parse_args(argv)


def run(args: argparse.Namespace) -> int:
    if not 0 <= args.overlap < 1:
        raise NasError("--overlap", f"must be at least 0 and below 1, not {args.overlap}")
    job = predict.plan(args.model, args.input, args.output)
    # torch: once the cards and the scans are found
    device = device_option(args.device)
    predict.write_masks(job, device, args.engine, args.tta, args.overlap, args.save_probabilities)
    n = len(job.outputs)
    saved = " and their probabilities" if args.save_probabilities else ""
    print(f"wrote {n} mask{'s' if n != 1 else ''}{saved} to {args.output}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return exit_code(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
