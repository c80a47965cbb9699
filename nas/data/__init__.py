"""Datasets: where the data is and how to prepare it (`DataConfig`), loading it through the
preprocessing cache, and serving training samples; the label schemes the data defines.
May import nas.core only: no network, no Optuna."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import ConfigDict, Field, field_validator, model_validator
from pydantic.dataclasses import dataclass
from pydantic_core import ArgsKwargs

from nas.core.errors import NasError
from nas.data.cache import Case, Dataset, cached_dataset
from nas.data.layouts import Layout, discover
from nas.data.sampling import PatchSampler, Slicing, patch_at, split_cases, validation_centres
from nas.data.synthetic import SyntheticSpec, ensure_synthetic_dataset

DEFAULT_SYNTHETIC_PATH = Path("data/Dataset001_SyntheticLesions")


@dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class DataConfig:
    """Where the data is and how it is prepared; relative paths are from the working directory.

    path: the dataset folder (nnU-Net v2 raw, MSD, or images/ + masks/ pairs).
    format: its layout; auto-detected by default.
    synthetic: generate the embedded dataset at `path` on first use; with no `path` at all,
        the embedded dataset is used.
    channels: input channels by number or name (default: all).
    foreground: class name -> label values merged into it (default: each declared label is
        its own class); values not listed count as background. Not for a region-based
        dataset, whose regions (dataset.json) say what is trained.
    target_spacing_mm: resampling target (default: the dataset's median spacing).
    normalization: auto (CT channels clip + z-score, others z-score per case), zscore or ct.
    slice_axis: the axis 2D candidates slice along (0, 1, 2 in RAS; 2 is axial).
    slices_per_case: train 2D candidates on this many slices of each case (default: all).
    n_folds, fold, split_seed: seeded k-fold split by case; or splits_file: an nnU-Net
        splits_final.json, whose entry `fold` is used.
    cache_dir: where preprocessed arrays are kept (default: $NAS_CACHE_DIR or ~/.cache/nas).
    test: a folder holding imagesTs/ and labelsTs/, scored after the search and never used
        in it (default: those folders inside `path`, when both are there).
    """

    path: Path = DEFAULT_SYNTHETIC_PATH
    format: Layout = "auto"
    synthetic: SyntheticSpec | None = None
    channels: tuple[int | str, ...] | None = None
    foreground: dict[str, tuple[int, ...]] | None = None
    target_spacing_mm: tuple[float, float, float] | None = None
    normalization: Literal["auto", "zscore", "ct"] = "auto"
    slice_axis: Literal[0, 1, 2] = 2
    slices_per_case: int | None = Field(None, ge=1)
    n_folds: int = Field(5, ge=2)
    fold: int = Field(0, ge=0)
    split_seed: int = Field(0, ge=0, lt=2**32)  # numpy takes seeds below 2**32
    splits_file: Path | None = None
    cache_dir: Path | None = None
    test: Path | None = None

    @model_validator(mode="before")
    @classmethod
    def _embedded_by_default(cls, values: Any) -> Any:
        kwargs = (values.kwargs or {}) if isinstance(values, ArgsKwargs) else values
        if isinstance(kwargs, dict) and "path" not in kwargs and kwargs.get("synthetic") is None:
            return {**kwargs, "synthetic": SyntheticSpec()}
        return values

    @field_validator("target_spacing_mm")
    @classmethod
    def _check_spacing(
        cls, value: tuple[float, float, float] | None
    ) -> tuple[float, float, float] | None:
        if value is not None and not all(0 < size < math.inf for size in value):
            raise ValueError(f"target_spacing_mm must be positive and finite, got {value}")
        return value

    @model_validator(mode="after")
    def _fold_in_range(self) -> DataConfig:
        if self.splits_file is None and self.fold >= self.n_folds:
            raise ValueError(f"fold {self.fold} does not exist with n_folds {self.n_folds}")
        return self

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable, with absolute paths (so it can be used from any directory).

        `test` is left out: the held-out cases play no part in the search, so a study may be
        resumed with another test folder or none (nas.evaluation.heldout rescores when the files
        change).
        """
        values = dataclasses.asdict(self)
        del values["test"]
        for key in ("path", "splits_file", "cache_dir"):
            if values[key] is not None:
                values[key] = str(Path(values[key]).resolve())
        return json.loads(json.dumps(values))

    @property
    def slicing(self) -> Slicing:
        return Slicing(self.slice_axis, self.slices_per_case, self.split_seed)


def load_dataset(cfg: DataConfig, *, processes: int | None = None) -> Dataset:
    """Generate the embedded dataset if asked to, then open it through the preprocessing
    cache; `processes` preprocess it if the cache is built (see `cached_dataset`)."""
    if cfg.synthetic is not None:
        ensure_synthetic_dataset(cfg.path, cfg.synthetic)
    index = discover(cfg.path, cfg.format)
    settings = {
        "channels": cfg.channels,
        "foreground": cfg.foreground,
        "target_spacing_mm": cfg.target_spacing_mm,
        "normalization": cfg.normalization,
    }
    return cached_dataset(index, settings, cfg.cache_dir, processes=processes)


def split_dataset(dataset: Dataset, cfg: DataConfig) -> tuple[list[Case], list[Case]]:
    """Training and validation cases of the configured fold; never one case on both sides,
    and every foreground class (or region) present among the validation cases."""
    try:
        train, val = split_cases(
            dataset.cases, cfg.n_folds, cfg.fold, cfg.split_seed, cfg.splits_file
        )
    except ValueError as err:
        raise NasError(dataset.root, str(err)) from None
    # A class (or region) absent from validation scores a perfect IoU for predicting nothing.
    scheme = dataset.scheme
    present = np.zeros(len(scheme.scored_names), bool)
    for case in val:
        present |= scheme.present(case.label)
        if present.all():
            break
    if not present.all():
        missing = [
            name for name, found in zip(scheme.scored_names, present, strict=True) if not found
        ]
        names = ", ".join(repr(name) for name in missing)
        kind = scheme.scored_kind
        kind = kind if len(missing) == 1 else {"class": "classes", "region": "regions"}[kind]
        how = (
            f"another fold of {cfg.splits_file}"
            if cfg.splits_file is not None
            else "another fold or split_seed"
        )
        raise NasError(
            dataset.root,
            f"the validation cases of fold {cfg.fold} hold no voxel of {kind} "
            f"{names}, which would score a perfect IoU for predicting nothing; choose {how}, "
            "or add cases showing it",
        )
    return train, val


__all__ = [
    "Case",
    "DataConfig",
    "Dataset",
    "PatchSampler",
    "Slicing",
    "SyntheticSpec",
    "ensure_synthetic_dataset",
    "load_dataset",
    "patch_at",
    "split_cases",
    "split_dataset",
    "validation_centres",
]
