"""Turn one case's NIfTI files into training arrays, checking them on the way.

Per case, as nnU-Net does: load every channel and the label with nibabel, check each (3D, no
empty axis, real and finite voxels, a finite and non-singular affine) and that they agree
(same shape and affine, declared label values), reorient to RAS, crop to the region where
any channel is nonzero, resample to the target spacing (linear for images, nearest neighbour
for labels) and normalise each channel: z-score for MRI and other modalities, clip to the
dataset's foreground percentiles then z-score for CT. Every problem is a NasError naming
the file. Knows nothing of caching, sampling or training.

The plan a case follows (`CasePlan`: channels, each channel's `Normalization`, classes,
spacing) has this one form, checked on construction: the cache's manifest and an export's
model card (nas/network/model_card.py) both hold it as it is and read it back with pydantic.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from pydantic import BaseModel, ConfigDict, NonNegativeFloat, field_validator
from scipy import ndimage

from nas.core.errors import NasError
from nas.data.layouts import CaseFiles


class _Strict(BaseModel):
    # Read back from files (a manifest, a model card anyone may edit): no unknown field, no
    # NaN or infinity.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Normalization(_Strict):
    """z-score after clipping to `clip`; a None mean or std is computed per scan."""

    clip: tuple[float, float] | None = None
    mean: float | None = None
    std: NonNegativeFloat | None = None

    @field_validator("clip")
    @classmethod
    def _ordered(cls, clip: tuple[float, float] | None) -> tuple[float, float] | None:
        if clip is not None and clip[0] > clip[1]:
            raise ValueError(f"clip {list(clip)} runs from high to low")
        return clip


class CasePlan(_Strict):
    """How every case of a dataset is preprocessed, and a new scan for its models too."""

    channels: tuple[int, ...]  # indices into the dataset's channels, in network order
    norms: tuple[Normalization, ...]  # one per entry of `channels`
    class_of_value: dict[int, int]  # label value -> class index (0 = background)
    target_spacing_mm: tuple[float, float, float]


# Multiplies `footprint_bytes`: numpy's and nibabel's own buffers, and the allocator's slack.
FOOTPRINT_MARGIN = 1.25

# Deflate cannot shrink data by more than about 1032:1; a .nii.gz whose header declares more
# voxels than that lies about its contents (and would make a reader allocate for them).
MAX_DEFLATE_RATIO = 1100


def open_nifti(path) -> nib.spatialimages.SpatialImage:
    """A NIfTI image, header only, refused in one line where it cannot be read or where its
    header declares more voxel bytes than the file can hold (uncompressed: the file's size;
    .gz: the most deflate can pack) or than this machine's memory limit."""
    from nas.core.resources import format_gb, host_memory_limit_bytes

    try:
        image = nib.load(path)
    except FileNotFoundError:
        raise NasError(path, "not found") from None
    except Exception as err:  # nibabel raises many types for files that are not NIfTI
        raise NasError(path, f"cannot be read as NIfTI ({err})") from None
    declared = int(np.prod(image.shape, dtype=np.float64)) * image.get_data_dtype().itemsize
    size = Path(path).stat().st_size
    gzipped = str(path).endswith(".gz")
    holds = size * MAX_DEFLATE_RATIO if gzipped else size
    if declared > holds + 352 * MAX_DEFLATE_RATIO:  # header and extensions aside
        raise NasError(
            path,
            f"its header declares {image.shape} voxels ({format_gb(declared)}), more than a "
            f"file of {size:,} bytes can hold: truncated or not what it claims",
        )
    as_float = int(np.prod(image.shape, dtype=np.float64)) * 4
    if as_float > host_memory_limit_bytes():
        raise NasError(
            path,
            f"its {image.shape} voxels need {format_gb(as_float)} as float32, more than this "
            f"machine's limit of {format_gb(host_memory_limit_bytes())}",
        )
    check_header(image, path)
    return image


