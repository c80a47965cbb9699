"""Bad input, round 3: a corpus of mistakes by class, and a property-based fuzzer over
search spaces, `--set` values and command lines. Every one must end in exit code 0 or 2 with
at most three lines on stderr and no traceback, and leave the dataset and an existing study
exactly as they were.

The fuzzer tries NAS_FUZZ_EXAMPLES examples per property (default 15, to stay quick in CI);
`NAS_FUZZ_EXAMPLES=700 pytest tests/search/test_fuzz.py -n 0` is the long run.
"""

from __future__ import annotations

import gzip
import hashlib
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import optuna
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from nas.search.record import StudyRecord
from tests.conftest import FUZZ, run_cli, tiny_space_yaml


def _digest(folder: Path) -> str:
    """Every file's path and bytes under `folder` (the preprocessing cache lives elsewhere)."""
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            digest.update(str(path.relative_to(folder)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def _clean_outcome(result) -> None:
    assert result.returncode in (0, 2), (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip() and "%|" not in line]
    assert len(lines) <= 3, result.stderr[-2000:]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_dataset) -> Path:
    """A folder with a finished one-trial study (results/tiny), the tiny dataset beside it
    and files that lie: a NIfTI whose header claims 9 GB in 71 bytes, gzipped and not."""
    root = tmp_path_factory.mktemp("fuzz")
    shutil.copytree(tiny_dataset, root / "data")
    (root / "space.yaml").write_text(tiny_space_yaml(root / "data", n_trials=1))
    assert run_cli("nas.run", "space.yaml", cwd=root).returncode == 0
    header = nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)).header
    header.set_data_shape((1500, 1500, 1000))
    lie = header.binaryblock + bytes(4) + bytes(256)
    (root / "liars").mkdir()
    (root / "liars" / "case_0000.nii").write_bytes(lie)
    (root / "liars_gz").mkdir()
    (root / "liars_gz" / "case_0000.nii.gz").write_bytes(gzip.compress(lie))
    (root / "notes.txt").write_text("not a model, not a scan\n")
    return root


def _unchanged(root: Path):
    before = (_digest(root / "data"), _digest(root / "results"))

    def check() -> None:
        assert (_digest(root / "data"), _digest(root / "results")) == before

    return check


# --- the corpus: each class of mistake the issue lists, at least two cases each ----------

CORPUS = {
    # types the schema let through
    "float spec on an int field": (["--set", "search.depth={type: float, low: 1, high: 3}"],
                                   "depth is a whole number"),
    "float spec on batches": (["--set", "train.batches_per_epoch={type: float, low: 2, high: 4}"],
                              "batches_per_epoch is a whole number"),
    "yes as a count": (["--set", "train.batches_per_epoch=yes"], "a boolean"),
    "true as epochs": (["--set", "train.epochs=true"], "a boolean"),
    "fraction as epochs": (["--set", "train.epochs=2.5"], "give a whole number"),
    "NaN bound": (["--set", "study.constraints={params: {max: .nan}}"], "finite number"),
    "infinite low": (["--set", "train.learning_rate={type: float, low: -.inf, high: 1}"],
                     "give a finite number"),
    "absent latency device": (["--set", "study.latency={device: 'cuda:7'}",
                               "--set", "study.objectives=[iou, latency_ms]"],
                              "cuda:7 is not on this machine"),
    "huge latency batch": (["--set", "study.latency={batch: 100000000}"], "less than or equal"),
    "negative seed": (["--set", "study.seed=-1"], "greater than or equal to 0"),
    "seed wider than 64 bits": (["--set", "study.seed=99999999999999999999999"], "less than"),
    "negative split seed": (["--set", "data.split_seed=-5"], "greater than or equal to 0"),
    # paths
    "cache below a file": (["--set", "data.cache_dir=notes.txt/cache"], "lies below the file"),
    "cache is a file": (["--set", "data.cache_dir=notes.txt"], "is a file, not a folder"),
    "results below a file": (["--results-dir", "notes.txt/results"], "lies below the file"),
    # hostile --set
    "deep key path": (["--set", ".".join(["a"] * 5000) + "=1"], "a key path of 5000 parts"),
    "billion laughs": (
        ["--set", "train.epochs=" + "{a: &a [1,1,1,1,1,1,1,1,1,1], "
         + ", ".join(f"{c}: &{c} [*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p}]"
                     for p, c in zip("abcdefgh", "bcdefghi", strict=True)) + "}"],
        "values (aliases expanded)",
    ),
    "deep YAML value": (["--set", "train.epochs=" + "[" * 200 + "]" * 200],
                        "nested deeper than"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CORPUS))
def test_corpus_of_space_mistakes(workspace, case):
    args, message = CORPUS[case]
    unchanged = _unchanged(workspace)
    result = run_cli("nas.run", "space.yaml", "--dry-run", *args, cwd=workspace)
    _clean_outcome(result)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    unchanged()


