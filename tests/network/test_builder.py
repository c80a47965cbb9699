"""The builder: shapes in 2D and 3D, any input size, every option, exact parameter counts."""

import itertools

import pytest
import torch
from pydantic import ValidationError

from nas import UNetConfig, build_unet, count_parameters


def _output(model, *spatial, batch=2, channels=1):
    model.eval()
    with torch.no_grad():
        return model(torch.randn(batch, channels, *spatial))


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("out_channels", [1, 3])
def test_output_has_input_spatial_shape_and_requested_channels(spatial_dims, out_channels):
    model = build_unet(
        spatial_dims=spatial_dims,
        in_channels=2,
        out_channels=out_channels,
        depth=3,
        base_channels=4,
    )
    spatial = (32, 24) if spatial_dims == 2 else (16, 16, 8)
    assert _output(model, *spatial, channels=2).shape == (2, out_channels, *spatial)


@pytest.mark.parametrize(
    ("spatial_dims", "spatial"),
    [(2, (37, 45)), (2, (5, 3)), (3, (33, 29, 13)), (3, (7, 9, 3))],
)
def test_odd_input_sizes_are_padded_and_cropped_back(spatial_dims, spatial):
    model = build_unet(spatial_dims=spatial_dims, depth=4, base_channels=4)
    assert _output(model, *spatial).shape == (2, 1, *spatial)


def test_odd_input_equals_the_zero_padded_input_cropped_back():
    torch.manual_seed(0)
    model = build_unet(spatial_dims=2, depth=3, base_channels=4).eval()
    padded = torch.randn(1, 1, 32, 32)
    padded[..., 31:, :] = 0
    padded[..., :, 30:] = 0
    with torch.no_grad():
        expected = model(padded)[..., :31, :30]
        assert torch.allclose(model(padded[..., :31, :30]), expected, atol=1e-6)


@pytest.mark.parametrize(
    "options",
    [
        dict(skip_mode="concat"),
        dict(skip_mode="add"),
        dict(skips=False),
        dict(skips=(True, False, True)),
        dict(skips=(False, False, True), skip_mode="add"),
    ],
)
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_every_skip_mode_builds_and_runs(options, spatial_dims):
    model = build_unet(spatial_dims=spatial_dims, depth=4, base_channels=4, **options)
    spatial = (16, 16) if spatial_dims == 2 else (16, 16, 8)
    assert _output(model, *spatial).shape == (2, 1, *spatial)


def test_concat_skips_have_more_parameters_than_add_and_none_fewest():
    counts = {
        name: count_parameters(build_unet(depth=3, base_channels=8, **opts))
        for name, opts in {
            "concat": dict(skip_mode="concat"),
            "add": dict(skip_mode="add"),
            "none": dict(skips=False),
        }.items()
    }
    assert counts["concat"] > counts["add"] == counts["none"]


def test_without_skips_the_decoder_ignores_the_encoder_features():
    model = build_unet(spatial_dims=2, depth=3, base_channels=4, skips=False, norm="none").eval()
    skips = model.encoder(torch.randn(1, 1, 16, 16))
    changed = [s.clone() for s in skips]
    changed[0] += 100.0  # the highest-resolution skip
    assert torch.equal(model.decoder(skips), model.decoder(changed))


@pytest.mark.parametrize("depth", [1, 2, 6])
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_depth_extremes(depth, spatial_dims):
    model = build_unet(spatial_dims=spatial_dims, depth=depth, base_channels=4)
    assert len(model.encoder.stages) == depth
    assert len(model.decoder.blocks) == depth - 1
    spatial = (20, 12) if spatial_dims == 2 else (10, 12, 6)
    assert _output(model, *spatial, batch=1).shape == (1, 1, *spatial)