def check_header(image: nib.spatialimages.SpatialImage, path) -> None:
    """Refuse a file nibabel reads but whose voxels nas would misplace or misread: voxels
    that are not real numbers (complex: numpy would quietly drop the imaginary part), an axis
    of length 0, or an affine (a declared sform or qform, and the one nibabel chose) that is
    not finite or is singular (its voxel axes span fewer than three dimensions)."""
    dtype = image.get_data_dtype()
    if dtype.kind not in "biuf":
        kind = "complex" if dtype.kind == "c" else "non-numeric"
        raise NasError(path, f"holds {kind} voxels ({dtype}); nas reads real numbers only")
    if 0 in image.shape:
        raise NasError(path, f"has an axis of length 0 (shape {image.shape})")
    header = image.header
    forms = []
    if isinstance(header, nib.Nifti1Header):  # NIfTI-2 too; the forms it declares in use
        if header["sform_code"] > 0:
            forms.append(("sform", header.get_sform()))
        if header["qform_code"] > 0:
            try:
                forms.append(("qform", header.get_qform()))
            except ValueError as err:  # quaternion b, c, d of more than unit length
                raise NasError(path, f"its qform cannot be decoded ({err})") from None
    for name, affine in [*forms, ("affine", image.affine)]:
        if not np.all(np.isfinite(affine)):
            raise NasError(path, f"its {name} holds NaN or infinite values")
        axes = affine[:3, :3]
        lengths = np.linalg.norm(axes, axis=0)
        if lengths.min() == 0 or abs(np.linalg.det(axes)) < 1e-6 * np.prod(lengths):
            raise NasError(
                path, f"its {name} is singular: the voxel axes span fewer than three dimensions"
            )


