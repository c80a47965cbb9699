"""Where an export may write: a new or empty folder, or an earlier export of the same model
(of another only with --force), and never a file, a link, the working folder, the study's own
files (its results, database, the weights exported) or a folder holding anything an export
does not write. Checked before the export begins and again before its folder is renamed in.
"""

from __future__ import annotations

from pathlib import Path

from nas.core.errors import NasError
from nas.deploy.readme import README_FILE
from nas.search.weights import is_fold_name, is_trial_name


def _export_files() -> frozenset[str]:
    """Everything an export writes (ONNX puts weights over 2 GB in model.onnx.data); a folder
    holding anything else is someone's own and is never replaced."""
    from nas.network.inference import ONNX_FILE, PT2_FILE
    from nas.network.model_card import CARD_FILE, WEIGHTS_FILE

    return frozenset(
        {CARD_FILE, WEIGHTS_FILE, PT2_FILE, ONNX_FILE, f"{ONNX_FILE}.data", README_FILE}
    )


def _written_by_export(entry: Path) -> bool:
    """A file an export writes, or an ensemble member's folder holding only such files."""
    export_files = _export_files()
    if entry.is_symlink():
        return False
    if entry.is_dir():
        return is_fold_name(entry.name) and all(
            e.is_file() and not e.is_symlink() and e.name in export_files for e in entry.iterdir()
        )
    return entry.is_file() and entry.name in export_files


def _refuse_unsafe_destination(out: Path, keep: dict[Path, str]) -> None:
    """Refuse, --force or not, an --out whose replacement would delete what no export wrote:
    a file, a link, a folder holding `keep` (the study's own files, each with what it is) or
    anything else, or a folder without a model description."""
    from nas.network.model_card import CARD_FILE

    instead = "give --out a new or empty folder"
    if out.is_symlink():
        raise NasError(out, f"is a symbolic link; {instead}")
    if not out.exists():
        return
    if not out.is_dir():
        raise NasError(out, f"is a file, not a folder; {instead}")
    target = out.resolve()
    here = Path.cwd().resolve()
    if target == here or target in here.parents:
        raise NasError(out, f"is or holds the current folder; {instead}")
    for path, what in keep.items():
        kept = path.resolve()
        if kept == target or target in kept.parents:
            verb = "is" if kept == target else "holds"
            raise NasError(out, f"{verb} the study's {what} ({path}); {instead}")
    entries = list(out.iterdir())
    foreign = sorted(e.name for e in entries if not _written_by_export(e))
    if foreign:
        raise NasError(out, f"holds {foreign[0]!r}, which an export does not write; {instead}")
    if entries and not (out / CARD_FILE).is_file():
        raise NasError(out, f"has no {CARD_FILE}, so it is not an earlier export; {instead}")


def check_destination(out: Path, source: dict, force: bool, keep: dict[Path, str]) -> None:
    from nas.network.model_card import CARD_FILE, read_card

    _refuse_unsafe_destination(out, keep)
    if force or not out.exists() or not any(out.iterdir()):
        return
    try:
        previous = read_card(out).source
    except NasError:
        raise NasError(
            out, f"holds an unreadable {CARD_FILE} (use --force to replace it)"
        ) from None
    same = ("storage", "study", "trial")
    if any(previous.get(key) != source[key] for key in same):
        raise NasError(
            out,
            f"holds trial {previous.get('trial')} of study {previous.get('study')!r}, "
            "a different model (use --force to replace it)",
        )


def check_ensemble_destination(out: Path, source: dict, force: bool, keep: dict[Path, str]) -> None:
    """An ensemble goes only into a new or empty folder, or over an earlier ensemble export
    (of other members only with --force); never over anything else."""
    from nas.network.model_card import ENSEMBLE_FILE, read_ensemble_card

    instead = "give --out a new or empty folder"
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise NasError(out, f"is not a folder; {instead}")
    if not out.exists() or not any(out.iterdir()):
        return
    target = out.resolve()
    for path, what in {**keep, Path.cwd(): "working folder"}.items():
        if path.resolve() == target or target in path.resolve().parents:
            raise NasError(out, f"is or holds the {what} ({path}); {instead}")
    for entry in out.iterdir():
        member = entry.is_dir() and not entry.is_symlink() and is_trial_name(entry.name)
        ours = member and all(_written_by_export(e) for e in entry.iterdir())
        if not ours and entry.name not in (ENSEMBLE_FILE, README_FILE):
            raise NasError(out, f"holds {entry.name!r}, which an export does not write; {instead}")
    try:
        previous = read_ensemble_card(out)
    except NasError:
        previous = None
    if previous is None:
        raise NasError(out, f"has no {ENSEMBLE_FILE}, so it is not an earlier export; {instead}")
    same = ("storage", "study", "trials")
    if not force and any(previous.source.get(key) != source[key] for key in same):
        raise NasError(
            out, f"holds another ensemble ({previous.source.get('trials')}); use --force to "
            "replace it",
        )  # fmt: skip
