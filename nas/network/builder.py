"""Build a 2D or 3D U-Net from a frozen `UNetConfig`.

The network is a composition, as in nnU-Net's dynamic-network-architectures: an encoder of
resolution stages that returns its skips, a decoder that consumes them, and a 1x1 head. 2D and
3D share every line; the convolution, normalisation, dropout and interpolation ops are chosen
once from `spatial_dims`. Deep supervision adds heads that only training reads; `deployed`
gives the network without them. The config itself is in nas.network.unet_config. This module knows
nothing of Optuna, YAML or data.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nas.network.unet_config import UNetConfig, padded_size


def _ops(spatial_dims: int) -> tuple[type[nn.Module], type[nn.Module], type[nn.Module]]:
    """Convolution, transposed convolution and channel dropout for 2D or 3D."""
    if spatial_dims == 2:
        return nn.Conv2d, nn.ConvTranspose2d, nn.Dropout2d
    return nn.Conv3d, nn.ConvTranspose3d, nn.Dropout3d


def _norm(kind: str, spatial_dims: int, channels: int) -> nn.Module:
    if kind == "batch":
        return (nn.BatchNorm2d if spatial_dims == 2 else nn.BatchNorm3d)(channels)
    if kind == "instance":
        instance_norm = nn.InstanceNorm2d if spatial_dims == 2 else nn.InstanceNorm3d
        return instance_norm(channels, affine=True)
    if kind == "group":
        # The largest group count up to 8 that divides the channels.
        groups = max(g for g in range(1, 9) if channels % g == 0)
        return nn.GroupNorm(groups, channels)
    return nn.Identity()


def _activation(kind: str) -> nn.Module:
    if kind == "relu":
        return nn.ReLU(inplace=True)
    if kind == "leaky_relu":
        return nn.LeakyReLU(0.01, inplace=True)
    return nn.GELU()


class ConvBlock(nn.Module):
    """`convs_per_stage` conv-norm-activation layers; the first applies the stage's stride.

    With `residual`, the input (projected by a strided 1x1 conv where shape changes) is added
    before the last activation, as in a ResNet basic block.
    """

    def __init__(
        self,
        cfg: UNetConfig,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: tuple[int, ...],
    ) -> None:
        super().__init__()
        conv, _, dropout = _ops(cfg.spatial_dims)
        bias = cfg.norm == "none"
        layers: list[nn.Module] = []
        for i in range(cfg.convs_per_stage):
            layers.append(
                conv(
                    in_channels if i == 0 else out_channels,
                    out_channels,
                    kernel_size,
                    stride=stride if i == 0 else 1,
                    padding=kernel_size // 2,
                    bias=bias,
                )
            )
            layers.append(_norm(cfg.norm, cfg.spatial_dims, out_channels))
            if cfg.dropout > 0:
                layers.append(dropout(cfg.dropout))
            if i < cfg.convs_per_stage - 1 or not cfg.residual:
                layers.append(_activation(cfg.activation))
        self.body = nn.Sequential(*layers)
        self.shortcut: nn.Module | None = None
        if cfg.residual:
            needs_projection = in_channels != out_channels or any(s != 1 for s in stride)
            self.shortcut = (
                nn.Sequential(
                    conv(in_channels, out_channels, 1, stride=stride, bias=bias),
                    _norm(cfg.norm, cfg.spatial_dims, out_channels),
                )
                if needs_projection
                else nn.Identity()
            )
            self.out_activation = _activation(cfg.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.shortcut is None:
            return self.body(x)
        return self.out_activation(self.body(x) + self.shortcut(x))


class Encoder(nn.Module):
    """Resolution stages from full to lowest; returns every stage's output (the skips)."""

    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__()
        channels = (cfg.in_channels, *cfg.features_per_stage)
        self.stages = nn.ModuleList(
            ConvBlock(cfg, channels[i], channels[i + 1], cfg.kernel_sizes[i], cfg.strides[i])
            for i in range(cfg.depth)
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs = []
        for stage in self.stages:
            x = stage(x)
            outputs.append(x)
        return outputs


class Upsample(nn.Module):
    """Double the resolution (per the stage's stride) and map to the target channels."""

    def __init__(self, cfg: UNetConfig, in_channels: int, out_channels: int, stride) -> None:
        super().__init__()
        conv, transposed_conv, _ = _ops(cfg.spatial_dims)
        self.stride = tuple(stride)
        self.transposed = cfg.upsampling == "transposed"
        if self.transposed:
            self.op = transposed_conv(in_channels, out_channels, self.stride, stride=self.stride)
        else:
            self.op = conv(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.transposed:
            return self.op(x)
        mode = "bilinear" if x.dim() == 4 else "trilinear"
        x = F.interpolate(x, scale_factor=self.stride, mode=mode, align_corners=False)
        return self.op(x)


class Decoder(nn.Module):
    """From the bottleneck up: upsample, join the stage's skip (if any), convolve."""

    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__()
        features = cfg.features_per_stage
        self.skip_mode = cfg.skip_mode
        self.skips = cfg.skips_per_stage
        self.upsamples = nn.ModuleList()
        self.blocks = nn.ModuleList()
        for stage in reversed(range(cfg.depth - 1)):
            self.upsamples.append(
                Upsample(cfg, features[stage + 1], features[stage], cfg.strides[stage + 1])
            )
            joined = features[stage]
            if self.skips[stage] and cfg.skip_mode == "concat":
                joined *= 2
            block_stride = (1,) * cfg.spatial_dims
            self.blocks.append(
                ConvBlock(cfg, joined, features[stage], cfg.kernel_sizes[stage], block_stride)
            )

    def stages(self, skips: list[torch.Tensor]) -> Iterator[torch.Tensor]:
        """Each decoder stage's output in turn, from just above the bottleneck up to full
        resolution (none at depth 1)."""
        x = skips[-1]
        stages = reversed(range(len(skips) - 1))
        for stage, upsample, block in zip(stages, self.upsamples, self.blocks, strict=True):
            x = upsample(x)
            if self.skips[stage]:
                x = (
                    torch.cat((x, skips[stage]), 1)
                    if self.skip_mode == "concat"
                    else x + skips[stage]
                )
            x = block(x)
            yield x

    def forward(self, skips: list[torch.Tensor]) -> torch.Tensor:
        x = skips[-1]  # depth 1: the bottleneck is the output
        for output in self.stages(skips):
            x = output  # only the latest stage's output stays referenced
        return x


class UNet(nn.Module):
    """Encoder, decoder and a 1x1 head; pads any input to the total stride and crops back.

    With `deep_supervision`, `aux_heads` holds a 1x1 head for each decoder stage below full
    resolution (the 1/2 stage's first), and in training mode the network returns a list of
    logits, full resolution first: [(B, K, *spatial), (B, K, *spatial / 2), ...], each stage's
    cropped to the part that covers the input (ceil(size / stage_downsampling) per axis). In
    eval mode it returns the full-resolution logits alone, as without deep supervision.
    """

    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__()
        self.config = cfg
        conv, _, _ = _ops(cfg.spatial_dims)
        features = cfg.features_per_stage
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.head = conv(features[0], cfg.out_channels, 1)
        # Built last, so that a seed gives the rest of the network the same initial weights
        # with deep supervision as without it.
        aux_stages = range(1, cfg.depth - 1) if cfg.deep_supervision else ()
        self.aux_heads = nn.ModuleList(conv(features[s], cfg.out_channels, 1) for s in aux_stages)
        self.size_multiple = cfg.size_multiple

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        spatial = x.shape[2:]  # x: (B, C, *spatial); the logits: (B, K, *spatial)
        padded = padded_size(self.config, spatial)
        if tuple(spatial) != padded:
            # F.pad takes (low, high) pairs starting from the last axis; pad at the high end only.
            pad_spec = [
                p
                for size, target in zip(spatial[::-1], padded[::-1], strict=True)
                for p in (0, target - size)
            ]
            x = F.pad(x, pad_spec)
        skips = self.encoder(x)
        if not (self.training and self.config.deep_supervision):
            return _crop(self.head(self.decoder(skips)), spatial)
        features = [*self.decoder.stages(skips)][::-1] or skips[-1:]  # full resolution first
        outputs = []
        for stage, (head, f) in enumerate(zip((self.head, *self.aux_heads), features, strict=True)):
            downsampling = self.config.stage_downsampling[stage]
            covered = [-(-size // d) for size, d in zip(spatial, downsampling, strict=True)]
            outputs.append(_crop(head(f), covered))
        return outputs


def _crop(x: torch.Tensor, spatial: Sequence[int]) -> torch.Tensor:
    """The first `spatial` voxels of each spatial axis of x (B, C, *spatial_padded)."""
    return x[(..., *(slice(0, size) for size in spatial))]


def build_unet(cfg: UNetConfig | None = None, /, **overrides: Any) -> UNet:
    """Build a U-Net from a config, or from keyword arguments in one line.

    `build_unet(spatial_dims=3, in_channels=1, out_channels=2, depth=4, base_channels=16)`
    """
    if cfg is None:
        cfg = UNetConfig.from_dict(overrides)
    elif overrides:
        cfg = UNetConfig.from_dict({**cfg.to_dict(), **overrides})
    return UNet(cfg)


def count_parameters(model: nn.Module) -> int:
    """The exact number of parameters of the built module as deployed (the search's size
    objective): deep supervision's heads, which only training reads, are not counted."""
    total = sum(p.numel() for p in model.parameters())
    if isinstance(model, UNet):
        total -= sum(p.numel() for p in model.aux_heads.parameters())
    return total


def deployed(
    cfg: UNetConfig, state_dict: Mapping[str, torch.Tensor]
) -> tuple[UNetConfig, dict[str, torch.Tensor]]:
    """The config and weights of the network as it is used after training: without deep
    supervision and its heads, so it computes exactly the trained network's eval output."""
    kept = {k: v for k, v in state_dict.items() if not k.startswith("aux_heads.")}
    return dataclasses.replace(cfg, deep_supervision=False), kept
