"""Preprocess a dataset once into memory-mapped .npy files that every trial and worker reuses.

The cache folder is keyed by a hash of the inputs (paths, sizes, modification times) and the
settings, so a second run reads no NIfTI file unless one of them changed. It is built case by
case (peak memory a few cases, never the dataset) into a temporary folder that is renamed
into place when complete, under a file lock: two processes building at once never see half
a cache, and the second one simply opens what the first built.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from nas.data.layouts import DatasetIndex
from nas.data.plan import make_plan
from nas.data.preprocess import CasePlan, ChannelNorm, preprocess_case
from nas.locking import file_lock

# Bump when preprocessing changes what it writes, so older caches are not reused.
CACHE_VERSION = 2


@dataclass(frozen=True)
class Case:
    name: str
    image: np.ndarray  # (C, X, Y, Z) float32, RAS, normalised; memory-mapped from the cache
    label: np.ndarray  # (X, Y, Z) uint8 class indices, 0 = background
    spacing_mm: tuple[float, float, float]


@dataclass(frozen=True)
class Dataset:
    root: Path
    channel_names: tuple[str, ...]  # the channels the network gets, in order
    class_names: tuple[str, ...]  # foreground classes, class index 1..K
    cases: tuple[Case, ...]
    cache: Path
    plan: CasePlan  # how every case was prepared: what a new scan must go through too
    source_channel_names: tuple[str, ...]  # every channel a case provides, in file order

    @property
    def in_channels(self) -> int:
        return len(self.channel_names)

    @property
    def n_classes(self) -> int:
        """Foreground classes; the network has one sigmoid output when there is just one."""
        return len(self.class_names)


def default_cache_root() -> Path:
    return Path(os.environ.get("NAS_CACHE_DIR", Path.home() / ".cache" / "nas"))


def cache_key(index: DatasetIndex, settings: dict) -> str:
    """Hash of every input file's path, size and mtime, and of the settings."""
    files = []
    for case in index.cases:
        for path in (*case.images, case.label):
            stat = path.stat()
            files.append([str(path.resolve()), stat.st_size, stat.st_mtime_ns])
    blob = json.dumps(
        {"version": CACHE_VERSION, "layout": index.layout, "files": files, "settings": settings},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def _build(index: DatasetIndex, settings: dict, folder: Path) -> None:
    plan, class_names = make_plan(index, **settings)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        cases = []
        # leave=False: on an error, the one-line message is what stays on the screen.
        progress = tqdm(
            index.cases, desc=f"preprocessing {index.root.name}", unit="case", leave=False
        )
        for case in progress:
            image, label, source_spacing = preprocess_case(case, len(index.channel_names), plan)
            np.save(staging / f"{case.name}_image.npy", image)
            np.save(staging / f"{case.name}_label.npy", label)
            cases.append(
                {"name": case.name, "shape": list(image.shape), "source_spacing": source_spacing}
            )
        manifest = {
            "root": str(index.root),
            "layout": index.layout,
            "channel_names": [index.channel_names[c] for c in plan.channels],
            "source_channel_names": list(index.channel_names),
            "class_names": list(class_names),
            "plan": dataclasses.asdict(plan)
            | {"class_of_value": {str(k): v for k, v in plan.class_of_value.items()}},
            "cases": cases,
        }
        # Written last: its presence marks a complete cache.
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=1))
        shutil.rmtree(folder, ignore_errors=True)  # an incomplete leftover, if any
        os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _open(folder: Path, root: Path) -> Dataset:
    manifest = json.loads((folder / "manifest.json").read_text())
    spacing = tuple(manifest["plan"]["target_spacing_mm"])
    cases = tuple(
        Case(
            entry["name"],
            np.load(folder / f"{entry['name']}_image.npy", mmap_mode="r"),
            np.load(folder / f"{entry['name']}_label.npy", mmap_mode="r"),
            spacing,
        )
        for entry in manifest["cases"]
    )
    plan = manifest["plan"]
    return Dataset(
        root,
        tuple(manifest["channel_names"]),
        tuple(manifest["class_names"]),
        cases,
        folder,
        CasePlan(
            tuple(plan["channels"]),
            tuple(
                ChannelNorm(norm["clip"] and tuple(norm["clip"]), norm["mean"], norm["std"])
                for norm in plan["norms"]
            ),
            {int(value): k for value, k in plan["class_of_value"].items()},
            tuple(plan["target_spacing_mm"]),
        ),
        tuple(manifest["source_channel_names"]),
    )


def cached_dataset(index: DatasetIndex, settings: dict, cache_root: Path | None = None) -> Dataset:
    """Open the preprocessed dataset, building it first if this exact one is not cached."""
    cache_root = cache_root or default_cache_root()
    folder = cache_root / f"{index.root.name}-{cache_key(index, settings)[:16]}"
    if not (folder / "manifest.json").exists():
        with file_lock(cache_root / f"{folder.name}.lock"):
            if not (folder / "manifest.json").exists():  # another process may have built it
                _build(index, settings, folder)
    return _open(folder, index.root)
