"""`python -m nas.export results/<study>`: write one architecture of the front as a model folder.

Pick the trial with --best (the default: the smallest front member whose score is within one
standard error of the best score, the one-standard-error rule of model selection, the error
bootstrapped over the validation cases), --best-score (the highest score on the front),
--max-params P (highest score among front members with at most P parameters) or --trial N;
with --by cv, --best and --max-params choose among the members `nas retrain --folds`
cross-validated, by their mean over the folds (as nnU-Net's find_best_configuration does).
Its weights are chosen with --weights (default: wherever nas trained it longest; see
nas/weights.py). The folder
(default results/<study>/export/trial_NNNN) gets architecture.yaml, weights.pt, README.md,
and the formats asked for with --format: pt2 (torch.export, the default) and onnx. Each
exported program is run on a random input and compared with the eager model before the folder
is written; the largest difference is recorded. The folder is built beside its destination
and renamed into place. A folder holding a different model is only replaced with --force,
and only an empty folder or an earlier export is ever replaced: never a file, a link, a
folder with anything an export does not write, or the study's own results."""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import re
import sys
import warnings
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from nas.cli import command_parser, exit_code
from nas.errors import NasError
from nas.staging import check_output_folder, remove_stale_staging, replace_folder, staging_folder
from nas.weights import KINDS, RETRAINED_BEST, find_weights, trial_name

if TYPE_CHECKING:
    import numpy as np
    import optuna
    import torch
    from optuna.trial import FrozenTrial

    from nas.builder import UNet
    from nas.model_card import Inference, ModelCard

FORMATS = ("pt2", "onnx")
README_FILE = "README.md"
MEMBER_FOLDER = re.compile(r"^fold_\d+$")
# An exported program must give the eager model's logits within this (float32 round-off).
RTOL, ATOL = 1e-3, 1e-4


def make_parser() -> argparse.ArgumentParser:
    parser = command_parser("export", __doc__.split("\n")[0])
    parser.add_argument("results", type=Path, help="a study's results folder, e.g. results/unet")
    choice = parser.add_mutually_exclusive_group()
    choice.add_argument(
        "--best", action="store_true",
        help="the smallest front member within one standard error of the best score (default)",
    )  # fmt: skip
    choice.add_argument("--best-score", action="store_true", help="the highest score on the front")
    choice.add_argument("--max-params", type=int, metavar="P", help="best with at most P params")
    choice.add_argument("--trial", type=int, metavar="N", help="this trial")
    parser.add_argument(
        "--by", choices=["search", "cv"], default="search",
        help="--best and --max-params rank by the search's validation score (search) or by the "
        "cross-validated mean of nas retrain --folds (cv)",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, help="default: results/<study>/export/trial_NNNN")
    parser.add_argument("--format", default="pt2", help="comma-separated: pt2, onnx (or none)")
    parser.add_argument("--storage", help="Optuna storage URL (default: the folder's study.db)")
    parser.add_argument(
        "--force", action="store_true", help="replace an earlier export of a different model"
    )
    parser.add_argument(
        "--weights", choices=["auto", *KINDS, RETRAINED_BEST], default="auto",
        help="which weights: nas retrain --all-cases's, nas retrain's, the search's, or the "
        "fold ensemble of nas retrain --folds (auto: the first of these that exists); "
        "retrained-best: nas retrain's at its best validation epoch",
    )  # fmt: skip
    parser.add_argument(
        "--ensemble", choices=["folds", "members"],
        help="folds: every fold's weights from nas retrain --folds, averaged by predict (the "
        "same as --weights folds); members: the ensemble of different trials that nas retrain "
        "--folds chose out of fold, one model folder each",
    )  # fmt: skip
    parser.add_argument(
        "--tta", choices=["none", "mirror"], default="none",
        help="predict averages over mirrored inputs too (nnU-Net's test-time augmentation)",
    )  # fmt: skip
    return parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    return make_parser().parse_args(argv)


