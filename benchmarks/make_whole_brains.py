"""Build a whole-brain 3D stroke-lesion-like dataset in nnU-Net v2 raw layout.

Why: the motivating study segments stroke lesions on whole 1 mm T1 brains, a task far larger
(8.7 M voxels a case) and far more imbalanced (lesions ~0.15 % of voxels) than the coronal
slabs of Dataset902_MNIWM. This script makes a search at that real size measurable offline.
The only real brain to hand is the ICBM 2009a nonlinear symmetric MNI152 template that the
nilearn wheel ships (T1, white- and grey-matter probability maps, 197x233x189, 1 mm, RAS,
uint8 0..255), so every case is that brain given:

* 1 to 3 stroke-like lesions: irregular blobs (an ellipsoid roughened by Gaussian-smoothed
  noise, thresholded to a target volume) centred in white matter (WM map >= 0.5) and confined
  to brain tissue (WM + GM map >= 0.5), together ~0.1-0.2 % of the volume; lesion voxels are
  hypointense (40-60 % of the local intensity, a little texture inside) with a soft edge;
* its own pose: a rigid rotation of up to 5 degrees about a random axis through the volume's
  centre and a shift of up to 3 mm per axis (image linear, label nearest);
* its own acquisition: a smooth multiplicative bias field, gamma and Rician noise.

The whole volume and the template's affine are kept. Label: uint8, 1 = lesion. Image: int16.
The last --n-test cases are held out in imagesTs/ + labelsTs/; there is no splits file (the
search draws its own folds). Each case is seeded from (--seed, its index), so the output is
deterministic for a given --seed whatever --workers is.

Get the template files (no internet needed beyond the package registry), from the project root:
    pip download --no-deps nilearn -d data/nilearn_whl
    (cd data/nilearn_whl && unzip -q -o nilearn-*.whl 'nilearn/datasets/data/*')
    python benchmarks/make_whole_brains.py --nilearn-data data/nilearn_whl/nilearn/datasets/data \
        --out data/Dataset903_WholeBrainLesion [--n-cases 40] [--n-test 8] [--seed 0] [--workers 2]

Writes imagesTr/, labelsTr/, imagesTs/, labelsTs/, dataset.json and manifest.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

T1_FILE = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
WM_FILE = "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz"
GM_FILE = "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz"
THRESHOLD = 128  # p >= 0.5 on the uint8 probability maps
LESION_FRACTION = (0.0011, 0.0019)  # of all voxels, all lesions of a case together
LESION_FACTOR = (0.4, 0.6)  # lesion intensity / local intensity
MAX_ROTATION_DEG = 5.0
MAX_SHIFT_MM = 3.0
MIN_FRAGMENT = 20  # voxels; smaller detached bits of a lesion are dropped

_TEMPLATE: dict = {}  # filled once per process by _load_template


def _load_template(folder: Path) -> None:
    t1_img = nib.load(folder / T1_FILE)
    wm = np.asarray(nib.load(folder / WM_FILE).dataobj)
    gm = np.asarray(nib.load(folder / GM_FILE).dataobj)
    t1 = np.asarray(t1_img.dataobj, dtype=np.float32)
    if not (t1.shape == wm.shape == gm.shape):
        raise SystemExit("T1, WM and GM files do not share a grid")
    wm_mask = wm >= THRESHOLD
    _TEMPLATE.update(
        t1=t1,
        affine=t1_img.affine,
        zooms=np.array(t1_img.header.get_zooms()[:3], dtype=float),
        tissue=(wm.astype(np.int16) + gm) >= THRESHOLD,
        wm_voxels=np.argwhere(wm_mask),
    )


def _rotation(axis: np.ndarray, angle: float) -> np.ndarray:
    """Rodrigues: rotation by `angle` radians about the unit vector `axis`."""
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * (k @ k)


def _box(center: np.ndarray, half: int, shape: tuple[int, ...]) -> tuple[slice, ...]:
    return tuple(
        slice(max(0, int(c) - half), min(n, int(c) + half + 1))
        for c, n in zip(center, shape, strict=True)
    )


def add_lesion(
    img: np.ndarray,
    label: np.ndarray,
    tissue: np.ndarray,
    center: np.ndarray,
    volume: int,
    rng: np.random.Generator,
) -> int:
    """Carve one irregular hypointense blob of about `volume` voxels around `center` (in
    place into img and label); returns its voxel count."""
    r_eq = (3 * volume / (4 * np.pi)) ** (1 / 3)
    scales = np.exp(rng.uniform(-0.35, 0.35, 3))
    radii = r_eq * scales / np.prod(scales) ** (1 / 3)  # same volume, elongated
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))  # random orientation
    box = _box(center, int(np.ceil(2 * radii.max())) + 4, img.shape)
    grids = np.meshgrid(
        *(np.arange(s.start, s.stop) - c for s, c in zip(box, center, strict=True)), indexing="ij"
    )
    local = np.einsum("ij,j...->i...", q.T, np.stack(grids).astype(np.float32))
    rho = np.sqrt(sum((local[i] / radii[i]) ** 2 for i in range(3)))
    shape = rho.shape
    noise = ndimage.gaussian_filter(
        rng.standard_normal(shape, dtype=np.float32), max(1.5, r_eq / 3)
    )
    noise /= noise.std() + 1e-8
    score = 1.0 - rho + 0.3 * noise
    candidates = tissue[box] & (label[box] == 0) & (rho <= 1.8)
    values = np.sort(score[candidates])[::-1]
    if values.size == 0:
        return 0
    blob = candidates & (score >= values[min(volume, values.size) - 1])
    parts, n = ndimage.label(blob)
    if n > 1:
        sizes = np.bincount(parts.ravel())
        sizes[0] = 0
        blob = (sizes >= min(MIN_FRAGMENT, sizes.max()))[parts]
    texture = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), 2.0)
    texture /= texture.std() + 1e-8
    factor = np.clip(rng.uniform(*LESION_FACTOR) + 0.05 * texture, 0.3, 0.7)
    soft = ndimage.gaussian_filter(blob.astype(np.float32), 0.8)
    img[box] *= 1.0 - (1.0 - factor) * soft
    label[box][blob] = 1
    return int(blob.sum())


def pose(img: np.ndarray, label: np.ndarray, zooms: np.ndarray, rng: np.random.Generator):
    """A small random rigid motion about the volume's centre: image linear, label nearest."""
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    angle = float(rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG))
    shift_mm = rng.uniform(-MAX_SHIFT_MM, MAX_SHIFT_MM, 3)
    # In mm, out -> in: x_in = R (x_out - c) + c - t; in voxels, scale by the zooms.
    rot = np.diag(1 / zooms) @ _rotation(axis, np.deg2rad(angle)) @ np.diag(zooms)
    center = (np.array(img.shape) - 1) / 2
    offset = center - rot @ center - shift_mm / zooms
    img = ndimage.affine_transform(img, rot, offset, order=1, mode="constant", cval=0.0)
    label = ndimage.affine_transform(label, rot, offset, order=0, mode="constant", cval=0)
    params = {
        "rotation_deg": round(angle, 2),
        "axis": [round(float(a), 3) for a in axis],
        "shift_mm": [round(float(s), 2) for s in shift_mm],
    }
    return img, label, params


