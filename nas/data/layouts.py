"""Find the cases of a dataset folder: which files hold each case's channels and its label.

Three layouts, detected automatically unless named:
- nnU-Net v2 raw: imagesTr/{case}_{XXXX}{file_ending}, labelsTr/{case}{file_ending} and a
  dataset.json with channel_names, labels (name -> value), numTraining, file_ending; labels
  listing several values are regions (region-based training), which need regions_class_order;
- Medical Segmentation Decathlon (MSD): dataset.json with modality, labels (value -> name)
  and a training list of image/label paths; multi-modal images are 4D (channels last);
- plain pairs: images/ and masks/ holding files of the same names.
Only file names and dataset.json are read here; voxels are the preprocessing's business.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from nas.core.errors import NasError

# The dataset formats `data.format` names: a reader per layout (READERS), or "auto" to detect it.
Layout = Literal["auto", "nnunet", "msd", "pairs"]
NIFTI_ENDINGS = (".nii.gz", ".nii")


@dataclass(frozen=True)
class CaseFiles:
    name: str
    images: tuple[Path, ...]  # one 3D file per channel, or a single 4D file (channels last)
    label: Path


@dataclass(frozen=True)
class DatasetIndex:
    root: Path
    layout: str
    channel_names: tuple[str, ...]
    # Declared label values by name, background (0) included; None where only the masks can
    # tell (plain pairs).
    labels: dict[str, int] | None
    cases: tuple[CaseFiles, ...]
    # nnU-Net region-based training: region name -> the label values it covers, in the order
    # of dataset.json, and the value written where each is predicted (regions_class_order).
    regions: dict[str, tuple[int, ...]] | None = None
    regions_class_order: tuple[int, ...] | None = None


def _read_dataset_json(root: Path) -> dict:
    path = root / "dataset.json"
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise NasError(path, "not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise NasError(path, f"not valid JSON ({err})") from None
    if not isinstance(meta, dict):
        raise NasError(path, "must hold a JSON object")
    return meta


def _require(meta: dict, key: str, kind: type, path: Path):
    if key not in meta:
        raise NasError(path, f"missing required key {key!r}")
    if not isinstance(meta[key], kind):
        raise NasError(path, f"{key!r} must be a {kind.__name__}")
    return meta[key]


def _strip_ending(name: str, ending: str) -> str | None:
    return name[: -len(ending)] if name.endswith(ending) else None


def nifti_stem(name: str) -> str | None:
    """`name` without its .nii.gz or .nii ending; None for any other file."""
    return next((n for e in NIFTI_ENDINGS if (n := _strip_ending(name, e))), None)


def nifti_files(folder: Path) -> dict[str, Path]:
    """The NIfTI files of `folder` by case name; two giving one name are refused."""
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        name = nifti_stem(path.name)
        if name is not None and path.is_file():
            _refuse_duplicate(files.get(name), path, name)
            files[name] = path
    return files


def _inside(root: Path, relative: str, source: Path) -> Path:
    """`relative` resolved against root; refused if it leaves the dataset folder."""
    path = (root / relative).resolve()
    if not path.is_relative_to(root.resolve()):
        raise NasError(source, f"path {relative!r} leaves the dataset folder {root}")
    return path


def _is_label_value(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _nnunet_labels(
    meta: dict, path: Path
) -> tuple[dict[str, int], dict[str, tuple[int, ...]] | None, tuple[int, ...] | None]:
    """Label values by name and, where a label lists several values (nnU-Net's region-based
    training), the regions (background left out) and regions_class_order. Then every label
    is a region, a single value a region of one, and the classes are the distinct values
    (`label_<value>`). A one-value list is that value, as in nnU-Net."""
    labels = _require(meta, "labels", dict, path)
    declared: dict[str, tuple[int, ...]] = {}
    for name, value in labels.items():
        values = value if isinstance(value, list) else [value]
        if not values:
            raise NasError(path, f"label {name!r} lists no values")
        if not all(_is_label_value(v) for v in values):
            raise NasError(path, f"label {name!r} must be a non-negative integer or a list of them")
        if isinstance(value, list) and 0 in values:
            raise NasError(
                path, f"label {name!r} lists background (0); declare background as 0 alone"
            )
        declared[str(name)] = tuple(dict.fromkeys(values))  # duplicates dropped, order kept
    if not any(values == (0,) for values in declared.values()):
        raise NasError(path, "labels must declare background with value 0")
    if all(len(values) == 1 for values in declared.values()):
        return {name: values[0] for name, values in declared.items()}, None, None

    regions = {name: values for name, values in declared.items() if values != (0,)}
    several = next(name for name, values in regions.items() if len(values) > 1)
    order = meta.get("regions_class_order")
    if order is None:
        raise NasError(
            path,
            f"label {several!r} lists several values (region-based training), so "
            "regions_class_order is required: the label value written for each region, in order",
        )
    if not isinstance(order, list) or not all(_is_label_value(v) for v in order):
        raise NasError(path, "regions_class_order must be a list of label values")
    if len(order) != len(regions):
        raise NasError(
            path,
            f"regions_class_order has {len(order)} values for {len(regions)} regions "
            f"({', '.join(regions)})",
        )
    for (name, values), value in zip(regions.items(), order, strict=True):
        if value not in values:
            raise NasError(
                path,
                f"regions_class_order gives {value} for region {name!r}, which is not one of "
                f"its values {list(values)}",
            )
    found = sorted({v for values in regions.values() for v in values})
    return {"background": 0} | {f"label_{v}": v for v in found}, regions, tuple(order)


def _nnunet(root: Path) -> DatasetIndex:
    meta_path = root / "dataset.json"
    meta = _read_dataset_json(root)
    channels = _require(meta, "channel_names", dict, meta_path)
    ending = _require(meta, "file_ending", str, meta_path)
    try:
        channel_ids = sorted(int(key) for key in channels)
    except ValueError:
        raise NasError(meta_path, "channel_names keys must be channel numbers") from None
    if not channel_ids or channel_ids != list(range(len(channel_ids))):
        raise NasError(meta_path, "channel_names must number channels 0, 1, ... without gaps")
    labels, regions, regions_class_order = _nnunet_labels(meta, meta_path)

    label_names = {
        case: path
        for path in sorted((root / "labelsTr").glob(f"*{ending}"))
        if (case := _strip_ending(path.name, ending))
    }
    image_cases: dict[str, set[int]] = {}
    for path in sorted((root / "imagesTr").glob(f"*{ending}")):
        stem = _strip_ending(path.name, ending)
        case, _, channel = stem.rpartition("_")
        if not case or len(channel) != 4 or not channel.isdigit():
            raise NasError(path, "image names must end in _XXXX (the channel number)")
        image_cases.setdefault(case, set()).add(int(channel))
    unlabelled = sorted(set(image_cases) - set(label_names))
    if unlabelled:
        raise NasError(root / "imagesTr" / f"{unlabelled[0]}_0000{ending}", "image without a label")
    cases = []
    for case, label in label_names.items():
        if case not in image_cases:
            raise NasError(label, "label without an image in imagesTr")
        for channel in channel_ids:
            if channel not in image_cases[case]:
                missing = root / "imagesTr" / f"{case}_{channel:04d}{ending}"
                raise NasError(missing, f"missing: channel {channel} of case {case!r}")
        images = tuple(root / "imagesTr" / f"{case}_{c:04d}{ending}" for c in channel_ids)
        cases.append(CaseFiles(case, images, label))
    if not cases:
        raise NasError(root / "labelsTr", f"holds no label files ending in {ending}")
    declared = meta.get("numTraining")
    if declared is not None and declared != len(cases):
        raise NasError(meta_path, f"numTraining is {declared} but labelsTr holds {len(cases)}")
    return DatasetIndex(
        root,
        "nnunet",
        tuple(str(channels[str(c)]) for c in channel_ids),
        labels,
        tuple(cases),
        regions,
        regions_class_order,
    )


def _msd(root: Path) -> DatasetIndex:
    meta_path = root / "dataset.json"
    meta = _read_dataset_json(root)
    modality = _require(meta, "modality", dict, meta_path)
    labels = _require(meta, "labels", dict, meta_path)
    training = _require(meta, "training", list, meta_path)
    try:
        modality_ids = sorted(int(key) for key in modality)
        label_values = {str(name): int(value) for value, name in labels.items()}
    except ValueError:
        raise NasError(meta_path, "modality and labels keys must be numbers") from None
    if 0 not in label_values.values():
        raise NasError(meta_path, "labels must declare background with value 0")
    cases: dict[str, CaseFiles] = {}
    for i, entry in enumerate(training):
        if not isinstance(entry, dict) or not {"image", "label"} <= set(entry):
            raise NasError(meta_path, f"training[{i}] must have 'image' and 'label' paths")
        image = _inside(root, entry["image"], meta_path)
        label = _inside(root, entry["label"], meta_path)
        for path, what in ((image, "image"), (label, "label")):
            if not path.exists():
                raise NasError(path, f"listed as training[{i}].{what} in dataset.json but missing")
        name = nifti_stem(image.name) or image.name
        _refuse_duplicate(cases[name].images[0] if name in cases else None, image, name)
        cases[name] = CaseFiles(name, (image,), label)
    if not cases:
        raise NasError(meta_path, "the training list is empty")
    return DatasetIndex(
        root,
        "msd",
        tuple(str(modality[str(m)]) for m in modality_ids),
        label_values,
        tuple(cases.values()),
    )


def _refuse_duplicate(earlier: Path | None, path: Path, name: str) -> None:
    """Two files giving one case name would overwrite each other in the cache."""
    if earlier is not None:
        raise NasError(path, f"gives the same case name {name!r} as {earlier}; names must differ")


def _pairs(root: Path) -> DatasetIndex:
    images, masks = nifti_files(root / "images"), nifti_files(root / "masks")
    if unmatched := sorted(set(images) - set(masks)):
        raise NasError(images[unmatched[0]], "image without a mask of the same name in masks/")
    if unmatched := sorted(set(masks) - set(images)):
        raise NasError(masks[unmatched[0]], "mask without an image of the same name in images/")
    if not images:
        raise NasError(root / "images", "holds no NIfTI files")
    cases = tuple(CaseFiles(name, (images[name],), masks[name]) for name in images)
    return DatasetIndex(root, "pairs", ("image",), None, cases)


READERS = {"nnunet": _nnunet, "msd": _msd, "pairs": _pairs}


def detect_layout(root: Path) -> str:
    """The layout of an existing dataset folder, from dataset.json or its subfolders."""
    if (root / "dataset.json").exists():
        meta = _read_dataset_json(root)
        if "channel_names" in meta or "file_ending" in meta:
            return "nnunet"
        if "modality" in meta or "training" in meta:
            return "msd"
        raise NasError(
            root / "dataset.json",
            "neither nnU-Net v2 (channel_names, file_ending) nor MSD (modality, training)",
        )
    if (root / "images").is_dir() and (root / "masks").is_dir():
        return "pairs"
    raise NasError(
        root,
        "no dataset found: expected dataset.json (nnU-Net v2 or MSD) or images/ and masks/",
    )


def discover(root: Path, layout: Layout = "auto") -> DatasetIndex:
    """Index the cases under `root` in the given (or detected) layout."""
    if not root.is_dir():
        raise NasError(root, "dataset folder not found")
    layout = detect_layout(root) if layout == "auto" else layout
    return READERS[layout](root)


# A channel file of nnU-Net's naming: <case>_0000.nii.gz, <case>_0001.nii.gz, ...
CHANNEL_FILE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


@dataclass(frozen=True)
class Scan:
    name: str
    images: tuple[Path, ...]  # one file per channel, or a single (4D) file


def find_scans(source: Path, n_channels: int) -> list[Scan]:
    """The scans in a file or folder, channel files grouped by case."""
    if source.is_file():
        stem = nifti_stem(source.name)
        if stem is None:
            raise NasError(source, "not a NIfTI file (.nii or .nii.gz)")
        match = CHANNEL_FILE.match(stem)
        name = match["case"] if match and match["channel"] == "0000" else stem
        return [Scan(name, (source,))]
    if not source.is_dir():
        raise NasError(source, "not found")
    groups: dict[str, dict[int, Path]] = {}
    singles = []
    for path in sorted(source.iterdir()):
        stem = nifti_stem(path.name)
        if stem is not None and path.is_symlink() and not path.exists():
            raise NasError(path, "is a link to a file that does not exist")
        if stem is None or not path.is_file():
            continue
        match = CHANNEL_FILE.match(stem)
        if match:
            groups.setdefault(match["case"], {})[int(match["channel"])] = path
        else:
            singles.append(Scan(stem, (path,)))
    scans = list(singles)
    for case, channels in groups.items():
        if n_channels == 1 and len(channels) == 1 and 0 not in channels:
            channel, path = next(iter(channels.items()))  # a lone `name_1234`: a plain name
            scans.append(Scan(f"{case}_{channel:04d}", (path,)))
            continue
        expected = list(range(n_channels))
        if sorted(channels) != expected:
            first = next(iter(channels.values()))
            raise NasError(
                first,
                f"case {case!r} has channel files {sorted(channels)}; the model takes "
                f"{n_channels} ({', '.join(f'_{c:04d}' for c in expected)})",
            )
        scans.append(Scan(case, tuple(channels[c] for c in expected)))
    if not scans:
        raise NasError(source, "holds no .nii or .nii.gz file")
    by_name: dict[str, Scan] = {}
    for scan in scans:  # x.nii and x.nii.gz would both write x.nii.gz
        if scan.name in by_name:
            first, second = by_name[scan.name].images[0], scan.images[0]
            raise NasError(second, f"is case {scan.name!r} again (as {first.name}): one mask each")
        by_name[scan.name] = scan
    return sorted(scans, key=lambda s: s.name)