@pytest.mark.parametrize(
    ("norm", "activation", "upsampling", "residual", "dropout"),
    list(
        itertools.product(
            ["batch", "instance", "group", "none"],
            ["relu", "leaky_relu", "gelu"],
            ["transposed", "interpolate"],
            [False, True],
            [0.0, 0.2],
        )
    )[::5],
)
def test_option_combinations_run_in_2d_and_3d(norm, activation, upsampling, residual, dropout):
    for spatial_dims, spatial in ((2, (12, 20)), (3, (12, 8, 8))):
        model = build_unet(
            spatial_dims=spatial_dims,
            depth=3,
            base_channels=6,
            channel_growth=1.5,
            norm=norm,
            activation=activation,
            upsampling=upsampling,
            residual=residual,
            dropout=dropout,
        )
        assert _output(model, *spatial).shape == (2, 1, *spatial)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_parameter_count_matches_a_hand_count_with_norms_and_upsampling(spatial_dims):
    # Depth 2, 4 -> 8 channels, the defaults: two convs a stage without bias (an instance norm
    # with a weight and a bias per channel follows each), a 2x transposed conv with bias, the
    # decoder block reading the concatenated 4 + 4 channels, a 1x1 head with bias.
    kernel, up_kernel = 3**spatial_dims, 2**spatial_dims
    conv_weights = (1 * 4 + 4 * 4) + (4 * 8 + 8 * 8) + (8 * 4 + 4 * 4)
    norm_affine = 2 * (4 + 4 + 8 + 8 + 4 + 4)
    expected = conv_weights * kernel + norm_affine + (8 * 4 * up_kernel + 4) + (4 * 1 + 1)
    model = build_unet(spatial_dims=spatial_dims, depth=2, base_channels=4)
    assert count_parameters(model) == expected


def test_deep_supervision_heads_are_not_counted():
    plain = build_unet(spatial_dims=2, depth=3, base_channels=4)
    supervised = build_unet(spatial_dims=2, depth=3, base_channels=4, deep_supervision=True)
    everything = sum(p.numel() for p in supervised.parameters())
    assert count_parameters(supervised) == count_parameters(plain) < everything


def test_parameter_count_matches_a_hand_count():
    # depth 1, one 3x3 conv without norm (so with bias), 1 -> 4 channels, then a 1x1 head 4 -> 1.
    model = build_unet(spatial_dims=2, depth=1, base_channels=4, convs_per_stage=1, norm="none")
    assert count_parameters(model) == (1 * 4 * 9 + 4) + (4 * 1 + 1)
    model3d = build_unet(spatial_dims=3, depth=1, base_channels=4, convs_per_stage=1, norm="none")
    assert count_parameters(model3d) == (1 * 4 * 27 + 4) + (4 * 1 + 1)


def test_channels_grow_per_stage_and_are_capped():
    cfg = UNetConfig(depth=5, base_channels=16, channel_growth=1.5, max_channels=50)
    assert cfg.features_per_stage == (16, 24, 36, 50, 50)


def test_anisotropic_stages_keep_the_slice_axis():
    cfg = UNetConfig(spatial_dims=3, depth=3, anisotropic_stages=1)
    assert cfg.strides == ((1, 1, 1), (2, 2, 1), (2, 2, 2))
    model = build_unet(cfg)
    assert model.size_multiple == (4, 4, 2)
    assert _output(model, 16, 16, 6).shape == (2, 1, 16, 16, 6)


def test_anisotropic_stages_beyond_depth_keep_the_slice_axis_everywhere():
    cfg = UNetConfig(spatial_dims=3, depth=2, anisotropic_stages=3)
    assert cfg.strides == ((1, 1, 1), (2, 2, 1))


def test_per_stage_kernel_sizes():
    model = build_unet(spatial_dims=2, depth=3, kernel_size=(3, 5, 7), base_channels=4)
    kernels = [stage.body[0].kernel_size for stage in model.encoder.stages]
    assert kernels == [(3, 3), (5, 5), (7, 7)]


def test_config_round_trips_through_a_dict():
    cfg = UNetConfig(spatial_dims=3, depth=3, skips=(True, False), kernel_size=(3, 5, 3))
    assert UNetConfig.from_dict(cfg.to_dict()) == cfg
    rebuilt = build_unet(**cfg.to_dict())
    assert count_parameters(rebuilt) == count_parameters(build_unet(cfg))


@pytest.mark.parametrize(
    "bad",
    [
        dict(kernel_size=4),
        dict(depth=0),
        dict(depth=3, skips=(True,)),
        dict(spatial_dims=2, anisotropic_stages=1),
        dict(spatial_dims=3, anisotropic_stages=-1),
        dict(norm="layer"),
        dict(spatial_dims=4),
        dict(dropout=1.0),
        dict(unknown_option=1),
    ],
)
def test_invalid_configs_are_refused(bad):
    with pytest.raises((ValidationError, TypeError)):
        UNetConfig(**bad)
