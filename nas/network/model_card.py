"""An exported model's description, architecture.yaml (its model card): the schema, writing
it, and reading it back checked, without torch.

It holds the builder config, the preprocessing a scan must go through, the inference
settings, the label values (and regions, for region-based training, as nnU-Net's
dataset.json gives them), the postprocessing, any ensemble members, and where the model came
from. A card whose network and one inference window would not fit in this machine's memory
is refused before any network is built. nas/deploy/exported.py loads the model it describes.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)

from nas.core.errors import NasError, validation_problem
from nas.core.resources import format_gb, host_memory_limit_bytes
from nas.core.yaml_file import read_yaml
from nas.data import Dataset
from nas.data.labels import LabelScheme
from nas.data.preprocess import CasePlan, Normalization
from nas.network.memory import estimate_inference_bytes
from nas.network.unet_config import UNetConfig

CARD_FILE = "architecture.yaml"
ENSEMBLE_FILE = "ensemble.yaml"
WEIGHTS_FILE = "weights.pt"
MEMBER_NAME = re.compile(r"^[A-Za-z0-9_]+$")
FORMAT_VERSION = 1


class _Strict(BaseModel):
    # A card is read back from a file anyone may edit: no unknown field, no NaN or infinity.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Preprocessing(_Strict):
    """What a scan goes through before the network, in this order (as in training)."""

    orientation: Literal["RAS"] = "RAS"  # reoriented with nibabel's as_closest_canonical
    crop: Literal["nonzero"] = "nonzero"  # to the box where any used channel is nonzero
    input_channels: tuple[str, ...]  # the channels a scan provides: files _0000, _0001, ...
    channels: tuple[int, ...]  # which of them the network reads, in its input order
    target_spacing_mm: tuple[PositiveFloat, PositiveFloat, PositiveFloat]  # linear; labels nearest
    normalization: tuple[Normalization, ...]  # one per network input channel (the plan's norms)

    @model_validator(mode="after")
    def _channels_exist(self) -> Preprocessing:
        n_inputs = len(self.input_channels)
        if not self.channels or not all(0 <= c < n_inputs for c in self.channels):
            raise ValueError(
                f"channels {list(self.channels)} must name some of the {n_inputs} input channels"
            )
        if len(self.normalization) != len(self.channels):
            raise ValueError(
                f"normalization has {len(self.normalization)} entries for "
                f"{len(self.channels)} channels"
            )
        return self

    def plan(self, labels: dict[str, int]) -> CasePlan:
        """The plan a scan follows: the card's channels, normalisation and spacing, with each
        of `labels`' values (background first) its own class."""
        classes = {value: k for k, value in enumerate(labels.values())}
        return CasePlan(channels=self.channels, norms=self.normalization, class_of_value=classes,
                        target_spacing_mm=self.target_spacing_mm)  # fmt: skip

    @classmethod
    def of(cls, plan: CasePlan, input_channels: tuple[str, ...]) -> Preprocessing:
        """What a card records of a dataset's `plan` (`input_channels`: every channel a scan
        provides)."""
        return cls(input_channels=input_channels, channels=plan.channels,
                   target_spacing_mm=plan.target_spacing_mm, normalization=plan.norms)  # fmt: skip


class Inference(_Strict):
    """How the network is applied: slice by slice (2D) or by sliding windows (3D)."""

    spatial_dims: Literal[2, 3]
    slice_axis: Literal[0, 1, 2]  # 2D networks see slices along this RAS axis
    patch_size: tuple[PositiveInt, ...]  # the sliding window: in-plane for 2D, (X, Y, Z) for 3D
    # The exported programs take spatial sizes that are multiples of this (at least twice it).
    size_multiple: tuple[PositiveInt, ...]
    # One foreground logit; one per class; or one per region (each sigmoid > 0.5 writes its
    # regions_class_order value, in order).
    output: Literal["sigmoid", "softmax", "regions"]
    # "mirror": average over every flip of the input along its spatial axes (nnU-Net's TTA).
    tta: Literal["none", "mirror"] = "none"


class Postprocessing(_Strict):
    """Applied to the predicted classes, chosen by cross-validation (nnU-Net's rule)."""

    largest_component: tuple[str, ...] = ()  # classes reduced to their largest 3D component