def test_corpus_of_arguments_paths_and_lying_files(workspace, tmp_path):
    unchanged = _unchanged(workspace)
    results = str(workspace / "results" / "tiny")
    model = tmp_path / "model"
    assert run_cli("nas.export", results, "--format", "none", "--out", str(model),
                   cwd=workspace).returncode == 0  # fmt: skip
    lying_gz = str(workspace / "liars_gz")
    one = tmp_path / "one"  # a folder with one good scan
    one.mkdir()
    shutil.copy(next((workspace / "data").rglob("*.nii.gz")), one / "x.nii.gz")
    cases = [
        (["nas.retrain", results, "--epochs", "0"], "--epochs: must be at least 1"),
        (["nas.retrain", results, "--epochs", "-3"], "--epochs: must be at least 1"),
        (["nas.retrain", results, "--top", "0"], "--top: must be at least 1"),
        (["nas.dashboard", results, "--port", "70000"], "70000 is not a port"),
        (["nas.dashboard", results, "--port", "0"], "0 is not a port"),
        # outputs below a file
        (["nas.predict", str(model), str(one), str(workspace / "notes.txt" / "out")],
         "lies below the file"),
        (["nas.evaluate", str(one), str(one), "--out", str(workspace / "notes.txt")],
         "is a file, not a folder"),
        (["nas.export", results, "--out", str(workspace / "notes.txt" / "m")],
         "notes.txt: is a file, not a folder"),
        # files that lie about their size
        (["nas.predict", str(model), lying_gz, str(tmp_path / "masks")], "more than a file"),
        (["nas.predict", str(model), str(workspace / "liars"), str(tmp_path / "masks")],
         "more than a file"),
        (["nas.evaluate", lying_gz, lying_gz], "more than a file"),
        # a weights file that is not one
        (["nas.predict", str(tmp_path / "broken"), lying_gz, str(tmp_path / "m2")], "weights.pt"),
    ]  # fmt: skip
    shutil.copytree(model, tmp_path / "broken")
    (tmp_path / "broken" / "weights.pt").write_bytes(b"PK\x03\x04 not a zip at all")
    # Damaged exported programs, asked for by name, and a scan that is a dangling link.
    programs = tmp_path / "programs"
    assert run_cli("nas.export", results, "--format", "pt2,onnx", "--out", str(programs),
                   cwd=workspace).returncode == 0  # fmt: skip
    for name in ("model.pt2", "model.onnx"):
        (programs / name).write_bytes(b"garbage, not a program")
    cases += [
        (
            [
                "nas.predict",
                str(programs),
                str(one),
                str(tmp_path / "m4"),
                "--engine",
                "pt2",
            ],
            "model.pt2: cannot be loaded as a torch.export program",
        ),
        (
            [
                "nas.predict",
                str(programs),
                str(one),
                str(tmp_path / "m4"),
                "--engine",
                "onnx",
            ],
            "model.onnx: cannot be loaded by ONNX Runtime",
        ),
    ]
    dangling = tmp_path / "dangling"
    dangling.mkdir()
    (dangling / "y_0000.nii.gz").symlink_to(tmp_path / "nowhere.nii.gz")
    cases.append((["nas.predict", str(model), str(dangling), str(tmp_path / "m4")],
                  "is a link to a file that does not exist"))  # fmt: skip
    # Two files of one case name: x.nii and x.nii.gz.
    twins = tmp_path / "twins"
    twins.mkdir()
    scan = next((workspace / "data").rglob("*.nii.gz"))
    shutil.copy(scan, twins / "x.nii.gz")
    nib.save(nib.load(scan), twins / "x.nii")
    cases.append((["nas.predict", str(model), str(twins), str(tmp_path / "m3")], "again"))
    for argv, message in cases:
        module, *args = argv
        result = run_cli(module, *args, cwd=tmp_path)
        _clean_outcome(result)
        assert result.returncode == 2 and message in result.stderr, (argv, result.stderr)
    assert not any((tmp_path / name).exists() for name in ("masks", "m2", "m3", "m4"))
    unchanged()


def test_resuming_with_other_constraints_is_refused(workspace, tmp_path):
    root = tmp_path / "study"
    shutil.copytree(workspace, root)
    result = run_cli("nas.run", "space.yaml", "--set", "study.constraints={params: {max: 10}}",
                     cwd=root)  # fmt: skip
    _clean_outcome(result)
    assert result.returncode == 2 and "was made with other constraints" in result.stderr
    result = run_cli("nas.run", "space.yaml", "--set", "study.constraints={iou: {min: .nan}}",
                     cwd=root)  # fmt: skip
    assert result.returncode == 2 and "finite number" in result.stderr
    # Asked for with --extend-space, the change is recorded and the study goes on.
    result = run_cli("nas.run", "space.yaml", "--set", "study.constraints={params: {max: 10}}",
                     "--extend-space", cwd=root)  # fmt: skip
    assert result.returncode == 0, result.stderr
    storage = f"sqlite:///{root / 'results' / 'tiny' / 'study.db'}"
    study = optuna.load_study(study_name="tiny", storage=storage)
    assert StudyRecord.of(study).constraints == {"params": {"max": 10.0}}


# --- the fuzzer ---------------------------------------------------------------------------

