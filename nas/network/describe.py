"""A network in words and numbers: the note each trial carries in optuna-dashboard, and the
one-line summary the report shows on hover.

Counts come from the module itself: parameters exactly, and multiply-accumulates for one
training patch through torch's FLOP counter (convolutions, transposed convolutions and
matrix products; one MAC is two FLOPs). Knows nothing of Optuna.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from nas.network.unet_config import UNetConfig


@torch.no_grad()
def count_macs(model: nn.Module, in_channels: int, patch_size: Sequence[int]) -> int:
    """Multiply-accumulates of one forward pass over a batch of one training patch."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with counter:
        model(torch.zeros(1, in_channels, *patch_size, device=device))
    model.train(was_training)
    return counter.get_total_flops() // 2


def _si(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.0f}"


def summary(cfg: UNetConfig, n_params: int) -> str:
    """One line: '2D, 4 stages 16-32-64-128, k3, 2 convs, instance, skips 1111, 107k params'."""
    skips = "".join("1" if s else "0" for s in cfg.skips_per_stage) or "-"
    kernels = sorted(set(cfg.kernel_sizes))
    kernel = "k" + "/".join(str(k) for k in kernels)
    extras = [cfg.norm, cfg.activation]
    if cfg.residual:
        extras.append("residual")
    if cfg.deep_supervision:
        extras.append("deep supervision")
    return (
        f"{cfg.spatial_dims}D, {cfg.depth} stages "
        f"{'-'.join(str(c) for c in cfg.features_per_stage)}, {kernel}, "
        f"{cfg.convs_per_stage} conv{'s' if cfg.convs_per_stage > 1 else ''}, "
        f"{', '.join(extras)}, skips {skips} ({cfg.skip_mode}), {_si(n_params)} params"
    )


def trial_note(
    number: int,
    cfg: UNetConfig,
    n_params: int,
    macs: int,
    patch_size: Sequence[int],
    outcome: dict[str, Any],
) -> str:
    """Markdown for optuna-dashboard: the architecture stage by stage, then how it did.

    outcome: state, and where known val_iou, val_dice, val_case_dice, epochs_run, seconds,
    device, reason.
    """
    header = "| stage | channels | kernel | stride | skip |\n|---|---|---|---|---|\n"
    rows = []
    skips = (*cfg.skips_per_stage, False)  # the bottleneck has no skip
    for stage, (channels, kernel, stride) in enumerate(
        zip(cfg.features_per_stage, cfg.kernel_sizes, cfg.strides, strict=True)
    ):
        skip = "bottleneck" if stage == cfg.depth - 1 else ("yes" if skips[stage] else "no")
        rows.append(f"| {stage} | {channels} | {kernel} | {'x'.join(map(str, stride))} | {skip} |")
    patch = " x ".join(str(p) for p in patch_size)
    lines = [
        f"## Trial {number}: {cfg.spatial_dims}D U-Net, {n_params:,} parameters",
        "",
        f"**{outcome.get('state', 'RUNNING')}**"
        + (f": {outcome['reason']}" if outcome.get("reason") else ""),
        "",
    ]
    scores = []
    if outcome.get("val_iou") is not None:
        scores.append(f"validation IoU **{outcome['val_iou']:.4f}**")
    if outcome.get("val_dice") is not None:
        scores.append(f"Dice {outcome['val_dice']:.4f}")
    if outcome.get("val_case_dice") is not None:
        scores.append(f"case Dice **{outcome['val_case_dice']:.4f}**")
    if outcome.get("epochs_run") is not None:
        scores.append(f"{outcome['epochs_run']} epochs")
    if outcome.get("seconds") is not None:
        scores.append(f"{outcome['seconds']:.1f} s on {outcome.get('device', '?')}")
    if scores:
        lines += [", ".join(scores), ""]
    lines += [
        f"- {n_params:,} parameters; {_si(macs)} multiply-accumulates per {patch} patch",
        f"- {cfg.convs_per_stage} convolution(s) per stage, {cfg.norm} norm, {cfg.activation}, "
        f"dropout {cfg.dropout:g}, {'residual' if cfg.residual else 'plain'} blocks",
        f"- upsampling: {cfg.upsampling}; skips joined by {cfg.skip_mode}",
        "",
        header + "\n".join(rows),
    ]
    return "\n".join(lines)
