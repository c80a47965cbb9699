"""`nas ensemble DIR DIR... OUT`: average saved probabilities into masks, as nnU-Net's ensemble.

Each DIR holds the `<case>.npz` files `nas predict --save-probabilities` wrote (one folder
per model, e.g. two front members or two configurations). For every case the models'
probabilities are averaged, turned into labels by the models' common label scheme (argmax,
or each region above 0.5 in order) and postprocessed: a class is reduced to its largest
connected component where every model's card says so. OUT/<case>.nii.gz has the scan's own
shape, affine and header. The folders must hold the same cases, on the same grid, from models
with the same labels; anything else is refused before a mask is written.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from nas.commands.cli import command_parser, exit_code
from nas.core.errors import NasError
from nas.deploy.ensemble import write_ensemble_masks


def make_parser() -> argparse.ArgumentParser:
    parser = command_parser("ensemble", __doc__.split("\n")[0])
    parser.add_argument(
        "folders", nargs="+", type=Path, metavar="DIR",
        help="two or more folders of <case>.npz from nas predict --save-probabilities, then "
        "OUT, the folder for the masks",
    )  # fmt: skip
    return parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    return make_parser().parse_args(argv)


def run(args: argparse.Namespace) -> int:
    if len(args.folders) < 3:
        raise NasError("nas ensemble", "give at least two folders of probabilities and OUT")
    *folders, out = args.folders
    names = write_ensemble_masks(folders, out)
    print(f"wrote {len(names)} mask{'s' if len(names) != 1 else ''} to {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return exit_code(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