FIELDS = [
    "search.depth", "search.base_channels", "search.kernel_size", "search.skips",
    "search.spatial_dims", "train.epochs", "train.batches_per_epoch", "train.learning_rate",
    "train.patch_size_2d", "train.patch_size_3d", "train.batch_size_2d",
    "train.foreground_fraction", "train.augment_probability", "train.optimizer",
    "train.init_weights", "study.n_trials", "study.seed", "study.timeout", "study.budget",
    "study.fidelity", "study.fidelity.eta", "study.fidelity.min_steps", "study.constraints",
    "study.latency", "study.objectives", "study.enqueue", "study.name", "study.pruner",
    "data.n_folds", "data.fold", "data.split_seed", "data.slice_axis", "data.format",
    "data.channels", "data.foreground", "data.target_spacing_mm", "data.path",
    "train.no_such_field", "nonsense",
]  # fmt: skip
SCALARS = st.one_of(
    st.booleans(),
    st.none(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(
            st.sampled_from(
                [
                    "type",
                    "low",
                    "high",
                    "step",
                    "log",
                    "choices",
                    "when",
                    "max",
                    "min",
                    "device",
                    "batch",
                    "x",
                ]
            ),  # fmt: skip
            inner,
            max_size=4,
        ),
        st.fixed_dictionaries(
            {"type": st.sampled_from(["int", "float", "categorical", "bogus"])},
            optional={"low": inner, "high": inner, "choices": st.lists(inner, max_size=3)},
        ),
    ),
    max_leaves=8,
)


def _set(space: dict, dotted: str, value) -> dict:
    node = space
    *parents, last = dotted.split(".")
    for part in parents:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[last] = value
    return space


@pytest.mark.slow
@FUZZ
@given(field=st.sampled_from(FIELDS), value=VALUES)
def test_fuzzed_search_spaces_fail_cleanly(workspace, field, value):
    unchanged = _unchanged(workspace)
    space = _set(yaml.safe_load((workspace / "space.yaml").read_text()), field, value)
    text = yaml.safe_dump(space, allow_unicode=True)
    path = workspace / "fuzzed.yaml"
    path.write_text(text)
    try:
        _clean_outcome(run_cli("nas.run", str(path), "--dry-run", cwd=workspace))
    finally:
        path.unlink()
    unchanged()


@pytest.mark.slow
@FUZZ
@given(
    field=st.sampled_from(FIELDS),
    text=st.text(st.characters(blacklist_characters="\x00"), max_size=40),
)
def test_fuzzed_set_strings_fail_cleanly(workspace, field, text):
    unchanged = _unchanged(workspace)
    _clean_outcome(run_cli("nas.run", "space.yaml", "--dry-run", "--set", f"{field}={text}",
                           cwd=workspace))  # fmt: skip
    unchanged()


COMMAND_OPTIONS = {
    "nas.export": ["--best", "--trial", "--max-params", "--out", "--format", "--by",
                   "--weights", "--ensemble", "--tta", "--force", "--storage"],
    "nas.predict": ["--engine", "--tta", "--overlap", "--device", "--save-probabilities"],
    "nas.evaluate": ["--dataset-json", "--tolerance-mm", "--out"],
    "nas.ensemble": [],
    "nas.retrain": ["--top", "--trials", "--epochs", "--folds", "--workers", "--all-cases",
                    "--batches-per-epoch", "--checkpoint-every", "--continue"],
    "nas.report": [],
}  # fmt: skip
# What a command line can carry: anything but NUL, which ends a C string (undecodable bytes
# arrive as lone surrogates, which st.text leaves out).
ARGV_TEXT = st.text(alphabet=st.characters(blacklist_characters="\x00"), max_size=10)
TOKENS = st.one_of(
    st.sampled_from(
        [
            "liars",
            "liars_gz",
            "notes.txt",
            "data",
            "missing",
            "results",
            "-1",
            "0",
            "1e9",
            "nan",
            "all",
            "cv",
            "folds",
            "members",
            "onnx,pt2",
            "sqlite:///nowhere.db",
            "x" * 300,
            "",
        ]
    ),  # fmt: skip
    st.text(max_size=10),
)


@pytest.mark.slow
@FUZZ
@given(data=st.data())
def test_fuzzed_command_lines_fail_cleanly(workspace, data):
    """Random arguments for every command that reads files, none of them a valid results
    folder (a valid one could start real training): each fails cleanly or does nothing."""
    unchanged = _unchanged(workspace)
    module = data.draw(st.sampled_from(sorted(COMMAND_OPTIONS)))
    options = st.sampled_from(COMMAND_OPTIONS[module]) if COMMAND_OPTIONS[module] else TOKENS
    argv = data.draw(st.lists(st.one_of(TOKENS, options), min_size=1, max_size=6))
    outputs = [workspace / name for name in ("out", "m", "masks")]
    result = run_cli(module, *argv, cwd=workspace)
    try:
        _clean_outcome(result)
    finally:
        for path in outputs:
            shutil.rmtree(path, ignore_errors=True)
    unchanged()
