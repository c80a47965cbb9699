"""Bad input, round 4: a property-based fuzzer over the files nas reads back and the files it
must not write. It mutates NIfTI headers (data type, affine, pixel sizes, dimensions), the
probability maps and model cards nas wrote, the attrs of a study and its trials, and storage
files that are not a nas study (another program's SQLite database, an empty file, random
bytes). Every example must end in exit code 0 or 2, with at most three lines on stderr and no
traceback; a mutation known to be wrong must end in 2; and no file the command was not asked
to write may change (the SHA-256 of every file in the workspace, before and after).

NAS_FUZZ_EXAMPLES examples per property (default 15, derandomized, to stay quick in CI);
`NAS_FUZZ_EXAMPLES=400 pytest tests/core/test_fuzz_files.py -n 0` is the long run.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import sqlite3
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml
from hypothesis import assume, given
from hypothesis import strategies as st

from tests.conftest import FUZZ, run_cli, tiny_space_yaml

pytestmark = pytest.mark.slow

OUT = "out"  # the one folder a command of these tests is asked to write

# JSON-like values a tampered file or attr may hold instead of the right one.
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=False)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                 max_size=3),
    max_leaves=6,
)  # fmt: skip
ODD_NUMBERS = st.sampled_from([0.0, -1.0, 1e-9, 1e9, 1e30, math.nan, math.inf, -math.inf])


def _snapshot(root: Path) -> dict[str, str]:
    """{path: sha256} of every file under `root` but the output folder."""
    found = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if path.is_file() and relative.parts[0] != OUT:
            found[str(relative)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def _clean(result, must_refuse: bool = False) -> None:
    assert result.returncode in (0, 2), (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip() and "%|" not in line]
    assert len(lines) <= 3, result.stderr[-2000:]
    if must_refuse:
        assert result.returncode == 2, (result.stdout[-1000:], result.stderr[-1000:])


def _run(root: Path, module: str, *args: str, must_refuse: bool = False, writes: str = ""):
    """`module args` in `root`; nothing but OUT (and `writes`, a file the command makes) may
    change, and the output folder is removed afterwards."""
    before = _snapshot(root)
    try:
        result = run_cli(module, *args, cwd=root)
        _clean(result, must_refuse)
        after = _snapshot(root)
        if writes:
            before.pop(writes, None)
            after.pop(writes, None)
        assert after == before, sorted(set(after.items()) ^ set(before.items()))[:6]
    finally:
        shutil.rmtree(root / OUT, ignore_errors=True)
    return result


@pytest.fixture(scope="module")
def made(tmp_path_factory, tiny_dataset) -> Path:
    """A workspace: the tiny dataset, a finished one-trial study, its export, two scans and
    two predictions of them with their probabilities."""
    root = tmp_path_factory.mktemp("fuzz-files")
    shutil.copytree(tiny_dataset, root / "data")
    (root / "space.yaml").write_text(tiny_space_yaml(root / "data", n_trials=1))
    assert run_cli("nas.run", "space.yaml", cwd=root).returncode == 0
    exported = run_cli("nas.export", "results/tiny", "--best", "--out", "model", "--format",
                       "none", cwd=root)  # fmt: skip
    assert exported.returncode == 0, exported.stderr
    (root / "scans").mkdir()
    for path in sorted((root / "data" / "imagesTr").glob("*.nii.gz"))[:2]:
        shutil.copy(path, root / "scans" / path.name.replace("_0000", ""))
    for name in ("probs_a", "probs_b"):
        predicted = run_cli("nas.predict", "model", "scans", name, "--save-probabilities",
                            cwd=root)  # fmt: skip
        assert predicted.returncode == 0, predicted.stderr
    return root


def _fresh(root: Path, name: str) -> Path:
    folder = root / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    return folder


# --- NIfTI headers -------------------------------------------------------------------------

DTYPES = ["complex64", "complex128", "int8", "uint8", "int16", "float64", "uint64", "bool"]


@st.composite
def nifti_mutations(draw):
    kind = draw(st.sampled_from(["dtype", "affine", "pixdim", "shape", "values"]))
    if kind == "dtype":
        return kind, draw(st.sampled_from(DTYPES))
    if kind == "affine":
        return kind, (draw(st.integers(0, 2)), draw(st.integers(0, 3)), draw(ODD_NUMBERS))
    if kind == "pixdim":
        return kind, (draw(st.integers(1, 3)), draw(ODD_NUMBERS))
    if kind == "shape":
        return kind, draw(st.sampled_from([(0, 32, 16), (32, 0, 16), (32, 32, 1), (1, 1, 1),
                                           (32, 32, 16, 1), (32, 32, 16, 2)]))  # fmt: skip
    return kind, draw(st.sampled_from([math.nan, math.inf, -math.inf, 1e38, -1e38]))


def _mutated_scan(source: Path, mutation) -> tuple[nib.Nifti1Image, bool]:
    """The scan with one mutation, and whether the result is wrong for sure."""
    image = nib.load(source)
    data = np.asarray(image.dataobj).astype(np.float32)
    affine = image.affine.copy()
    kind, value = mutation
    wrong = False
    if kind == "dtype":
        data = data.astype(value)
        wrong = value.startswith("complex")
    elif kind == "affine":
        row, column, number = value
        affine[row, column] = number
        wrong = not math.isfinite(number) or abs(np.linalg.det(affine[:3, :3])) < 1e-12
    elif kind == "shape":
        data = np.resize(data, value).astype(np.float32)
        wrong = 0 in value or value[3:] == (2,)  # nothing, or channels the model lacks
    elif kind == "values":
        data = data.copy()
        data[0, 0, 0] = value
        wrong = not math.isfinite(value)
    if kind != "pixdim":
        return nib.Nifti1Image(data, affine), wrong
    # The pixel sizes alone define the grid (no sform, no qform); nibabel reads a size of 0
    # as 1, and nas must refuse what is left wrong (NaN, infinite) or fail cleanly.
    header = image.header.copy()
    header.set_sform(None, code=0)
    header.set_qform(None, code=0)
    axis, number = value
    header["pixdim"][axis] = number
    return nib.Nifti1Image(data, None, header), not math.isfinite(number)


@FUZZ
@given(mutation=nifti_mutations())
def test_fuzzed_nifti_headers_fail_cleanly(made, mutation):
    folder = _fresh(made, "mutated")
    source = sorted((made / "scans").glob("*.nii.gz"))[0]
    try:
        image, wrong = _mutated_scan(source, mutation)
        nib.save(image, folder / "scan.nii.gz")
    except Exception:  # nibabel itself refuses to write it: nothing for nas to read
        assume(False)
    _run(made, "nas.predict", "model", "mutated", OUT, must_refuse=wrong)


# --- saved probabilities -------------------------------------------------------------------


@st.composite
def probability_mutations(draw):
    field = draw(st.sampled_from(["probabilities", "affine", "header_class", "labels",
                                  "label_value", "drop"]))  # fmt: skip
    if field == "probabilities":
        return field, draw(st.sampled_from(["nan", "inf", "negative", "above_one", "3d",
                                            "text", "int", "transpose"]))  # fmt: skip
    if field == "affine":
        return field, draw(st.sampled_from(["nan", "singular", "3x3", "text"]))
    if field == "drop":
        return field, draw(st.sampled_from(["probabilities", "affine", "header", "labels"]))
    return field, draw(JSON)


def _mutated_probabilities(path: Path, mutation) -> tuple[dict, bool]:
    with np.load(path, allow_pickle=False) as saved:
        fields = {name: saved[name] for name in saved.files}
    field, value = mutation
    wrong = True
    if field == "probabilities":
        p = fields["probabilities"].copy()
        if value in ("nan", "inf", "negative", "above_one"):
            p.flat[0] = {"nan": np.nan, "inf": np.inf, "negative": -0.5, "above_one": 7.0}[value]
        fields["probabilities"] = {
            "3d": p[0], "text": np.array(["0.5"] * 4), "int": p.astype(np.int64),
            "transpose": p.transpose(0, 3, 2, 1),
        }.get(value, p)  # fmt: skip
        wrong = value != "int" or not np.array_equal(p, p.astype(np.int64))
        if value == "transpose" and p.shape[1] == p.shape[3]:
            wrong = False  # a cube transposed is still a grid of the scan's shape
    elif field == "affine":
        a = fields["affine"].copy()
        fields["affine"] = {"nan": np.where(np.eye(4) > 0, np.nan, a), "singular": a * 0,
                            "3x3": a[:3, :3], "text": np.array("eye")}[value]  # fmt: skip
    elif field == "header_class":
        fields["header_class"] = np.array(json.dumps(value))
    elif field == "labels":
        fields["labels"] = np.array(json.dumps(value, allow_nan=True))
    elif field == "label_value":  # a label map whose values are not label values
        labels = json.loads(str(fields["labels"]))
        labels["labels"] = {name: value for name in labels["labels"]}
        fields["labels"] = np.array(json.dumps(labels, allow_nan=True))
        wrong = not all(isinstance(v, int) and not isinstance(v, bool) for v in [value])
    elif field == "drop":
        del fields[value]
    return fields, wrong


@FUZZ
@given(mutation=probability_mutations())
def test_fuzzed_probability_files_fail_cleanly(made, mutation):
    folder = _fresh(made, "probs_m")
    source = sorted((made / "probs_a").glob("*.npz"))[0]
    fields, wrong = _mutated_probabilities(source, mutation)
    np.savez_compressed(folder / source.name, **fields)
    for other in sorted((made / "probs_a").glob("*.npz"))[1:]:
        shutil.copy(other, folder / other.name)
    _run(made, "nas.ensemble", "probs_m", "probs_b", OUT, must_refuse=wrong)


# --- model cards ---------------------------------------------------------------------------


def _paths(value, prefix=()):
    """Every key path of a nested mapping."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield (*prefix, key)
            yield from _paths(item, (*prefix, key))