def acquisition(img: np.ndarray, rng: np.random.Generator):
    """Multiplicative smooth bias field, gamma and Rician noise on a 0..255 image."""
    x, y, z = (np.linspace(-1, 1, n, dtype=np.float32) for n in img.shape)
    x, y, z = x[:, None, None], y[None, :, None], z[None, None, :]
    terms = (x, y, z, x * y, x * z, y * z, x**2, y**2, z**2)
    coeff = rng.uniform(-0.3, 0.3, size=len(terms)).astype(np.float32)
    log_field = np.zeros(img.shape, dtype=np.float32)
    for c, t in zip(coeff, terms, strict=True):
        log_field += c * t
    field = np.exp(log_field)
    gamma = float(np.exp(rng.uniform(np.log(0.75), np.log(1.3))))
    sigma = float(rng.uniform(0.01, 0.05) * 255.0)
    out = 255.0 * np.power(np.clip(img * field / 255.0, 0, None), gamma, dtype=np.float32)
    out += sigma * rng.standard_normal(img.shape, dtype=np.float32)
    out = np.hypot(out, sigma * rng.standard_normal(img.shape, dtype=np.float32))
    params = {
        "gamma": round(gamma, 3),
        "noise_sigma": round(sigma, 2),
        "bias_range": [round(float(field.min()), 3), round(float(field.max()), 3)],
    }
    return out, params


