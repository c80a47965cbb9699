"""Preprocess a dataset once into memory-mapped .npy files that every trial and worker reuses.

The cache folder is keyed by a hash of the inputs (paths, sizes, modification times, the
content of dataset.json) and the settings, so a second run reads no NIfTI file unless one of
them changed. It is built case by case, by several processes at once as nnU-Net does (each
holds one case at a time, and no more of them run than the memory available holds at the
largest case's estimated footprint), into a staging folder that is renamed into place when
complete, every file flushed to disk first, under a file lock: two processes building at
once never see half a cache, and the second one simply opens what the first built. What the
workers write is byte for byte what one process writes. The manifest records each array's
shape and type, so a cache damaged later (a file cut short by a full disk, say) is noticed on
opening and rebuilt.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import multiprocessing
import multiprocessing.context
import os
import signal
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
from tqdm import tqdm

from nas.core.errors import NasError
from nas.core.locking import file_lock
from nas.core.resources import (
    HOST_SHARE,
    available_cores,
    available_host_bytes,
    format_gb,
    peak_rss_bytes,
)
from nas.core.staging import (
    check_output_folder,
    remove_stale_staging,
    replace_folder,
    staging_folder,
)
from nas.data.labels import LabelScheme
from nas.data.layouts import CaseFiles, DatasetIndex
from nas.data.plan import make_plan
from nas.data.preprocess import CasePlan, footprint_bytes, preprocess_case

# Bump when preprocessing changes what it writes, so older caches are not reused.
CACHE_VERSION = 3
# Preprocessing processes by default: nnU-Net's default for 3D, beyond which the disk, not
# the cores, usually sets the pace.
MAX_DEFAULT_PROCESSES = 8
# Below this estimated memory of all cases together (`footprint_bytes`), a dataset is
# preprocessed in one process: seconds of work, less than starting workers would save.
SERIAL_BELOW_BYTES = 10**9
# A worker's own resident memory before its first case: an interpreter with numpy, scipy
# and nibabel loaded (about 75 MB measured on Linux), with room to spare.
WORKER_BASE_BYTES = 150 * 10**6


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
    scheme: LabelScheme  # the foreground classes (class index 1..K) and any regions of them
    cases: tuple[Case, ...]
    cache: Path
    plan: CasePlan  # how every case was prepared: what a new scan must go through too
    source_channel_names: tuple[str, ...]  # every channel a case provides, in file order

    @property
    def in_channels(self) -> int:
        return len(self.channel_names)

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.scheme.class_names

    @property
    def n_classes(self) -> int:
        """Foreground classes (what the network outputs is the scheme's business)."""
        return self.scheme.n_classes


def default_cache_root() -> Path:
    return Path(os.environ.get("NAS_CACHE_DIR", Path.home() / ".cache" / "nas"))


def cache_key(index: DatasetIndex, settings: dict) -> str:
    """Hash of every input file's path, size and mtime, of dataset.json's content (it names
    the channels, which choose their normalisation, and the labels) and of the settings."""
    files = []
    for case in index.cases:
        for path in (*case.images, case.label):
            stat = path.stat()
            files.append([str(path.resolve()), stat.st_size, stat.st_mtime_ns])
    meta = index.root / "dataset.json"
    # By content, not mtime: an edit within the filesystem's mtime granularity still counts.
    meta_hash = hashlib.sha256(meta.read_bytes()).hexdigest() if meta.is_file() else None
    blob = json.dumps(
        {
            "version": CACHE_VERSION,
            "layout": index.layout,
            "files": files,
            "dataset_json": meta_hash,
            "settings": settings,
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


@contextmanager
def _synced(path: Path) -> Iterator[IO[bytes]]:
    """A new file to write, flushed to disk on leaving the block: the rename that publishes
    the cache must not reach the disk before the data does, or a crash could leave a
    complete-looking cache of zeros."""
    with open(path, "wb") as handle:
        yield handle
        handle.flush()
        os.fsync(handle.fileno())


def _array_entry(array: np.ndarray) -> dict:
    return {"shape": list(array.shape), "dtype": array.dtype.str}


def default_processes() -> int:
    """One preprocessing process per core this process may run on, at most
    MAX_DEFAULT_PROCESSES."""
    return max(1, min(available_cores(), MAX_DEFAULT_PROCESSES))


def worker_count(asked: int, n_cases: int, footprint: int, available: int) -> int:
    """Processes to preprocess with: `asked`, no more than there are cases, nor than fit in
    HOST_SHARE of the `available` bytes when each holds the interpreter and the largest
    case's `footprint` at once; at least one."""
    fit = int(HOST_SHARE * available) // (WORKER_BASE_BYTES + footprint)
    return max(1, min(asked, n_cases, fit))


@dataclass(frozen=True)
class BuildReport:
    """How a cache was built: what the run prints."""

    cases: int
    seconds: float
    processes: int
    asked: int  # the processes asked for: more than `processes` when memory capped them
    own_peak_bytes: int  # this process's peak resident memory
    worker_peak_bytes: tuple[int, ...]  # each worker process's, none for one process

    def describe(self) -> str:
        peak = self.own_peak_bytes + sum(self.worker_peak_bytes)
        line = (
            f"preprocessed {self.cases} cases in {self.seconds:.1f} s with {self.processes} "
            f"process{'es' if self.processes > 1 else ''}"
        )
        if self.processes < self.asked:
            line += f" (of {self.asked} asked: that many fit in the memory available)"
        line += f", peak memory {format_gb(peak)}"
        if self.worker_peak_bytes:
            line += (
                f" (this process {format_gb(self.own_peak_bytes)}, each worker up to "
                f"{format_gb(max(self.worker_peak_bytes))})"
            )
        return line


def _preprocess_into(
    case: CaseFiles, n_channels: int, plan: CasePlan, staging: Path
) -> tuple[dict, int, int]:
    """Preprocess one case into `staging`: its manifest entry, the process's id and its peak
    resident memory so far. Run in this process or in a worker."""
    image, label, source_spacing = preprocess_case(case, n_channels, plan)
    for kind, array in (("image", image), ("label", label)):
        with _synced(staging / f"{case.name}_{kind}.npy") as handle:
            np.save(handle, array)
    entry = {
        "name": case.name,
        "image": _array_entry(image),
        "label": _array_entry(label),
        "source_spacing": source_spacing,
    }
    return entry, os.getpid(), peak_rss_bytes()


def _ignore_interrupts() -> None:
    """A worker's start: Ctrl-C reaches the whole process group, and it is the parent's to
    handle (it stops handing out cases and waits for those in flight)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _pool_context() -> multiprocessing.context.BaseContext:
    """Fresh interpreters for the workers: forking a process that has loaded torch (or any
    threads) can deadlock; a fork server is cheaper per worker than spawning where it exists."""
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    return multiprocessing.get_context(method)


def _preprocess_all(
    index: DatasetIndex, plan: CasePlan, staging: Path, processes: int
) -> tuple[list[dict], dict[int, int]]:
    """Every case preprocessed into `staging` by `processes` processes: the manifest entries
    in the index's order, and each worker's peak resident memory by process id."""
    run = functools.partial(
        _preprocess_into, n_channels=len(index.channel_names), plan=plan, staging=staging
    )
    # leave=False: on an error, the one-line message is what stays on the screen.
    progress = tqdm(
        total=len(index.cases), desc=f"preprocessing {index.root.name}", unit="case", leave=False
    )
    entries: list[dict] = [{}] * len(index.cases)
    with contextlib.closing(progress):
        if processes == 1:
            for position, case in enumerate(index.cases):
                entries[position] = run(case)[0]
                progress.update()
            return entries, {}
        peaks: dict[int, int] = {}
        pool = ProcessPoolExecutor(processes, _pool_context(), initializer=_ignore_interrupts)
        try:
            futures = {pool.submit(run, case): i for i, case in enumerate(index.cases)}
            for future in as_completed(futures):
                entry, pid, peak = future.result()
                entries[futures[future]] = entry
                peaks[pid] = max(peak, peaks.get(pid, 0))
                progress.update()
        except BrokenProcessPool:
            raise NasError(
                index.root,
                f"a preprocessing process died (killed for memory?); try --processes "
                f"{max(1, processes // 2)}",
            ) from None
        finally:  # on an error or Ctrl-C, no new case starts; those in flight finish
            pool.shutdown(wait=True, cancel_futures=True)
    return entries, peaks


def _build(index: DatasetIndex, settings: dict, folder: Path, processes: int | None) -> BuildReport:
    start = time.perf_counter()
    plan, scheme = make_plan(index, **settings)
    n_channels = len(index.channel_names)
    footprints = [footprint_bytes(case, n_channels, plan) for case in index.cases]
    if processes is None:  # a small dataset takes less time in one process than starting more
        small = sum(footprints) < SERIAL_BELOW_BYTES
        asked = 1 if small else default_processes()
    else:
        asked = processes
    workers = worker_count(asked, len(index.cases), max(footprints), available_host_bytes())
    with staging_folder(folder) as staging:
        cases, worker_peaks = _preprocess_all(index, plan, staging, workers)
        manifest = {
            "root": str(index.root),
            "layout": index.layout,
            "channel_names": [index.channel_names[c] for c in plan.channels],
            "source_channel_names": list(index.channel_names),
            "class_names": list(scheme.class_names),
            "plan": plan.model_dump(mode="json"),
            "cases": cases,
        }
        # Only for a region-based dataset: a plain one's manifest is as before.
        manifest |= {k: v for k, v in scheme.describe().items() if k != "labels"}
        # Written last: its presence marks a complete cache.
        with _synced(staging / "manifest.json") as handle:
            handle.write(json.dumps(manifest, indent=1).encode())
        replace_folder(staging, folder)
    return BuildReport(
        len(index.cases),
        time.perf_counter() - start,
        workers,
        min(asked, len(index.cases)),
        peak_rss_bytes(),
        tuple(worker_peaks.values()),
    )


def _why(err: Exception) -> str:
    return " ".join(f"{type(err).__name__}: {err}".split())  # one line, whatever numpy says


def _load_array(path: Path, entry: dict) -> np.ndarray:
    """The memory-mapped array at `path`, checked against its manifest entry; NasError if the
    file is unreadable, of another shape or type, or not exactly as long as they require."""
    try:
        array = np.lib.format.open_memmap(path, mode="r")
        expected = (tuple(entry["shape"]), np.dtype(entry["dtype"]))
        size = path.stat().st_size
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise NasError(path, f"unreadable cache file ({_why(err)})") from None
    if (array.shape, array.dtype) != expected:
        raise NasError(
            path,
            f"holds {array.dtype} {array.shape}; the manifest says {expected[1]} {expected[0]}",
        )
    if size != array.offset + array.nbytes:  # open_memmap refuses a short file, not a long one
        raise NasError(path, f"is {size} bytes long, not {array.offset + array.nbytes}")
    return array


def open_cache(folder: Path, root: Path) -> Dataset:
    """The dataset cached in `folder` (of the dataset at `root`); a NasError naming the file if
    the manifest or an array is damaged."""
    manifest_path = folder / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
        entries = [(entry["name"], entry["image"], entry["label"]) for entry in manifest["cases"]]
        case_plan = CasePlan.model_validate(manifest["plan"])
        channel_names = tuple(manifest["channel_names"])
        scheme = LabelScheme.build(
            case_plan.class_of_value,
            tuple(manifest["class_names"]),
            manifest.get("regions"),
            manifest.get("regions_class_order"),
        )
        source_channel_names = tuple(manifest["source_channel_names"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise NasError(manifest_path, f"unreadable cache manifest ({_why(err)})") from None
    cases = tuple(
        Case(
            name,
            _load_array(folder / f"{name}_image.npy", image),
            _load_array(folder / f"{name}_label.npy", label),
            case_plan.target_spacing_mm,
        )
        for name, image, label in entries
    )
    return Dataset(root, channel_names, scheme, cases, folder, case_plan, source_channel_names)


def cached_dataset(
    index: DatasetIndex,
    settings: dict,
    cache_root: Path | None = None,
    *,
    processes: int | None = None,
) -> Dataset:
    """Open the preprocessed dataset, building it first if this exact one is not cached, or
    rebuilding it (once) if it is damaged; a build prints one line (`BuildReport`).

    processes: how many processes preprocess the cases (capped by the cases and the memory
    available); default: one per core up to MAX_DEFAULT_PROCESSES, or one for a dataset
    whose cases need less than SERIAL_BELOW_BYTES in all. Workers are fresh interpreters
    that import the calling script, as multiprocessing's do: a script that builds a cache
    keeps its work under `if __name__ == "__main__":`."""
    if processes is not None and processes < 1:
        raise ValueError(f"processes must be at least 1, got {processes}")
    cache_root = cache_root or default_cache_root()
    check_output_folder(cache_root)
    folder = cache_root / f"{index.root.name}-{cache_key(index, settings)[:16]}"
    if (folder / "manifest.json").exists():
        try:
            return open_cache(folder, index.root)
        except NasError:
            pass  # checked again under the lock: another process may be rebuilding it
    with file_lock(cache_root / f"{folder.name}.lock"):
        if (folder / "manifest.json").exists():  # another process may have built or repaired it
            try:
                return open_cache(folder, index.root)
            except NasError as err:
                print(f"rebuilding the preprocessing cache: {err}", file=sys.stderr)
        remove_stale_staging(cache_root)  # what builds killed on this host left behind
        report = _build(index, settings, folder, processes)
    print(report.describe(), flush=True)
    return open_cache(folder, index.root)
