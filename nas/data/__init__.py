"""Datasets: where the data is (`DataConfig`), loading it, and serving training samples."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ConfigDict, Field, model_validator
from pydantic.dataclasses import dataclass
from pydantic_core import ArgsKwargs

from nas.data.nnunet import Case, Dataset, read_nnunet_raw
from nas.data.sampling import PatchSampler, split_by_case
from nas.data.synthetic import SyntheticSpec, ensure_synthetic_dataset

DEFAULT_SYNTHETIC_PATH = Path("data/Dataset001_SyntheticLesions")


@dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class DataConfig:
    """path: an nnU-Net v2 raw dataset folder (relative paths are from the working directory).
    synthetic: generate the embedded dataset at `path` on first use; with no `path` at all,
    the embedded dataset is used.
    val_fraction, split_seed: the train/validation split, by case.
    """

    path: Path = DEFAULT_SYNTHETIC_PATH
    synthetic: SyntheticSpec | None = None
    val_fraction: float = Field(0.25, gt=0.0, lt=1.0)
    split_seed: int = 0

    @model_validator(mode="before")
    @classmethod
    def _embedded_by_default(cls, values: Any) -> Any:
        kwargs = (values.kwargs or {}) if isinstance(values, ArgsKwargs) else values
        if isinstance(kwargs, dict) and "path" not in kwargs and kwargs.get("synthetic") is None:
            return {**kwargs, "synthetic": SyntheticSpec()}
        return values


def load_dataset(cfg: DataConfig) -> Dataset:
    """Generate the embedded dataset if asked to, then read the dataset from disk."""
    if cfg.synthetic is not None:
        ensure_synthetic_dataset(cfg.path, cfg.synthetic)
    return read_nnunet_raw(cfg.path)


__all__ = [
    "Case",
    "DataConfig",
    "Dataset",
    "PatchSampler",
    "SyntheticSpec",
    "ensure_synthetic_dataset",
    "load_dataset",
    "split_by_case",
]