def make_case(index: int, seed: int, case: str, images: Path, labels: Path) -> dict:
    start = time.perf_counter()
    rng = np.random.default_rng([seed, index])
    t1, tissue, wm_voxels = _TEMPLATE["t1"], _TEMPLATE["tissue"], _TEMPLATE["wm_voxels"]
    img, label = t1.copy(), np.zeros(t1.shape, dtype=np.uint8)

    n_lesions = int(rng.integers(1, 4))
    total = rng.uniform(*LESION_FRACTION) * t1.size
    volumes = np.maximum(300, total * rng.dirichlet([2.0] * n_lesions)).astype(int)
    centers, lesions = [], []
    for volume in volumes:
        r_eq = (3 * volume / (4 * np.pi)) ** (1 / 3)
        for _ in range(100):  # keep lesions apart: centres at least 1.5 radii from the others
            center = wm_voxels[rng.integers(len(wm_voxels))]
            if all(np.linalg.norm(center - c) >= 1.5 * (r_eq + r) for c, r in centers):
                break
        centers.append((center, r_eq))
        voxels = add_lesion(img, label, tissue, center, int(volume), rng)
        world = _TEMPLATE["affine"] @ np.append(center, 1.0)
        lesions.append({"center_mm": [round(float(v), 1) for v in world[:3]], "voxels": voxels})

    img, label, pose_params = pose(img, label, _TEMPLATE["zooms"], rng)
    img, acq_params = acquisition(img, rng)
    img = np.clip(np.rint(img), 0, np.iinfo(np.int16).max).astype(np.int16)

    nib.save(nib.Nifti1Image(img, _TEMPLATE["affine"]), images / f"{case}_0000.nii.gz")
    nib.save(nib.Nifti1Image(label, _TEMPLATE["affine"]), labels / f"{case}.nii.gz")
    return {
        "case": case,
        "seed": [seed, index],
        "n_lesions": n_lesions,
        "lesion_fraction": round(float(label.mean()), 6),
        "lesion_voxels": int(label.sum()),
        "lesions": lesions,
        "pose": pose_params,
        "acquisition": acq_params,
        "seconds": round(time.perf_counter() - start, 2),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--nilearn-data",
        type=Path,
        required=True,
        help="folder holding the MNI152 2009a T1, WM and GM files from the nilearn wheel",
    )
    ap.add_argument("--out", type=Path, required=True, help="dataset folder to (re)create")
    ap.add_argument("--n-cases", type=int, default=40, help="cases in all, test ones included")
    ap.add_argument("--n-test", type=int, default=8, help="last cases, held out in imagesTs/")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2, help="processes generating cases")
    args = ap.parse_args(argv)

    missing = [f for f in (T1_FILE, WM_FILE, GM_FILE) if not (args.nilearn_data / f).is_file()]
    if missing:
        print(
            f"error: {args.nilearn_data} lacks {', '.join(missing)} (see this script's "
            "docstring for how to unpack them from the nilearn wheel)",
            file=sys.stderr,
        )
        return 2
    if not 0 <= args.n_test < args.n_cases or args.workers < 1:
        print("error: need 0 <= --n-test < --n-cases and --workers >= 1", file=sys.stderr)
        return 2
    if args.out.exists():
        if any(args.out.iterdir()) and not (args.out / "manifest.json").is_file():
            print(
                f"error: {args.out} is neither empty nor a dataset this script made; "
                "not overwriting it",
                file=sys.stderr,
            )
            return 2
        shutil.rmtree(args.out)
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (args.out / sub).mkdir(parents=True)

    start = time.perf_counter()
    n_train = args.n_cases - args.n_test
    jobs = []
    for i in range(args.n_cases):
        split = "train" if i < n_train else "test"
        images, labels = ("imagesTr", "labelsTr") if split == "train" else ("imagesTs", "labelsTs")
        jobs.append((i, args.seed, f"BRAIN_{i:03d}", args.out / images, args.out / labels))
    splits = {job[2]: ("train" if job[0] < n_train else "test") for job in jobs}

    def report(entry: dict) -> dict:
        entry = {"case": entry["case"], "split": splits[entry["case"]]} | entry
        print(
            f"{entry['case']} {entry['split']:5s} {entry['n_lesions']} lesion(s) "
            f"{100 * entry['lesion_fraction']:.3f} % of voxels, "
            f"rotation {entry['pose']['rotation_deg']:+.1f} deg, {entry['seconds']:.1f} s",
            flush=True,
        )
        return entry

    manifest = []
    if args.workers == 1:
        _load_template(args.nilearn_data)
        manifest = [report(make_case(*job)) for job in jobs]
    else:
        with ProcessPoolExecutor(
            args.workers, initializer=_load_template, initargs=(args.nilearn_data,)
        ) as pool:
            futures = [pool.submit(make_case, *job) for job in jobs]
            manifest = [report(f.result()) for f in as_completed(futures)]
    manifest.sort(key=lambda e: e["case"])

    description = (
        "Whole 1 mm MNI152 ICBM 2009a T1 brains, each with its own rigid pose, bias field, "
        "gamma and Rician noise, and 1-3 synthetic hypointense stroke-like lesions "
        "(~0.1-0.2 % of voxels) in brain tissue."
    )
    reference = "Fonov et al. 2009/2011 (ICBM 2009a), files as shipped in the nilearn wheel"
    dataset = {
        "channel_names": {"0": "T1"},
        "labels": {"background": 0, "lesion": 1},
        "numTraining": n_train,
        "file_ending": ".nii.gz",
        "name": "WholeBrainLesion",
        "description": description,
        "reference": reference,
    }
    (args.out / "dataset.json").write_text(json.dumps(dataset, indent=2))
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    fractions = [100 * e["lesion_fraction"] for e in manifest]
    print(
        f"{n_train} training and {args.n_test} test cases in {args.out} in "
        f"{time.perf_counter() - start:.1f} s; lesion fraction "
        f"{min(fractions):.3f}..{max(fractions):.3f} % of voxels"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
