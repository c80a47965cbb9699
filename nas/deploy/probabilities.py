"""Saved probabilities: what `nas predict --save-probabilities` writes and `nas ensemble` reads.

Beside each mask `<case>.nii.gz`, a compressed `<case>.npz` holds:
  probabilities  (K, X, Y, Z) float32 in the scan's own voxel order: channel k is the
                 network's output k (softmax over the classes, or a sigmoid per region), and
                 outside the cropped box background (softmax: 1 on channel 0; sigmoid: 0);
  affine, header the scan's NIfTI affine and header, so a mask made from them lies exactly on
                 the scan;
  labels         the model card's labels, regions, region order and postprocessing, as JSON
                 (`LabelDescription`).
The file is read with allow_pickle=False: a saved probability map cannot carry code. What is
read back is distrusted as the schema that wrote it says: every array's header is checked
against the bytes that hold it and the memory available before any array is read, the labels
go through the `LabelDescription` that wrote them, and the probabilities must be float32 in
[0, 1] on the grid their NIfTI header describes; anything else is one line naming the file and
the field, before a mask is made from it.
"""

from __future__ import annotations

import math
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from nas.core.errors import NasError
from nas.data.labels import LabelScheme

if TYPE_CHECKING:
    import nibabel as nib

    from nas.network.model_card import ModelCard

SUFFIX = ".npz"
_HEADERS = ("Nifti1Header", "Nifti2Header")
# The arrays `save` writes, each as <name>.npy in the zip, with the types it writes them in.
ARRAY_TYPES = {
    "probabilities": np.dtype(np.float32),
    "affine": np.dtype(np.float64),
    "header": np.dtype(np.uint8),
    "header_class": None,  # a string (numpy's unicode type, of any length)
    "labels": None,
}
WRONG = "is not a probability map written by nas predict --save-probabilities"

# How far outside [0, 1] a saved probability may lie: float32 rounding in the windows'
# blending and the resampling back can step a few units in the last place past either end.
ROUNDING = 1e-4
# A mask holds label values in uint8, uint16 or uint32 (nas.deploy.predict.mask_values).
LabelValue = Annotated[int, Field(ge=0, le=2**32 - 1)]


class LabelDescription(BaseModel):
    """What turns saved probabilities into a mask (`label_description`): written as JSON by
    `save` and validated by this same model on `load`."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    labels: dict[str, LabelValue]  # class name -> mask value, background first
    regions: dict[str, list[LabelValue]] | None  # region-based models only
    regions_class_order: list[LabelValue] | None
    largest_component: list[str]  # classes reduced to their largest component

    @model_validator(mode="after")
    def _consistent(self) -> LabelDescription:
        if len(self.labels) < 2:
            raise ValueError("labels must name the background and at least one class")
        self.scheme()  # ValueError where the regions disagree with the labels
        unknown = [name for name in self.largest_component if name not in self.labels]
        if unknown:
            raise ValueError(f"largest_component names {unknown[0]!r}, which is not a label")
        return self

    def scheme(self) -> LabelScheme:
        """What the probabilities' channels are: one per class, or per region."""
        return LabelScheme.from_description(self.model_dump())


def probabilities_path(mask: Path) -> Path:
    """Where the probabilities of the mask file `mask` go: `<case>.npz` beside it."""
    from nas.data.layouts import nifti_stem

    return mask.with_name(f"{nifti_stem(mask.name) or mask.stem}{SUFFIX}")


def label_description(
    card: ModelCard, largest_component: Sequence[str] | None = None
) -> dict[str, Any]:
    """What turns a card's probabilities into a mask: its labels, regions and postprocessing
    (or, for an ensemble of different networks, the ensemble's `largest_component`)."""
    if largest_component is None:
        largest_component = card.postprocessing.largest_component
    return {
        "labels": dict(card.labels),
        "regions": {k: list(v) for k, v in card.regions.items()} if card.regions else None,
        "regions_class_order": list(card.regions_class_order or []) or None,
        "largest_component": list(largest_component),
    }