def parse_formats(text: str) -> tuple[str, ...]:
    formats = tuple(f.strip() for f in text.split(",") if f.strip() and f.strip() != "none")
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise NasError("--format", f"unknown format {unknown[0]!r} (choose from pt2, onnx)")
    return formats


def choose_trial(
    study: optuna.Study,
    trial: int | None,
    max_params: int | None,
    by: str = "search",
    best_score: bool = False,
) -> FrozenTrial:
    """--trial N, or the best (the smaller on a tie) with at most `max_params` parameters:
    of the front by the search's score, or of the cross-validated members by their mean.
    --best on the front (no `max_params`, not `best_score`): the one-standard-error rule
    (`one_standard_error`)."""
    from optuna.trial import TrialState

    if best_score and by == "cv":
        raise NasError("--best-score", "ranks the search's front; with --by cv use --best")
    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    if trial is not None:
        if by != "search":
            raise NasError("--by", "--trial names the trial; --by chooses for --best")
        if trial not in by_number:
            raise NasError("--trial", f"study {study.study_name!r} has no trial {trial}")
        chosen = by_number[trial]
        if chosen.state != TrialState.COMPLETE:
            raise NasError("--trial", f"trial {trial} is {chosen.state.name}, not COMPLETE")
        return chosen

    from nas.record import study_objectives

    score = study_objectives(study).score.name  # IoU unless the study ranks on (case) Dice
    candidates = _cv_candidates(study, score) if by == "cv" else _front_candidates(study, score)
    if max_params is not None:
        fitting = [c for c in candidates if c[2] <= max_params]
        if not fitting:
            smallest = min(c[2] for c in candidates)
            among = "cross-validated member" if by == "cv" else "front member"
            raise NasError(
                "--max-params",
                f"no {among} has at most {max_params:,} parameters (the smallest has {smallest:,})",
            )
        candidates = fitting
    elif by == "search" and not best_score:
        return by_number[one_standard_error(study)[1]]
    number = max(candidates, key=lambda c: (c[1], -c[2]))[0]
    return by_number[number]


def one_standard_error(study: optuna.Study) -> tuple[int, int, dict]:
    """(the front's best by score, the member the one-standard-error rule chooses, the
    front's intervals by trial) over the search's one score; each member's error is that of
    its difference from the best, the validation cases resampled together."""
    from nas.objectives import curve_metric, score_of
    from nas.record import TrialRecord, study_objectives
    from nas.results import pareto_front
    from nas.scoring import (
        best_member,
        difference_error,
        front_intervals,
        one_standard_error_choice,
    )

    front = pareto_front(study)
    if not front:
        raise NasError(study.study_name, "has no completed trial to export")
    names = study_objectives(study).names
    score = score_of(names)
    # The intervals are of what the curves hold: of the score unless the study ranks on Dice.
    intervals = front_intervals(study, front) if score == curve_metric(names) else {}
    records = {trial.number: TrialRecord.of(trial) for trial in front}
    scored = [(n, r.quantity(score), r.n_params or 0) for n, r in records.items()]
    top = intervals.get(best_member(scored)[0])
    members = [(n, value, difference_error(top, intervals.get(n)), params)
               for n, value, params in scored]  # fmt: skip
    best, chosen = one_standard_error_choice(members)
    return best, chosen, intervals


def _front_candidates(study: optuna.Study, score: str) -> list[tuple[int, float, int]]:
    """(trial, the search's score, params) of each front member."""
    from nas.record import TrialRecord
    from nas.results import pareto_front

    front = pareto_front(study)
    if not front:
        raise NasError(study.study_name, "has no completed trial to export")
    records = [(t.number, TrialRecord.of(t)) for t in front]
    return [(n, r.quantity(score), r.n_params or 0) for n, r in records]


