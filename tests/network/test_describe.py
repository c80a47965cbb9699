"""The architecture in words and numbers: MACs, the one-line summary, the dashboard note."""

from __future__ import annotations

from nas import build_unet, count_parameters
from nas.network.describe import count_macs, summary, trial_note


def test_macs_are_counted_from_the_convolutions():
    # One 3x3 convolution 1 -> 4 channels and the 1x1 head 4 -> 1, on an 8 x 8 patch.
    model = build_unet(
        spatial_dims=2, depth=1, base_channels=4, convs_per_stage=1, norm="none", skips=False
    )
    assert count_macs(model, 1, (8, 8)) == 8 * 8 * (4 * 1 * 9 + 1 * 4 * 1)
    assert model.training  # left as it was


def test_summary_and_note_describe_the_network():
    model = build_unet(spatial_dims=3, depth=3, base_channels=8, skips=(True, False), residual=True)
    n_params = count_parameters(model)
    line = summary(model.config, n_params)
    assert line.startswith("3D, 3 stages 8-16-32, k3, 2 convs") and "skips 10" in line
    assert "residual" in line
    note = trial_note(
        7, model.config, n_params, 123_456_789, (32, 32, 16),
        {"state": "COMPLETE", "val_iou": 0.51234, "val_dice": 0.6, "epochs_run": 4,
         "seconds": 12.5, "device": "cpu"},
    )  # fmt: skip
    assert note.startswith(f"## Trial 7: 3D U-Net, {n_params:,} parameters")
    assert "validation IoU **0.5123**" in note and "123M multiply-accumulates" in note
    assert "32 x 32 x 16 patch" in note
    assert "| 2 | 32 | 3 | 2x2x2 | bottleneck |" in note and "| 1 | 16 | 3 | 2x2x2 | no |" in note
    failed = trial_note(
        8, model.config, n_params, 1, (32, 32, 16), {"state": "FAIL", "reason": "out of memory"}
    )
    assert "**FAIL**: out of memory" in failed and "validation IoU" not in failed