@FUZZ
@given(data=st.data())
def test_fuzzed_model_cards_fail_cleanly(made, data):
    folder = made / "model_m"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(made / "model", folder)
    card = yaml.safe_load((folder / "architecture.yaml").read_text())
    path = data.draw(st.sampled_from(sorted(_paths(card), key=str)))
    value = data.draw(JSON)
    node = card
    for key in path[:-1]:
        node = node[key]
    assume(node[path[-1]] != value)
    node[path[-1]] = value
    (folder / "architecture.yaml").write_text(yaml.safe_dump(card, sort_keys=False))
    _run(made, "nas.predict", "model_m", "scans", OUT)


# --- study and trial attrs -----------------------------------------------------------------


@FUZZ
@given(data=st.data())
def test_fuzzed_study_and_trial_attrs_fail_cleanly(made, data):
    copy = made / "res_m" / "tiny"
    shutil.rmtree(made / "res_m", ignore_errors=True)
    shutil.copytree(made / "results" / "tiny", copy)
    table = data.draw(st.sampled_from(["trial_user_attributes", "study_user_attributes"]))
    with sqlite3.connect(copy / "study.db") as db:
        keys = sorted(k for (k,) in db.execute(f"SELECT DISTINCT key FROM {table}"))
        key = data.draw(st.sampled_from(keys))
        value = json.dumps(data.draw(JSON), allow_nan=True)
        db.execute(f"UPDATE {table} SET value_json = ? WHERE key = ?", (value, key))
    db.close()
    command = data.draw(st.sampled_from(["report", "export"]))
    if command == "report":
        _run(made, "nas.report", "res_m/tiny", writes="res_m/tiny/report.html")
    else:
        _run(made, "nas.export", "res_m/tiny", "--best", "--out", OUT, "--format", "none")