def save(
    path: Path,
    probabilities: np.ndarray,
    image: nib.spatialimages.SpatialImage,
    labels: dict[str, Any],
) -> None:
    """Write one scan's probabilities (K, *image shape) with the geometry of `image` and the
    `labels` (label_description's form) that turn them into a mask."""
    header = image.header
    if type(header).__name__ not in _HEADERS:
        header = image.header.from_header(image.header)  # e.g. an Analyze scan: as NIfTI-1
    description = LabelDescription.model_validate(labels)  # what `load` validates
    np.savez_compressed(
        path,
        probabilities=probabilities.astype(np.float32, copy=False),
        affine=np.asarray(image.affine, np.float64),
        header=np.frombuffer(header.binaryblock, np.uint8),
        header_class=np.array(type(header).__name__),
        labels=np.array(description.model_dump_json()),
    )


@dataclass(frozen=True)
class SavedProbabilities:
    path: Path
    probabilities: np.ndarray  # (K, X, Y, Z) float32
    affine: np.ndarray
    header: bytes
    header_class: str
    labels: dict[str, Any]  # as label_description gives it

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.probabilities.shape)

    def like(self) -> nib.spatialimages.SpatialImage:
        """An image with the scan's affine and header, for nas.deploy.predict.write_mask."""
        import nibabel as nib

        header_type = getattr(nib, self.header_class)
        image_type = nib.Nifti1Image if self.header_class == "Nifti1Header" else nib.Nifti2Image
        header = header_type(binaryblock=self.header)
        return image_type(np.zeros(self.shape[1:], np.uint8), self.affine, header)