class ModelCard(_Strict):
    """architecture.yaml: everything needed to rebuild the model and use it on a new scan."""

    format_version: Literal[1] = FORMAT_VERSION
    architecture: dict[str, Any]  # keyword arguments of nas.build_unet
    preprocessing: Preprocessing
    inference: Inference
    labels: dict[str, NonNegativeInt]  # class name -> voxel value in the masks, background first
    # Region-based training only: region name -> the label values it covers, and the value
    # written where each region is predicted (later regions overwrite earlier ones).
    regions: dict[str, tuple[int, ...]] | None = None
    regions_class_order: tuple[int, ...] | None = None
    source: dict[str, Any]  # study, trial, storage, scores, dataset, date
    postprocessing: Postprocessing = Postprocessing()
    # Subfolders holding one ensemble member each; none: the folder is the one model.
    members: tuple[str, ...] = ()

    @field_validator("members")
    @classmethod
    def _plain_names(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        for name in names:  # a member stays inside the model folder
            if not MEMBER_NAME.match(name):
                raise ValueError(f"member {name!r} is not a plain folder name")
        return names

    @model_validator(mode="after")
    def _consistent_outputs(self) -> ModelCard:
        scheme = self.scheme()  # ValueError where the regions disagree with the labels
        if scheme.output != self.inference.output:
            raise ValueError(
                f"inference.output is {self.inference.output!r}; the labels and regions give "
                f"{scheme.output!r}"
            )
        unknown = [n for n in self.postprocessing.largest_component if n not in self.labels]
        if unknown:
            raise ValueError(f"postprocessing names classes not among the labels: {unknown}")
        return self

    def unet_config(self) -> UNetConfig:
        return UNetConfig.from_dict(self.architecture)

    def member_folders(self, folder: Path) -> list[Path]:
        return [folder / name for name in self.members] or [folder]

    def scheme(self) -> LabelScheme:
        """What the network outputs and how it becomes label values."""
        return LabelScheme.from_description(
            {
                "labels": self.labels,
                "regions": self.regions,
                "regions_class_order": self.regions_class_order,
            }
        )


def describe_data(dataset: Dataset) -> dict[str, Any]:
    """The preprocessing, label values and any regions of a dataset, as the card records them
    (JSON); `regions` and `regions_class_order` only for a region-based dataset."""
    preprocessing = Preprocessing.of(dataset.plan, dataset.source_channel_names)
    return {"preprocessing": preprocessing.model_dump(mode="json"), **dataset.scheme.describe()}


def write_card(folder: Path, card: ModelCard) -> None:
    # A card without regions reads as every card before them did.
    plain = card.regions is None
    fields = card.model_dump(
        mode="json", exclude={"regions", "regions_class_order"} if plain else None
    )
    text = yaml.safe_dump(fields, sort_keys=False)
    (folder / CARD_FILE).write_text(text)


def read_card(folder: Path) -> ModelCard:
    path = Path(folder) / CARD_FILE
    if not Path(folder).is_dir():
        raise NasError(folder, "not found: expected a folder written by nas.export")
    if not path.is_file():
        raise NasError(path, "not found: not a folder written by nas.export")
    try:
        card = ModelCard.model_validate(read_yaml(path))
        unet = card.unet_config()
    except (ValidationError, TypeError, ValueError) as err:
        raise NasError(path, f"not a valid model description ({validation_problem(err)})") from None
    problem = _network_mismatch(card, unet)
    if problem is not None:
        raise NasError(path, f"not a valid model description ({problem})")
    # The network is built on the CPU whatever the target device, so the host's limit applies.
    check_memory(path, card, host_memory_limit_bytes(), "cpu")
    return card


def _network_mismatch(card: ModelCard, unet: UNetConfig) -> str | None:
    """Where the card's inference and preprocessing disagree with its network, in words."""
    inference, dims = card.inference, unet.spatial_dims
    if inference.spatial_dims != dims:
        return f"inference.spatial_dims is {inference.spatial_dims} for a {dims}D network"
    for name in ("patch_size", "size_multiple"):
        if len(getattr(inference, name)) != dims:
            return (
                f"inference.{name} has {len(getattr(inference, name))} values for a {dims}D network"
            )
    if unet.in_channels != len(card.preprocessing.channels):
        return (
            f"architecture.in_channels is {unet.in_channels}; preprocessing.channels gives "
            f"{len(card.preprocessing.channels)}"
        )
    if unet.out_channels != card.scheme().out_channels:
        return (
            f"architecture.out_channels is {unet.out_channels}; the labels give "
            f"{card.scheme().out_channels}"
        )
    return None


class EnsembleCard(_Strict):
    """ensemble.yaml: different networks (front members) used together: each subfolder named
    in `members` is a model folder of its own (architecture.yaml, weights); their
    probabilities on a scan's grid are averaged, then labelled and postprocessed as here."""

    format_version: Literal[1] = FORMAT_VERSION
    members: tuple[str, ...]
    postprocessing: Postprocessing = Postprocessing()
    source: dict[str, Any]  # study, trials, how they were chosen and scored, date

    @field_validator("members")
    @classmethod
    def _plain_names(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        if len(names) < 2:
            raise ValueError("an ensemble needs at least two members")
        return ModelCard._plain_names(names)


def write_ensemble_card(folder: Path, card: EnsembleCard) -> None:
    text = yaml.safe_dump(card.model_dump(mode="json"), sort_keys=False)
    (folder / ENSEMBLE_FILE).write_text(text)


def read_ensemble_card(folder: Path) -> EnsembleCard | None:
    """The ensemble a folder describes; None when it is a single model's folder."""
    path = Path(folder) / ENSEMBLE_FILE
    if not path.is_file():
        return None
    try:
        card = EnsembleCard.model_validate(read_yaml(path))
    except (ValidationError, TypeError, ValueError) as err:
        raise NasError(
            path, f"not a valid ensemble description ({validation_problem(err)})"
        ) from None
    return card


def check_memory(path: Path, card: ModelCard, limit: int, where: str) -> None:
    """Refuse, before anything is built, a model whose weights and one inference window
    need more than the `limit` bytes `where` (cpu, cuda) has to spare (an edited or foreign
    architecture.yaml)."""
    unet = card.unet_config()
    needed = estimate_inference_bytes(unet, card.inference.patch_size, unet.in_channels)
    if needed > limit:
        raise NasError(
            path,
            f"needs about {format_gb(needed)} for its weights and one inference window, "
            f"more than the {format_gb(limit)} {where} memory this machine allows",
        )
