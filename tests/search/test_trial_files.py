"""A study's trial files through its artifact store, with two results folders standing for two
hosts: what one publishes the other fetches and checks; a newer upload replaces a stale local
copy; a dropped file is gone from the store; bytes that are not the recorded ones are refused."""

from __future__ import annotations

import optuna
import pytest

from nas.core.errors import NasError
from nas.search.record import write_study
from nas.search.trial_files import TrialFiles, store_url, trial_files

RELATIVE = "checkpoints/trial_0003.pt"


@pytest.fixture
def hosts(tmp_path):
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'study.db'}", study_name="s")
    (tmp_path / "store").mkdir()
    write_study(study, artifacts=store_url(str(tmp_path / "store")))
    return trial_files(study, tmp_path / "a"), trial_files(study, tmp_path / "b")


def _write(files: TrialFiles, data: bytes):
    path = files.study_dir / RELATIVE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    files.publish(path)
    return path


def test_what_one_host_publishes_another_fetches_and_a_newer_upload_replaces(hosts, tmp_path):
    a, b = hosts
    _write(a, b"first weights")
    fetched = b.local(b.study_dir / RELATIVE)
    assert fetched.read_bytes() == b"first weights"
    _write(a, b"second weights")
    assert b.local(b.study_dir / RELATIVE).read_bytes() == b"second weights"  # stale: again
    uploads = list((tmp_path / "store/s/checkpoints").iterdir())
    assert len(uploads) == 1 and uploads[0].read_bytes() == b"second weights"  # old removed
    assert a.any_under(a.study_dir / "checkpoints") and b.any_under(b.study_dir / "checkpoints")


def test_a_dropped_file_leaves_the_store_and_the_record(hosts, tmp_path):
    a, b = hosts
    path = _write(a, b"weights")
    a.drop(path)
    assert not path.exists() and a.local(path) is None
    assert not any((tmp_path / "store/s/checkpoints").iterdir())
    assert b.local(b.study_dir / RELATIVE) is None  # never here, no longer recorded
    assert not b.any_under(b.study_dir / "checkpoints")


def test_bytes_that_are_not_the_recorded_ones_are_refused_and_not_kept(hosts, tmp_path):
    a, b = hosts
    _write(a, b"weights")
    (upload,) = (tmp_path / "store/s/checkpoints").iterdir()
    upload.write_bytes(b"weighty")
    with pytest.raises(NasError, match="does not match the SHA-256 the study recorded"):
        b.local(b.study_dir / RELATIVE)
    assert not (b.study_dir / RELATIVE).exists()
    assert not [p for p in (b.study_dir / "checkpoints").iterdir()]  # no temporary left
    upload.unlink()
    with pytest.raises(NasError, match="has lost"):
        b.local(b.study_dir / RELATIVE)


def test_without_a_store_the_results_folder_is_all(tmp_path):
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'study.db'}", study_name="s")
    files = trial_files(study, tmp_path / "a")
    assert not files.shared
    path = _write(files, b"weights")  # publish: nothing to do
    assert files.local(path) == path and files.records() == {}
    files.drop(path)
    assert files.local(path) is None


@pytest.mark.parametrize(
    ("given", "message"),
    [("s3://", "names no bucket"), ("http://host/x", "unknown kind of artifact store")],
)
def test_store_urls_that_name_no_store_are_refused(given, message):
    with pytest.raises(NasError, match=message):
        store_url(given)


def test_a_plain_folder_is_recorded_as_an_absolute_file_url(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert store_url("shared") == f"file://{tmp_path / 'shared'}"
    assert store_url("s3://bucket/prefix/") == "s3://bucket/prefix"
