"""The README.md of an exported model folder, and of an ensemble's folder: what the files are,
what the network expects and outputs, and how to use it, written from the model card alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nas.network.model_card import ModelCard

README_FILE = "README.md"


def _files(formats: Sequence[str]) -> list[str]:
    """A line for each file of the folder."""
    from nas.network.inference import ONNX_FILE, PT2_FILE
    from nas.network.model_card import CARD_FILE, WEIGHTS_FILE

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
    return files


def _labels(card: ModelCard) -> str:
    """The mask's voxel values, and the regions where the network predicts regions."""
    labels = ", ".join(f"{name} = {value}" for name, value in card.labels.items())
    if card.regions is not None:
        labels += "; regions " + ", ".join(
            f"{name} = {list(values)}" for name, values in card.regions.items()
        )
    return labels


def _output(card: ModelCard) -> str:
    """What the network's logits are and how they become labels."""
    return {
        "sigmoid": "one logit (sigmoid > 0.5 is foreground)",
        "softmax": "one logit per class (argmax)",
        "regions": "one logit per region; where its sigmoid > 0.5, each region writes its "
        f"value of {list(card.regions_class_order or ())} in turn (later regions overwrite "
        "earlier ones)",
    }[card.inference.output]


def _trained(weights: dict) -> str:
    """How long the exported weights trained and what they scored, after a colon; or ""."""
    trained = [f"{weights['epochs_run']} epochs"] if weights.get("epochs_run") else []
    trained += [
        f"{label} {weights[key]:.4f}"
        for key, label in (("val_iou", "validation IoU"), ("val_dice", "Dice"))
        if weights.get(key) is not None
    ]
    return ": " + ", ".join(trained) if trained else ""


def model_readme(card: ModelCard, formats: Sequence[str]) -> str:
    """The README of a model folder with the programs of `formats`."""
    from nas.network.inference import PT2_FILE
    from nas.network.model_card import CARD_FILE

    source, prep, inf = card.source, card.preprocessing, card.inference
    used = ", ".join(prep.input_channels[c] for c in prep.channels)
    unit = f"Slices along RAS axis {inf.slice_axis}" if inf.spatial_dims == 2 else "Volumes"
    multiple = " x ".join(str(m) for m in inf.size_multiple)
    weights = source["weights"]
    volume = source.get("volume_val_iou")
    whole = "" if volume is None else f"; IoU {volume:.4f} on the whole validation volumes"
    return f"""# {source["study"]} trial {source["trial"]}: a {inf.spatial_dims}D U-Net

- Parameters: {source["n_params"]:,}
- Validation IoU {source["val_iou"]:.4f}, Dice {source["val_dice"]:.4f} in the search \
(fold {source["fold"]} of {source["dataset"]}){whole}
- Weights: {weights["kind"]} (`{weights["path"]}`){_trained(weights)}
- Labels (mask voxel values): {_labels(card)}
- Exported {source["exported_at"]} from {source["storage"]}

## Files
{chr(10).join(_files(formats))}

## Input
Channels {", ".join(prep.input_channels)} (files `_0000`, `_0001`, ... or one 4D image); the
network reads {used}. Each scan is reoriented to RAS, cropped to its nonzero box, resampled
to {list(prep.target_spacing_mm)} mm (linear) and z-scored per channel as `{CARD_FILE}`
records. {unit} are predicted with sliding windows of {list(inf.patch_size)}; the output is
{_output(card)}.

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


def ensemble_readme(study_name: str, names: Sequence[str], postprocessing: Sequence[str]) -> str:
    """The README of an ensemble's folder: its member folders `names`, and the classes whose
    largest component `postprocessing` keeps."""
    return (
        f"# An ensemble of {len(names)} networks of study {study_name!r}\n\n"
        f"Members (each a model folder of its own): {', '.join(names)}. `nas predict` "
        "averages their probabilities on each scan's grid, then labels them"
        + (
            f" and keeps the largest component of {', '.join(postprocessing)}"
            if postprocessing
            else ""
        )
        + ".\n\n```bash\npython -m nas.predict THIS_FOLDER scans/ masks/\n```\n"
    )
