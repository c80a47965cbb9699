"""Peak memory of a command given input that asks for a huge allocation, against the same
command on a valid input: a 16^3 scan whose 1000 mm voxels make a grid of 16,000^3 at the
model's 1 mm (`nas predict`; --huge-spacing-mm 70 makes it 1,120^3, tens of GB, which numpy
would start to fill), a saved-probability file whose array header claims 3 x 40,000^3 float32
(`nas ensemble`), and `--threads 100000` (`nas run --dry-run`, against `--threads 1`).

Each command runs in a fresh process started by a fresh runner process, whose
RUSAGE_CHILDREN ru_maxrss is the peak resident memory of the command's process tree. Prints,
per case, the exit code and peak of the valid and the bad input, the bad one's first line on
stderr, and the bad peak minus the valid one. The bound issue 35 sets: under 500 MB more.

    python benchmarks/allocation_guard.py [--workdir DIR] [--cases predict,ensemble,threads]
                                          [--huge-spacing-mm MM]

Everything it writes goes under --workdir (default: a temporary folder), the preprocessing
cache of the dry runs included.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from nas.deploy.probabilities import label_description, save
from nas.network.builder import build_unet
from nas.network.model_card import (
    WEIGHTS_FILE,
    Inference,
    ModelCard,
    Normalization,
    Preprocessing,
    read_card,
    write_card,
)
from nas.network.unet_config import UNetConfig

BOUND_MB = 500
SHAPE = (16, 16, 16)
# Runs the command given as JSON and prints its exit code and its tree's peak RSS in bytes.
RUNNER = """
import json, resource, subprocess, sys
done = subprocess.run(json.loads(sys.argv[1]), capture_output=True, text=True)
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps([done.returncode, peak * (1 if sys.platform == "darwin" else 1024),
                  done.stderr.strip().splitlines()[-1:]]))
"""


def measure(command: list[str], cwd: Path, env: dict[str, str]) -> tuple[int, int, str]:
    """Exit code, peak resident bytes and last stderr line of `command` run in `cwd`."""
    done = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(command)], cwd=cwd,
                          env=env, capture_output=True, text=True, check=True)  # fmt: skip
    code, peak, last = json.loads(done.stdout)
    return code, peak, (last or [""])[0]


def write_scan(path: Path, spacing_mm: float) -> Path:
    voxels = np.random.default_rng(0).random(SHAPE).astype(np.float32) + 0.5
    nib.save(nib.Nifti1Image(voxels, np.diag([spacing_mm] * 3 + [1.0])), path)
    return path


def write_model(folder: Path) -> Path:
    """A model folder as nas export writes one: a one-stage 3D network at 1 mm."""
    folder.mkdir(parents=True)
    unet = UNetConfig(spatial_dims=3, in_channels=1, out_channels=3, depth=1, base_channels=2)
    card = ModelCard(
        architecture=unet.to_dict(),
        preprocessing=Preprocessing(
            input_channels=("MRI",), channels=(0,), target_spacing_mm=(1.0, 1.0, 1.0),
            normalization=(Normalization(),),
        ),
        inference=Inference(
            spatial_dims=3, slice_axis=2, patch_size=SHAPE, size_multiple=unet.size_multiple,
            output="softmax",
        ),
        labels={"background": 0, "core": 1, "edge": 2},
        source={"made_by": "benchmarks/allocation_guard.py"},
    )  # fmt: skip
    write_card(folder, card)
    torch.manual_seed(0)
    torch.save(build_unet(unet).state_dict(), folder / WEIGHTS_FILE)
    return folder


def predict_case(work: Path, huge_spacing_mm: float) -> tuple[list[str], list[str]]:
    model = write_model(work / "model")
    valid = write_scan(work / "valid.nii.gz", 1.0)
    huge = write_scan(work / "huge.nii.gz", huge_spacing_mm)
    nas = [sys.executable, "-m", "nas", "predict", str(model)]
    return [*nas, str(valid), "out/valid.nii.gz"], [*nas, str(huge), "out/huge.nii.gz"]


def lie_about(path: Path, shape: tuple[int, ...]) -> None:
    """Rewrite the probabilities' .npy header in the .npz at `path` to claim `shape`."""
    with zipfile.ZipFile(path) as archive:
        contents = {name: archive.read(name) for name in archive.namelist()}
    stream = io.BytesIO(contents["probabilities.npy"])
    np.lib.format.read_magic(stream)
    _, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
    header = io.BytesIO()
    descr = np.lib.format.dtype_to_descr(dtype)
    np.lib.format.write_array_header_1_0(
        header, {"descr": descr, "fortran_order": fortran, "shape": shape}
    )
    contents["probabilities.npy"] = header.getvalue() + stream.read()
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, content in contents.items():
            archive.writestr(name, content)