def _cv_candidates(study: optuna.Study, score: str) -> list[tuple[int, float, int]]:
    """(trial, mean over the folds, params) of each cross-validated member."""
    from nas.companions import find_crossval_study, summary_rows

    crossval = find_crossval_study(study)
    rows = summary_rows(crossval, study) if crossval is not None else []
    if not rows:
        raise NasError(
            "--by cv",
            f"study {study.study_name!r} has no cross-validation: run nas retrain RESULTS "
            "--folds all first",
        )
    return [(r["trial"], r[f"cv_{score}_mean"], r["n_params"]) for r in rows]


def _data_description(study: optuna.Study) -> dict:
    from nas.data import DataConfig, load_dataset
    from nas.model_card import describe_data
    from nas.record import StudyRecord

    recorded = StudyRecord.of(study)
    if recorded.data_description is not None:
        return _checked_description(study, dict(recorded.data_description))
    if recorded.data_config is None:  # a study from before nas.run recorded either
        raise NasError(study.study_name, "does not record its data settings")
    return describe_data(load_dataset(DataConfig(**recorded.data_config)))


def _checked_description(study: optuna.Study, data: dict) -> dict:
    """The study's record of its preprocessing and labels, read through the models that
    wrote it (model_card.Preprocessing, LabelScheme): a record that is not what nas wrote is
    one line naming the study and the field."""
    from nas.errors import validation_problem
    from nas.labels import LabelScheme
    from nas.model_card import Preprocessing

    try:
        Preprocessing.model_validate(data["preprocessing"])
        LabelScheme.from_description(data)
    except KeyError as err:
        problem = f"it lacks {err}"
    except (TypeError, ValueError, AttributeError) as err:  # pydantic's ValidationError too
        problem = validation_problem(err)
    else:
        return data
    raise NasError(f"study {study.study_name!r}", f"attr data_description: {problem}")


