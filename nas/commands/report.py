"""results/<study>/report.html: the search at a glance, in one file that needs no network.

`python -m nas.report results/<study>` rewrites it on demand, from the study alone; `nas run`
rewrites it after every trial. The page and its figures are nas/search/report.py's and
nas/search/report_figures.py's.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from nas.commands.cli import command_parser, exit_code
from nas.search.report import write_report


def make_parser() -> argparse.ArgumentParser:
    parser = command_parser("report", __doc__.split("\n")[0])
    parser.add_argument("results", type=Path, help="a study's results folder, e.g. results/unet")
    parser.add_argument("--storage", help="Optuna storage URL (default: the folder's study.db)")
    return parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    return make_parser().parse_args(argv)


def run(args: argparse.Namespace) -> int:
    from nas.search.study import load_results_study

    study = load_results_study(args.results, args.storage)
    print(f"wrote {write_report(study, args.results)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return exit_code(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