def ensemble_case(work: Path, huge_spacing_mm: float) -> tuple[list[str], list[str]]:
    model = write_model(work / "model")
    image = nib.load(write_scan(work / "scan.nii.gz", 1.0))
    labels = label_description(read_card(model))
    for seed, name in ((1, "a"), (2, "b")):
        logits = torch.from_numpy(np.random.default_rng(seed).normal(size=(3, *SHAPE)))
        (work / name).mkdir()
        save(work / name / "case.npz", torch.softmax(logits, 0).numpy(), image, labels)
    shutil.copytree(work / "b", work / "liar")
    lie_about(work / "liar" / "case.npz", (3, 40000, 40000, 40000))
    nas = [sys.executable, "-m", "nas", "ensemble", str(work / "a")]
    return [*nas, str(work / "b"), "masks_valid"], [*nas, str(work / "liar"), "masks_liar"]


SPACE = """\
data:
  path: {data}
  synthetic: {{n_cases: 6, shape: [32, 32, 16], spacing_mm: [1.5, 1.5, 3.0], seed: 3}}
  n_folds: 3
search:
  spatial_dims: 2
  depth: 2
  base_channels: 4
train:
  epochs: 1
  batches_per_epoch: 2
  batch_size_2d: 4
  patch_size_2d: [32, 32]
study:
  name: threads
  n_trials: 1
"""


def threads_case(work: Path, huge_spacing_mm: float) -> tuple[list[str], list[str]]:
    (work / "space.yaml").write_text(SPACE.format(data=work / "tiny"))
    nas = [sys.executable, "-m", "nas", "run", "space.yaml", "--dry-run", "--threads"]
    return [*nas, "1"], [*nas, "100000"]


CASES = {"predict": predict_case, "ensemble": ensemble_case, "threads": threads_case}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated, of " +
                        ", ".join(CASES))  # fmt: skip
    parser.add_argument(
        "--huge-spacing-mm", type=float, default=1000.0,
        help="the voxel size of the predict case's bad scan (default 1000)",
    )  # fmt: skip
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="allocation_guard_"))
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, NAS_CACHE_DIR=str(work / "cache"))
    print(f"{'case':<9} {'valid: code, peak':>18} {'bad: code, peak':>16} {'bad - valid':>12}")
    worst = None
    for name in args.cases.split(","):
        folder = work / name
        folder.mkdir()
        valid, bad = CASES[name](folder, args.huge_spacing_mm)
        valid_code, valid_peak, _ = measure(valid, folder, env)
        bad_code, bad_peak, line = measure(bad, folder, env)
        extra_mb = (bad_peak - valid_peak) / 1e6
        worst = extra_mb if worst is None else max(worst, extra_mb)
        print(f"{name:<9} {valid_code:>5}, {valid_peak / 1e6:7.0f} MB {bad_code:>5}, "
              f"{bad_peak / 1e6:7.0f} MB {extra_mb:+9.0f} MB")  # fmt: skip
        print(textwrap.indent(line, "          "))
    if worst is not None:
        verdict = "within" if worst < BOUND_MB else "BEYOND"
        print(f"largest extra peak: {worst:+.0f} MB, {verdict} the {BOUND_MB} MB bound")


if __name__ == "__main__":
    main()