def load(path: Path) -> SavedProbabilities:
    """One saved file, checked field by field; anything else is refused with one line naming
    the file and the field, before an array larger than the file or the memory is read."""
    _check_array_sizes(path)
    try:
        with np.load(path, allow_pickle=False) as saved:
            fields = {name: saved[name] for name in saved.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise NasError(path, f"{WRONG} ({_one_line(err)})") from None
    for name, dtype in ARRAY_TYPES.items():
        array = fields[name]
        if dtype is None and (array.dtype.kind != "U" or array.ndim != 0):
            _refuse(path, name, f"holds {array.dtype} {array.shape}, not a string")
        if dtype is not None and array.dtype != dtype:
            _refuse(path, name, f"holds {array.dtype} {array.shape}, not {dtype}")
    header_class = str(fields["header_class"])
    if header_class not in _HEADERS:
        _refuse(path, "header_class", f"{header_class[:40]!r} is not one of {', '.join(_HEADERS)}")
    try:
        description = LabelDescription.model_validate_json(str(fields["labels"]))
    except ValidationError as err:
        _refuse(path, "labels", _first_error(err))
    header = _header(path, header_class, fields["header"])
    probabilities, affine = fields["probabilities"], fields["affine"]
    _check_grid(path, probabilities, affine, header, description.scheme())
    return SavedProbabilities(
        path, probabilities, affine, fields["header"].tobytes(), header_class,
        description.model_dump(),
    )  # fmt: skip


def _refuse(path: Path, field: str, problem: str) -> NoReturn:
    raise NasError(path, f"{WRONG} ({field}: {problem})")


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _first_error(err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    return f"{where}: {first['msg']}" if where else first["msg"]


def _check_array_sizes(path: Path) -> None:
    """Refuse a file that is not the zip of `save`'s arrays, or whose arrays' headers claim
    more bytes than the file can hold (deflate packs at most about 1032:1) or than this
    machine has available, from the headers alone: no array is read."""
    from nas.core.resources import check_allocation
    from nas.data.preprocess import MAX_DEFLATE_RATIO

    try:
        with zipfile.ZipFile(path) as archive:
            members = {info.filename: info for info in archive.infolist()}
            wanted = {f"{name}.npy" for name in ARRAY_TYPES}
            if set(members) != wanted:
                missing, extra = sorted(wanted - set(members)), sorted(set(members) - wanted)
                what = f"it lacks {', '.join(missing)}" if missing else f"it holds {extra[0]!r}"
                raise NasError(path, f"{WRONG} ({what})")
            total = 0
            for name, info in members.items():
                if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                    _refuse(path, name[:-4], f"compressed with method {info.compress_type}")
                with archive.open(info) as member:
                    shape, dtype = _array_header(member)
                if dtype.hasobject or any(n < 0 for n in shape):
                    _refuse(path, name[:-4], f"holds {dtype} {shape}")
                claimed = math.prod(shape) * dtype.itemsize
                holds = min(info.file_size, info.compress_size * MAX_DEFLATE_RATIO + 1024)
                if claimed > holds:
                    _refuse(path, name[:-4], f"its header claims {shape} {dtype} ({claimed:,} "
                            f"bytes), more than the {info.compress_size:,} bytes stored can "
                            "hold: truncated or not what it claims")  # fmt: skip
                total += claimed
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise NasError(path, f"{WRONG} ({_one_line(err)})") from None
    check_allocation(total, "reading its arrays", path)


def _array_header(member) -> tuple[tuple[int, ...], np.dtype]:
    """The shape and type an .npy stream's header declares; ValueError if it has none."""
    version = np.lib.format.read_magic(member)
    readers = {
        (1, 0): np.lib.format.read_array_header_1_0,
        (2, 0): np.lib.format.read_array_header_2_0,
    }
    if version not in readers:
        raise ValueError(f"an .npy of version {version}")
    shape, _, dtype = readers[version](member)
    return tuple(shape), dtype


def _header(path: Path, header_class: str, block: np.ndarray):
    """The scan's NIfTI header, as stored."""
    import nibabel as nib

    try:
        return getattr(nib, header_class)(binaryblock=block.tobytes())
    except Exception as err:  # nibabel's errors of a block of the wrong size or content
        _refuse(path, "header", f"not a {header_class} ({_one_line(err)})")


def _check_grid(
    path: Path, probabilities: np.ndarray, affine: np.ndarray, header, scheme: LabelScheme
) -> None:
    """The probabilities lie on the header's grid, one channel per output of the labels'
    scheme, with values in [0, 1]; the affine is finite and the header's own."""
    grid = tuple(int(n) for n in header.get_data_shape()[:3])
    if probabilities.ndim != 4 or probabilities.shape[1:] != grid:
        _refuse(path, "probabilities", f"shape {probabilities.shape} is not (K, *{grid}), the "
                "grid its header describes")  # fmt: skip
    if probabilities.shape[0] != scheme.out_channels:
        _refuse(path, "probabilities", f"{probabilities.shape[0]} channels; its labels give "
                f"{scheme.out_channels} ({scheme.output})")  # fmt: skip
    if probabilities.size == 0:
        _refuse(path, "probabilities", f"shape {probabilities.shape} holds no voxel")
    low, high = float(probabilities.min()), float(probabilities.max())  # NaN propagates
    if not -ROUNDING <= low <= high <= 1.0 + ROUNDING:
        _refuse(path, "probabilities", f"values from {low} to {high}, not in [0, 1]")
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        _refuse(path, "affine", f"not a finite 4x4 matrix (shape {affine.shape})")
    if not np.allclose(affine, header.get_best_affine(), atol=1e-4):
        _refuse(path, "affine", "disagrees with the affine its header holds")


def classes_of_mean(probabilities: Sequence[np.ndarray], labels: dict[str, Any]) -> np.ndarray:
    """The class map (uint8, 0 = background) of the mean of several models' probabilities
    (each (K, X, Y, Z)), labelled as `labels` (label_description's form) says: argmax, or
    each region above 0.5 in order, then its classes reduced to their largest component."""
    import torch

    from nas.data.labels import LabelScheme
    from nas.validation.postprocess import keep_largest_component

    mean = np.mean(probabilities, axis=0) if len(probabilities) > 1 else probabilities[0]
    scheme = LabelScheme.from_description(labels)
    classes = scheme.classes_from_probabilities(torch.from_numpy(mean)).numpy()
    names = list(labels["labels"])
    chosen = [names.index(name) for name in labels["largest_component"]]
    return keep_largest_component(classes, chosen) if chosen else classes
