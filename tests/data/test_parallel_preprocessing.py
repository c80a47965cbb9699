"""Preprocessing in several processes: the same cache byte for byte as one process writes, as
many workers as the memory holds, one line saying what it took, and a bad case or a bad
`--processes` refused in one line with nothing left behind."""

from __future__ import annotations

import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from nas.core.errors import NasError
from nas.data import DataConfig, load_dataset
from nas.data.cache import worker_count
from nas.data.layouts import discover
from nas.data.plan import make_plan
from nas.data.preprocess import footprint_bytes, preprocess_case
from tests import datasets
from tests.conftest import run_cli, tiny_space_yaml, user_error

GB = 10**9


def _build(root: Path, cache: Path, processes: int):
    # A target spacing other than the files': every case is resampled too.
    cfg = DataConfig(path=root, cache_dir=cache, n_folds=2, target_spacing_mm=(1.0, 1.0, 2.0))
    return load_dataset(cfg, processes=processes)


def _files(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def test_processes_write_byte_for_byte_what_one_process_writes(tmp_path, capsys):
    root = datasets.write_nnunet(tmp_path / "ds", n_cases=4)
    one = _build(root, tmp_path / "one", processes=1)
    assert "preprocessed 4 cases in" in capsys.readouterr().out
    two = _build(root, tmp_path / "two", processes=2)
    line = capsys.readouterr().out.strip()
    assert line.startswith("preprocessed 4 cases in") and "with 2 processes" in line, line
    assert "peak memory" in line and "each worker up to" in line
    assert one.cache.name == two.cache.name
    one_files, two_files = _files(one.cache), _files(two.cache)
    assert len(one_files) == 2 * 4 + 1  # an image and a label per case, and the manifest
    assert one_files == two_files
    _build(root, tmp_path / "two", processes=2)  # cached: opened, not built again
    assert "preprocessed" not in capsys.readouterr().out


def test_a_bad_case_in_a_worker_is_one_error_naming_its_file(tmp_path):
    root = datasets.write_nnunet(tmp_path / "ds", n_cases=4)
    bad = root / "imagesTr" / "case_002_0001.nii.gz"
    channel = np.asanyarray(nib.load(bad).dataobj).astype(np.float32)
    channel[3, 4, 5] = np.nan
    datasets.save(channel, bad)
    with pytest.raises(NasError, match="holds NaN or infinite voxels") as error:
        _build(root, tmp_path / "cache", processes=2)
    assert error.value.source == str(bad)
    assert not [p for p in (tmp_path / "cache").iterdir() if p.is_dir()], "a cache was left"


def test_workers_are_as_many_as_asked_cases_and_memory_allow():
    assert worker_count(4, 40, footprint=GB // 10, available=64 * GB) == 4
    assert worker_count(8, 3, footprint=GB // 10, available=64 * GB) == 3
    # Half the available memory, 8 GB, holds 3 workers of 2 GB and their interpreters.
    assert worker_count(8, 40, footprint=2 * GB, available=16 * GB) == 3
    assert worker_count(8, 40, footprint=20 * GB, available=16 * GB) == 1  # never none


def _scaled_int16(root: Path) -> Path:
    """A pairs dataset of one int16 image whose header scales it (read as float64 first)."""
    rng = np.random.default_rng(0)
    shape = (96, 80, 40)
    image = nib.Nifti1Image(rng.integers(0, 3000, shape, dtype=np.int16), datasets.affine())
    image.header.set_slope_inter(0.5, 10.0)
    (root / "images").mkdir(parents=True)
    nib.save(image, root / "images" / "case.nii.gz")
    label = np.zeros(shape, np.uint8)
    label[40:50, 30:40, 10:20] = 1
    datasets.save(label, root / "masks" / "case.nii.gz")
    return root


def _large_nnunet(root: Path) -> Path:
    """Two float32 channels of 96 x 96 x 40 voxels, LPS (reoriented on reading)."""
    return datasets.write_nnunet(root, 1, lambda i, _: datasets.make_case(i, (96, 96, 40)))


@pytest.mark.parametrize("write", [_scaled_int16, _large_nnunet])
def test_the_footprint_estimate_bounds_what_preprocessing_allocates(write, tmp_path):
    index = discover(write(tmp_path / "ds"), "auto")
    plan, _ = make_plan(index, None, None, (1.0, 1.0, 2.0), "auto")
    case = index.cases[0]
    estimate = footprint_bytes(case, len(index.channel_names), plan)
    tracemalloc.start()
    try:
        image, _, _ = preprocess_case(case, len(index.channel_names), plan)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert image.nbytes < peak <= estimate


def test_processes_must_be_a_positive_count(tmp_path, tiny_dataset):
    (tmp_path / "space.yaml").write_text(tiny_space_yaml(tiny_dataset))
    cache = tmp_path / "cache"
    for value in ("0", "-2"):
        result = run_cli("nas.run", "space.yaml", "--dry-run", "--processes", value,
                         "--set", f"data.cache_dir={cache}", cwd=tmp_path)  # fmt: skip
        assert user_error(result) == f"error: --processes: must be at least 1, not {value}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["space.yaml"]  # nothing written


BUILD = """
import sys
from pathlib import Path
from nas.data import DataConfig, load_dataset

if __name__ == "__main__":
    load_dataset(DataConfig(path=Path(sys.argv[1]), cache_dir=Path(sys.argv[2]), n_folds=2),
                 processes=2)
"""


def test_two_builds_at_once_make_one_cache(tmp_path):
    root = datasets.write_nnunet(tmp_path / "ds", n_cases=4)
    script = tmp_path / "build.py"
    script.write_text(BUILD)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    command = [sys.executable, str(script), str(root), str(tmp_path / "cache")]
    builds = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True)
              for _ in range(2)]  # fmt: skip
    outputs = [build.communicate(timeout=120)[0] for build in builds]
    assert [build.returncode for build in builds] == [0, 0]
    assert sum(out.count("preprocessed 4 cases") for out in outputs) == 1  # the other waited
    (folder,) = (tmp_path / "cache").glob("ds-*/")
    assert len(list(folder.glob("*.npy"))) == 8
    assert not list((tmp_path / "cache").glob(".*/"))  # no staging folder left
