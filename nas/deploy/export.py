"""Write one architecture of the front, or an ensemble, as a model folder: architecture.yaml
(the model card), weights.pt, the pt2 and ONNX programs checked against the eager network, and a
README; into a destination nas made or was told to make, never over a foreign file.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import warnings
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from nas.core.errors import NasError
from nas.core.staging import (
    remove_stale_staging,
    replace_folder,
    staging_folder,
)
from nas.search.weights import find_weights, trial_name

if TYPE_CHECKING:
    import numpy as np
    import optuna
    import torch
    from optuna.trial import FrozenTrial

    from nas.network.builder import UNet
    from nas.network.model_card import Inference, ModelCard


# An exported program must give the eager model's logits within this (float32 round-off).
RTOL, ATOL = 1e-3, 1e-4


FORMATS = ("pt2", "onnx")


README_FILE = "README.md"


MEMBER_FOLDER = re.compile(r"^fold_\d+$")


def _data_description(study: optuna.Study) -> dict:
    from nas.data import DataConfig, load_dataset
    from nas.network.model_card import describe_data
    from nas.search.record import StudyRecord

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
    from nas.core.errors import validation_problem
    from nas.data.labels import LabelScheme
    from nas.network.model_card import Preprocessing

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
    from nas.network.inference import ONNX_FILE, PT2_FILE
    from nas.network.model_card import CARD_FILE, WEIGHTS_FILE

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
        return bool(MEMBER_FOLDER.match(entry.name)) and all(
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


def _check_destination(out: Path, source: dict, force: bool, keep: dict[Path, str]) -> None:
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


def _given_weights(weights: Path | dict[str, Path]) -> dict:
    """source.weights for weights handed to `export` without a description."""
    if isinstance(weights, Path):
        return {"kind": "file", "path": str(weights)}
    return {"kind": "files", "path": {name: str(path) for name, path in weights.items()}}


def _deployed_networks(unet, members: dict[str, Path]) -> tuple:
    """(the deployed UNetConfig, {member name: network in eval mode}): each member's weights
    loaded into the trained network, then deep supervision's heads dropped."""
    from nas.network.builder import build_unet, deployed
    from nas.network.state_dict import load_weights

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

    from nas.network.builder import count_parameters
    from nas.search.objectives import OBJECTIVES
    from nas.search.record import study_objectives
    from nas.search.storage import redact

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

    from nas.network.inference import ONNX_FILE, PT2_FILE
    from nas.network.model_card import WEIGHTS_FILE

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
    from nas.data.labels import LabelScheme
    from nas.network.model_card import Inference, ModelCard, Postprocessing, write_card
    from nas.search.record import StudyRecord, TrialRecord
    from nas.search.storage import local_file

    record = TrialRecord.of(trial)
    candidate = record.candidate()
    unet, train = candidate.unet, candidate.train
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
    from nas.network.model_card import EnsembleCard, Postprocessing, write_ensemble_card
    from nas.search.storage import redact

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
