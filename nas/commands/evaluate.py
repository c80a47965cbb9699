"""`python -m nas.evaluate PREDICTIONS LABELS`: score predicted masks against reference labels.

PREDICTIONS and LABELS are two folders of `<case>.nii.gz` (or `.nii`) files matched by case
name, or two single files. Every label needs a prediction; predictions without a label are
ignored, with a note. The regions come from `--dataset-json` (nnU-Net v2 `labels`: name ->
value, or name -> list of values for a region; background 0 is left out); without it, each
nonzero value in the files is a region named by its value. Per case and region,
nas.validation.metrics gives Dice, IoU, HD95 and NSD in mm (spacing from the label's header), the
volumes, and what
lesion studies report: per-case Dice (nnU-Net's: none where both masks are empty), lesion-wise
detection (precision, recall, F1 of 26-connected components) and the lesion-count difference;
`metrics.csv` (one row per case and region) and `summary.json` (mean, median and sd per
region, and the lesions pooled over cases) are written to `--out` (default: the PREDICTIONS
folder, as nnU-Net's evaluate_folder does) and the summary is printed. A prediction on
another grid than its label, a missing prediction, a label value that dataset.json does not
declare, a file that is not a NIfTI label mask: one line naming the file, exit code 2, and
nothing written.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from nas.commands.cli import command_parser, exit_code
from nas.core.errors import NasError
from nas.core.staging import check_output_folder

SHOWN_METRICS = (
    ("dice", 3), ("iou", 3), ("nsd", 3), ("hd95_mm", 2), ("volume_diff_ml", 2),
    ("case_dice", 3), ("lesion_f1", 3), ("lesion_count_diff", 1),
)  # fmt: skip


def format_summary(summary: dict) -> str:
    """The summary as a table: one line per region, mean ± sd of the main metrics ("-" where
    no case has one: a lesion F1 where no case holds a lesion)."""
    header = ["region", "n", *(metric for metric, _ in SHOWN_METRICS)]
    lines = [header]
    for region, stats in summary.items():
        cells = [region, str(stats["n"])]
        for metric, digits in SHOWN_METRICS:
            mean, sd = stats[metric]["mean"], stats[metric]["sd"]
            if mean is None:
                cells.append("-")
                continue
            cells.append(f"{mean:.{digits}f}" + ("" if sd is None else f" ± {sd:.{digits}f}"))
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


def make_parser() -> argparse.ArgumentParser:
    parser = command_parser("evaluate", __doc__.split("\n")[0])
    parser.add_argument("predictions", type=Path, help="a folder of <case>.nii.gz, or one file")
    parser.add_argument("labels", type=Path, help="the reference labels, named as PREDICTIONS")
    parser.add_argument(
        "--dataset-json", type=Path,
        help="nnU-Net v2 dataset.json naming the labels and regions (default: each value found)",
    )  # fmt: skip
    parser.add_argument(
        "--tolerance-mm", type=float, default=1.0,
        help="NSD counts surface within this distance as correct (default: 1.0)",
    )  # fmt: skip
    parser.add_argument(
        "--out", type=Path,
        help="folder for metrics.csv and summary.json (default: the PREDICTIONS folder)",
    )  # fmt: skip
    return parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    return make_parser().parse_args(argv)


def run(args: argparse.Namespace) -> int:
    from nas.evaluation.masks import find_pairs, read_regions, write_scores

    if not 0 <= args.tolerance_mm < math.inf:
        raise NasError(
            "--tolerance-mm", f"must be a non-negative distance, got {args.tolerance_mm}"
        )
    regions = read_regions(args.dataset_json) if args.dataset_json is not None else None
    pairs, extra = find_pairs(args.predictions, args.labels)
    out = args.out or (args.predictions if args.predictions.is_dir() else args.predictions.parent)
    check_output_folder(out)
    if out.exists() and not out.is_dir():
        raise NasError(out, "exists and is not a folder")
    if extra:
        shown = ", ".join(path.name for path in extra[:3]) + (", ..." if len(extra) > 3 else "")
        what = "a prediction" if len(extra) == 1 else f"{len(extra)} predictions"
        print(f"note: ignoring {what} without a label ({shown})", file=sys.stderr)
    summary = write_scores(pairs, regions, args.tolerance_mm, out)
    print(
        f"{len(pairs)} case{'s' if len(pairs) != 1 else ''}, NSD tolerance {args.tolerance_mm:g} mm"
    )
    print(format_summary(summary))
    print(f"wrote metrics.csv and summary.json to {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return exit_code(run, args)


if __name__ == "__main__":
    sys.exit(main())