def _example_input(model: UNet, inference: Inference, in_channels: int) -> torch.Tensor:
    """A batch of two, each spatial size the patch rounded up to a multiple (at least 2x)."""
    import torch

    sizes = [
        max(2 * m, -(-p // m) * m)
        for p, m in zip(inference.patch_size, model.size_multiple, strict=True)
    ]
    return torch.randn(2, in_channels, *sizes, generator=torch.Generator().manual_seed(0))


def _dynamic_shapes(model: UNet) -> dict:
    """Batch and every spatial size free; spatial sizes multiples of the total stride, >= 2x."""
    import torch

    dims = {0: torch.export.Dim("batch", min=1, max=4096)}
    for axis, m in enumerate(model.size_multiple):
        dims[axis + 2] = m * torch.export.Dim(f"k{axis}", min=2, max=8192 // m)
    return {"x": dims}


def _max_difference(
    model: UNet, example: torch.Tensor, exported: Callable[[torch.Tensor], np.ndarray], what: str
) -> float:
    """Run the exported program on another batch size and spatial size than it was traced
    with; its logits must match the eager model's within RTOL/ATOL."""
    import numpy as np
    import torch

    with torch.no_grad():
        check = torch.randn(1, *example.shape[1:-1], example.shape[-1] * 2)
        reference = model(check).numpy()
        actual = exported(check)
    if actual.shape != reference.shape or not np.allclose(actual, reference, RTOL, ATOL):
        raise RuntimeError(f"the {what} export differs from the eager model")
    return float(np.abs(actual - reference).max())


def export_pt2(model: UNet, example: torch.Tensor, path: Path) -> float:
    import torch

    program = torch.export.export(model, (example,), dynamic_shapes=_dynamic_shapes(model))
    torch.export.save(program, path)
    loaded = torch.export.load(path).module()
    return _max_difference(model, example, lambda x: loaded(x).numpy(), "pt2")


@contextlib.contextmanager
def _quiet_exporter():
    """The ONNX exporter prints its progress, and warns and logs about operators it skips."""
    log = logging.getLogger("torch.onnx")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        log.setLevel(level)


def export_onnx(model: UNet, example: torch.Tensor, path: Path) -> float:
    import torch

    try:
        import onnxruntime
    except ImportError:
        raise NasError("--format", "onnx needs onnx, onnxscript and onnxruntime: "
                       'pip install "nas[onnx]"') from None  # fmt: skip
    with _quiet_exporter():
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            dynamic_shapes=_dynamic_shapes(model),
            input_names=["image"],
            output_names=["logits"],
            verbose=False,
        )
        program.save(str(path))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return _max_difference(
        model, example, lambda x: session.run(None, {"image": x.numpy()})[0], "onnx"
    )


def _readme(card: ModelCard, formats: Sequence[str]) -> str:
    from nas.inference import ONNX_FILE, PT2_FILE
    from nas.model_card import CARD_FILE, WEIGHTS_FILE

    source, prep, inf = card.source, card.preprocessing, card.inference
    files = [
        f"- `{CARD_FILE}`: the builder config, preprocessing, inference settings and labels",
        f"- `{WEIGHTS_FILE}`: the state_dict (`torch.load(path, weights_only=True)`)",
    ]
    if "pt2" in formats:
        files.append(
            f"- `{PT2_FILE}`: a `torch.export` program; needs only torch. It holds pickled "
            "data: load it only from a source you trust"
        )
    if "onnx" in formats:
        files.append(
            f"- `{ONNX_FILE}`: ONNX, checked with onnxruntime; load it only from a source you trust"
        )
    labels = ", ".join(f"{name} = {value}" for name, value in card.labels.items())
    if card.regions is not None:
        labels += "; regions " + ", ".join(
            f"{name} = {list(values)}" for name, values in card.regions.items()
        )
    used = ", ".join(prep.input_channels[c] for c in prep.channels)
    unit = f"Slices along RAS axis {inf.slice_axis}" if inf.spatial_dims == 2 else "Volumes"
    output = {
        "sigmoid": "one logit (sigmoid > 0.5 is foreground)",
        "softmax": "one logit per class (argmax)",
        "regions": "one logit per region; where its sigmoid > 0.5, each region writes its "
        f"value of {list(card.regions_class_order or ())} in turn (later regions overwrite "
        "earlier ones)",
    }[inf.output]
    multiple = " x ".join(str(m) for m in inf.size_multiple)
    weights = source["weights"]
    trained = [f"{weights['epochs_run']} epochs"] if weights.get("epochs_run") else []
    trained += [
        f"{label} {weights[key]:.4f}"
        for key, label in (("val_iou", "validation IoU"), ("val_dice", "Dice"))
        if weights.get(key) is not None
    ]
    volume = source.get("volume_val_iou")
    whole = "" if volume is None else f"; IoU {volume:.4f} on the whole validation volumes"
    return f"""# {source["study"]} trial {source["trial"]}: a {inf.spatial_dims}D U-Net

- Parameters: {source["n_params"]:,}
- Validation IoU {source["val_iou"]:.4f}, Dice {source["val_dice"]:.4f} in the search \
(fold {source["fold"]} of {source["dataset"]}){whole}
- Weights: {weights["kind"]} (`{weights["path"]}`){": " + ", ".join(trained) if trained else ""}
- Labels (mask voxel values): {labels}
- Exported {source["exported_at"]} from {source["storage"]}

## Files
{chr(10).join(files)}

## Input
Channels {", ".join(prep.input_channels)} (files `_0000`, `_0001`, ... or one 4D image); the
network reads {used}. Each scan is reoriented to RAS, cropped to its nonzero box, resampled
to {list(prep.target_spacing_mm)} mm (linear) and z-scored per channel as `{CARD_FILE}`
records. {unit} are predicted with sliding windows of {list(inf.patch_size)}; the output is
{output}.

## Use
```bash
python -m nas.predict THIS_FOLDER scan.nii.gz mask.nii.gz   # with the preprocessing
```
```python
import nas
model = nas.load("THIS_FOLDER")  # the nn.Module in eval mode, with its weights

import torch  # no nas needed
program = torch.export.load("THIS_FOLDER/{PT2_FILE}").module()
```
The exported programs take a batch `(B, {len(prep.channels)}, ...)` of preprocessed images
whose spatial sizes are multiples of {multiple}, at least twice that.
"""


def _export_files() -> frozenset[str]:
    """Everything an export writes (ONNX puts weights over 2 GB in model.onnx.data); a folder
    holding anything else is someone's own and is never replaced."""
    from nas.inference import ONNX_FILE, PT2_FILE
    from nas.model_card import CARD_FILE, WEIGHTS_FILE

    return frozenset(
        {CARD_FILE, WEIGHTS_FILE, PT2_FILE, ONNX_FILE, f"{ONNX_FILE}.data", README_FILE}
    )


def _written_by_export(entry: Path) -> bool:
    """A file an export writes, or an ensemble member's folder holding only such files."""
    export_files = _export_files()
    if entry.is_symlink():
        return False
    if entry.is_dir():
        return bool(MEMBER_FOLDER.match(entry.name)) and all(
            e.is_file() and not e.is_symlink() and e.name in export_files for e in entry.iterdir()
        )
    return entry.is_file() and entry.name in export_files


def _refuse_unsafe_destination(out: Path, keep: dict[Path, str]) -> None:
    """Refuse, --force or not, an --out whose replacement would delete what no export wrote:
    a file, a link, a folder holding `keep` (the study's own files, each with what it is) or
    anything else, or a folder without a model description."""
    from nas.model_card import CARD_FILE

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


def _check_destination(out: Path, source: dict, force: bool, keep: dict[Path, str]) -> None:
    from nas.model_card import CARD_FILE, read_card

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


def _given_weights(weights: Path | dict[str, Path]) -> dict:
    """source.weights for weights handed to `export` without a description."""
    if isinstance(weights, Path):
        return {"kind": "file", "path": str(weights)}
    return {"kind": "files", "path": {name: str(path) for name, path in weights.items()}}


def _deployed_networks(unet, members: dict[str, Path]) -> tuple:
    """(the deployed UNetConfig, {member name: network in eval mode}): each member's weights
    loaded into the trained network, then deep supervision's heads dropped."""
    from nas.builder import build_unet, deployed
    from nas.state_dict import load_weights

    networks = {}
    deployed_unet = unet
    for name, path in members.items():
        trained = build_unet(unet)
        load_weights(trained, path)
        deployed_unet, state = deployed(unet, trained.state_dict())
        networks[name] = build_unet(deployed_unet)
        networks[name].load_state_dict(state)
        networks[name].eval()
    return deployed_unet, networks


def _source(study, trial, record, model, recorded, storage: str, weights_source: dict) -> dict:
    """The card's `source`: where the model came from (`recorded`: the study's StudyRecord)
    and what the search measured: its score on the validation patches and, once the run
    scored its front on the whole validation volumes, that score too."""
    import torch

    from nas.builder import count_parameters
    from nas.objectives import OBJECTIVES
    from nas.record import study_objectives
    from nas.storage import redact

    data_config = recorded.data_config or {}
    whole_volumes = recorded.volume_scores.get(str(trial.number), {})
    return {
        "study": study.study_name,
        "trial": trial.number,
        "storage": redact(storage),
        "n_params": count_parameters(model),
        "val_iou": record.iou,
        "val_dice": record.quantity("dice"),
        "val_case_dice": record.quantity("case_dice"),
        "volume_val_iou": whole_volumes.get("iou"),
        "objectives": study_objectives(study).names,
        # Every measured objective, as the search recorded it (None: not measured).
        "measured": {name: record.quantity(name) for name in OBJECTIVES},
        "dataset": data_config.get("path"),
        "fold": data_config.get("fold"),
        "epochs_run": record.epochs_run,
        # The weights exported: kind, path (relative to the results folder), their scores.
        "weights": weights_source,
        "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
    }


def _write_networks(staging: Path, networks: dict, example, formats: Sequence[str]) -> dict:
    """Each member's weights (and pt2/onnx programs) into its subfolder of `staging` ("" is
    the folder itself); returns each program's largest difference from eager."""
    import torch

    from nas.inference import ONNX_FILE, PT2_FILE
    from nas.model_card import WEIGHTS_FILE

    checks = {}
    for name, network in networks.items():
        folder = staging / name
        folder.mkdir(exist_ok=True)
        torch.save(network.state_dict(), folder / WEIGHTS_FILE)
        if "pt2" in formats:
            checks[f"{name}/{PT2_FILE}".lstrip("/")] = export_pt2(
                network, example, folder / PT2_FILE
            )
        if "onnx" in formats:
            checks[f"{name}/{ONNX_FILE}".lstrip("/")] = export_onnx(
                network, example, folder / ONNX_FILE
            )
    return checks


def export(
    study: optuna.Study,
    trial: FrozenTrial,
    weights: Path | dict[str, Path],
    out: Path,
    formats: Sequence[str],
    storage: str,
    force: bool = False,
    results: Path | None = None,
    tta: str = "none",
    postprocessing: Sequence[str] = (),
    weights_source: dict | None = None,
) -> ModelCard:
    """Write `trial` with `weights` as a model folder at `out`. `weights`: one file, or an
    ensemble's members by subfolder name. `tta`, `postprocessing` (class names reduced to
    their largest component) and `weights_source` (which weights these are, as
    `TrialWeights.describe` gives it; default: the file's path) go into the card. `storage`
    is only recorded, without its password; `results`, the study's folder, is never replaced
    or deleted."""
    from nas.labels import LabelScheme
    from nas.model_card import Inference, ModelCard, Postprocessing, write_card
    from nas.record import StudyRecord, TrialRecord
    from nas.storage import local_file

    record = TrialRecord.of(trial)
    unet = record.unet()
    train = record.train()
    data = _data_description(study)
    scheme = LabelScheme.from_description(data)
    if unet.out_channels != scheme.out_channels:
        raise NasError(
            study.study_name,
            f"trial {trial.number} has {unet.out_channels} outputs; the study's labels give "
            f"{scheme.out_channels} ({scheme.output})",
        )
    members = {"": weights} if isinstance(weights, Path) else dict(weights)
    unet, networks = _deployed_networks(unet, members)
    model = next(iter(networks.values()))
    recorded = StudyRecord.of(study)
    data_config = recorded.data_config or {}
    inference = Inference(
        spatial_dims=unet.spatial_dims,
        slice_axis=data_config.get("slice_axis", 2),
        patch_size=train.patch_size(unet.spatial_dims),
        size_multiple=model.size_multiple,
        output=scheme.output,
        tta=tta,
    )
    given = weights_source or _given_weights(weights)
    source = _source(study, trial, record, model, recorded, storage, given)
    keep = {results: "results folder"} if results is not None else {}
    database = local_file(storage)
    keep |= {database: "database"} if database else {}
    keep |= {path: "weights" for path in members.values()}
    _check_destination(out, source, force, keep)
    remove_stale_staging(out.parent)
    with staging_folder(out) as staging:
        example = _example_input(model, inference, unet.in_channels)
        source["max_abs_difference_from_eager"] = _write_networks(
            staging, networks, example, formats
        )
        card = ModelCard(
            architecture=unet.to_dict(),
            preprocessing=data["preprocessing"],
            inference=inference,
            labels=data["labels"],
            regions=data.get("regions"),
            regions_class_order=data.get("regions_class_order"),
            source=source,
            postprocessing=Postprocessing(largest_component=tuple(postprocessing)),
            members=tuple(name for name in members if name),
        )
        write_card(staging, card)
        (staging / README_FILE).write_text(_readme(card, formats))
        _check_destination(out, source, force, keep)  # again: the export took a while
        replace_folder(staging, out)
    return card


ENSEMBLE_MEMBER = re.compile(r"^trial_\d{4,}$")


def _check_ensemble_destination(
    out: Path, source: dict, force: bool, keep: dict[Path, str]
) -> None:
    """An ensemble goes only into a new or empty folder, or over an earlier ensemble export
    (of other members only with --force); never over anything else."""
    from nas.model_card import ENSEMBLE_FILE, read_ensemble_card

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
        member = entry.is_dir() and not entry.is_symlink() and ENSEMBLE_MEMBER.match(entry.name)
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


def _member_weights(study: optuna.Study, results: Path, trial: FrozenTrial, wanted: str):
    """An ensemble member's weights: with "auto", its all-cases model where nas retrain
    --all-cases trained one, else its folds, the models the ensemble was chosen on."""
    if wanted != "auto":
        return find_weights(study, results, trial, wanted)
    try:
        return find_weights(study, results, trial, "all-cases")
    except NasError:
        return find_weights(study, results, trial, "folds")


def export_members(
    study: optuna.Study,
    results: Path,
    trials: Sequence[FrozenTrial],
    out: Path,
    formats: Sequence[str],
    storage: str,
    weights_kind: str = "auto",
    force: bool = False,
    tta: str = "none",
    postprocessing: Sequence[str] = (),
    scores: dict | None = None,
) -> list[str]:
    """Write different networks as one ensemble folder: a model folder per trial (each as
    `export` writes it, with its `weights_kind` weights; auto: its all-cases model, else its
    folds) and ensemble.yaml; nas.predict averages their probabilities. The member folders'
    names."""
    from nas.model_card import EnsembleCard, Postprocessing, write_ensemble_card
    from nas.storage import redact

    source = {
        "study": study.study_name,
        "trials": [t.number for t in trials],
        "storage": redact(storage),
        "chosen_by": "cross-validation, out of fold",
        **(scores or {}),
        "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    keep = {results: "results folder"}
    found = [_member_weights(study, results, t, weights_kind) for t in trials]
    _check_ensemble_destination(out, source, force, keep)
    remove_stale_staging(out.parent)
    names = [trial_name(t.number) for t in trials]
    with staging_folder(out) as staging:
        for trial, weights, name in zip(trials, found, names, strict=True):
            export(study, trial, weights.files, staging / name, formats, storage, True, results,
                   tta, (), weights.describe(results))  # fmt: skip
        card = EnsembleCard(
            members=tuple(names),
            postprocessing=Postprocessing(largest_component=tuple(postprocessing)),
            source=source,
        )
        write_ensemble_card(staging, card)
        (staging / README_FILE).write_text(
            f"# An ensemble of {len(trials)} networks of study {study.study_name!r}\n\n"
            f"Members (each a model folder of its own): {', '.join(names)}. `nas predict` "
            "averages their probabilities on each scan's grid, then labels them"
            + (
                f" and keeps the largest component of {', '.join(postprocessing)}"
                if postprocessing
                else ""
            )
            + ".\n\n```bash\npython -m nas.predict THIS_FOLDER scans/ masks/\n```\n"
        )
        _check_ensemble_destination(out, source, force, keep)
        replace_folder(staging, out)
    return names


def _run_members(args: argparse.Namespace, study: optuna.Study) -> int:
    """--ensemble members: the ensemble nas retrain --folds chose out of fold."""
    from nas.companions import find_crossval_study
    from nas.member_ensemble import chosen_trials, recorded
    from nas.study import default_storage

    if args.trial is not None or args.max_params is not None:
        raise NasError(
            "--ensemble members",
            "exports the ensemble chosen out of fold; drop --trial and --max-params",
        )
    _, chosen = recorded(find_crossval_study(study))
    if chosen is None:
        raise NasError(
            "--ensemble members",
            f"study {study.study_name!r} has no ensemble chosen out of fold: run nas retrain "
            f"{args.results} --trials A,B --folds all first",
        )
    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    trials = [by_number[n] for n in chosen_trials(chosen)]
    if len(trials) == 1:
        raise NasError(
            "--ensemble members",
            f"out of fold, trial {trials[0].number} alone beat every ensemble; export it with "
            f"--trial {trials[0].number}",
        )
    name = "ensemble_" + "_".join(str(t.number) for t in trials)
    out = args.out or args.results / "export" / name
    check_output_folder(out.parent)
    storage = args.storage or default_storage(args.results.resolve())
    postprocessing = chosen["largest_component"].split()
    scores = {"oof_iou": chosen["oof_iou"], "oof_dice": chosen["oof_dice"]}
    export_members(study, args.results, trials, out, parse_formats(args.format), storage,
                   args.weights, args.force, args.tta, postprocessing, scores)  # fmt: skip
    print(
        f"exported the ensemble of trials {', '.join(str(t.number) for t in trials)} "
        f"(out-of-fold IoU {chosen['oof_iou']:.4f}) to {out}/"
    )
    return 0


def run(args: argparse.Namespace) -> int:
    from nas.model_card import CARD_FILE, WEIGHTS_FILE
    from nas.study import default_storage, load_results_study

    formats = parse_formats(args.format)
    if args.ensemble == "folds" and args.weights not in ("auto", "folds"):
        raise NasError(
            "--weights", f"--ensemble folds exports the folds' weights, not the {args.weights}'s"
        )
    study = load_results_study(args.results, args.storage)
    if args.ensemble == "members":
        return _run_members(args, study)
    trial = choose_trial(study, args.trial, args.max_params, args.by, args.best_score)
    wanted = "folds" if args.ensemble == "folds" else args.weights
    weights = find_weights(study, args.results, trial, wanted)

    from nas.companions import find_crossval_study
    from nas.record import StudyRecord

    storage = args.storage or default_storage(args.results)
    crossval = find_crossval_study(study)
    postprocessing = []
    if crossval is not None:
        postprocessing = StudyRecord.of(crossval).postprocessing.get(str(trial.number), [])
    out = args.out or args.results / "export" / trial_name(trial.number)
    check_output_folder(out.parent)
    if args.storage is None:  # recorded absolute, for use from any folder
        storage = default_storage(args.results.resolve())
    card = export(
        study, trial, weights.files, out, formats, storage, args.force, args.results, args.tta,
        postprocessing, weights.describe(args.results),
    )  # fmt: skip
    files = [WEIGHTS_FILE, *(f"model.{f}" for f in formats)]
    if card.members:
        files = [f"{{{','.join(card.members)}}}/{{{','.join(files)}}}"]
    chosen_by = "chosen by cross-validation; " if args.by == "cv" and args.trial is None else ""
    print(
        f"exported trial {trial.number} ({chosen_by}{card.source['n_params']:,} params, "
        f"IoU {card.source['val_iou']:.4f}) with its {weights.kind} weights ({weights.path}) "
        f"to {out}/: " + ", ".join([CARD_FILE, *files, README_FILE])
    )
    if card.postprocessing.largest_component:
        print(
            "  postprocessing: largest connected component of "
            + ", ".join(card.postprocessing.largest_component)
        )
    if args.trial is None and args.max_params is None and args.by == "search":
        print("  " + _why_chosen(study, trial.number, args.best_score))
    for name, difference in card.source["max_abs_difference_from_eager"].items():
        print(f"  {name}: max |difference| from the eager model {difference:.2e}")
    return 0


def _why_chosen(study: optuna.Study, number: int, best_score: bool) -> str:
    """The line that says how --best or --best-score chose."""
    best, chosen, intervals = one_standard_error(study)

    def scored(n: int) -> str:
        known = intervals.get(n)
        return f"trial {n} ({known.score:.4f} +- {known.se:.4f})" if known else f"trial {n}"

    if best_score:
        other = "" if chosen == best else f"; --best would take {scored(chosen)}"
        return f"chosen by the highest score: {scored(best)}{other}"
    if chosen == best:
        return f"chosen: {scored(best)}, the best score, and no smaller member within its error"
    return (
        f"chosen by the one-standard-error rule: {scored(chosen)}, the smallest front member "
        f"whose score reaches the best, {scored(best)}, within the standard error of their "
        f"difference over the validation cases; --best-score exports trial {best}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    return exit_code(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