# --- storage files that are not a nas study ------------------------------------------------


@st.composite
def foreign_storages(draw):
    kind = draw(st.sampled_from(["foreign", "empty", "bytes"]))
    if kind == "foreign":
        names = draw(st.lists(st.from_regex(r"[a-z]{1,8}", fullmatch=True), min_size=1,
                              max_size=3, unique=True))  # fmt: skip
        return kind, names
    if kind == "bytes":
        return kind, draw(st.binary(min_size=1, max_size=200))
    return kind, None


def _storage_file(path: Path, storage) -> None:
    kind, value = storage
    if kind == "foreign":
        with sqlite3.connect(path) as db:
            for name in value:
                db.execute(f"CREATE TABLE t_{name} (id INTEGER, note TEXT)")
                db.execute(f"INSERT INTO t_{name} VALUES (1, 'kept')")
        db.close()
    elif kind == "bytes":
        path.write_bytes(value)
    else:
        path.write_bytes(b"")


@FUZZ
@given(
    storage=foreign_storages(),
    command=st.sampled_from(["run", "report", "export", "retrain", "dashboard"]),
)
def test_fuzzed_storage_files_are_never_written(made, storage, command):
    # An empty file is no one's data: nas run makes it a study, as SQLite and Optuna would.
    assume(not (command == "run" and storage[0] == "empty"))
    path = made / "other.db"
    path.unlink(missing_ok=True)
    for sibling in ("other.db-wal", "other.db-shm", "other.db-journal"):
        (made / sibling).unlink(missing_ok=True)
    _storage_file(path, storage)
    url = f"sqlite:///{path}"
    if command == "run":
        _run(made, "nas.run", "space.yaml", "--storage", url, "--study-name", "fuzzed",
             "--results-dir", OUT, must_refuse=True)  # fmt: skip
    elif command == "dashboard":
        _run(made, "nas.dashboard", "results/tiny", "--storage", url, "--port", "1",
             must_refuse=True)  # fmt: skip
    elif command == "retrain":
        _run(made, "nas.retrain", "results/tiny", "--storage", url, must_refuse=True)
    elif command == "report":
        _run(made, "nas.report", "results/tiny", "--storage", url, must_refuse=True)
    else:
        _run(made, "nas.export", "results/tiny", "--storage", url, "--best", "--out", OUT,
             must_refuse=True)  # fmt: skip
    assert not any((made / s).exists() for s in ("other.db-wal", "other.db-shm"))
