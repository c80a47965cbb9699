"""An exported model's folder, loaded back: its network, or all its members as one predictor.

    architecture.yaml  the model card (nas/network/model_card.py): builder config, preprocessing,
                       inference settings, labels and regions, postprocessing, members, source
    weights.pt         the state_dict: torch.load(path, weights_only=True)
    model.pt2          a torch.export program: torch.export.load(path).module()
    model.onnx         on request, checked against the eager model with onnxruntime
    README.md          the same facts for a person
    fold_0/ ...        an ensemble instead: one subfolder per member (the folds of a
                       cross-validation), each with its weights.pt and programs

`load(folder)` rebuilds the network with `build_unet(**card.architecture)` and loads the
weights; `load_predictor(folder)` does so for every member and averages their probabilities.
Nothing in the folder is executed unless the pt2 engine is asked for, and the weights load
with weights_only=True. A description whose weights and one inference window would not fit
in the target device's memory is refused before any network is built.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from nas.core.resources import default_memory_limit_bytes
from nas.network.builder import build_unet
from nas.network.inference import TTA, Engine, Predictor, choose_engine, load_runner, onnx_fallback
from nas.network.inference import predictor as make_predictor
from nas.network.model_card import CARD_FILE, WEIGHTS_FILE, ModelCard, check_memory, read_card
from nas.network.state_dict import load_weights


def _load_network(card: ModelCard, member: Path, device: torch.device) -> nn.Module:
    model = build_unet(card.unet_config())
    load_weights(model, member / WEIGHTS_FILE)
    return model.to(device).eval()


def _open(folder: str | Path, device: str | torch.device) -> tuple[Path, ModelCard, torch.device]:
    """The folder, its card and the device, once the card is read and, on an accelerator,
    its weights and one inference window are known to fit the device's memory."""
    folder = Path(folder)
    card = read_card(folder)
    device = torch.device(device)
    if device.type != "cpu":
        limit = default_memory_limit_bytes(device)
        check_memory(folder / CARD_FILE, card, limit, device.type)
    return folder, card, device


def load(folder: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """The exported network in eval mode, with its weights, on `device` (for an ensemble,
    its first member; `load_predictor` uses them all)."""
    folder, card, device = _open(folder, device)
    return _load_network(card, card.member_folders(folder)[0], device)


def load_predictor(
    folder: str | Path,
    device: str | torch.device = "cpu",
    engine: Engine = "auto",
    tta: TTA | None = None,
) -> Predictor:
    """Every member of the exported model on `engine`, averaged, with the card's mirroring
    unless `tta` says otherwise. Where ONNX Runtime cannot use `device` and runs on the CPU
    instead, one line on stderr says so."""
    folder, card, device = _open(folder, device)
    cfg = card.unet_config()
    runners, engines = [], set()
    for member in card.member_folders(folder):
        engines.add(chosen := choose_engine(engine, member, device))
        # Loaded whatever the engine, so that a missing or foreign weights.pt is refused.
        network = _load_network(card, member, device)
        runners.append(load_runner(member, cfg, chosen, device, network))
    if "onnx" in engines and (fallback := onnx_fallback(device)):
        print(fallback, file=sys.stderr)
    inference = card.inference
    return make_predictor(runners, inference.output, cfg.spatial_dims, tta or inference.tta)