def load_volume(path, as_float32: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Voxels in RAS order and the RAS affine; a 4D file keeps its last (channel) axis.

    as_float32: read intensities straight into float32 (scaled int16 files would otherwise
    become float64, twice the memory); labels keep their stored integer type.
    """
    image = open_nifti(path)
    try:
        canonical = nib.as_closest_canonical(image)
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow is refused below
            data = (
                canonical.get_fdata(dtype=np.float32)
                if as_float32
                else np.asarray(canonical.dataobj)
            )
    except Exception as err:  # truncated or corrupt compressed data shows up here
        raise NasError(path, f"cannot be read as NIfTI ({err})") from None
    if data.dtype.kind == "f" and not np.all(np.isfinite(data)):  # float32 overflow included
        raise NasError(path, "holds NaN or infinite voxels")
    while data.ndim > 3 and data.shape[-1] == 1:  # 3D saved with a trailing time axis of 1
        data = data[..., 0]
    return data, canonical.affine


def _stored_zooms(image: nib.spatialimages.SpatialImage) -> tuple[float, ...]:
    """The voxel sizes as the header stores them: nibabel's loader quietly turns a zero into
    1 and a negative size into its absolute value, which would hide a broken header."""
    header = image.header
    if isinstance(header, nib.Nifti1Header):  # NIfTI-2 and .hdr/.img pairs included
        holder = image.file_map["header" if "header" in image.file_map else "image"]
        with holder.get_prepare_fileobj("rb") as handle:
            header = type(header).from_fileobj(handle, check=False)
    return tuple(float(z) for z in header.get_zooms()[:3])


def spacing_of(path) -> tuple[float, float, float]:
    """RAS voxel spacing from the header alone (no voxels read); positive and finite."""
    image = open_nifti(path)
    try:
        zooms = _stored_zooms(image)
    except Exception as err:
        raise NasError(path, f"cannot be read as NIfTI ({err})") from None
    if len(image.shape) < 3:
        raise NasError(path, f"expected a 3D volume, found shape {image.shape}")
    if not all(0 < z < np.inf for z in zooms):
        shown = ", ".join(f"{z:g}" for z in zooms)
        raise NasError(path, f"voxel spacing ({shown}) must be positive and finite")
    ornt = nib.io_orientation(image.affine)
    spacing = [0.0, 0.0, 0.0]
    for axis, (ras_axis, _) in enumerate(ornt[:3]):
        spacing[int(ras_axis)] = float(zooms[axis])
    return (spacing[0], spacing[1], spacing[2])


def _check_3d(data: np.ndarray, path, expected_channels: int | None = None) -> None:
    if expected_channels is not None and expected_channels > 1:
        if data.ndim != 4 or data.shape[3] != expected_channels:
            raise NasError(
                path, f"expected a 4D image with {expected_channels} channels, found {data.shape}"
            )
        return
    if data.ndim != 3:
        raise NasError(path, f"expected a 3D volume, found shape {data.shape}")


def read_channels(
    images: Sequence[Path], n_channels: int
) -> tuple[list[np.ndarray], list[Path], np.ndarray]:
    """A case's channels (3D, RAS), the file each came from, and their common affine.

    images: one 3D file per channel, or a single file (4D when there are several channels).
    """
    if len(images) == 1:  # MSD or plain pairs: one file, 4D when multi-modal
        path = images[0]
        data, affine = load_volume(path, as_float32=True)
        _check_3d(data, path, n_channels)
        channels = [data] if data.ndim == 3 else [data[..., c] for c in range(data.shape[3])]
        return channels, [path] * len(channels), affine
    channels, affine = [], None
    if len(images) != n_channels:
        raise NasError(
            images[0].parent, f"expected {n_channels} channel files, found {len(images)}"
        )
    for path in images:
        data, this_affine = load_volume(path, as_float32=True)
        _check_3d(data, path)
        if channels and (data.shape != channels[0].shape or not _same(this_affine, affine)):
            raise NasError(path, f"shape or affine differs from {images[0].name}")
        channels.append(data)
        affine = this_affine
    return channels, list(images), affine


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(np.allclose(a, b, rtol=1e-4, atol=1e-3))


def read_label(case: CaseFiles, shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    label, label_affine = load_volume(case.label)
    _check_3d(label, case.label)
    if label.shape != shape or not _same(label_affine, affine):
        raise NasError(
            case.label,
            f"shape {label.shape} or affine differs from its image {case.images[0].name} "
            f"(shape {shape})",
        )
    is_integer = np.issubdtype(label.dtype, np.integer)
    if not is_integer and not np.all(label == np.round(label)):  # finite: load_volume
        raise NasError(case.label, "label values must be whole numbers")
    if label.min() < 0:
        raise NasError(case.label, f"label values must not be negative (found {label.min()})")
    # The smallest type that holds the values: a uint8 label is not copied at all.
    return label.astype(np.uint8 if label.max() < 256 else np.int32, copy=False)


def nonzero_box(channels: list[np.ndarray]) -> tuple[slice, ...]:
    """Bounding box of the voxels where any channel is nonzero (the whole volume if none)."""
    nonzero = np.zeros(channels[0].shape, bool)
    for channel in channels:
        nonzero |= channel != 0
    if not nonzero.any():
        return tuple(slice(0, n) for n in nonzero.shape)
    box = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hits = np.flatnonzero(nonzero.any(axis=other))
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)


def _resample(volume: np.ndarray, shape: tuple[int, ...], order: int) -> np.ndarray:
    """`volume` resampled to exactly `shape` (zoom rounds the shape itself, to 0 for a thin
    crop, so it is given the factors that land on `shape`)."""
    if volume.shape == tuple(shape):
        return volume
    factors = np.array(shape) / np.array(volume.shape)
    return ndimage.zoom(volume, factors, order=order, mode="nearest", grid_mode=True)


def _normalise_in_place(channel: np.ndarray, norm: Normalization) -> None:
    """channel: float32, overwritten (no full-size copies: cases can be large)."""
    if norm.clip is not None:
        np.clip(channel, *norm.clip, out=channel)
    mean = float(channel.mean(dtype=np.float64)) if norm.mean is None else norm.mean
    channel -= np.float32(mean)
    if norm.std is None:  # centred now: the std is a dot product, with no temporary array
        flat = channel.reshape(-1)
        std = float(np.sqrt(np.dot(flat, flat) / max(flat.size, 1)))
    else:
        std = norm.std
    channel /= np.float32(max(std, 1e-8))


def prepare_image(
    channels: list[np.ndarray], spacing: tuple[float, float, float], plan: CasePlan
) -> tuple[np.ndarray, tuple[slice, ...]]:
    """The network's input (C, X, Y, Z) float32 from a case's RAS channels (all of them, in
    the dataset's order), and the nonzero box it was cropped to, in the source voxels."""
    chosen = [channels[c] for c in plan.channels]
    box = nonzero_box(chosen)
    factors = np.array(spacing) / np.array(plan.target_spacing_mm)
    shape = _resampled_shape(chosen[0][box].shape, factors)
    image = np.empty((len(chosen), *shape), np.float32)
    for out, channel, norm in zip(image, chosen, plan.norms, strict=True):
        out[...] = _resample(channel[box], shape, order=1)
        _normalise_in_place(out, norm)
    return image, box


def _resampled_shape(shape: tuple[int, ...], factors: np.ndarray) -> tuple[int, ...]:
    if np.allclose(factors, 1.0):
        return tuple(shape)
    # At least one voxel: a crop one slice thick must not vanish at a coarser spacing.
    return tuple(max(1, int(round(n * f))) for n, f in zip(shape, factors, strict=True))


def case_bytes_per_voxel(plan: CasePlan) -> int:
    """What `preprocess_case` holds per resampled voxel: the image (float32 per channel), one
    channel's resampling and the label."""
    return 4 * len(plan.channels) + 4 + 1


def check_target_grid(path: Path, plan: CasePlan, bytes_per_voxel: int) -> None:
    """Refuse, from its header alone, a scan whose grid at the plan's target spacing would
    need more memory than is available at `bytes_per_voxel` (what the caller holds per
    resampled voxel): a spacing that lies, or a target far finer than the scan, would
    otherwise allocate tens of GB before failing. The nonzero crop is taken as the whole
    volume, so what preprocessing then allocates is at most this."""
    from nas.core.resources import check_allocation

    shape = tuple(open_nifti(path).shape[:3])
    spacing = spacing_of(path)
    factors = np.array(spacing) / np.array(plan.target_spacing_mm)
    grid = _resampled_shape(shape, factors)

    def mm(values: Sequence[float]) -> str:
        return " x ".join(f"{v:g}" for v in values)

    check_allocation(
        math.prod(grid) * bytes_per_voxel,
        f"resampling its {shape} voxels of {mm(spacing)} mm to the target spacing of "
        f"{mm(plan.target_spacing_mm)} mm, a grid of {grid},",
        path,
    )


def preprocess_case(
    case: CaseFiles, n_channels: int, plan: CasePlan
) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """(image (C, X, Y, Z) float32, label (X, Y, Z) uint8 class indices, source spacing)."""
    channels, paths, affine = read_channels(case.images, n_channels)
    label = read_label(case, channels[0].shape, affine)
    values = np.unique(label)
    undeclared = sorted(set(values.tolist()) - set(plan.class_of_value))
    if undeclared:
        raise NasError(case.label, f"label values {undeclared} are not declared")
    spacing = spacing_of(paths[0])
    image, box = prepare_image(channels, spacing, plan)
    lookup = np.zeros(int(values.max()) + 1, np.uint8)
    for value in values:
        lookup[value] = plan.class_of_value[int(value)]
    label = _resample(lookup[label[box]], image.shape[1:], order=0)  # the image's very grid
    return image, label, spacing


def footprint_bytes(case: CaseFiles, n_channels: int, plan: CasePlan) -> int:
    """The most memory `preprocess_case` should need for `case`, from its headers alone (the
    nonzero crop taken as the whole volume), times FOOTPRINT_MARGIN: per source voxel, each
    channel in float32, as stored and as decompressed (and in float64 where the header scales
    it), the label three times (read, sorted for its values, mapped to classes) and three
    masks; per resampled voxel, the image, one channel's resampling and the label."""
    images = [open_nifti(path) for path in case.images]
    shape = images[0].shape[:3]
    per_channel = 0
    for image in images:
        channels = n_channels if len(images) == 1 else 1
        scaling = (getattr(image.dataobj, "slope", 1.0), getattr(image.dataobj, "inter", 0.0))
        scaled = 8 if scaling != (1.0, 0.0) else 0
        per_channel += channels * (4 + 2 * image.get_data_dtype().itemsize + scaled)
    label = open_nifti(case.label).get_data_dtype().itemsize
    factors = np.array(spacing_of(case.images[0])) / np.array(plan.target_spacing_mm)
    resampled = math.prod(_resampled_shape(shape, factors))
    source = math.prod(shape) * (per_channel + 3 * label + 3)
    target = resampled * case_bytes_per_voxel(plan)
    return math.ceil(FOOTPRINT_MARGIN * (source + target))
